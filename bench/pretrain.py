"""A backbone pretrained centrally on a synthetic task disjoint from the federated one.

Users start from pretrained backbones; this gives the benchmarks one without downloading: tiny3d
trained centrally on the synthetic classes a federated run does not use (the 8-class generator's
classes from ``--skip-classes`` on: with the default 4, the rotations and zooms, while a federated
run with ``synthetic-classes = 4`` has the four translations; no label in common). The weights are
written as safetensors for ``pretrained-path`` (its head is dropped when loaded: the federated run
gets a new head for its own classes). Prints the pretraining task's held-out accuracy.

    .venv/bin/python -m bench.pretrain --out /tmp/pretrained-tiny3d.safetensors
    .venv/bin/python -m bench.heterogeneity --classes 4 --pretrained-path /tmp/pretrained-tiny3d.safetensors ...
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.robustness import SMALL


def pretrain_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run config whose data and clip settings the pretraining uses (the benchmarks' small setting)."""
    return {**SMALL, "synthetic-classes": 8, "synthetic-videos-per-class": args.videos_per_class,
            "cache-dir": args.cache_dir, "torch-threads": args.threads, "seed": args.seed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the weights file to write (.safetensors)")
    parser.add_argument("--skip-classes", type=int, default=4, help="the federated task's classes, left out here")
    parser.add_argument("--videos-per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: the app's)")
    args = parser.parse_args(argv)

    from fedapp.server.results import save_weights
    from fedapp.task.config import parse_config
    from fedapp.task.data import eval_loader, load_video_index, train_loader
    from fedapp.task.models import build_model
    from fedapp.task.train import evaluate_model, make_optimizer, set_torch_threads, state_arrays, train_epochs

    cfg = parse_config(pretrain_config(args))
    set_torch_threads(cfg.torch_threads)
    index = load_video_index(cfg)
    kept = index.classes[args.skip_classes :]
    if not kept:
        parser.error(f"--skip-classes={args.skip_classes} leaves no class of {len(index.classes)} to pretrain on")

    def relabel(samples: list) -> list:
        return [replace(s, label=s.label - args.skip_classes) for s in samples if s.label >= args.skip_classes]

    train, test = relabel(index.train), relabel(index.test)
    import torch

    torch.manual_seed(args.seed)
    model = build_model(cfg.model, len(kept))
    device = torch.device("cpu")
    started = time.perf_counter()
    metrics = train_epochs(model, train_loader(cfg, train, seed=args.seed), make_optimizer(model, cfg), args.epochs,
                           device)  # fmt: skip
    scores = evaluate_model(model, eval_loader(cfg, test), device)
    save_weights(args.out, dict(zip(model.state_dict(), state_arrays(model))),
                 {"classes": ",".join(kept), "model": cfg.model})  # fmt: skip
    print(
        f"pretrained {cfg.model} on {', '.join(kept)} ({len(train)} train videos, {args.epochs} epochs, "
        f"{time.perf_counter() - started:.0f} s): train accuracy {metrics['train-accuracy']:.3f}, "
        f"held-out video accuracy {scores['video-accuracy']:.3f} on {len(test)} videos; written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
