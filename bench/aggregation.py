"""Time and peak memory of the server's aggregation functions against a memory-bandwidth bound.

N client models with the state_dict shapes of a real model (``fedapp.task.models.build_model``, built on
PyTorch's meta device, so no weights are initialised; default ``r3d_18`` with 101 classes: 33.2 M
parameters, 133 MB of float32 per model) hold random float32 values: a shared base plus a small
per-client delta, as client updates of one round look. BatchNorm running variances are positive
and integer tensors (``num_batches_tracked``) are small counters, as in a real state_dict, so every
update passes the server's screening.

Every function is timed ``--repeats`` times (best and median printed) and compared with one numpy
pass that reads every byte of the N client models once (``np.add.reduce`` of every client tensor):
no aggregation can read its inputs faster than that, so ``× bound`` says how far each one is from
the memory-bandwidth limit on this machine. All ratios come from one run of this script.

Peak memory is ``tracemalloc``'s peak during one extra call of the function (not a timed one),
minus the memory traced when the call starts: numpy reports its array buffers to tracemalloc, so
this is the extra memory the function allocates on top of the N input models (its output model
included), without the interpreter, torch or the inputs that an RSS reading would also contain.

FedDF (``fusion-fn = "feddf"``) is left out: it is not a numpy pass over the updates but a training
loop (forward passes of the N client models and the student on unlabeled server clips, for a
budget of ``feddf-steps`` steps), so its cost is set by the model's FLOPs and the step budget, not
by the update size; it belongs with the training throughput figures.

    .venv/bin/python -m bench.aggregation   # 10 clients of r3d_18 (about 7 min on this 2-core machine)
    .venv/bin/python -m bench.aggregation --model tiny3d --clients 4 --repeats 1   # seconds
"""

from __future__ import annotations

import os

# Before numpy loads OpenBLAS: the means' per-block matrix-vector products would otherwise start
# BLAS threads of their own, and the "1 thread" rows would not be one core. The aggregation
# threads (strategies.blocks) are then the only parallelism measured.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import gc
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import run_benchmark
from fedapp.task.models import MODEL_NAMES
from strategies.aggregation import average, fedavg, weighted_average
from strategies.blocks import available_cpus, run_in_blocks, set_threads, spans
from strategies.coordinatewise import coordinate_median, trimmed_mean
from strategies.fusion import geometric_median, krum
from strategies.records import arrays_to_numpy, numpy_to_arrays
from strategies.validation import check_update, reference_spec
from strategies.weighting import normalize_weights

Models = list[dict[str, np.ndarray]]


