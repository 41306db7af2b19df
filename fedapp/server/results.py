"""The run's results directory, written atomically: a crash never leaves a half-written file."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedapp.files import atomic_path, atomic_write_bytes, atomic_write_json
from fedapp.server.summary import summary_text

SUMMARY_FILE = "summary.json"
SUMMARY_TEXT_FILE = "summary.txt"
CONFIG_FILE = "run_config.json"
ROUNDS_FILE = "rounds.jsonl"
PARTITIONS_FILE = "partitions.json"
MODEL_FILE = "model.safetensors"
CLASSES_FILE = "classes.json"
LOCK_FILE = ".writer.lock"
# A folder holding any of these already belongs to a run (the launcher's logs/ alone does not).
RUN_FILES = (CONFIG_FILE, SUMMARY_FILE, ROUNDS_FILE, MODEL_FILE, "checkpoints")


class RunFolderError(RuntimeError):
    """The run folder belongs to another run, or another process is writing it."""


def run_folder_taken(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` already holds a run's files."""
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """What the process writing ``run_dir`` recorded (pid, host, start), or None if no one holds it."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                return json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                return {}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


class WriterLock:
    """The one writer of a run folder: an exclusive ``flock`` on ``run_dir/.writer.lock``, which
    records the writer's pid, host and start time.

    The kernel drops the lock when its process ends, however it ends (``kill -9`` included), so a
    stale lock file never blocks a later run; a live writer always does.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise RunFolderError(
                f"{self.path.parent} is being written by another process ({holder or 'unknown'}): "
                "one writer per run folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def save_weights(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Weights as safetensors (no pickle: safe to load from anywhere), atomically."""
    with atomic_path(path) as tmp:
        save_file({k: np.asarray(v, order="C") for k, v in arrays.items()}, str(tmp), metadata=dict(metadata))


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


class RunResults:
    """One run's folder: config, partition summary, per-round history, final model, summary."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        self.config_written = False  # the run got past its start checks

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.dir / CONFIG_FILE, dict(config))
        self.config_written = True

    def write_partitions(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.dir / PARTITIONS_FILE, dict(summary))

    def append_round(self, record: Mapping[str, Any]) -> None:
        """Add one round to ``rounds.jsonl`` (the whole small file is rewritten atomically)."""
        self.rounds.append(dict(record))
        self._write_rounds()

    def restore_history(self, rounds: Sequence[Mapping[str, Any]]) -> None:
        """Continue a resumed run: the history becomes exactly the checkpoint's (no gap, no duplicate)."""
        self.rounds = [dict(r) for r in rounds]
        self._write_rounds()

    def _write_rounds(self) -> None:
        text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in self.rounds)
        atomic_write_bytes(self.dir / ROUNDS_FILE, text.encode())

    def save_model(self, arrays: Mapping[str, np.ndarray], classes: Sequence[str], model_name: str) -> None:
        """Final global weights with the class list (in the file's metadata and beside it)."""
        atomic_write_json(self.dir / CLASSES_FILE, list(classes))
        save_weights(self.dir / MODEL_FILE, arrays, {"model": model_name, "classes": json.dumps(list(classes))})

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary.json`` and ``summary.txt``, the text rendered from the same dict: the two never
        disagree, and a failed run (a failed resume too) replaces the text along with the JSON."""
        atomic_write_json(self.dir / SUMMARY_FILE, dict(summary))
        atomic_write_bytes(self.dir / SUMMARY_TEXT_FILE, summary_text(summary).encode())
