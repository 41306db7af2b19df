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


# Every strategy the run config can select, each checked by what it must have done in its round.
# All of them run here, in process with every message through Flower's wire encoding (2-3 s each);
# tests/test_e2e.py runs the ones that use Flower's own machinery beyond one model each way
# (SCAFFOLD's two records, client-side DP's clipping mod) through the real `fedvideo run` too.
STRATEGY_RUNS = {
    "average": {"strategy": "average"},
    "weighted": {"strategy": "weighted", "weight-source": "inverse-loss"},
    "median": {"strategy": "fusion", "fusion-fn": "median"},
    "trimmed-mean": {"strategy": "fusion", "fusion-fn": "trimmed-mean", "trim-beta": 0.2},
    "geometric-median": {"strategy": "fusion", "fusion-fn": "geometric-median"},
    "krum": {
        "strategy": "fusion",
        "fusion-fn": "krum",
        "krum-malicious": 1,
        "min-train-nodes": 5,
        "min-available-nodes": 5,
    },
    "feddf": {"strategy": "fusion", "fusion-fn": "feddf", "feddf-steps": 10, "feddf-videos": 8},
    "fedavgm-fedprox-fedbn": {"server-momentum": 0.9, "server-lr": 0.5, "proximal-mu": 0.01, "fedbn": True},
    "dp-client-side": {"strategy": "average", "dp": "client-side", "dp-noise-multiplier": 0.5, "dp-clipping-norm": 2.0},
    "fedadam": {"server-optimizer": "adam", "server-lr": 0.01},
    # Two ArrayRecords each way.
    "scaffold": {"scaffold": True, "optimizer": "sgd", "momentum": 0.0, "lr": 0.05},
    # Four exchanges per round, node state between them, the masked update in its own record.
    "secagg": {"secagg": True, "secagg-num-shares": 3, "secagg-threshold": 2},
}
STRATEGY_NODES = 5


def strategy_config(name: str, small_run_config: dict) -> dict:
    """A 1-round run of strategy ``name`` on 5 nodes (no client evaluation: the round is the point)."""
    return {**small_run_config, **STRATEGY_RUNS[name], "num-server-rounds": 1, "fraction-evaluate": 0.0}


def check_strategy_round(name: str, run_dir, summary: dict) -> None:
    """What strategy ``name``'s 1-round run must show: its keys as given, every node trained, its
    own decisions in the round record."""
    saved = json.loads((run_dir / "run_config.json").read_text())
    for key, value in STRATEGY_RUNS[name].items():
        assert saved[key] == value
    record = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[1])
    assert len(record["train-clients"]["clients"]) == STRATEGY_NODES and not record["train-clients"]["failed"]
    assert summary["status"] == "completed" and summary["rounds-completed"] == 1
    if name == "krum":
        assert len(record["fusion"]["selected-nodes"]) == 1
    if name == "feddf":
        assert record["fusion"]["steps"] >= 0 and "best-val-kl" in record["fusion"]
    if name == "weighted":
        assert abs(sum(record["fusion"]["weights"].values()) - 1) < 1e-9
    if name == "scaffold":
        assert record["fusion"]["scaffold"]["clients"] == 5 and record["fusion"]["scaffold"]["control-norm"] > 0
    if name == "secagg":  # a sharing graph of 3 neighbours each among 5 nodes, nobody dropped
        assert record["fusion"]["secagg"]["contributors"] == 5 and record["fusion"]["secagg"]["dropped"] == []
        assert record["fusion"]["secagg"]["error-bound"] < 1e-2
    if name == "dp-client-side":  # clipped on the nodes by Flower's fixedclipping_mod, noised on the server
        assert record["privacy"]["update-norm-median"] <= 2.0 + 1e-4
        assert summary["privacy"]["epsilon"] > 0 and summary["privacy"]["releases"] == 1


@pytest.mark.parametrize("name", list(STRATEGY_RUNS))
def test_each_strategy_runs_selected_by_run_config(name, small_run_config, tmp_path):
    run_inprocess(strategy_config(name, small_run_config), STRATEGY_NODES, tmp_path / "run", wire=True)
    check_strategy_round(name, tmp_path / "run", json.loads((tmp_path / "run" / "summary.json").read_text()))


def test_the_wire_encoding_carries_what_a_round_sends(small_run_config):
    """``wire=True`` is Flower's encoding, not a copy: arrays by name and bit for bit, config values
    with their types; something Flower cannot encode fails here as it would between processes."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from bench.inprocess import over_the_wire

    InProcessGrid(small_run_config, 1)  # sets the task identity a Message needs, as a run does
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.count": np.array(7, dtype=np.int64)}
    record = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    content = RecordDict({"arrays": record, "config": ConfigRecord({"lr": 0.5, "name": "x", "n": 3})})
    msg = Message(content, dst_node_id=3, message_type="train")
    received = over_the_wire(msg)
    assert received is not msg and received.metadata.dst_node_id == 3 and received.metadata.message_type == "train"
    got = received.content["arrays"].to_numpy_ndarrays()
    assert list(received.content["arrays"]) == ["a.weight", "b.count"]
    assert all(np.array_equal(g, e) and g.dtype == e.dtype for g, e in zip(got, arrays.values()))
    assert dict(received.content["config"]) == {"lr": 0.5, "name": "x", "n": 3}