def model_spec(name: str, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{state_dict key: (shape, numpy dtype)}`` of the app's model, built without allocating weights."""
    import torch

    from fedapp.task.models import build_model

    with torch.device("meta"):
        model = build_model(name, num_classes)
    return {
        key: (tuple(t.shape), torch.empty((), dtype=t.dtype).numpy().dtype) for key, t in model.state_dict().items()
    }


def make_clients(
    spec: dict[str, tuple[tuple[int, ...], np.dtype]], clients: int, seed: int = 0, delta: float = 1e-3
) -> Models:
    """``clients`` models: one random float32 base plus an independent small delta per client."""
    rng = np.random.default_rng(seed)
    base = {}
    for key, (shape, dtype) in spec.items():
        if not np.issubdtype(dtype, np.floating):
            base[key] = np.full(shape, 100, dtype=dtype)
        elif key.endswith("running_var"):  # variances stay positive, or screening would reject the update
            base[key] = rng.uniform(0.5, 1.5, shape).astype(dtype)
        else:
            base[key] = (0.05 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype, copy=False)
    models = []
    for i in range(clients):
        model = {}
        for key, value in base.items():
            if np.issubdtype(value.dtype, np.floating):
                noise = rng.standard_normal(value.shape, dtype=np.float32)
                noise *= delta
                noise += value
                model[key] = noise
            else:
                model[key] = value + i  # integer counters differ a little between clients
        models.append(model)
    return models


def read_pass(models: Models) -> float:
    """The bound: one pass reading every byte of every client model (float32 sums, no output), in
    blocks on the aggregation threads, so a multi-threaded rule is held to a multi-threaded read."""
    flats = [(model, key) for model in models for key in model]
    sizes = {str(i): int(np.size(model[key])) for i, (model, key) in enumerate(flats)}

    def one(span: tuple[str, int, int]) -> float:
        model, key = flats[int(span[0])]
        return float(np.add.reduce(np.asarray(model[key]).reshape(-1)[span[1] : span[2]]))

    return sum(run_in_blocks(one, spans(sizes, 1 << 20)))


def functions(models: Models, krum_f: int, trim_beta: float, seed: int) -> dict[str, Callable[[], Any]]:
    """The timed calls, as the strategies make them (``strategies/strategy.py``)."""
    rng = np.random.default_rng(seed + 1)
    counts = [int(c) for c in rng.integers(10, 100, len(models))]
    weights = list(normalize_weights(rng.random(len(models)) + 0.1))  # numpy float64s, as WeightedStrategy passes
    n = len(models)
    out: dict[str, Callable[[], Any]] = {
        "fedavg": lambda: fedavg(zip(models, counts)),
        "average": lambda: average(models),
        "weighted_average": lambda: weighted_average(zip(models, weights)),
        "coordinate_median": lambda: coordinate_median(models),
        f"trimmed_mean β={trim_beta}": lambda: trimmed_mean(models, trim_beta),
        "geometric_median": lambda: geometric_median(models, counts),
    }
    if n > 2 * krum_f + 2:
        out[f"krum f={krum_f}"] = lambda: krum(models, krum_f)
        if n - krum_f > 1:
            out[f"multi-krum f={krum_f} m={n - krum_f}"] = lambda: krum(models, krum_f, num_selected=n - krum_f)
    return out


def context_functions(models: Models) -> dict[str, Callable[[], Any]]:
    """Other per-round server work on the same N updates, for scale (not aggregation proper)."""
    spec = reference_spec(models[0])
    reasons = [check_update(m, 10, spec) for m in models]
    if any(reasons):  # a rejected update returns early and would time nothing
        raise RuntimeError(f"the synthetic updates fail screening: {reasons}")
    records = [numpy_to_arrays(m) for m in models]
    return {
        "screening (validation.check_update)": lambda: [check_update(m, 10, spec) for m in models],
        "deserialize replies (Array.numpy)": lambda: [arrays_to_numpy(r) for r in records],
    }


def time_call(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result
    return times


def peak_extra_bytes(fn: Callable[[], Any]) -> tuple[int, str]:
    """tracemalloc peak during one call, above what was traced when it started (its output included),
    and a note on the call's result (geometric-median iterations, Krum's selection)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return max(0, peak - before), describe(result)


def describe(result: Any) -> str:
    if isinstance(result, tuple) and len(result) == 2:
        info = result[1]
        if isinstance(info, dict) and "iterations" in info:
            return f"{info['iterations']} Weiszfeld iterations"
        if isinstance(info, list):
            return f"selected {len(info)} of the clients"
    return ""


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    spec = model_spec(args.model, args.num_classes)
    models = make_clients(spec, args.clients, args.seed)
    model_bytes = sum(v.nbytes for v in models[0].values())
    params = sum(int(np.prod(shape)) for shape, dtype in spec.values() if np.issubdtype(dtype, np.floating))
    krum_f = (
        args.krum_malicious
        if args.krum_malicious >= 0
        else max(0, min(round(0.3 * args.clients), (args.clients - 3) // 2))
    )
    rows, bounds = [], {}
    aggregations = functions(models, krum_f, args.trim_beta, args.seed)
    context = context_functions(models)
    calls = {**aggregations, **context}
    for threads in args.threads:
        threads = set_threads(threads)
        print(f"{threads} thread(s):", flush=True)
        # The bound first and last too: a machine that slowed down shows as two different figures.
        bound_times = time_call(lambda: read_pass(models), args.repeats)
        for name, fn in calls.items():
            if name in context and threads > 1:
                continue  # the context rows run no threaded code: measured once, at 1 thread
            times = time_call(fn, args.repeats)
            peak, note = peak_extra_bytes(fn) if not args.no_memory else (None, describe(fn()))
            rows.append(
                {
                    "function": name,
                    "threads": threads,
                    "best-s": min(times),
                    "median-s": statistics.median(times),
                    "peak-extra-bytes": peak,
                    "context": name in context,
                    "note": note,
                }
            )
            print(f"  {name:<36} best {min(times):8.3f} s", flush=True)
        bound_times += time_call(lambda: read_pass(models), args.repeats)
        bounds[threads] = bound_times
    set_threads(1)
    for row in rows:
        row["x-bound"] = row["best-s"] / min(bounds[row["threads"]])
        row["peak-extra-models"] = None if row["peak-extra-bytes"] is None else row["peak-extra-bytes"] / model_bytes
    bound = min(bounds[min(bounds)])
    return {
        "benchmark": "aggregation",
        "model": args.model,
        "num-classes": args.num_classes,
        "clients": args.clients,
        "repeats": args.repeats,
        "params": params,
        "model-bytes": model_bytes,
        "input-bytes": model_bytes * args.clients,
        "krum-malicious": krum_f,
        "trim-beta": args.trim_beta,
        "bound-s": bound,
        "bound-gb-per-s": model_bytes * args.clients / bound / 1e9,
        "threads": sorted(bounds),
        "bound-s-all": bounds[min(bounds)],
        "bounds": {str(t): {"best-s": min(v), "all-s": v} for t, v in bounds.items()},
        "rows": rows,
        "machine": machine(),
    }


def machine() -> str:
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, numpy {np.__version__}, OPENBLAS_NUM_THREADS={blas}"


def format_table(result: dict[str, Any]) -> str:
    mb = 1024**2
    lines = [
        (
            f"{result['clients']} clients × {result['model']} ({result['params'] / 1e6:.1f} M params, "
            f"{result['model-bytes'] / 1e6:.0f} MB per model, "
            f"{result['input-bytes'] / 1e9:.2f} GB read per aggregation); "
            f"best of {result['repeats']}"
        ),
        "bound: one numpy read pass over all client bytes, on as many threads as the row: "
        + ", ".join(
            f"{t} thread(s) {b['best-s']:.3f} s ({result['input-bytes'] / b['best-s'] / 1e9:.1f} GB/s)"
            for t, b in result["bounds"].items()
        ),
        "",
        "| function | threads | best s | median s | × bound | peak extra MiB | peak extra / model | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        peak = row["peak-extra-bytes"]
        name = f"{row['function']} *(context)*" if row["context"] else row["function"]
        lines.append(
            f"| {name} | {row['threads']} | {row['best-s']:.3f} | {row['median-s']:.3f} | {row['x-bound']:.1f} | "
            + ("n/a | n/a |" if peak is None else f"{peak / mb:.0f} | {row['peak-extra-models']:.2f} |")
            + f" {row['note']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="r3d_18", choices=MODEL_NAMES)
    parser.add_argument("--num-classes", type=int, default=101)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trim-beta", type=float, default=0.2)
    parser.add_argument(
        "--krum-malicious",
        type=int,
        default=-1,
        help="Krum's f; default round(0.3 × clients), capped so that clients > 2f + 2",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 0],
        help="aggregation thread counts to measure, 0 = every CPU this process may use (default: 1 0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.repeats < 1:
        parser.error("--clients and --repeats must be >= 1")
    if any(t < 0 for t in args.threads):
        parser.error("--threads must be >= 0")
    # One row set per distinct count: "0" on a 1-CPU machine is the 1-thread run again.
    args.threads = list(dict.fromkeys(t or available_cpus() for t in args.threads))
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), benchmark, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
