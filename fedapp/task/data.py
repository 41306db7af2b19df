"""From the run config to data: the dataset index, this node's partition and the loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datasets.clip_dataset import EvalClipDataset, TrainClipDataset, collate_clips
from datasets.layouts import (
    VIDEO_EXTENSIONS,
    VideoIndex,
    VideoSample,
    list_videos,
    load_class_folders,
    load_hmdb51,
    load_manifest,
    load_ucf101,
)
from datasets.partition import follow_partition, partition_samples
from datasets.synthetic import ensure_synthetic
from datasets.transforms import EvalClipTransform, TrainClipTransform
from fedapp.task.config import AppConfig, ConfigError

logger = logging.getLogger(__name__)

# Simulation runs many virtual clients in one process: cache indexes by their defining settings only.
_INDEX_CACHE: dict[tuple, VideoIndex] = {}


def load_video_index(cfg: AppConfig, data_dir: str | None = None) -> VideoIndex:
    """Index the configured dataset (generating the synthetic default on first use)."""
    data_dir = data_dir if data_dir is not None else cfg.data_dir
    key = (cfg.dataset, data_dir, cfg.splits_dir, cfg.fold, cfg.test_fraction, cfg.synthetic_spec, str(cfg.cache_path))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = _load_index(cfg, data_dir)
    return _INDEX_CACHE[key]


def _load_index(cfg: AppConfig, data_dir: str) -> VideoIndex:
    if cfg.dataset == "synthetic":
        root = ensure_synthetic(cfg.cache_path, cfg.synthetic_spec)
        return load_ucf101(root / "UCF-101", root / "ucfTrainTestlist", cfg.fold)
    root = Path(data_dir).expanduser()
    if cfg.dataset == "ucf101":
        return load_ucf101(root, _splits_dir(cfg, root, "classInd.txt"), cfg.fold)
    if cfg.dataset == "hmdb51":
        return load_hmdb51(root, _splits_dir(cfg, root, f"*_test_split{cfg.fold}.txt"), cfg.fold)
    if cfg.dataset == "folders":
        return load_class_folders(root, cfg.test_fraction)
    return load_manifest(root, cfg.test_fraction)


def _splits_dir(cfg: AppConfig, video_dir: Path, marker: str) -> Path:
    """The split-file folder: ``splits-dir`` if set, else searched beside and inside the video folder."""
    if cfg.splits_dir:
        return Path(cfg.splits_dir).expanduser()
    for base in (video_dir, video_dir.parent):
        for candidate in [base, *sorted(p for p in base.iterdir() if p.is_dir())]:
            if any(candidate.glob(marker)):
                return candidate
    raise ConfigError(
        f"splits-dir='' and no split files ({marker}) were found in or beside data-dir={str(video_dir)!r}: "
        "set splits-dir"
    )


def unlabeled_samples(cfg: AppConfig) -> list[VideoSample]:
    """Server-side unlabeled videos for FedDF: up to ``feddf-videos`` of every video under
    ``feddf-data-dir``; with it empty (allowed for ``dataset="synthetic"`` only, the config refuses
    it otherwise) fresh videos of the run's own synthetic task drawn with another seed, so never the
    train or test videos. Logs the source and the count."""
    if cfg.feddf_data_dir:
        root = Path(cfg.feddf_data_dir).expanduser()
        paths = list_videos(root)
        if not paths:
            raise ConfigError(
                f"feddf-data-dir={cfg.feddf_data_dir!r} holds no video file ({', '.join(VIDEO_EXTENSIONS)})"
            )
        samples = [VideoSample(str(p), -1, p.stem) for p in paths[: cfg.feddf_videos]]
        logger.info("FedDF distils on %d unlabeled videos from feddf-data-dir=%s", len(samples), root)
        return samples
    if cfg.dataset != "synthetic":  # parse_config refuses this; a hand-built config must not slip past
        raise ConfigError(f"feddf-data-dir='' is not allowed with dataset={cfg.dataset!r}: name unlabeled videos")
    spec = replace(
        cfg.synthetic_spec,
        seed=cfg.synthetic_spec.seed + 1_000_003,
        videos_per_class=max(2, -(-cfg.feddf_videos // cfg.synthetic_spec.num_classes)),
    )
    root = ensure_synthetic(cfg.cache_path, spec)
    index = load_ucf101(root / "UCF-101", root / "ucfTrainTestlist", 1)
    samples = [VideoSample(s.path, -1, s.group) for s in (index.train + index.test)][: cfg.feddf_videos]
    logger.info(
        "FedDF distils on %d unlabeled videos of the synthetic task generated with seed %d (not the run's videos)",
        len(samples),
        spec.seed,
    )
    return samples


def node_partition(
    cfg: AppConfig, index: VideoIndex, partition_id: int, num_partitions: int
) -> tuple[list[VideoSample], list[VideoSample]]:
    """This node's train and test videos: the configured partition of the train split, and of the
    test split the same share of every class (``follow_partition``), so a site's local evaluation
    follows its own label distribution.

    Whole videos are assigned, so clips of one video never reach two clients. With a single
    partition (a SuperNode holding its own data folder) the node keeps everything.
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} is out of range: allowed [0, {num_partitions - 1}]")
    if num_partitions == 1:
        return list(index.train), list(index.test)
    if not index.train:  # nothing to split: the client reports it has no training video
        return [], []
    train_parts, test_parts = federation_partition(cfg, index, num_partitions)
    return [index.train[i] for i in train_parts[partition_id]], [index.test[i] for i in test_parts[partition_id]]


