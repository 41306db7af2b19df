"""End to end through the Flower CLI: the launcher starts a SuperLink, `flwr run`s the app in the
simulation engine, and judges the outcome. Slow (tens of seconds each): marked e2e."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import pytest

from fedapp.ops.launch import config_text
from tests.conftest import PROJECT_DIR, fedvideo_command

pytestmark = pytest.mark.e2e


def launch(
    config: dict, tmp_path, federation: str = "num-supernodes=3 client-resources-num-cpus=1"
) -> tuple[int, str, dict]:
    results = tmp_path / "results"
    config = {**config, "results-dir": str(results), "run-name": "run"}
    proc = subprocess.run(
        [
            fedvideo_command(),
            "run",
            "--run-config",
            config_text(config),
            "--federation-config",
            federation,
            "--timeout",
            "600",
        ],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary_path = results / "run" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, summary


def test_simulation_completes_and_writes_results(small_run_config, tmp_path):
    rc, output, summary = launch({**small_run_config, "num-server-rounds": 2}, tmp_path)
    assert rc == 0, output[-3000:]
    assert summary["status"] == "completed" and summary["rounds-completed"] == 2
    run_dir = tmp_path / "results" / "run"
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert len(record["train-clients"]["clients"]) == 3
        assert {"loss", "video-accuracy", "clip-accuracy"} <= set(record["central"])
        assert "train-loss" in record["train"] and "video-accuracy" in record["evaluate"]
    partitions = json.loads((run_dir / "partitions.json").read_text())
    assert partitions["num-partitions"] == 3
    assert json.loads((run_dir / "classes.json").read_text()) == summary["classes"]
    assert (run_dir / "model.safetensors").stat().st_size > 0
    assert json.loads((run_dir / "run_config.json").read_text())["num-server-rounds"] == 2


def test_simulation_starts_from_pretrained_weights_in_the_cache(small_run_config, tmp_path, monkeypatch):
    """`pretrained` in Flower's simulation engine: the file in torch.hub's cache is what the
    federation starts from (the trained model still carries it), and nothing is downloaded."""
    import numpy as np
    from safetensors.numpy import load_file

    from tests.test_pretrained import place_random_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # inherited by the SuperLink and ServerApp
    state = place_random_weights("framepool_resnet18", "IMAGENET1K_V1")
    config = {
        **small_run_config,
        "model": "framepool_resnet18",
        "pretrained": "IMAGENET1K_V1",
        "resize": "32x32",  # the preset (short:256 / 224) overridden: CPU-sized
        "crop-size": 32,
        "clip-len": 4,
        "num-server-rounds": 1,
        "fraction-evaluate": 0.0,
    }
    rc, output, summary = launch(config, tmp_path, federation="num-supernodes=2 client-resources-num-cpus=1")
    assert rc == 0, output[-3000:]
    assert summary["rounds-completed"] == 1
    trained = load_file(str(tmp_path / "results" / "run" / "model.safetensors"))["backbone.net.conv1.weight"]
    start = state["conv1.weight"].numpy()
    assert np.corrcoef(trained.ravel(), start.ravel())[0, 1] > 0.9  # fine-tuned from the file, not from scratch
    assert sorted(p.name for p in (tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == ["resnet18-f37072fd.pth"]


def test_bad_config_fails_before_anything_starts_with_a_clear_message(small_run_config, tmp_path):
    """The launcher refuses it itself: one line, exit 2, no Flower process, nothing written (the
    ServerApp's own refusal, for plain `flwr run .`, is tested in tests/test_plain_flwr_run.py)."""
    rc, output, summary = launch({**small_run_config, "model": "resnet9000"}, tmp_path)
    assert rc == 2
    assert output.strip().splitlines() == [
        "FAILED: config: model='resnet9000' is not allowed: choose one of tiny3d, r3d_18, mc3_18, r2plus1d_18, "
        "framepool_resnet18, framepool_resnet50"
    ]
    assert summary == {} and not (tmp_path / "results").exists()


def test_client_without_usable_video_fails_alone(small_run_config, cache_dir, tmp_path):
    """Partition by group; one group holds only corrupt files: that client fails, the others train."""
    from fedapp.task.config import parse_config
    from fedapp.task.data import load_video_index

    index = load_video_index(parse_config(small_run_config))
    rows = []
    for split, samples in (("train", index.train), ("test", index.test)):
        for i, sample in enumerate(samples):
            group = ["site-a", "site-b", "site-c"][i % 3]
            path = tmp_path / "videos" / split / sample.path.split("/")[-1]
            path.parent.mkdir(parents=True, exist_ok=True)
            if group == "site-c":
                path.write_bytes(b"\x00" * 100)  # corrupt
            else:
                shutil.copy(sample.path, path)
            rows.append({"path": str(path), "label": index.classes[sample.label], "split": split, "group": group})
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "group"])
        writer.writeheader()
        writer.writerows(rows)
    config = {
        **{k: v for k, v in small_run_config.items() if not k.startswith("synthetic-")},  # synthetic-only keys
        "dataset": "manifest",
        "data-dir": str(manifest),
        "partitioning": "groups",
        "num-server-rounds": 1,
    }
    rc, output, summary = launch(config, tmp_path)
    assert rc == 0, output[-3000:]
    record = json.loads((tmp_path / "results" / "run" / "rounds.jsonl").read_text().splitlines()[1])
    assert len(record["train-clients"]["clients"]) == 2
    assert len(record["train-clients"]["failed"]) == 1
    assert "no usable training video" in record["train-clients"]["failed"][0]["reason"]


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
    # Two ArrayRecords each way through Flower's own message path.
    "scaffold": {"scaffold": True, "optimizer": "sgd", "momentum": 0.0, "lr": 0.05},
}


