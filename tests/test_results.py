import json
import os

import numpy as np
import pytest

from fedapp.ops.launch import judge
from fedapp.server.results import RunResults, atomic_write_json, load_weights
from safetensors import safe_open


def test_atomic_write_keeps_the_old_file_when_a_write_crashes(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"round": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_json(path, {"round": 2})
    assert json.loads(path.read_text()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left behind


def test_run_results_layout(tmp_path):
    results = RunResults(tmp_path / "run")
    results.write_config({"model": "tiny3d"})
    results.append_round({"round": 1, "central": {"loss": 1.0}})
    results.append_round({"round": 2, "central": {"loss": 0.5}})
    arrays = {"head.weight": np.ones((2, 3), np.float32), "bn.num_batches_tracked": np.array(4, np.int64)}
    results.save_model(arrays, ["a", "b"], "tiny3d")
    results.write_summary({"status": "completed"})
    lines = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    loaded = load_weights(tmp_path / "run" / "model.safetensors")
    assert loaded["bn.num_batches_tracked"].dtype == np.int64 and loaded["bn.num_batches_tracked"].shape == ()
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "np") as f:
        assert json.loads(f.metadata()["classes"]) == ["a", "b"] and f.metadata()["model"] == "tiny3d"
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == ["a", "b"]


def test_judge_requires_flower_status_and_app_summary(tmp_path):
    ok = {"status": "completed"}
    assert judge("finished:completed", ok, tmp_path).ok
    assert not judge("finished:completed", None, tmp_path).ok  # every client failed, no summary
    failed = judge("finished:failed", {"status": "failed", "error": "ConfigError: model='x'"}, tmp_path)
    assert not failed.ok and "model='x'" in failed.message
    assert not judge("finished:failed", ok, tmp_path).ok
    # A resume refused at start leaves the earlier run's completed summary: not this run's verdict.
    earlier = {"status": "completed", "run-id": 11}
    assert judge("finished:completed", earlier, tmp_path, run_id=11).ok
    refused = judge("finished:failed", earlier, tmp_path, run_id=12)
    assert not refused.ok and "no summary for run 12" in refused.message
