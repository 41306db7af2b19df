"""One writer per run folder: a run-name in use is refused unless resume names it, a live writer
locks the folder, and a failed or refused start leaves the earlier run's files byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.inprocess import InProcessGrid
from fedapp.server.app import serve
from fedapp.server.checkpoint import CheckpointError
from fedapp.server.results import LOCK_FILE, RunFolderError, WriterLock, lock_holder
from fedapp.server.summary import summary_text
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


def numbers(value: Any) -> Iterator[float]:
    """Every number of a JSON document (bools are not numbers)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield float(value)


def assert_text_shows_only_json_figures(text: str, summary: dict) -> None:
    """Each number summary.txt shows is one of summary.json's, at the precision shown."""
    values = list(numbers(summary))
    for line in text.splitlines():
        if line.startswith(("results:", "classes:")):  # a path and class names, not figures
            continue
        line = re.sub(r"\((\d+h)?\d+m\d+s\)", "", line)  # the wall time again, as h/m/s
        for token in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])", line):
            decimals = len(token.split(".")[1]) if "." in token and "e" not in token else 0
            assert any(round(v, decimals) == float(token) for v in values), f"{token} in {line!r}"


def test_summary_txt_and_summary_json_agree_figure_for_figure(finished):
    _, folder = finished
    summary = json.loads((folder / "summary.json").read_text())
    text = (folder / "summary.txt").read_text()
    assert text == summary_text(summary)  # rendered from that very dict
    assert_text_shows_only_json_figures(text, summary)
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    # The figures a reader looks for, one by one, and where they come from.
    assert "status: completed\nstrategy: fedavg\n" in text
    assert f"rounds: {summary['rounds-completed']} completed\n" in text and summary["rounds-completed"] == 2
    best = max(rounds[1:], key=lambda r: (r["central"]["video-accuracy"], -r["round"]))
    assert (summary["best-round"], summary["best-video-accuracy"]) == (best["round"], best["central"]["video-accuracy"])
    assert f"best video-acc {summary['best-video-accuracy']:.4f} at round {summary['best-round']}" in text
    assert summary["initial-video-accuracy"] == rounds[0]["central"]["video-accuracy"]
    assert json.loads((folder / "checkpoints" / "best.json").read_text())["metric"] == summary["best-video-accuracy"]
    assert summary["final-central"] == rounds[-1]["central"]
    assert f"final central: video-acc {summary['final-central']['video-accuracy']:.4f}" in text
    assert summary["wall-time-s"] >= rounds[-1]["wall-time-s"]  # the whole run: its last round and final report
    assert f"wall time: {summary['wall-time-s']:.1f} s" in text
    assert f"stop reason: {summary['stop-reason']}\n" in text


def test_a_failed_run_writes_its_summary_txt_with_its_json(small_run_config, tmp_path):
    config = {**small_run_config, "results-dir": str(tmp_path), "run-name": "bad", "model": "resnet9000"}
    with pytest.raises(Exception, match="resnet9000"):
        run(config, 1)
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    text = (tmp_path / "bad" / "summary.txt").read_text()
    assert summary["status"] == "failed" and text == summary_text(summary)
    assert text.startswith(f"status: failed\nerror: {summary['error']}\n")
    assert_text_shows_only_json_figures(text, summary)


def test_results_and_checkpoints_get_the_mode_the_umask_gives(finished):
    """Not 0600 (what a temp file is created with): results are as readable as any file written."""
    _, folder = finished
    mask = os.umask(0o022)
    os.umask(mask)
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert {"summary.json", "summary.txt", "model.safetensors", "manifest.json"} <= {p.name for p in written}
    for path in [folder, *folder.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
