"""Checkpoints: atomic writes, verification, pruning, compatibility, and resume without gaps."""

import json

import numpy as np
import pytest

from bench.inprocess import InProcessGrid
from fedapp.client.video_client import VideoClient
from fedapp.server.app import NoUpdateError, run_federation
from fedapp.server.checkpoint import (
    CheckpointError,
    best_checkpoint,
    check_compatible,
    list_checkpoints,
    load_checkpoint,
    model_from_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from fedapp.server.results import RunResults
from fedapp.server.run_folder import locate_run
from fedapp.task.config import parse_config


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "bn.num_batches_tracked": np.array(7, np.int64)}


def test_roundtrip_with_strategy_state(tmp_path):
    state = {"velocity": {"w": np.ones((3, 2))}, "note": 3}
    path = save_checkpoint(tmp_path, 2, arrays(), {"model": "tiny3d"}, ["a", "b"], state, [{"round": 1}, {"round": 2}])
    checkpoint = load_checkpoint(path)
    assert checkpoint.round == 2 and checkpoint.classes == ["a", "b"]
    np.testing.assert_array_equal(checkpoint.arrays["w"], arrays()["w"])
    assert checkpoint.arrays["bn.num_batches_tracked"].shape == ()
    np.testing.assert_array_equal(checkpoint.manifest["strategy-state"]["velocity"]["w"], np.ones((3, 2)))
    assert checkpoint.manifest["strategy-state"]["note"] == 3
    assert load_checkpoint(tmp_path).round == 2  # a run folder means its latest checkpoint


def test_crash_mid_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, arrays(1), {"model": "tiny3d"}, ["a"], {}, [])
    import fedapp.server.checkpoint as checkpoint_module

    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(checkpoint_module, "sha256", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, arrays(2), {"model": "tiny3d"}, ["a"], {}, [])
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-0001"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers
    np.testing.assert_array_equal(load_checkpoint(tmp_path).arrays["w"], arrays(1)["w"])


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, arrays(), {"model": "tiny3d"}, ["a", "b"], {}, [])
    checkpoint = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="model 'tiny3d'"):
        check_compatible(checkpoint, "r3d_18", ["a", "b"], arrays())
    with pytest.raises(CheckpointError, match="other classes"):
        check_compatible(checkpoint, "tiny3d", ["a", "b", "c"], arrays())
    with pytest.raises(CheckpointError, match="shape"):
        check_compatible(checkpoint, "tiny3d", ["a", "b"], {**arrays(), "w": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"tensors this model does not: \['bn.num_batches_tracked'\]"):
        check_compatible(checkpoint, "tiny3d", ["a", "b"], {"w": arrays()["w"]})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_prune_keeps_last_k_and_best(tmp_path):
    paths = [save_checkpoint(tmp_path, r, arrays(r), {"model": "m"}, ["a"], {}, []) for r in range(1, 6)]
    prune_checkpoints(tmp_path, keep_last=2, best=paths[0])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-0001", "round-0004", "round-0005"]


def run_rounds(config, tmp_path, rounds, run_dir):
    config = {**config, "num-server-rounds": rounds, "results-dir": str(tmp_path), "run-name": "run"}
    cfg = parse_config(config)
    location = locate_run(config, "test")  # as the ServerApp does: the folder and what it resumes
    assert location.folder == run_dir
    results = RunResults(run_dir)
    return run_federation(InProcessGrid(config, 2), cfg, results, location.checkpoint), results


def test_resume_after_a_killed_run_continues_without_gap_or_duplicate(small_run_config, tmp_path):
    run_dir = tmp_path / "run"
    base = {**small_run_config, "server-momentum": 0.9, "checkpoint-keep": 2}
    run_rounds(base, tmp_path, 2, run_dir)  # "killed" after round 2 of 4
    # a crash after the checkpoint but before the history write: the file misses round 2
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    (run_dir / "rounds.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    before = load_checkpoint(run_dir / "checkpoints" / "round-0002")
    summary, results = run_rounds({**base, "resume": "latest"}, tmp_path, 4, run_dir)
    history = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    # The resumed rounds trained: both clients accepted, none failed, and the model moved.
    for record in history[3:]:
        assert len(record["train-clients"]["clients"]) == 2, record["train-clients"]
        assert not record["train-clients"]["failed"] and not record["train-clients"]["skipped"]
    assert history[4]["central"]["loss"] != pytest.approx(history[2]["central"]["loss"], abs=1e-6)
    after = load_checkpoint(run_dir / "checkpoints" / "round-0004")
    assert (
        max(
            float(np.abs(after.arrays[k].astype(np.float64) - v).max())
            for k, v in before.arrays.items()
            if v.dtype.kind == "f"
        )
        > 1e-4
    )
    assert summary["rounds-without-update"] == 0
    assert summary["rounds-completed"] == 4
    assert [p.name for p in list_checkpoints(run_dir)][-2:] == ["round-0003", "round-0004"]
    velocity = load_checkpoint(run_dir).manifest["strategy-state"]["velocity"]
    assert velocity and all(np.isfinite(v).all() for v in velocity.values())
    model, classes, cfg = model_from_checkpoint(run_dir)
    assert classes == summary["classes"] and cfg.model == "tiny3d"
    assert best_checkpoint(run_dir) is not None


def test_a_fedadam_run_checkpoints_its_moments_and_resumes_them(small_run_config, tmp_path):
    run_dir = tmp_path / "run"
    base = {**small_run_config, "server-optimizer": "adam", "server-lr": 0.05}
    run_rounds(base, tmp_path, 1, run_dir)
    state = load_checkpoint(run_dir).manifest["strategy-state"]
    assert state["server-m"] and state["server-m"].keys() == state["server-v"].keys()
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in state["server-m"])
    # The moments in the parameters' dtype: the checkpoint is the model plus two moments of its size
    # (float64 moments made it 5x the model: 11 MB for tiny3d's 2.3 MB).
    model = load_checkpoint(run_dir).arrays
    assert all(state[m][k].dtype == model[k].dtype == np.float32 for m in ("server-m", "server-v") for k in state[m])
    model_bytes = (run_dir / "model.safetensors").stat().st_size
    weights_file = list_checkpoints(run_dir)[-1] / "model.safetensors"
    assert weights_file.stat().st_size < 3.1 * model_bytes
    summary, _ = run_rounds({**base, "resume": "latest"}, tmp_path, 2, run_dir)
    history = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in history] == [0, 1, 2] and summary["rounds-without-update"] == 0
    assert len(history[2]["train-clients"]["clients"]) == 2
    resumed = load_checkpoint(run_dir).manifest["strategy-state"]
    # Round 2's moments grew from round 1's (v only accumulates squared steps under Adam's β₂ < 1).
    assert any(not np.allclose(resumed["server-v"][k], state["server-v"][k]) for k in state["server-v"])


