"""What federation costs on top of the same training done centrally, measured in one run.

1. **Federated**: an N-round in-process federation (``bench/inprocess.py``: the real ServerApp round
   loop, strategy and ClientApp handlers; Flower's transport replaced by direct calls, so clients run
   one after another in this process) on a small synthetic dataset.
2. **Centralized**: one model trained on the union of the clients' training partitions with the
   same data pipeline (``fedapp.task.data.train_loader``, ``fedapp.task.train.train_epochs``), model,
   optimizer settings, batch size and clip shape, for the same number of epochs over the data
   (rounds × local epochs), evaluated on the same test split as often as the server evaluates
   (before training and after every round).

Both train on the same clips per epoch (one per training video). Optimizer steps differ slightly:
each client's last batch of an epoch is partial, so the federation takes
Σᵢ ⌈nᵢ / B⌉ steps per epoch against ⌈Σnᵢ / B⌉; both counts are printed. Whichever run goes
second in one process tends to be faster (warm caches), so ``--repeats R`` runs the pair R times,
alternating which goes first, and compares each one's fastest run (every run's time is printed).

The federated time is broken down by wrapping the app's functions for the duration of the run and
charging each call's *own* time (minus the wrapped calls inside it) to a category: client training
(``train_epochs``), client model setup (build + load weights, per client per round), client-side
and server-side serialization (Flower's ``Array``: ``np.save`` / ``np.load`` of every tensor),
aggregation (the strategy's ``train_round`` / ``evaluate_round``: reply screening + the math), central evaluation,
checkpoints, results files, the final report (confusion matrix, plots) and the rest. What the
in-process federation does not include: the network, gRPC/protobuf framing, chunking and hashing of
messages, process start-up (~40 s for ``flwr run`` with the simulation engine). ``--compression`` runs the
ClientApp's compression mod (its encode and the server's decode are categories of their own);
``--clip-cache`` turns the decoded-video cache on for both runs (filled before either is timed).

    # 4 clients, 5 rounds × 2 epochs, tiny3d (about 4 min on a CPU core)
    .venv/bin/python -m bench.federation_overhead --threads 1 --repeats 2
    .venv/bin/python -m bench.federation_overhead --rounds 1 --clients 2 --videos-per-class 4 --size 32 --clip-len 8
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.run import run_benchmark
from fedapp.task.models import MODEL_NAMES

# Categories of the breakdown, in print order.
CLIENT_TRAIN = "client: training (train_epochs: decode + forward/backward)"
CLIENT_SETUP = "client: model setup (build, load weights)"
CLIENT_EVAL = "client: evaluation"
CLIENT_OTHER = "client: other (ClientApp, mods, bridge, partition lookup)"
ENCODE = "client: update compression (compress)"
DECODE = "server: update decompression (decompress)"
SER_CLIENT = "serialization, client side (Flower Array np.save/np.load)"
SER_SERVER = "serialization, server side (Flower Array np.save/np.load)"
AGGREGATION = "server: aggregation (screening + math)"
CENTRAL_EVAL = "server: central evaluation"
CHECKPOINTS = "server: checkpoints"
RESULTS = "server: results files"
REPORT = "server: final report (confusion matrix, plots)"
OTHER = "server: other (setup, round loop, logging)"
CATEGORIES = (
    CLIENT_TRAIN,
    CLIENT_SETUP,
    CLIENT_EVAL,
    CLIENT_OTHER,
    ENCODE,
    SER_CLIENT,
    SER_SERVER,
    DECODE,
    AGGREGATION,
    CENTRAL_EVAL,
    CHECKPOINTS,
    RESULTS,
    REPORT,
    OTHER,
)
_CLIENT_SIDE = (CLIENT_TRAIN, CLIENT_SETUP, CLIENT_EVAL, CLIENT_OTHER, ENCODE)


class SelfTimer:
    """Charges every wrapped call its own time: elapsed minus the wrapped calls nested inside it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [category, start, time of nested wrapped calls]

    def in_client(self) -> bool:
        return any(frame[0] in _CLIENT_SIDE for frame in self._stack)

    def wrap(self, category: str | Callable[[], str], fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = category() if callable(category) else category
            frame = [name, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - frame[1]
                self._stack.pop()
                self.totals[name] += elapsed - frame[2]
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][2] += elapsed

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper


@contextmanager
def instrumented(timer: SelfTimer) -> Iterator[None]:
    """Wrap the app's functions where the round loop and the client handlers look them up."""
    from flwr.app import Array

    import strategies.screening as screening_module
    from bench import inprocess
    from fedapp.client import compression_mod
    from fedapp.client import video_client as client
    from fedapp.server import app as server_app
    from fedapp.server import rounds
    from fedapp.server.results import RunResults

    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, category: str | Callable[[], str], as_classmethod: bool = False) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        patches.append((owner, name, original))
        fn = original.__func__ if as_classmethod else original
        wrapped = timer.wrap(category, fn)
        setattr(owner, name, classmethod(wrapped) if as_classmethod else wrapped)

    def serialization():
        return SER_CLIENT if timer.in_client() else SER_SERVER

    patch(inprocess, "client_app", CLIENT_OTHER)  # the ClientApp with its mods, as InProcessGrid calls it
    patch(compression_mod, "compress", ENCODE)
    patch(screening_module, "decompress", DECODE)
    patch(client, "train_epochs", CLIENT_TRAIN)
    patch(client, "evaluate_model", CLIENT_EVAL)
    patch(client.VideoClient, "_model", CLIENT_SETUP)
    patch(Array, "from_numpy_ndarray", serialization, as_classmethod=True)
    patch(Array, "numpy", serialization)
    patch(server_app.CentralEvaluator, "__call__", CENTRAL_EVAL)
    patch(server_app.CentralEvaluator, "confusion_of", REPORT)
    patch(server_app, "write_final_report", REPORT)
    for name in ("save_checkpoint", "prune_checkpoints", "mark_best"):
        patch(rounds, name, CHECKPOINTS)
    for name in ("write_config", "write_partitions", "append_round", "save_model", "write_summary"):
        patch(RunResults, name, RESULTS)

    original_build = server_app.build_strategy

    def build_strategy(*args: Any, **kwargs: Any) -> Any:
        strategy = original_build(*args, **kwargs)
        strategy.train_round = timer.wrap(AGGREGATION, strategy.train_round)
        strategy.evaluate_round = timer.wrap(AGGREGATION, strategy.evaluate_round)
        return strategy

    patches.append((server_app, "build_strategy", original_build))
    server_app.build_strategy = build_strategy
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def run_config(args: argparse.Namespace, cache_dir: str, clip_cache_dir: str) -> dict[str, Any]:
    return {
        "num-server-rounds": args.rounds,
        "min-train-nodes": args.clients,
        "min-evaluate-nodes": args.clients if args.client_eval else 0,
        "min-available-nodes": args.clients,
        "fraction-evaluate": 1.0 if args.client_eval else 0.0,
        "strategy": args.strategy,
        "model": args.model,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "clip-len": args.clip_len,
        "resize": f"{args.size}x{args.size}",
        "crop-size": args.size,
        "eval-clips": args.eval_clips,
        "synthetic-classes": args.classes,
        "synthetic-videos-per-class": args.videos_per_class,
        "synthetic-frames": max(args.frames, args.clip_len),
        "synthetic-size": args.size,
        "num-workers": args.workers,
        "torch-threads": args.threads,
        "device": args.device,
        "bf16": args.bf16,
        "channels-last": args.channels_last,
        "cache-dir": cache_dir,
        "clip-cache-dir": clip_cache_dir,
        "compression": args.compression,
        "topk-fraction": args.topk_fraction,
        "tensorboard": False,
        "checkpoint-keep": 1,
    }