@pytest.mark.parametrize("name", list(STRATEGY_RUNS))
def test_each_strategy_runs_selected_by_run_config(name, small_run_config, tmp_path):
    config = {**small_run_config, **STRATEGY_RUNS[name], "num-server-rounds": 1, "fraction-evaluate": 0.0}
    rc, output, summary = launch(config, tmp_path, federation="num-supernodes=5 client-resources-num-cpus=1")
    assert rc == 0, output[-3000:]
    run_dir = tmp_path / "results" / "run"
    saved = json.loads((run_dir / "run_config.json").read_text())
    for key, value in STRATEGY_RUNS[name].items():
        assert saved[key] == value
    record = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[1])
    assert len(record["train-clients"]["clients"]) == 5
    if name == "krum":
        assert len(record["fusion"]["selected-nodes"]) == 1
    if name == "feddf":
        assert record["fusion"]["steps"] >= 0 and "best-val-kl" in record["fusion"]
    if name == "weighted":
        assert abs(sum(record["fusion"]["weights"].values()) - 1) < 1e-9
    if name == "scaffold":
        assert record["fusion"]["scaffold"]["clients"] == 5 and record["fusion"]["scaffold"]["control-norm"] > 0
    if name == "dp-client-side":  # clipped on the nodes by Flower's fixedclipping_mod, noised on the server
        assert record["privacy"]["update-norm-median"] <= 2.0 + 1e-4
        assert summary["privacy"]["epsilon"] > 0 and summary["privacy"]["releases"] == 1


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Flower's SuperLink, SuperExec and ServerApp under a launcher)."""
    from fedapp.ops.processes import process_table

    table = process_table()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent and p not in found]
        found.update(children)
        todo.extend(children)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (an exited process not yet reaped, a zombie, is not)."""
    import psutil

    still = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                still.add(pid)
        except psutil.NoSuchProcess:
            continue
    return still


def test_launcher_killed_mid_round_takes_its_processes_along_and_the_resume_trains(small_run_config, tmp_path):
    """kill -9 the launcher during round 3: its SuperLink, SuperExec and ServerApp go with it (no
    orphan writes on), then resume="latest" trains every resumed round and moves the model."""
    import os
    import signal
    import time

    results = tmp_path / "results"
    config = {**small_run_config, "num-server-rounds": 4, "results-dir": str(results), "run-name": "run"}
    cmd = [
        fedvideo_command(),
        "run",
        "--run-config",
        config_text(config),
        "--federation-config",
        "num-supernodes=2 client-resources-num-cpus=1",
    ]
    proc = subprocess.Popen(cmd, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = results / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "round-0002").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (checkpoints / "round-0002").exists(), "round 2 never checkpointed"
    children = descendants(proc.pid)
    assert len(children) >= 3, children  # SuperLink, SuperExec, ServerApp (and the watchdog, flwr run)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(children), f"orphans of the killed launcher: {alive(children)}"
    time.sleep(3)  # nothing writes on: round 3 never lands
    assert not (checkpoints / "round-0003").exists()
    rounds = [json.loads(line)["round"] for line in (results / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]

    rc, output, summary = launch(
        {**config, "resume": "latest"}, tmp_path, federation="num-supernodes=2 client-resources-num-cpus=1"
    )
    assert rc == 0, output[-3000:]
    history = [json.loads(line) for line in (results / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    assert summary["rounds-completed"] == 4 and summary["rounds-without-update"] == 0
    for record in history[3:]:  # the resumed rounds trained both clients
        assert len(record["train-clients"]["clients"]) == 2 and not record["train-clients"]["failed"], record
    assert history[4]["central"]["loss"] != pytest.approx(history[2]["central"]["loss"], abs=1e-6)


def test_a_run_name_in_use_is_refused_before_anything_starts(small_run_config, tmp_path):
    rc, _, _ = launch({**small_run_config, "num-server-rounds": 1}, tmp_path)
    assert rc == 0
    folder = tmp_path / "results" / "run"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    rc, output, _ = launch({**small_run_config, "num-server-rounds": 1}, tmp_path)
    assert rc == 1 and "already holds a run" in output
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
