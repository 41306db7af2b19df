"""FLTrust's root set: a few labeled videos the server holds, and the server's own update on them.

The root set is a folder of class folders (``fltrust-root-dir``), named like the run's classes. It
must never hold one of the run's test videos (it would leak the test split into training), which is
checked by path at start; a class folder the run does not have is refused, a run class without a
root video is warned about (FLTrust then cannot tell a good update for that class from a bad one).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from datasets.clip_dataset import scan_videos
from datasets.layouts import VideoIndex, VideoSample, list_videos
from fedapp.task.config import AppConfig, ConfigError

logger = logging.getLogger(__name__)


def root_samples(cfg: AppConfig, index: VideoIndex) -> list[VideoSample]:
    """The labeled root videos under ``fltrust-root-dir``, labeled by the run's class list."""
    root = Path(cfg.fltrust_root_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"fltrust-root-dir={cfg.fltrust_root_dir!r} is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index.classes]
    if unknown:
        raise ConfigError(
            f"fltrust-root-dir={cfg.fltrust_root_dir!r} has class folders the run does not have: {unknown[:5]} "
            f"(the run's classes: {index.classes[:8]}{' ...' if len(index.classes) > 8 else ''})"
        )
    samples = [
        VideoSample(str(video.resolve()), index.classes.index(folder.name), video.stem)
        for folder in folders
        for video in list_videos(folder)
    ]
    if not samples:
        raise ConfigError(f"fltrust-root-dir={cfg.fltrust_root_dir!r} holds no video in a class folder")
    test_paths = {str(Path(s.path).resolve()) for s in index.test}
    leaked = [s.path for s in samples if s.path in test_paths]
    if leaked:
        raise ConfigError(
            f"fltrust-root-dir={cfg.fltrust_root_dir!r} holds {len(leaked)} of the run's test videos "
            f"(e.g. {leaked[0]}): the root set must be the server's own data, never the test split"
        )
    missing = sorted(set(index.classes) - {p.name for p in folders if list_videos(p)})
    if missing:
        logger.warning("FLTrust root set has no video of %d classes: %s", len(missing), ", ".join(missing[:8]))
    return samples


class RootTrainer:
    """The server's update on the root set: the global model trained as a client trains it
    (``local-epochs``, the client optimizer and ``lr``, ``batch-size``), its clip order seeded by the
    round, so two calls in one round (FLTrust and the test tool's adaptive attack) agree; the
    round's result is kept for the second."""

    def __init__(self, cfg: AppConfig, num_classes: int, samples: list[VideoSample], device: Any) -> None:
        usable, skipped = scan_videos(samples)
        if not usable:
            raise ConfigError(f"fltrust-root-dir={cfg.fltrust_root_dir!r}: none of its {len(samples)} videos decodes")
        self.cfg, self.num_classes, self.samples, self.device = cfg, num_classes, usable, device
        self.num_videos = len(usable)
        self._last: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None
        logger.info("FLTrust: root set of %d videos (%d unreadable) from %s", len(usable), len(skipped),
                    cfg.fltrust_root_dir)  # fmt: skip

    def __call__(self, global_model: Mapping[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
        key = (server_round, id(global_model))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        from fedapp.task.data import train_loader
        from fedapp.task.devices import prepare_model
        from fedapp.task.models import build_model
        from fedapp.task.train import load_named_arrays, make_optimizer, state_arrays, train_epochs

        cfg = self.cfg
        model = build_model(cfg.model, self.num_classes, freeze_backbone=cfg.freeze_backbone, pooling=cfg.pooling)
        load_named_arrays(model, global_model)
        model = prepare_model(model, self.device, cfg.channels_last)
        seed = (cfg.seed * 1_000_003 + server_round * 1009 + 999_983) % 2**31  # no client's seed
        loader = train_loader(cfg, self.samples, seed=seed)
        optimizer = make_optimizer(model, cfg)
        prefix = f"[root set round {server_round}] "
        train_epochs(model, loader, optimizer, cfg.local_epochs, self.device, cfg.bf16, cfg.channels_last, prefix)
        trained = dict(zip(model.state_dict(), state_arrays(model)))
        self._last = (key, trained)
        return trained
