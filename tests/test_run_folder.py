"""One writer per run folder: a run-name in use is refused unless resume names it, a live writer
locks the folder, and a failed or refused start leaves the earlier run's files byte-identical."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest

from bench.inprocess import InProcessGrid
from fedapp.server.app import serve
from fedapp.server.checkpoint import CheckpointError
from fedapp.server.results import LOCK_FILE, RunFolderError, WriterLock, lock_holder
from tests.conftest import PROJECT_DIR


def snapshot(folder) -> dict[str, str]:
    """SHA-256 of every file of a run folder (the lock file is the lock's bookkeeping, not a result)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def run(config: dict, rounds: int) -> dict:
    config = {**config, "num-server-rounds": rounds}
    return serve(InProcessGrid(config, 2), config, run_id=7)


@pytest.fixture()
def finished(small_run_config, tmp_path):
    """A completed 2-round run named "run"."""
    config = {**small_run_config, "results-dir": str(tmp_path), "run-name": "run", "tensorboard": False}
    summary = run(config, 2)
    assert summary["status"] == "completed" and summary["run-id"] == 7
    return config, tmp_path / "run"


def test_a_run_name_in_use_is_refused_and_the_earlier_run_is_untouched(finished):
    config, folder = finished
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match="already holds a run; choose another run-name, or set resume="):
        run(config, 1)  # the 1-round run that used to overwrite model, history, summary and best.json
    assert snapshot(folder) == before
    assert json.loads((folder / "summary.json").read_text())["rounds-completed"] == 2


def test_a_resume_that_fails_at_start_leaves_the_earlier_files_byte_identical(finished):
    config, folder = finished
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match="is for model 'tiny3d'"):
        run({**config, "resume": "latest", "model": "mc3_18"}, 3)
    with pytest.raises(CheckpointError, match="leaves nothing to train"):
        run({**config, "resume": "latest"}, 2)
    with pytest.raises(RunFolderError, match="run-name='other' names"):
        run({**config, "run-name": "other", "resume": str(folder)}, 3)
    assert snapshot(folder) == before


def test_a_second_writer_is_refused_while_the_first_lives(finished):
    config, folder = finished
    before = snapshot(folder)
    # Another process holds the folder (as a running ServerApp would).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fedapp.server.results import WriterLock; "
            f"lock = WriterLock({str(folder)!r}).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_holder(folder)["pid"] == holder.pid
        with pytest.raises(RunFolderError, match=f"being written by another process.*{holder.pid}"):
            run({**config, "resume": "latest"}, 3)
        assert snapshot(folder) == before
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead writer's lock: its stale lock file blocks nobody.
    assert (folder / LOCK_FILE).exists() and lock_holder(folder) is None
    summary = run({**config, "resume": "latest"}, 3)
    assert summary["rounds-completed"] == 3


def test_partial_writes_of_a_killed_writer_are_removed_at_start(finished):
    config, folder = finished
    partial = folder / "checkpoints" / ".round-0003.abc123"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a checkpoint")
    temp = folder / ".rounds.jsonl.xyz.tmp"
    temp.write_text("{")
    run({**config, "resume": "latest"}, 3)
    assert not partial.exists() and not temp.exists()
    assert (folder / "checkpoints" / "round-0003" / "manifest.json").exists()


def test_writer_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    with WriterLock(tmp_path):
        holder = lock_holder(tmp_path)
        assert holder["pid"] > 0 and holder["started"] <= time.time()
        with pytest.raises(RunFolderError, match="one writer per run folder"):
            WriterLock(tmp_path).acquire()
    assert lock_holder(tmp_path) is None
    WriterLock(tmp_path).acquire().release()
