"""Local training throughput (clips/s) of a client fed from video files, against the pure-PyTorch
limit of the same model, measured in one run.

For each model (``--models``), the same ``fedapp.task.train.train_epochs`` loop runs ``--steps``
optimizer steps of ``--batch-size`` clips of ``--clip-len`` × ``--size``² in three ways:

- **limit**: random clips and labels already on the device (``--steps`` batches made once, channels
  last when asked), after ``--warmup-steps`` untimed steps: what the model and optimizer alone allow;
- **cold**: the real client loader (``fedapp.task.data.train_loader``: PyAV decoding of the synthetic
  dataset's MPEG-4 files, random clip offset, crop, jitter, normalisation, collate) built fresh, as
  a client builds it every round; the files themselves are in the OS page cache (just generated);
- **cached**: the same loader with the decoded-video cache on (``clip_cache_dir``, set with
  ``dataclasses.replace`` on the AppConfig): one untimed epoch fills the cache, then a timed epoch
  with another seed (other clip offsets and crops, as the next round would draw) reads it.

``cold`` and ``cached`` print clips/s and their ratio to ``limit``. Model-independent ``decode
only`` rows (the loader iterated without a model) show how fast each input path can go at all.
All figures come from one run: the ratios are the result, the absolute clips/s depend on the
machine and its load. ``--repeats R`` measures every mode R times, interleaved, and keeps each
mode's best. The table also gives the share of each file-fed epoch spent waiting for the next batch
(decoding, with ``--workers 0``, runs in the training process). On a machine whose cores are busy
with other work, pass ``--threads 1``: torch's intra-op thread pool then stalls on every small
operation (the loader's per-clip tensor ops included) and the figures swing by several times. On
CPU the app ignores ``--bf16`` and ``--channels-last`` (bf16 autocast is CUDA-only there, by design).

    .venv/bin/python -m bench.client_throughput   # tiny3d, 16×64², batch 8 (CPU: a minute or two)
    .venv/bin/python -m bench.client_throughput --device cuda --models r3d_18 mc3_18 r2plus1d_18 \\
        --batch-size 32 --size 112 --bf16 --channels-last --workers 8 --steps 30  # the issue's GPU setting
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from bench.run import run_benchmark
from fedapp.task.models import MODEL_NAMES

NUM_CLASSES = 8  # the synthetic dataset's


class DeviceBatches:
    """A loader stand-in for ``train_epochs``: the same on-device batch ``steps`` times."""

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
        self.clips, self.labels, self.steps = clips, labels, steps
        self.indices = torch.arange(len(labels))
        self.dataset = None  # train_epochs looks for dataset.set_epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]]:
        for _ in range(self.steps):
            yield self.clips, self.labels, self.indices, []


class TimedLoader:
    """Passes a loader through to ``train_epochs`` and adds up the time spent waiting for batches."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.wait_s = loader, 0.0
        self.dataset = getattr(loader, "dataset", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.wait_s += time.perf_counter() - start
                return
            self.wait_s += time.perf_counter() - start
            yield batch


def has_clip_cache() -> bool:
    from fedapp.task.config import AppConfig

    return "clip_cache_dir" in {f.name for f in fields(AppConfig)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epoch(model: Any, loader: Any, cfg: Any, device: torch.device) -> tuple[float, float, float]:
    """(clips trained, seconds, seconds waiting for batches) of one train_epochs pass over ``loader``."""
    from fedapp.task.train import make_optimizer, train_epochs

    optimizer = make_optimizer(model, cfg)
    timed = TimedLoader(loader)
    _sync(device)
    start = time.perf_counter()
    metrics = train_epochs(model, timed, optimizer, 1, device, cfg.bf16, cfg.channels_last)
    _sync(device)
    return metrics["train-clips"], time.perf_counter() - start, timed.wait_s


def decode_only(loader: Any) -> tuple[float, float]:
    """(clips, seconds) of iterating the loader without a model."""
    start = time.perf_counter()
    clips = sum(len(labels) for _, labels, _, _ in loader)
    return float(clips), time.perf_counter() - start


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from datasets.clip_dataset import scan_videos
    from fedapp.task.config import parse_config
    from fedapp.task.data import load_video_index, train_loader
    from fedapp.task.devices import input_to_device, prepare_model, select_device
    from fedapp.task.models import build_model, count_parameters
    from fedapp.task.train import set_torch_threads

    videos = args.steps * args.batch_size
    modes = [m for m in args.modes if m != "cached" or has_clip_cache()]
    notes = [] if modes == args.modes else ["cached mode skipped: AppConfig has no clip_cache_dir field"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(
            {
                "batch-size": args.batch_size,
                "clip-len": args.clip_len,
                "resize": f"{args.size}x{args.size}",
                "crop-size": args.size,
                "num-workers": args.workers,
                "torch-threads": args.threads,
                "device": args.device,
                "bf16": args.bf16,
                "channels-last": args.channels_last,
                "synthetic-videos-per-class": max(2, math.ceil(videos / NUM_CLASSES)),
                "synthetic-frames": max(24, args.clip_len + 8),
                "synthetic-size": args.size,
                "cache-dir": args.cache_dir or str(Path(tmp) / "data"),
            }
        )
        set_torch_threads(cfg.torch_threads)
        device = select_device(cfg.device)
        index = load_video_index(cfg)
        samples, _ = scan_videos((index.train + index.test)[:videos])
        cached_cfg = replace(cfg, clip_cache_dir=str(Path(tmp) / "clips")) if "cached" in modes else None
        if cached_cfg is not None:
            Path(cached_cfg.clip_cache_dir).mkdir()

        decode: dict[str, float] = {}
        if cached_cfg is not None:
            decode_only(train_loader(cached_cfg, samples, seed=0))  # fills the cache
        for repeat in range(args.repeats):
            for mode, mode_cfg in (("cold", cfg), ("cached", cached_cfg)):
                if mode in modes:
                    clips, seconds = decode_only(train_loader(mode_cfg, samples, seed=1 + 10 * repeat))
                    decode[mode] = max(decode.get(mode, 0.0), clips / seconds)
        print("  decode only: " + ", ".join(f"{k} {v:.1f} clips/s" for k, v in decode.items()), flush=True)

        rows = []
        for name in args.models:
            torch.manual_seed(0)
            model = prepare_model(build_model(name, NUM_CLASSES), device, cfg.channels_last)
            row: dict[str, Any] = {"model": name, "params-m": count_parameters(model) / 1e6}
            shape = (args.batch_size, 3, args.clip_len, args.size, args.size)
            clips = input_to_device(torch.randn(shape), device, cfg.channels_last)
            labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
            timed_epoch(model, DeviceBatches(clips, labels, args.warmup_steps), cfg, device)  # untimed warm-up
            for repeat in range(args.repeats):  # modes interleaved; each keeps its best repeat
                for mode in modes:
                    if mode == "limit":
                        loader: Any = DeviceBatches(clips, labels, args.steps)
                    elif mode == "cold":
                        loader = train_loader(cfg, samples, seed=1 + 10 * repeat)
                    else:  # the cache was filled by the untimed decode-only pass above
                        loader = train_loader(cached_cfg, samples, seed=2 + 10 * repeat)
                    done, seconds, wait = timed_epoch(model, loader, cfg, device)
                    if done / seconds > row.get(f"{mode}-clips-per-s", 0.0):
                        row[f"{mode}-clips-per-s"] = done / seconds
                        row[f"{mode}-s"] = seconds
                        row[f"{mode}-input-wait-share"] = wait / seconds
            del model, clips
            if "limit" in modes:
                for mode in modes:
                    row[f"{mode}-vs-limit"] = row[f"{mode}-clips-per-s"] / row["limit-clips-per-s"]
            rows.append(row)
            print(
                "  " + name + ": " + ", ".join(f"{m} {row[f'{m}-clips-per-s']:.2f} clips/s" for m in modes), flush=True
            )
    return {
        "benchmark": "client-throughput",
        "device": str(device),
        "device-name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch-threads": torch.get_num_threads(),
        "batch-size": args.batch_size,
        "clip-len": args.clip_len,
        "size": args.size,
        "workers": args.workers,
        "steps": args.steps,
        "repeats": args.repeats,
        "videos": len(samples),
        "bf16": args.bf16 and device.type == "cuda",
        "channels-last": args.channels_last and device.type == "cuda",
        "modes": modes,
        "decode-only-clips-per-s": decode,
        "rows": rows,
        "notes": notes,
    }


def format_table(result: dict[str, Any]) -> str:
    modes = result["modes"]
    lines = [
        (
            f"device {result['device']} ({result['device-name']}), {result['torch-threads']} torch threads, "
            f"batch {result['batch-size']}, clips {result['clip-len']}×{result['size']}², {result['steps']} steps "
            f"(best of {result['repeats']}) "
            f"({result['videos']} videos), {result['workers']} loader workers, bf16 {result['bf16']}, "
            f"channels-last {result['channels-last']}"
        ),
        "decode only (loader, no model): "
        + ", ".join(f"{k} {v:.1f} clips/s" for k, v in result["decode-only-clips-per-s"].items()),
        *result["notes"],
        "",
        "| model | params M | "
        + " | ".join(f"{m} clips/s" for m in modes)
        + "".join(f" | {m} ÷ limit" for m in modes if m != "limit" and "limit" in modes)
        + "".join(f" | {m}: share waiting for input" for m in modes if m != "limit")
        + " |",
        "|---|---|"
        + "---|"
        * (
            len(modes)
            + 2 * sum(m != "limit" for m in modes)
            - sum(m != "limit" and "limit" not in modes for m in modes)
        ),
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['params-m']:.2f} | "
            + " | ".join(f"{row[f'{m}-clips-per-s']:.2f}" for m in modes)
            + "".join(f" | {row[f'{m}-vs-limit']:.2f}" for m in modes if m != "limit" and "limit" in modes)
            + "".join(f" | {row[f'{m}-input-wait-share']:.0%}" for m in modes if m != "limit")
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny3d"], choices=MODEL_NAMES)
    parser.add_argument("--modes", nargs="+", default=["limit", "cold", "cached"], choices=("limit", "cold", "cached"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast (CUDA only; ignored on CPU)"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="channels_last_3d model and clips (CUDA only; ignored on CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="frame, decode and crop size (square)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode (one epoch)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure every mode this many times (interleaved), keep the best"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.clip_len, args.steps, args.repeats) < 1 or args.warmup_steps < 0 or args.size < 16:
        parser.error("--batch-size, --clip-len, --steps and --repeats must be >= 1, --size >= 16, --warmup-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), benchmark, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