# One simulation process serves many virtual clients, each asking for its own part of the same
# partition: computed once per process (an O(videos + sites) pass), not once per client and round.
_PARTITION_CACHE: dict[tuple, tuple[VideoIndex, list[list[int]], list[list[int]]]] = {}
_PARTITION_CACHE_SIZE = 4


def partition_key(cfg: AppConfig, index: VideoIndex, num_partitions: int) -> tuple:
    """What determines a federation's partition of ``index`` (an index cached for the process's
    lifetime, so its id identifies the dataset)."""
    return (
        id(index),
        cfg.partitioning,
        cfg.partition_seed,
        cfg.dirichlet_alpha,
        cfg.min_partition_videos,
        cfg.classes_per_client,
        num_partitions,
    )


def federation_partition(
    cfg: AppConfig, index: VideoIndex, num_partitions: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Every site's train and test indices under ``cfg``'s partitioning, cached per process."""
    key = partition_key(cfg, index, num_partitions)
    cached = _PARTITION_CACHE.get(key)
    # The entry holds the index, so while it is cached no other object can reuse its id.
    if cached is not None and cached[0] is index:
        return cached[1], cached[2]
    train_parts = partition_samples(
        labels=[s.label for s in index.train],
        groups=[s.group for s in index.train],
        method=cfg.partitioning,
        num_partitions=num_partitions,
        seed=cfg.partition_seed,
        alpha=cfg.dirichlet_alpha,
        k=cfg.classes_per_client,
        min_per_partition=cfg.min_partition_videos,
    )
    test_parts = follow_partition(
        [s.label for s in index.train], train_parts, [s.label for s in index.test], cfg.partition_seed + 1
    )
    if len(_PARTITION_CACHE) >= _PARTITION_CACHE_SIZE:
        _PARTITION_CACHE.pop(next(iter(_PARTITION_CACHE)))  # the oldest
    _PARTITION_CACHE[key] = (index, train_parts, test_parts)
    return train_parts, test_parts


def loader_workers(num_workers: int) -> int:
    """DataLoader workers for ``num-workers``: -1 means the CPUs this process may use minus one
    (one stays for the training loop), at least 0."""
    if num_workers != -1:
        return num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cpus - 1, 0)


def train_loader(
    cfg: AppConfig, samples: Sequence[VideoSample], seed: int, warn_scope: Hashable | None = None
) -> DataLoader:
    """Shuffled loader of one random clip per video per epoch; an unreadable file is warned about
    once per ``warn_scope`` (None: once per loader)."""
    dataset = TrainClipDataset(
        samples,
        cfg.clip_spec,
        TrainClipTransform(cfg.crop_size, mean=cfg.normalization[0], std=cfg.normalization[1]),
        seed=seed,
        cache_dir=cfg.clip_cache_dir or None,
        warn_scope=warn_scope,
    )
    return _loader(cfg, dataset, shuffle=True, generator=torch.Generator().manual_seed(seed))


def eval_loader(cfg: AppConfig, samples: Sequence[VideoSample], warn_scope: Hashable | None = None) -> DataLoader:
    """Loader of ``eval-clips`` uniformly spaced clips per video, in order; warnings as ``train_loader``."""
    dataset = EvalClipDataset(
        samples,
        cfg.clip_spec,
        EvalClipTransform(cfg.crop_size, *cfg.normalization),
        clips_per_video=cfg.eval_clips,
        cache_dir=cfg.clip_cache_dir or None,
        warn_scope=warn_scope,
    )
    return _loader(cfg, dataset, shuffle=False)


def _loader(cfg: AppConfig, dataset: torch.utils.data.Dataset, **kwargs) -> DataLoader:
    # Pinned host memory lets the training loop's non-blocking copies overlap with compute on CUDA.
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=loader_workers(cfg.num_workers),
        collate_fn=collate_clips,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )
