"""Classify videos with a trained checkpoint.

    fedvideo predict CHECKPOINT VIDEO [VIDEO ...] [--top-k 5] [--json]

CHECKPOINT is a checkpoint folder or a run folder (its best checkpoint, else its latest). Each
video's prediction averages the softmax of its ``eval-clips`` clips, cut as evaluation cuts them.
An unreadable video gets an error entry instead of stopping the others. Exit status: 0 when every
video was classified, 1 when any failed, 2 when the checkpoint cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch, PyAV and the checkpoint code are imported where they are used, so that
# `fedvideo predict --help` answers without loading them (seconds on a busy machine).
if TYPE_CHECKING:
    from torch import nn

    from fedapp.task.config import AppConfig

logger = logging.getLogger(__name__)


def format_line(entry: dict[str, Any]) -> str:
    """One human-readable line per video: ``path: Label 0.912, Other 0.051`` or ``path: ERROR ...``."""
    if "error" in entry:
        return f"{entry['video']}: ERROR {entry['error']}"
    labels = ", ".join(f"{item['label']} {item['probability']:.3f}" for item in entry["top"])
    return f"{entry['video']}: {labels}"


def predict_many(
    model: nn.Module, cfg: AppConfig, classes: list[str], videos: list[str], top_k: int
) -> list[dict[str, Any]]:
    """A prediction or an ``{"video", "error"}`` entry per video, in the given order."""
    from datasets.video_io import VideoDecodeError
    from fedapp.tools.inference import predict_video

    entries = []
    for video in videos:
        try:
            entries.append(predict_video(model, video, cfg, classes, top_k))
        except VideoDecodeError as error:
            logger.debug("cannot classify %s: %s", video, error)  # reported in the entry
            entries.append({"video": str(video), "error": str(error)})
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedvideo predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder or run folder")
    parser.add_argument(
        "--site", type=int, default=None, help="a personalized run: this site's personal model (its partition id)"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="with --site: the SuperNode's state-dir holding it"
    )
    parser.add_argument("videos", nargs="+", help="video files to classify")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per video (default 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of one line per video")
    args = parser.parse_args(argv)
    if args.state_dir is not None and args.site is None:
        parser.error("--state-dir names where a site's personal model is: it needs --site")
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fedapp.client.personal import PersonalStateError
    from fedapp.server.checkpoint import CheckpointError, model_from_checkpoint
    from fedapp.task.config import ConfigError
    from fedapp.task.models import ModelError

    try:
        model, classes, cfg = model_from_checkpoint(args.checkpoint, args.site, args.state_dir)
    except (CheckpointError, ConfigError, ModelError, PersonalStateError, OSError) as error:
        print(f"cannot load checkpoint {args.checkpoint}: {error}", file=sys.stderr)
        return 2
    entries = predict_many(model, cfg, classes, args.videos, args.top_k)
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        for entry in entries:
            print(format_line(entry))
    failed = sum("error" in entry for entry in entries)
    if failed:
        print(f"{failed} of {len(entries)} videos could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
