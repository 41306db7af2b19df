"""End to end through the Flower CLI: the launcher starts a SuperLink, `flwr run`s the app in the
simulation engine, and judges the outcome. Slow (tens of seconds each): marked e2e."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from fedapp.ops.flwr_run import config_text
from tests.conftest import PROJECT_DIR, fedvideo_command
from tests.test_server_loop import STRATEGY_NODES, check_strategy_round, strategy_config

pytestmark = pytest.mark.e2e


def launch(
    config: dict, tmp_path, federation: str = "num-supernodes=3 client-resources-num-cpus=1"
) -> tuple[int, str, dict]:
    results = tmp_path / "results"
    config = {**config, "results-dir": str(results), "run-name": "run"}
    # A Flower home of the test's own: launches in parallel test workers never unpack the app into
    # one folder at the same time (Flower's install skips a folder that exists, even half-written).
    env = {**os.environ, "FEDVIDEO_FLWR_HOME": str(tmp_path / "flwr_home")}
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
        env=env,
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
        'FAILED: config: model="resnet9000" is not allowed: choose one of tiny3d, r3d_18, mc3_18, r2plus1d_18, s3d, '
        'framepool_resnet18, framepool_resnet50 or "module:attribute" (your own)'
    ]
    assert summary == {} and not (tmp_path / "results").exists()


# Every strategy runs in process through Flower's wire encoding (tests/test_server_loop.py); these
# three also through the real launcher, as they use Flower's machinery beyond one model each way:
# SCAFFOLD's second record each way and the node state it keeps, client-side DP's clipping mod,
# SecAgg+'s four exchanges a round with the secrets in node state between them.
REAL_STRATEGY_RUNS = ["scaffold", "dp-client-side", "secagg"]


@pytest.mark.parametrize("name", REAL_STRATEGY_RUNS)
def test_strategy_selected_by_run_config_through_flower(name, small_run_config, tmp_path):
    config = strategy_config(name, small_run_config)
    rc, output, summary = launch(
        config, tmp_path, federation=f"num-supernodes={STRATEGY_NODES} client-resources-num-cpus=1"
    )
    assert rc == 0, output[-3000:]
    check_strategy_round(name, tmp_path / "results" / "run", summary)


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
    env = {**os.environ, "FEDVIDEO_FLWR_HOME": str(tmp_path / "flwr_home")}
    proc = subprocess.Popen(cmd, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
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
    """The earlier run is made in process (the real round loop writes the same files); the refusal
    is the real launcher's, before it starts anything."""
    from bench.inprocess import run_inprocess

    folder = tmp_path / "results" / "run"
    run_inprocess({**small_run_config, "num-server-rounds": 1}, 2, folder)
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    rc, output, _ = launch({**small_run_config, "num-server-rounds": 1}, tmp_path)
    assert rc == 1 and "already holds a run" in output
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
