import json

import numpy as np
from safetensors import safe_open

from fedapp.server.results import RunResults, load_weights

# The atomic writes themselves (a crash keeps the old file, no temp file is left) are tested in
# tests/test_files.py.


def test_run_results_layout(tmp_path):
    results = RunResults(tmp_path / "run")
    results.write_config({"model": "tiny3d"})
    results.append_round({"round": 1, "central": {"loss": 1.0}})
    results.append_round({"round": 2, "central": {"loss": 0.5}})
    arrays = {"head.weight": np.ones((2, 3), np.float32), "bn.num_batches_tracked": np.array(4, np.int64)}
    results.save_model(arrays, ["a", "ünïcode"], "tiny3d")
    results.write_summary({"status": "completed"})
    lines = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    loaded = load_weights(tmp_path / "run" / "model.safetensors")
    assert loaded["bn.num_batches_tracked"].dtype == np.int64 and loaded["bn.num_batches_tracked"].shape == ()
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "np") as f:
        assert json.loads(f.metadata()["classes"]) == ["a", "ünïcode"] and f.metadata()["model"] == "tiny3d"
    assert json.loads((tmp_path / "run" / "classes.json").read_text(encoding="utf-8")) == ["a", "ünïcode"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [  # and no temp file left
        "classes.json",
        "model.safetensors",
        "rounds.jsonl",
        "run_config.json",
        "summary.json",
        "summary.txt",  # rendered from the same dict
    ]
