"""Export a checkpoint as TorchScript (float and dynamic-int8) and check what the export changes.

    fedvideo export CHECKPOINT --out DIR [--samples N] [--videos VIDEO ...] [--latency-runs 10]

Writes into DIR:

* ``model.ts``: ``torch.jit.trace`` of the eval-mode classifier on a ``1×C×T×H×W`` clip.
* ``model-int8.ts``: the same after ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
  qint8)``, traced. Dynamic quantization only touches ``nn.Linear`` layers (weights stored int8,
  activations quantized on the fly); convolutions stay float. In the video models here the only
  Linear layer is the classification head (and the attention scorer of ``framepool_*`` with
  attention pooling), so size and latency barely change: ``export.json`` reports what was measured.
* ``classes.json``: the class names, in logit order.
* ``export.json``: artifact sizes in bytes, CPU latency per clip (median, batch 1, one thread), and
  the agreement of each artifact with the eager float model on N sample clips (the evaluation
  clips of ``--videos``, else of freshly rendered synthetic videos).

Both artifacts are checked after being read back from their bytes. Exit status 1 when the float
TorchScript's logits differ from eager by more than 1e-4 (the files are still written, for
inspection), 2 when the checkpoint cannot be loaded or no sample clip can be read.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedapp.files import atomic_write_bytes, atomic_write_json

# torch, PyAV and the checkpoint code are imported in the functions that use them, so that
# `fedvideo export --help` answers without loading them (seconds on a busy machine).
if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedapp.task.config import AppConfig

logger = logging.getLogger(__name__)

FLOAT_FILE = "model.ts"
INT8_FILE = "model-int8.ts"
CLASSES_FILE = "classes.json"
REPORT_FILE = "export.json"
FLOAT_TOLERANCE = 1e-4  # max abs logit difference allowed between TorchScript float and eager
SYNTHETIC_SEED = 20_240_601  # sample videos differ from any training set generated with small seeds


class ExportError(RuntimeError):
    """No sample clip to check the export with."""


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # torch 2.x marks TorchScript and torch.ao quantization deprecated and warns on every call;
    # they still work, and the warning is recorded once in export.json instead.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions .* are deprecated")
        yield


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synthetic_sample_clips(cfg: AppConfig, count: int) -> torch.Tensor:
    """``count`` clips cut from freshly rendered synthetic videos (all eight motions, in turn),
    written to a temporary folder and read back through the evaluation pipeline."""
    from datasets.layouts import list_videos
    from datasets.synthetic import SyntheticSpec, generate_dataset
    from datasets.video_io import clip_span
    from fedapp.config.data import parse_resize

    resize = parse_resize(cfg.resize, "resize")
    sides = (resize,) if isinstance(resize, int) else resize  # square synthetic frames: the larger side
    spec = SyntheticSpec(
        num_classes=8,
        videos_per_class=max(1, math.ceil(count / 8)),
        num_frames=max(2, clip_span(cfg.clip_len, cfg.clip_stride)),
        size=max(16, *sides),
        seed=SYNTHETIC_SEED,
    )
    with tempfile.TemporaryDirectory(prefix="fedapp-export-") as tmp:
        root = generate_dataset(Path(tmp) / "synthetic", spec)
        by_class = [list_videos(folder) for folder in sorted((root / "UCF-101").iterdir())]
        # one video of each class in turn, so a small sample still covers every motion
        ordered = [videos[i] for i in range(spec.videos_per_class) for videos in by_class if i < len(videos)]
        return sample_clips_from_videos(cfg, ordered, count)


def sample_clips_from_videos(cfg: AppConfig, videos: Sequence[str | Path], count: int) -> torch.Tensor:
    """Up to ``count`` evaluation clips of the given videos (all clips of each, in order);
    unreadable videos are skipped. Raises ExportError when none can be read."""
    import torch

    from datasets.video_io import VideoDecodeError
    from fedapp.tools.inference import video_clips

    clips: list[torch.Tensor] = []
    for video in videos:
        if len(clips) >= count:
            break
        try:
            clips.extend(video_clips(video, cfg))
        except VideoDecodeError as error:
            logger.warning("sample video skipped: %s", error)
    if not clips:
        raise ExportError("no readable sample video to check the export with")
    return torch.stack(clips[:count])


def _serialize(module: torch.jit.ScriptModule) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def _median_latency_ms(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, runs: int) -> float:
    """Median wall time of ``fn(example)`` over ``runs`` calls, after two warm-up calls."""
    times = []
    for index in range(runs + 2):
        start = time.perf_counter()
        fn(example)
        if index >= 2:  # the first calls of a TorchScript module also run its profiling/optimization
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _linear_layers(model: nn.Module) -> list[str]:
    from torch import nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _trace_and_write(
    model: nn.Module, classes: Sequence[str], out_dir: Path, example: torch.Tensor
) -> tuple[bytes, bytes]:
    """Trace the float and dynamic-int8 model on ``example``; write both and ``classes.json``."""
    import torch
    from torch import nn

    float_bytes = _serialize(torch.jit.trace(model, example, check_trace=False))
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    int8_bytes = _serialize(torch.jit.trace(quantized, example, check_trace=False))
    atomic_write_bytes(out_dir / FLOAT_FILE, float_bytes)
    atomic_write_bytes(out_dir / INT8_FILE, int8_bytes)
    atomic_write_json(out_dir / CLASSES_FILE, list(classes))
    return float_bytes, int8_bytes


def _agreement(eager: torch.Tensor, scripted: torch.Tensor, int8: torch.Tensor) -> dict[str, Any]:
    """How far the artifacts' logits (one row per sample clip) are from the eager float model's."""
    float_diff = float((scripted - eager).abs().max())
    top1 = eager.argmax(1)
    return {
        "samples": len(eager),
        "float": {
            "max-abs-logit-diff": float_diff,
            "top1-agreement": float((scripted.argmax(1) == top1).float().mean()),
            "tolerance": FLOAT_TOLERANCE,
            "ok": float_diff <= FLOAT_TOLERANCE,
        },
        "int8": {
            "top1-agreement": float((int8.argmax(1) == top1).float().mean()),
            "max-abs-prob-diff": float((int8.softmax(1) - eager.softmax(1)).abs().max()),
            "max-abs-logit-diff": float((int8 - eager).abs().max()),
        },
    }


def export_model(
    model: nn.Module,
    cfg: AppConfig,
    classes: Sequence[str],
    out_dir: str | Path,
    sample_clips: torch.Tensor,
    latency_runs: int = 10,
) -> dict[str, Any]:
    """Write ``model.ts``, ``model-int8.ts``, ``classes.json`` and ``export.json`` into ``out_dir``.

    ``sample_clips`` (``N×C×T×H×W``) drive the trace (the first clip) and the agreement checks;
    returns the report also written to ``export.json``. ``report["agreement"]["float"]["ok"]`` is
    False when TorchScript float differs from eager by more than :data:`FLOAT_TOLERANCE`.
    """
    import torch

    out_dir = Path(out_dir)
    if sample_clips.dim() != 5 or len(sample_clips) == 0:
        raise ExportError(f"sample clips must be N×C×T×H×W with N >= 1, got {tuple(sample_clips.shape)}")
    model = copy.deepcopy(model).cpu().eval()
    example = sample_clips[:1].contiguous()
    with _quiet_deprecations(), torch.no_grad():
        float_bytes, int8_bytes = _trace_and_write(model, classes, out_dir, example)
        # Check what was written, not the in-memory modules.
        float_ts = torch.jit.load(io.BytesIO(float_bytes))
        int8_ts = torch.jit.load(io.BytesIO(int8_bytes))

        # One clip at a time: the traced batch size, and the deployment case that latency measures.
        eager, scripted, int8 = (
            torch.cat([fn(clip[None]).float() for clip in sample_clips]) for fn in (model, float_ts, int8_ts)
        )
        with _torch_threads(1):
            latency = {
                "eager-float": _median_latency_ms(model, example, latency_runs),
                "torchscript-float": _median_latency_ms(float_ts, example, latency_runs),
                "torchscript-int8": _median_latency_ms(int8_ts, example, latency_runs),
            }

    linear = _linear_layers(model)
    linear_params = sum(p.numel() for name in linear for p in model.get_submodule(name).parameters())
    total_params = sum(p.numel() for p in model.parameters())
    report = {
        "model": cfg.model,
        "classes": len(classes),
        "input-shape": list(example.shape),
        "files": {"float": FLOAT_FILE, "int8": INT8_FILE, "classes": CLASSES_FILE},
        "bytes": {"float": len(float_bytes), "int8": len(int8_bytes)},
        "int8-size-ratio": len(int8_bytes) / len(float_bytes),
        "quantized-layers": linear,
        "quantized-parameter-fraction": linear_params / max(total_params, 1),
        "latency-ms-per-clip": latency,
        "latency": {"batch": 1, "threads": 1, "runs": latency_runs, "statistic": "median"},
        "agreement": _agreement(eager, scripted, int8),
        "torch-version": torch.__version__,
        "notes": [
            "dynamic int8 quantization converts nn.Linear layers only; convolutions stay float32",
            "torch.jit and torch.ao.quantization are deprecated in this torch version but still supported",
        ],
    }
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedvideo export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder or run folder")
    parser.add_argument(
        "--site", type=int, default=None, help="a personalized run: this site's personal model (its partition id)"
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="with --site: the SuperNode's state-dir holding it"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--samples", type=int, default=16, help="clips for the agreement check (default 16)")
    parser.add_argument(
        "--videos",
        nargs="+",
        default=[],
        help="take the sample clips from these videos (default: freshly rendered synthetic videos)",
    )
    parser.add_argument("--latency-runs", type=int, default=10, help="timed runs per artifact (default 10)")
    args = parser.parse_args(argv)
    if args.state_dir is not None and args.site is None:
        parser.error("--state-dir names where a site's personal model is: it needs --site")
    if args.samples < 1 or args.latency_runs < 1:
        parser.error("--samples and --latency-runs must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fedapp.client.personal import PersonalStateError
    from fedapp.server.checkpoint import CheckpointError, model_from_checkpoint
    from fedapp.task.config import ConfigError
    from fedapp.task.models import ModelError

    try:
        model, classes, cfg = model_from_checkpoint(args.checkpoint, args.site, args.state_dir)
        if args.videos:
            clips = sample_clips_from_videos(cfg, args.videos, args.samples)
        else:
            clips = synthetic_sample_clips(cfg, args.samples)
    except (CheckpointError, ConfigError, ModelError, PersonalStateError, ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = export_model(model, cfg, classes, args.out, clips, args.latency_runs)

    sizes, latency, agreement = report["bytes"], report["latency-ms-per-clip"], report["agreement"]
    print(
        f"{FLOAT_FILE}: {sizes['float']} bytes, {latency['torchscript-float']:.2f} ms/clip "
        f"(eager {latency['eager-float']:.2f} ms)"
    )
    print(
        f"{INT8_FILE}: {sizes['int8']} bytes ({report['int8-size-ratio']:.3f}x), "
        f"{latency['torchscript-int8']:.2f} ms/clip; quantized layers: {', '.join(report['quantized-layers'])} "
        f"({report['quantized-parameter-fraction']:.1%} of parameters)"
    )
    print(
        f"agreement on {agreement['samples']} clips: float max |logit diff| "
        f"{agreement['float']['max-abs-logit-diff']:.2e}, int8 top-1 {agreement['int8']['top1-agreement']:.3f}, "
        f"int8 max |prob diff| {agreement['int8']['max-abs-prob-diff']:.4f}"
    )
    if not agreement["float"]["ok"]:
        print(f"FAILED: TorchScript float differs from eager by more than {FLOAT_TOLERANCE}", file=sys.stderr)
        return 1
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
