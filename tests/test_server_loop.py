"""The ServerApp's round loop with the real strategies and ClientApp handlers, in process
(bench/inprocess.py): fast checks of what the slow `flwr run` tests cover end to end."""

import csv
import json

import pytest

from bench.inprocess import InProcessGrid, run_inprocess
from fedapp.server.app import NoUpdateError, run_federation
from fedapp.server.results import RunResults
from fedapp.task.config import parse_config


def test_rounds_are_recorded_with_per_client_metrics(small_run_config, tmp_path):
    results = run_inprocess({**small_run_config, "num-server-rounds": 2}, 3, tmp_path / "run")
    assert [r["round"] for r in results.rounds] == [0, 1, 2]
    assert all(len(r["train-clients"]["clients"]) == 3 for r in results.rounds[1:])
    assert json.loads((tmp_path / "run" / "partitions.json").read_text())["num-partitions"] == 3
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_attackers_are_outvoted_by_the_median(small_run_config, tmp_path):
    config = {
        **small_run_config,
        "num-server-rounds": 1,
        "strategy": "fusion",
        "fusion-fn": "median",
        "attack": "sign-flip",
        "attack-fraction": 0.2,
        "min-train-nodes": 5,
        "min-available-nodes": 5,
    }
    results = run_inprocess(config, 5, tmp_path / "run")
    assert len(results.rounds[1]["train-clients"]["clients"]) == 5  # poisoned updates pass validation
    assert results.rounds[1]["train-clients"]["skipped"] == ""


def test_a_run_where_no_round_updates_fails(small_run_config, tmp_path):
    rows = []
    for i in range(12):
        path = tmp_path / f"v{i}.avi"
        path.write_bytes(b"\x00" * 64)
        rows.append({"path": str(path), "label": f"c{i % 2}", "split": "train" if i < 8 else "test"})
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    own = {k: v for k, v in small_run_config.items() if not k.startswith("synthetic-")}  # only for dataset="synthetic"
    config = {**own, "dataset": "manifest", "data-dir": str(manifest), "num-server-rounds": 2}
    cfg = parse_config(config)
    results = RunResults(tmp_path / "run")
    with pytest.raises(NoUpdateError, match="no round produced a global update"):
        run_federation(InProcessGrid(config, 2), cfg, results, checkpoint=None)
    assert [r["round"] for r in results.rounds] == [0, 1, 2]
    assert "no usable training video" in results.rounds[1]["train-clients"]["failed"][0]["reason"]
    assert "fewer than min-train-nodes" in results.rounds[1]["train-clients"]["skipped"]


def test_the_initial_model_is_seeded_from_seed():
    import torch

    from fedapp.server.app import initial_model
    from fedapp.task.config import parse_config

    def weights(seed):
        return initial_model(parse_config({"seed": seed}), 4).state_dict()

    torch.manual_seed(123)
    before = torch.rand(1)
    a, b, c = weights(0), weights(0), weights(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's random state is not consumed
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_two_runs_of_one_config_start_from_the_same_model(small_run_config, tmp_path):
    import torch

    config = {**small_run_config, "num-server-rounds": 1, "fraction-evaluate": 0.0}
    torch.manual_seed(1)
    first = run_inprocess(config, 2, tmp_path / "a").rounds[0]["central"]
    torch.manual_seed(2)  # whatever else drew from the global generator in between
    second = run_inprocess(config, 2, tmp_path / "b").rounds[0]["central"]
    assert first["loss"] == second["loss"] and first["video-accuracy"] == second["video-accuracy"]
