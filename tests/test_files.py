"""fedapp.files: the target of an atomic write is never half-written, whatever fails when."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedapp import files
from fedapp.files import (
    TEMP_GLOB,
    atomic_directory,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from fedapp.server.checkpoint import remove_partial_writes

PROJECT_DIR = Path(__file__).resolve().parents[1]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the umask for one test (and put the old one back)."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_writes_replace_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "a.json"  # missing folders are made
    atomic_write_json(path, {"round": 1, "name": "ünïcode"})
    assert path.read_text(encoding="utf-8") == '{\n  "round": 1,\n  "name": "\\u00fcn\\u00efcode"\n}\n'
    atomic_write_json(path, [1, 2], indent=None)
    assert path.read_text() == "[1, 2]\n"
    atomic_write_text(path, "ünï\n")
    assert path.read_bytes() == "ünï\n".encode()
    atomic_write_bytes(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_write_failing_midway_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"round": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path) as f:
            f.write(b'{"round": 2, "half')
            f.flush()
            # The half-written bytes are in the temp file beside it, not in the target.
            assert [p.name for p in tmp_path.glob(TEMP_GLOB)] and json.loads(path.read_text()) == {"round": 1}
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failing_fsync_or_rename_keeps_the_old_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "rounds.jsonl"
    atomic_write_bytes(path, b"old\n")

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(path, b"new\n")
    assert path.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.jsonl"]


def test_a_killed_writer_leaves_only_a_temp_file_that_remove_partial_writes_deletes(tmp_path):
    """kill -9 mid-write: the target keeps its old content, and the one thing left over is named
    so that the next start's clean-up (fedapp.server.checkpoint.remove_partial_writes) finds it."""
    path = tmp_path / "rounds.jsonl"
    atomic_write_bytes(path, b"old\n")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom fedapp.files import atomic_open\n"
            f"with atomic_open({str(path)!r}) as f:\n"
            "    f.write(b'new, half'); f.flush(); print('writing', flush=True); time.sleep(60)\n",
        ],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert path.read_bytes() == b"old\n"
    (left,) = tmp_path.glob(TEMP_GLOB)
    assert left.name.startswith(".rounds.jsonl.") and left.read_bytes() == b"new, half"
    assert remove_partial_writes(tmp_path) == [left]
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.jsonl"]


def test_new_files_get_the_mode_open_would_give_them(tmp_path, umask):
    umask(0o027)
    atomic_write_bytes(tmp_path / "a", b"x")
    assert mode_of(tmp_path / "a") == 0o640
    (tmp_path / "b").write_bytes(b"x")  # what a plain write gives, for comparison
    assert mode_of(tmp_path / "b") == 0o640
    umask(0o022)
    atomic_write_bytes(tmp_path / "a", b"y")  # a replaced file gets the mode anew
    assert mode_of(tmp_path / "a") == 0o644


def test_a_private_file_is_never_readable_by_others_even_while_written(tmp_path, umask):
    umask(0o000)
    path = tmp_path / "ca.key"
    atomic_write_bytes(path, b"old, public", mode=0o644)
    assert mode_of(path) == 0o644
    with atomic_open(path, mode=0o600) as f:
        assert stat.S_IMODE(os.fstat(f.fileno()).st_mode) == 0o600  # before the first byte
        f.write(b"secret")
    assert mode_of(path) == 0o600 and path.read_bytes() == b"secret"
    umask(0o077)
    atomic_write_bytes(tmp_path / "ca.crt", b"cert", mode=0o644)  # an explicit mode ignores the umask
    assert mode_of(tmp_path / "ca.crt") == 0o644


def test_atomic_path_serves_writers_that_want_a_file_name(tmp_path, umask):
    path = tmp_path / "model.safetensors"
    atomic_write_bytes(path, b"old")

    def recreating_writer(name: Path, data: bytes) -> None:  # deletes and recreates its output
        name.unlink()
        name.write_bytes(data)

    umask(0o077)
    with atomic_path(path, mode=0o644) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and path.read_bytes() == b"old"
        recreating_writer(tmp, b"new")
    assert path.read_bytes() == b"new" and mode_of(path) == 0o644  # the mode is set again
    with pytest.raises(ValueError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("the writer failed")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path, umask):
    umask(0o022)
    final = tmp_path / "checkpoints" / "round-0001"
    with atomic_directory(final) as tmp:
        assert tmp.name.startswith(".round-0001.") and tmp.name.endswith(files.TEMP_SUFFIX)
        atomic_write_bytes(tmp / "model.safetensors", b"one")
        assert not final.exists()
    assert (final / "model.safetensors").read_bytes() == b"one" and mode_of(final) == 0o755
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            atomic_write_bytes(tmp / "model.safetensors", b"two, half")
            raise RuntimeError("killed mid-checkpoint")
    assert (final / "model.safetensors").read_bytes() == b"one"
    with atomic_directory(final) as tmp:  # a rewrite replaces the old folder, no old file survives in it
        atomic_write_bytes(tmp / "manifest.json", b"{}")
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json"]
    assert [p.name for p in final.parent.iterdir()] == ["round-0001"]
