"""A disk cache of decoded videos: each video decoded once, reused across epochs, rounds and runs.

An entry is the whole video as uint8 ``N×H×W×3`` RGB frames at the ``resize`` size (an exact
``(height, width)``, or an int short side with the aspect ratio kept; every frame, stride 1),
stored as one ``.npy`` file and read back memory-mapped: a clip copies only its own frames out of
the page cache. Entries hold the frames *before* any crop, jitter or flip, so the random training
augmentation still differs per epoch, and ``clip-len`` / ``clip-stride`` / random clip starts can
pick any frame without a new decode. Pixels are exactly what
:func:`datasets.video_io.decode_frames` returns for the same frames, so cached and uncached clips
are identical.

Disk cost: ``N × H × W × 3`` bytes per video (+128 bytes of header). At ``resize="64x64"`` that is
12 KiB per frame (a 24-frame synthetic video: 288 KiB); at ``"128x171"`` 64 KiB per frame, so a
UCF-101 video (about 180 frames) takes about 12 MB and all of UCF-101 about 160 GB — decoded
frames are far larger than the compressed files. A short side N costs ``N × int(N × aspect) × 3``
bytes per frame: short side 128 of UCF-101's 320×240 is 128×170, as many bytes as ``"128x170"``.

Layout: ``<root>/<settings digest>/<source digest>-<size>-<mtime_ns>.npy``. The settings digest
covers what changes decoded pixels (the resize size, exact or short side, PyAV's version and this
format's version); the source digest is that of the file's absolute path; size and ``mtime_ns``
name its version. A changed source file or changed settings therefore miss, and writing a source's
new entry deletes its stale versions. Writes go to a temp file in the same folder and are renamed
in place, so a killed process never leaves a partial entry (at worst a ``.tmp-*`` file);
concurrent writers of one entry each rename a complete file. An entry that cannot be read
(truncated, wrong header, wrong shape) is a miss and is rewritten. A file that cannot be decoded
is never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from datasets.video_io import VideoDecodeError, decode_frames, probe_video, resized_shape

logger = logging.getLogger(__name__)

# Bump when the stored layout or the decoding behind it changes: old entries then simply miss.
FORMAT_VERSION = 1
# Frames decoded per decode_frames call while building an entry: bounds the decoder's memory
# (about twice this many bytes) for long videos, at the price of one extra seek per chunk.
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ClipCache:
    """Decoded videos at ``resize`` under ``root``: an exact (height, width), or an int short side
    (aspect kept, see :func:`datasets.video_io.resized_shape`); see the module docstring."""

    root: Path
    resize: tuple[int, int] | int

    @property
    def settings_digest(self) -> str:
        """Hash of every setting that changes the decoded pixels (the folder of this cache's entries)."""
        # An exact size keeps the digest it always had (existing caches stay valid); a short side is a
        # dict, so short side N never shares a folder with N×N.
        resize = {"short-side": self.resize} if isinstance(self.resize, int) else list(self.resize)
        settings = {"format": FORMAT_VERSION, "resize": resize, "pyav": av.__version__}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def entry_path(self, video_path: str | Path) -> Path:
        """The entry for the current version of ``video_path``; raises OSError if the file is gone."""
        source = Path(video_path).resolve()
        stat = source.stat()
        return self._folder() / f"{_source_digest(source)}-{stat.st_size}-{stat.st_mtime_ns}.npy"

    def load(self, video_path: str | Path) -> np.ndarray | None:
        """The cached frames (memory-mapped, read-only), or None on a miss or an unreadable entry."""
        try:
            entry = self.entry_path(video_path)
        except OSError:
            return None  # a missing source: the decoder reports it as a VideoDecodeError
        try:
            frames = np.load(entry, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as error:
            logger.warning("clip cache entry %s is unreadable (%s): decoding again", entry, error)
            return None
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] < 1 or not self._fits(frames.shape[1:]):
            logger.warning("clip cache entry %s has shape %s %s: decoding again", entry, frames.dtype, frames.shape)
            return None
        return frames

    def build(self, video_path: str | Path, num_frames: int) -> np.ndarray:
        """Decode frames ``0..num_frames-1`` into a new entry, atomically; returns it memory-mapped.

        Raises VideoDecodeError (and writes nothing) if any frame cannot be decoded.
        """
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        entry = self.entry_path(video_path)  # before decoding: a file changed meanwhile misses next time
        entry.parent.mkdir(parents=True, exist_ok=True)
        height, width = self._frame_size(video_path)
        chunk = max(1, CHUNK_BYTES // (height * width * 3))
        shape = (num_frames, height, width, 3)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=entry.parent)
        tmp = Path(tmp_name)
        try:
            # Plain writes, not a writable memmap: a full disk then raises OSError instead of SIGBUS.
            with os.fdopen(fd, "wb") as handle:
                descr = np.lib.format.dtype_to_descr(np.dtype(np.uint8))
                np.lib.format.write_array_header_1_0(handle, {"descr": descr, "fortran_order": False, "shape": shape})
                for first in range(0, num_frames, chunk):
                    frames = decode_frames(video_path, range(first, min(first + chunk, num_frames)), self.resize)
                    if frames.shape[1:] != (height, width, 3):  # the header would not match the data
                        raise VideoDecodeError(f"{video_path}: frames of {frames.shape[1:]}, expected {height}x{width}")
                    handle.write(np.ascontiguousarray(frames).data)
                handle.flush()
                os.fsync(handle.fileno())  # the data is on disk before the name says the entry exists
            os.replace(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        self._drop_stale(entry)
        return np.load(entry, mmap_mode="r", allow_pickle=False)

    def _fits(self, frame_shape: tuple[int, ...]) -> bool:
        """Whether an entry's ``H×W×C`` frames are of this cache's size."""
        if isinstance(self.resize, int):
            return len(frame_shape) == 3 and frame_shape[2] == 3 and min(frame_shape[:2]) == self.resize
        return frame_shape == (*self.resize, 3)

    def _frame_size(self, video_path: str | Path) -> tuple[int, int]:
        """The decoded ``(height, width)``: a short side depends on the video's native size."""
        if not isinstance(self.resize, int):
            return self.resize
        info = probe_video(video_path)
        return resized_shape(info.height, info.width, self.resize)

    def _folder(self) -> Path:
        return Path(self.root).expanduser() / self.settings_digest

    def _drop_stale(self, entry: Path) -> None:
        """Delete the entries of older versions of the same source file (same settings)."""
        digest = entry.name.split("-", 1)[0]
        for old in entry.parent.glob(f"{digest}-*.npy"):
            if old != entry:
                old.unlink(missing_ok=True)


def _source_digest(source: Path) -> str:
    return hashlib.sha256(str(source).encode()).hexdigest()[:24]
