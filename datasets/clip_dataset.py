"""PyTorch datasets of video clips decoded on the fly, tolerant of unreadable files.

A file that fails to probe or decode yields ``(None, label, index)`` instead of raising, so one
corrupt video cannot kill a federated client mid-round; ``collate_clips`` drops such items and
reports them. Use ``scan_videos`` up front to drop unreadable files before training.

Each unreadable file is warned about once per warning scope (:func:`reported_files`): a client
builds new datasets every round, and Flower's simulation reuses its worker processes across
rounds, so a per-dataset memory alone repeated the warning every round of a run.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.clip_cache import ClipCache
from datasets.layouts import VideoSample
from datasets.transforms import EvalClipTransform, TrainClipTransform
from datasets.video_io import (
    VideoDecodeError,
    clip_frame_indices,
    decode_frames,
    probe_video,
    random_clip_start,
    uniform_clip_starts,
)

logger = logging.getLogger(__name__)

# Files already warned about, per scope (a client names its run and partition): kept for the
# process's life so that the datasets of later rounds and epochs stay quiet about them.
_REPORTED: dict[Hashable, set[str]] = {}


def reported_files(scope: Hashable | None) -> set[str]:
    """The paths already warned about in ``scope``; None: a new, private set (warn once per owner)."""
    return set() if scope is None else _REPORTED.setdefault(scope, set())


def warn_unreadable(path: str, reason: object, reported: set[str]) -> None:
    """Warn that ``path`` is skipped, unless ``reported`` says it was already; records it there."""
    if path not in reported:
        reported.add(path)
        logger.warning("skipping unreadable video %s: %s", path, reason)


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut: ``clip_len`` frames every ``stride``, decoded at ``resize``, cropped square.

    ``resize`` is an exact ``(height, width)`` or an int N: the short side becomes N and the aspect
    ratio is kept (torchvision's int size, see :func:`datasets.video_io.resized_shape`).
    """

    clip_len: int = 16
    stride: int = 1
    resize: tuple[int, int] | int = (64, 64)
    crop_size: int = 64

    def __post_init__(self) -> None:
        sides = (self.resize,) if isinstance(self.resize, int) else self.resize
        if self.clip_len < 1 or self.stride < 1 or self.crop_size < 1 or min(sides) < 1:
            raise ValueError(f"ClipSpec values must be positive: {self}")


class _ClipDatasetBase(torch.utils.data.Dataset):
    """Shared decoding with a frame-count cache, an optional decoded-clip cache on disk
    (``cache_dir``, see :mod:`datasets.clip_cache`) and one warning per unreadable file and
    ``warn_scope`` (None: per dataset)."""

    def __init__(
        self,
        samples: Sequence[VideoSample],
        spec: ClipSpec,
        cache_dir: str | Path | None = None,
        warn_scope: Hashable | None = None,
    ):
        self.samples = list(samples)
        self.spec = spec
        self.cache = ClipCache(Path(cache_dir), spec.resize) if cache_dir else None
        self._num_frames: dict[str, int] = {}
        # Shared by the datasets of one scope in this process. A DataLoader worker gets a copy when
        # its epoch starts; what it adds is lost with it, so the training loop hands the failures it
        # sees back through mark_reported and the next epoch's workers know them.
        self._warned = reported_files(warn_scope)
        # Files whose cache entry could not be built: decoded clip by clip, as without a cache.
        self._uncacheable: set[str] = set()

    def _frame_count(self, sample: VideoSample) -> int:
        """Number of frames of the sample's video, probed once; raises VideoDecodeError."""
        if sample.path not in self._num_frames:
            self._num_frames[sample.path] = probe_video(sample.path).num_frames
        return self._num_frames[sample.path]

    def _open(self, sample: VideoSample) -> tuple[int, np.ndarray | None]:
        """``(frame count, whole decoded video memory-mapped or None without cache)``; raises VideoDecodeError."""
        video = self._cached_video(sample)
        if video is not None:
            return len(video), video
        return self._frame_count(sample), None

    def _cached_video(self, sample: VideoSample) -> np.ndarray | None:
        if self.cache is None or sample.path in self._uncacheable:
            return None
        video = self.cache.load(sample.path)
        if video is not None:
            return video
        try:
            return self.cache.build(sample.path, self._frame_count(sample))
        except (VideoDecodeError, OSError) as error:
            # Never cached: the per-clip decode below skips and counts a bad file exactly as
            # without a cache (a truncated file's early clips still decode).
            logger.debug("not caching %s: %s", sample.path, error)
            self._uncacheable.add(sample.path)
            return None

    def _decode_clip(self, sample: VideoSample, num_frames: int, start: int, video: np.ndarray | None) -> np.ndarray:
        """The uint8 clip starting at frame ``start``, from ``video`` when cached; raises VideoDecodeError."""
        indices = clip_frame_indices(num_frames, self.spec.clip_len, self.spec.stride, start)
        if video is not None:
            return video[indices]  # fancy indexing copies just these frames out of the memory map
        return decode_frames(sample.path, indices, self.spec.resize)

    def _warn_once(self, sample: VideoSample, error: VideoDecodeError) -> None:
        warn_unreadable(sample.path, error, self._warned)

    def mark_reported(self, indices: Iterable[int]) -> None:
        """Record the samples at ``indices`` (as ``collate_clips`` reports failures) as warned about:
        in the main process, so a worker of a later epoch does not warn again."""
        self._warned.update(self.samples[i].path for i in indices)