def test_a_scaffold_run_moves_the_control_variate_counts_its_bytes_and_resumes_it(small_run_config, tmp_path):
    run_dir = tmp_path / "run"
    base = {**small_run_config, "scaffold": True, "optimizer": "sgd", "momentum": 0.0, "lr": 0.05}
    run_rounds(base, tmp_path, 1, run_dir)
    first = load_checkpoint(run_dir)
    control = first.manifest["strategy-state"]["scaffold-control"]
    assert control and any(np.abs(v).max() > 0 for v in control.values())
    model_bytes = sum(v.nbytes for v in first.arrays.values())
    control_bytes = sum(v.nbytes for v in control.values())
    summary, _ = run_rounds({**base, "resume": "latest"}, tmp_path, 2, run_dir)
    history = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert summary["rounds-without-update"] == 0
    for record in history[1:]:
        assert len(record["train-clients"]["clients"]) == 2 and not record["train-clients"]["rejected"]
        assert record["fusion"]["scaffold"]["clients"] == 2
        # Both directions carry the control variate beside the model, for each of the 2 clients.
        assert record["bytes-down"] >= 2 * (model_bytes + control_bytes)
        assert record["bytes-up"] >= 2 * (model_bytes + control_bytes)
    resumed = load_checkpoint(run_dir).manifest["strategy-state"]["scaffold-control"]
    assert any(not np.allclose(resumed[k], control[k]) for k in control)


def test_a_resumed_run_in_which_no_client_trains_fails(small_run_config, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_rounds(small_run_config, tmp_path, 1, run_dir)

    def broken_fit(self, parameters, config):
        raise RuntimeError("this site's GPU fell off the bus")

    monkeypatch.setattr(VideoClient, "fit", broken_fit)
    with pytest.raises(NoUpdateError, match=r"no round produced a global update \(rounds 2\.\.3"):
        run_rounds({**small_run_config, "resume": "latest"}, tmp_path, 3, run_dir)


def test_resuming_a_finished_run_is_refused(small_run_config, tmp_path):
    run_dir = tmp_path / "run"
    run_rounds(small_run_config, tmp_path, 1, run_dir)
    with pytest.raises(CheckpointError, match="at round 1: num-server-rounds=1 leaves nothing to train"):
        run_rounds({**small_run_config, "resume": "latest"}, tmp_path, 1, run_dir)


def test_a_resume_without_its_checkpoint_is_refused_not_started_fresh(small_run_config, tmp_path):
    run_dir = tmp_path / "run"
    run_rounds(small_run_config, tmp_path, 1, run_dir)
    before = (run_dir / "rounds.jsonl").read_bytes()
    config = {**small_run_config, "num-server-rounds": 2, "resume": "latest", "results-dir": str(tmp_path)}
    with pytest.raises(CheckpointError, match="no checkpoint was given"):
        run_federation(InProcessGrid(config, 2), parse_config(config), RunResults(run_dir), checkpoint=None)
    assert (run_dir / "rounds.jsonl").read_bytes() == before


def test_resume_refuses_another_model(small_run_config, tmp_path):
    run_dir = tmp_path / "run"
    run_rounds(small_run_config, tmp_path, 1, run_dir)
    with pytest.raises(CheckpointError, match="is for model 'tiny3d'"):
        run_rounds({**small_run_config, "resume": "latest", "model": "mc3_18"}, tmp_path, 2, run_dir)


def test_early_stop_records_the_reason(small_run_config, tmp_path):
    summary, results = run_rounds({**small_run_config, "target-accuracy": 0.01}, tmp_path, 5, tmp_path / "run")
    assert summary["rounds-completed"] == 1 and "target-accuracy" in summary["stop-reason"]
    assert (tmp_path / "run" / "history.csv").exists()