def warm_up(cfg: Any, index: Any, device: torch.device) -> None:
    """One training step and one evaluation batch on random clips, and one decoded batch of each
    loader: one-time start-up costs (torch kernel selection, allocator, PyAV/codec set-up) are paid
    before either timed run."""
    from fedapp.task.data import eval_loader, train_loader
    from fedapp.task.devices import prepare_model
    from fedapp.task.models import build_model
    from fedapp.task.train import make_optimizer

    num_classes = len(index.classes)
    next(iter(train_loader(cfg, index.train[: cfg.batch_size], seed=0)))
    next(iter(eval_loader(cfg, index.test[: cfg.batch_size])))

    model = prepare_model(build_model(cfg.model, num_classes), device, cfg.channels_last)
    clips = torch.randn(cfg.batch_size, 3, cfg.clip_len, cfg.crop_size, cfg.crop_size, device=device)
    labels = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    optimizer = make_optimizer(model, cfg)
    loss = torch.nn.functional.cross_entropy(model(clips), labels)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.eval()(clips)


def centralized(cfg: Any, index: Any, clients: int, device: torch.device) -> dict[str, Any]:
    """The same training centrally: union of the partitions, rounds × local epochs, same evaluations."""
    from datasets.clip_dataset import scan_videos
    from fedapp.task.data import eval_loader, node_partition, train_loader
    from fedapp.task.devices import prepare_model
    from fedapp.task.models import build_model
    from fedapp.task.train import evaluate_model, make_optimizer, train_epochs

    start = time.perf_counter()
    union, sizes = [], []
    for pid in range(clients):
        usable, _ = scan_videos(node_partition(cfg, index, pid, clients)[0])
        union += usable
        sizes.append(len(usable))
    test, _ = scan_videos(index.test)
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(cfg.model, len(index.classes), pooling=cfg.pooling), device, cfg.channels_last)
    optimizer = make_optimizer(model, cfg)
    test_loader = eval_loader(cfg, test)
    times = {"train": 0.0, "eval": 0.0}
    steps = 0

    def evaluate() -> dict[str, Any]:
        t = time.perf_counter()
        scores = evaluate_model(model, test_loader, device, cfg.bf16, cfg.channels_last)
        times["eval"] += time.perf_counter() - t
        return scores

    scores = evaluate()
    for server_round in range(1, cfg.num_server_rounds + 1):
        seed = (cfg.seed * 1_000_003 + server_round * 1009) % 2**31
        loader = train_loader(cfg, union, seed=seed)
        t = time.perf_counter()
        train_epochs(model, loader, optimizer, cfg.local_epochs, device, cfg.bf16, cfg.channels_last)
        times["train"] += time.perf_counter() - t
        steps += len(loader) * cfg.local_epochs
        scores = evaluate()
    total = time.perf_counter() - start
    return {
        "total-s": total,
        "train-s": times["train"],
        "eval-s": times["eval"],
        "other-s": total - times["train"] - times["eval"],
        "steps": steps,
        "train-videos": len(union),
        "partition-sizes": sizes,
        "final-video-accuracy": scores["video-accuracy"],
    }


