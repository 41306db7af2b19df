"""Atomic writes: a reader (or a later run) sees the old file or the new one, never half of one.

Every write goes to a temp file in the target's own folder (a rename is atomic only within one file
system), is fsync-ed, then renamed over the target with ``os.replace``; a write that fails or is
interrupted deletes its temp file. A writer killed outright (``kill -9``, power loss) can leave
only a temp file named ``.NAME.XXXXXXXX.tmp`` (:data:`TEMP_GLOB`), which
``fedapp.server.checkpoint.remove_partial_writes`` deletes at the next start.

A new file gets the mode ``open()`` would give it (0666, or 0777 for a folder, less the umask)
unless ``mode`` says otherwise; a private file (``mode=0o600``) has that mode from its creation on,
so no byte of it is ever readable by others, also when it replaces a file that was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"
TEMP_GLOB = f".*{TEMP_SUFFIX}"  # what a killed writer may leave in a folder


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask sets as it
    reads, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the new name survives a power loss)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # e.g. a file system that cannot open folders: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(path: Path, mode: int | None) -> tuple[int, Path]:
    """An open descriptor and the name of a new temp file beside ``path``, already at its final mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)  # created 0600
    try:
        os.fchmod(fd, (0o666 & ~_umask()) if mode is None else mode)  # before any byte is written
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, Path(tmp)


@contextmanager
def atomic_open(path: str | Path, *, mode: int | None = None) -> Iterator[IO[bytes]]:
    """``with atomic_open(path) as f: f.write(...)``: a binary file that becomes ``path`` when the
    block ends without error (flushed and fsync-ed first); on an error ``path`` is left as it was.

    For data written in pieces (too large to hold in memory at once)."""
    path = Path(path)
    fd, tmp = _temp_beside(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name says the file exists
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """``with atomic_path(path) as tmp: library.save(..., tmp)``: for writers that take a file name,
    not a file. ``tmp`` (an empty file beside ``path``) becomes ``path`` when the block ends
    without error; on an error it is deleted and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = _temp_beside(path, mode)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), (0o666 & ~_umask()) if mode is None else mode)  # in case the writer recreated it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` by ``data`` atomically (``mode``: e.g. 0o600 for a private key)."""
    with atomic_open(path, mode=mode) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, mode: int | None = None) -> None:
    """Replace ``path`` by ``obj`` as JSON (one trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n", mode=mode)


@contextmanager
def private_umask() -> Iterator[None]:
    """Inside the block, what this process and the processes it starts create is its owner's only
    (umask 077: files 0600, folders 0700); the umask is restored after. For a deployment, whose
    database holds every round's model weights. The umask is process-wide: use it where no other
    thread creates files meanwhile."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@contextmanager
def atomic_directory(path: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """``with atomic_directory(path) as tmp:`` fill ``tmp`` (a new folder beside ``path``); when the
    block ends without error it is renamed to ``path`` (an existing ``path`` is deleted first), on an
    error it is deleted. Write the files inside with the atomic writers above so that their data is
    on disk before the folder's new name is.

    The folder appears whole or not at all; replacing an existing one is two steps (delete, rename),
    so a crash between them leaves no ``path`` at all, never a mix of old and new files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX))  # created 0700
    try:
        yield tmp
        tmp.chmod((0o777 & ~_umask()) if mode is None else mode)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