class TrainClipDataset(_ClipDatasetBase):
    """One random clip per video per access: ``(clip C×T×H×W float32, label, index)``.

    Randomness (temporal offset, crop, jitter, flip) comes from ``np.random.default_rng([seed,
    index, epoch])``: the same seed and epoch give the same clips in any worker layout. Call
    ``set_epoch`` before creating each epoch's DataLoader iterator (workers copy the dataset then).
    An unreadable file gives ``(None, label, index)``.
    """

    def __init__(
        self,
        samples: Sequence[VideoSample],
        spec: ClipSpec,
        transform: TrainClipTransform,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        warn_scope: Hashable | None = None,
    ):
        super().__init__(samples, spec, cache_dir, warn_scope)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random clips __getitem__ returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int]:
        sample = self.samples[index]
        rng = np.random.default_rng([self.seed, index, self.epoch])
        try:
            num_frames, video = self._open(sample)
            start = random_clip_start(num_frames, self.spec.clip_len, self.spec.stride, rng)
            frames = self._decode_clip(sample, num_frames, start, video)
        except VideoDecodeError as error:
            self._warn_once(sample, error)
            return None, sample.label, index
        clip, label = self.transform(frames, sample.label, rng)
        return clip, label, index


class EvalClipDataset(_ClipDatasetBase):
    """Up to ``clips_per_video`` distinct, uniformly spaced clips per video
    (``uniform_clip_starts``), returned as ``(clip, label, video_index)`` in video order.

    A video with fewer valid clip starts than ``clips_per_video`` gives fewer clips (frame counts
    are probed here, from the headers). Average the model's outputs over a video's clips for
    video-level accuracy. An unreadable file gives one ``(None, label, video_index)``.
    """

    def __init__(
        self,
        samples: Sequence[VideoSample],
        spec: ClipSpec,
        transform: EvalClipTransform,
        clips_per_video: int = 3,
        cache_dir: str | Path | None = None,
        warn_scope: Hashable | None = None,
    ):
        if clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
        super().__init__(samples, spec, cache_dir, warn_scope)
        self.transform = transform
        self.clips_per_video = clips_per_video
        self._clips = [
            (video_index, clip_number)
            for video_index, sample in enumerate(self.samples)
            for clip_number in range(self._clip_count(sample))
        ]

    def _clip_count(self, sample: VideoSample) -> int:
        video = self.cache.load(sample.path) if self.cache is not None else None  # cached: no probe
        try:
            num_frames = len(video) if video is not None else self._frame_count(sample)
        except VideoDecodeError:
            return 1  # unreadable: one item, which reports the failure when decoded
        return len(uniform_clip_starts(num_frames, self.spec.clip_len, self.spec.stride, self.clips_per_video))

    def __len__(self) -> int:
        return len(self._clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        video_index, clip_number = self._clips[index]
        sample = self.samples[video_index]
        try:
            num_frames, video = self._open(sample)
            starts = uniform_clip_starts(num_frames, self.spec.clip_len, self.spec.stride, self.clips_per_video)
            # The decoded length can fall short of the header's count (a truncated file).
            frames = self._decode_clip(sample, num_frames, starts[min(clip_number, len(starts) - 1)], video)
        except VideoDecodeError as error:
            self._warn_once(sample, error)
            return None, sample.label, video_index
        return self.transform(frames), sample.label, video_index


def collate_clips(
    batch: Sequence[tuple[torch.Tensor | None, int, int]],
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[int]]:
    """Stack the readable items of a batch; returns ``(clips B×C×T×H×W or None, labels, indices, failed_indices)``.

    Labels and indices cover the readable items only; ``failed_indices`` lists the dataset's
    ``index`` field of the items whose file could not be decoded.
    """
    good = [(clip, label, index) for clip, label, index in batch if clip is not None]
    failed = [int(index) for clip, _, index in batch if clip is None]
    clips = torch.stack([clip for clip, _, _ in good]) if good else None
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.long)
    indices = torch.tensor([index for _, _, index in good], dtype=torch.long)
    return clips, labels, indices, failed


def scan_videos(samples: Sequence[VideoSample], warn: bool = True) -> tuple[list[VideoSample], list[tuple[str, str]]]:
    """Probe every sample; returns (usable samples, [(path, reason), ...] of skipped ones), with a
    warning per skipped file unless ``warn`` is False (the caller warns: see ``warn_unreadable``).

    Probing reads headers only: a truncated file whose header is intact passes here and fails
    later at decode time (the datasets then skip it).
    """
    usable: list[VideoSample] = []
    skipped: list[tuple[str, str]] = []
    for sample in samples:
        try:
            probe_video(sample.path)
        except VideoDecodeError as error:
            if warn:
                logger.warning("skipping unreadable video %s: %s", sample.path, error)
            skipped.append((sample.path, str(error)))
        else:
            usable.append(sample)
    return usable, skipped