def federated(config: dict[str, Any], clients: int, out_dir: Path) -> dict[str, Any]:
    from bench.inprocess import run_inprocess

    timer = SelfTimer()
    start = time.perf_counter()
    with instrumented(timer):
        results = run_inprocess(config, clients, out_dir)
    total = time.perf_counter() - start
    breakdown = {name: timer.totals.get(name, 0.0) for name in CATEGORIES if name != OTHER}
    breakdown[OTHER] = total - sum(breakdown.values())
    last = results.rounds[-1]
    return {
        "total-s": total,
        "breakdown-s": breakdown,
        "calls": dict(timer.calls),
        "final-video-accuracy": last["central"].get("video-accuracy"),
        "bytes-up": sum(r.get("bytes-up", 0) for r in results.rounds),
        "bytes-down": sum(r.get("bytes-down", 0) for r in results.rounds),
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import bench.inprocess  # noqa: F401  (imports the apps, which set their log levels, before we lower them)
    from fedapp.task.config import parse_config
    from fedapp.task.data import load_video_index
    from fedapp.task.devices import select_device
    from fedapp.task.train import set_torch_threads

    if not args.verbose:
        for name in ("fedapp", "strategies", "datasets", "flwr"):
            logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or str(Path(tmp) / "cache")
        clip_cache_dir = str(Path(tmp) / "clips") if args.clip_cache else ""
        if clip_cache_dir:
            Path(clip_cache_dir).mkdir()
        config = run_config(args, cache_dir, clip_cache_dir)
        cfg = parse_config(config)
        set_torch_threads(cfg.torch_threads)
        device = select_device(cfg.device)
        index = load_video_index(cfg)  # generate the synthetic data before either timed run
        if clip_cache_dir:  # fill the decoded-video cache before either timed run, so both read it
            from fedapp.task.data import eval_loader

            for _ in eval_loader(replace(cfg, eval_clips=1), index.train + index.test):
                pass
        warm_up(cfg, index, device)
        best: dict[str, dict[str, Any]] = {}
        all_totals: dict[str, list[float]] = {"federated": [], "centralized": []}
        for repeat in range(args.repeats):
            # Alternate which runs first: the second run of a pair tends to be faster (warm caches).
            order = (
                ("federated", "centralized")
                if (repeat % 2 == 0) != args.centralized_first
                else ("centralized", "federated")
            )
            for mode in order:
                torch.manual_seed(cfg.seed)
                if mode == "federated":
                    run = federated(config, args.clients, Path(tmp) / f"run-{repeat}")
                else:
                    run = centralized(cfg, index, args.clients, device)
                all_totals[mode].append(run["total-s"])
                if mode not in best or run["total-s"] < best[mode]["total-s"]:
                    best[mode] = run
                print(f"  {mode}: {run['total-s']:.1f} s", flush=True)
        fed, cent = best["federated"], best["centralized"]
    fed_steps = (
        sum(math.ceil(n / cfg.batch_size) for n in cent["partition-sizes"]) * cfg.local_epochs * cfg.num_server_rounds
    )
    return {
        "benchmark": "federation-overhead",
        "config": {k: v for k, v in config.items() if k != "cache-dir"},
        "clients": args.clients,
        "device": str(device),
        "torch-threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "all-totals-s": all_totals,
        "federated": {**fed, "steps": fed_steps},
        "centralized": cent,
        "ratio": fed["total-s"] / cent["total-s"],
        # the final report (confusion-matrix evaluation, plots) is the app's, not federation's: without it
        "ratio-without-report": (fed["total-s"] - fed["breakdown-s"][REPORT]) / cent["total-s"],
        "train-ratio": fed["breakdown-s"][CLIENT_TRAIN] / cent["train-s"],
    }


def format_report(result: dict[str, Any]) -> str:
    fed, cent = result["federated"], result["centralized"]
    cfg = result["config"]
    lines = [
        (
            f"{result['clients']} clients × {cfg['num-server-rounds']} rounds × {cfg['local-epochs']} local epochs, "
            f"{cfg['model']}, {cent['train-videos']} training videos (partitions {cent['partition-sizes']}), "
            f"batch {cfg['batch-size']}, clips {cfg['clip-len']}×{cfg['crop-size']}², device {result['device']}, "
            f"{result['torch-threads']} torch threads"
        ),
        "",
        f"best of {result['repeats']} (alternating which runs first); every run's wall s: "
        + "; ".join(f"{k} " + ", ".join(f"{t:.1f}" for t in v) for k, v in result["all-totals-s"].items()),
        "",
        "| run | wall s | optimizer steps | final central video accuracy |",
        "|---|---|---|---|",
        f"| federated (in process) | {fed['total-s']:.1f} | {fed['steps']} | {fed['final-video-accuracy']:.3f} |",
        f"| centralized | {cent['total-s']:.1f} | {cent['steps']} | {cent['final-video-accuracy']:.3f} |",
        "",
        (
            f"federated ÷ centralized wall time: {result['ratio']:.2f} "
            f"({result['ratio-without-report']:.2f} without the final report); training alone "
            f"(client train_epochs ÷ central train_epochs): {result['train-ratio']:.2f}"
        ),
        "",
        "| federated time, by category | s | share |",
        "|---|---|---|",
    ]
    for name, seconds in fed["breakdown-s"].items():
        lines.append(f"| {name} | {seconds:.2f} | {seconds / fed['total-s']:.1%} |")
    lines += [
        "",
        "| centralized time | s | share |",
        "|---|---|---|",
        f"| training (train_epochs) | {cent['train-s']:.2f} | {cent['train-s'] / cent['total-s']:.1%} |",
        f"| evaluation | {cent['eval-s']:.2f} | {cent['eval-s'] / cent['total-s']:.1%} |",
        f"| other (partition scan, model build) | {cent['other-s']:.2f} | {cent['other-s'] / cent['total-s']:.1%} |",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--strategy", default="fedavg", choices=("fedavg", "average", "weighted", "fusion"))
    parser.add_argument("--model", default="tiny3d", choices=MODEL_NAMES)
    parser.add_argument("--classes", type=int, default=8, choices=(2, 4, 6, 8), help="synthetic classes")
    parser.add_argument("--videos-per-class", type=int, default=20)
    parser.add_argument("--frames", type=int, default=24, help="frames per synthetic video")
    parser.add_argument("--size", type=int, default=64, help="synthetic frame, decode and crop size (square)")
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-clips", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (num-workers)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast on CUDA (the app ignores it on CPU)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last(_3d) on CUDA (the app ignores it on CPU)",
    )
    parser.add_argument("--client-eval", action="store_true", help="also run the clients' evaluate phase")
    parser.add_argument(
        "--compression",
        default="none",
        choices=("none", "fp16", "int8", "topk"),
        help="update compression (run config compression)",
    )
    parser.add_argument("--topk-fraction", type=float, default=0.01)
    parser.add_argument(
        "--clip-cache",
        action="store_true",
        help="decoded-video cache on (clip-cache-dir in a temporary folder, filled before timing)",
    )
    parser.add_argument("--centralized-first", action="store_true", help="run the centralized loop first")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the pair this many times, alternating which goes first; keep each one's fastest",
    )
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="keep the app's INFO logs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.clients, args.rounds, args.local_epochs, args.repeats) < 1:
        parser.error("--clients, --rounds, --local-epochs and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), benchmark, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
