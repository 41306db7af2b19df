"""Keys of the data: which videos, how they are split among clients, and how clips are cut
(read by ``fedapp.task.data`` and ``datasets``; declared here so that validating a config never
imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets.layouts import LAYOUTS
from datasets.partition import METHODS as PARTITION_METHODS
from fedapp.config.keys import ConfigError, Key, Owner

DATASETS = ("synthetic", *LAYOUTS)
SYNTHETIC_PRESETS = ("easy", "hard")
APP_DIR = Path(__file__).resolve().parents[2]


def _own_data(cfg: Any) -> bool:
    return cfg.dataset != "synthetic"


DATA = Owner(
    "the data",
    keys=(
        Key("dataset", "synthetic", "synthetic (generated, offline) or the layout of your videos", choices=DATASETS),
        Key("data-dir", "", "the folder of your videos", when=_own_data,
            needs="a dataset of your own (dataset=" + " / ".join(f'"{d}"' for d in LAYOUTS) + ")"),
        Key("splits-dir", "", "UCF-101 / HMDB-51 split files (default: inside data-dir)",
            when=lambda c: c.dataset in ("ucf101", "hmdb51"), needs='dataset="ucf101" or "hmdb51"'),
        Key("fold", 1, "the official split (1-3)", low=1, high=3,
            when=lambda c: c.dataset in ("synthetic", "ucf101", "hmdb51"),
            needs='dataset="synthetic", "ucf101" or "hmdb51"'),
        Key("test-fraction", 0.2, "share of each class held out for testing", low=0.0, high=1.0, low_open=True,
            when=lambda c: c.dataset in ("folders", "manifest"), needs='dataset="folders" or "manifest"'),
        Key("cache-dir", "", "where generated data lives (default: ~/.cache/fedvideo)"),
        Key("partitioning", "iid", "how training videos are split among clients", choices=PARTITION_METHODS),
        Key("dirichlet-alpha", 0.5, "Dirichlet concentration (smaller: more skewed)", low=0.0, low_open=True,
            when=lambda c: c.partitioning == "dirichlet", needs='partitioning="dirichlet"'),
        Key("min-partition-videos", 1, "fewest training videos a site gets (Dirichlet redraws, then moves videos)",
            low=1, when=lambda c: c.partitioning == "dirichlet", needs='partitioning="dirichlet"'),
        Key("classes-per-client", 2, "classes each client holds", low=1,
            when=lambda c: c.partitioning == "k-classes", needs='partitioning="k-classes"'),
        Key("partition-seed", 42, "seeds the partition"),
    ),
)  # fmt: skip


def _even(value: int) -> str | None:
    return None if value % 2 == 0 else f"synthetic-classes={value} is not allowed: choose 2, 4, 6 or 8"


SYNTHETIC = Owner(
    "the synthetic dataset",
    keys=(
        Key("synthetic-classes", 8, "motion classes (2, 4, 6 or 8)", low=2, high=8, check=_even),
        Key("synthetic-videos-per-class", 35, "videos generated per class", low=2),
        Key("synthetic-frames", 24, "frames per video", low=2),
        Key("synthetic-size", 64, "frame side in pixels", low=16),
        Key("synthetic-preset", "easy", "easy or hard (clutter, noise, speed jitter)", choices=SYNTHETIC_PRESETS),
        Key("synthetic-seed", 0, "seeds the generator"),
    ),
    when=lambda cfg: cfg.dataset == "synthetic",
    needs='dataset="synthetic"',
)


def parse_size(text: str, key: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (or a single ``"S"`` for a square) into ``(height, width)``."""
    parts = str(text).lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2 or min(values) < 8:
        raise ConfigError(f"{key}={text!r} is invalid: expected 'HxW' with H, W >= 8 (e.g. '128x171')")
    return values  # type: ignore[return-value]


def parse_resize(text: str, key: str) -> tuple[int, int] | int:
    """Parse ``"short:N"`` (the short side becomes N, aspect kept: an int) or ``"HxW"`` (exact)."""
    if str(text).lower().startswith("short:"):
        side = str(text)[len("short:") :]
        if not side.isdigit() or int(side) < 8:
            raise ConfigError(f"{key}={text!r} is invalid: expected 'short:N' with N >= 8 (e.g. 'short:128')")
        return int(side)
    return parse_size(text, key)


def _resize(value: str) -> str | None:
    if value == "auto":
        return None
    try:
        parse_resize(value, "resize")
    except ConfigError as error:
        return str(error)
    return None


def _clip_cache_dir(value: str) -> str | None:
    """Empty (off) or an absolute folder outside the app (never bundled with it)."""
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() or path.resolve().is_relative_to(APP_DIR):
        return (
            f"clip-cache-dir={value!r} is not allowed: give an absolute path (or ~/...) outside the app folder "
            f"{str(APP_DIR)!r}, or '' to turn the clip cache off"
        )
    if path.exists() and not path.is_dir():
        return f"clip-cache-dir={value!r} is not a directory"
    return None


CLIPS = Owner(
    "clip sampling",
    keys=(
        Key("clip-len", 16, "frames per clip", low=1),
        Key("clip-stride", 1, "frame step inside a clip", low=1),
        Key("resize", "auto", '"auto" (the weights\' preset, else 64x64), "HxW" or "short:N" (aspect kept)',
            check=_resize),
        Key("crop-size", 0, "square crop side (0: the preset's)", low=0),
        Key("eval-clips", 3, "clips per video at evaluation", low=1),
        Key("clip-cache-dir", "", "an absolute folder for decoded clips outside the app ('' : off)",
            check=_clip_cache_dir),
    ),
)  # fmt: skip
OWNERS = (DATA, SYNTHETIC, CLIPS)
