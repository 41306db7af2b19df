"""Bytes sent per round, up (clients → server) and down (server → clients), per model and per
update-compression setting (the client's encoder ``fedapp/client/compression.py``, the server's
decoder ``strategies/compression.py``).

For each model the reference is the app's freshly initialised model (``fedapp.task.models.build_model``,
the global model a client receives) and a client's update is reference + a small Gaussian delta
(std ``--delta-std`` on every floating tensor; BatchNorm counters unchanged), the shape of what one
local round produces. The update goes through ``compress(update, reference, method, topk_fraction,
residual)``; bytes up = the payload's tensor bytes (``payload_bytes``: what the server's round
record counts as ``bytes-up``) × clients. Bytes down = the full model's tensor bytes × clients: the
server always sends the whole global model (once more for client evaluation when
``fraction-evaluate`` > 0, not counted here).

Payload sizes depend on the tensor shapes only (fp16: 2 bytes per element, int8: 1 byte + a
4-byte scale per tensor, top-k: ``ceil(fraction · numel)`` int32 indices + float32 values per
tensor; integer tensors and tensors a method would not shrink go whole), so one client's payload is
measured and multiplied by the client count. Also printed, for one client: the bytes after Flower's
per-array serialization (``np.save`` headers: top-k sends two arrays per tensor), the seconds to
compress and to decompress, and the relative error of the delta the server rebuilds
(‖restored − update‖ / ‖update − reference‖; for Gaussian deltas, which are not heavy-tailed like
real ones, so it is an illustration, not the codecs' accuracy on real training; top-k's unsent part
is kept as the client's residual and sent in later rounds, which this single round does not show).

    .venv/bin/python -m bench.bytes_per_round                          # all five models, 10 clients (under a minute)
    .venv/bin/python -m bench.bytes_per_round --models tiny3d --clients 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import run_benchmark
from fedapp.client.compression import compress
from strategies.compression import decompress, payload_bytes

MODELS = ("tiny3d", "mc3_18", "r3d_18", "r2plus1d_18", "framepool_resnet18")
# (label, method, top-k fraction)
SETTINGS = (
    ("none", "none", 0.0),
    ("fp16", "fp16", 0.0),
    ("int8", "int8", 0.0),
    ("topk 0.1", "topk", 0.1),
    ("topk 0.01", "topk", 0.01),
)


def reference_model(name: str, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    import torch

    from fedapp.task.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def client_update(reference: dict[str, np.ndarray], delta_std: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    update = {}
    for key, value in reference.items():
        if np.issubdtype(value.dtype, np.floating):
            noise = rng.standard_normal(value.shape, dtype=np.float32).astype(value.dtype, copy=False)
            noise *= delta_std
            noise += value
            update[key] = noise
        else:
            update[key] = value.copy()
    return update


def serialized_bytes(payload: dict[str, np.ndarray]) -> int:
    """Bytes of the payload as Flower serializes each array (``np.save`` into ``Array.data``)."""
    from strategies.records import numpy_to_arrays

    return sum(len(array.data) for array in numpy_to_arrays(payload).values())


def measure_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    reference = reference_model(name, args.num_classes, args.seed)
    update = client_update(reference, args.delta_std, args.seed + 1)
    model_bytes = sum(v.nbytes for v in reference.values())
    delta_norm = float(
        np.sqrt(sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in reference))
    )
    rows = []
    for label, method, fraction in SETTINGS:
        start = time.perf_counter()
        payload, _ = compress(update, reference, method, topk_fraction=fraction or 0.01, residual=None)
        compress_s = time.perf_counter() - start
        start = time.perf_counter()
        restored = decompress(payload, reference)
        decompress_s = time.perf_counter() - start
        error = float(np.sqrt(sum(float(np.sum((restored[k].astype(np.float64) - update[k]) ** 2)) for k in update)))
        up = payload_bytes(payload)
        rows.append(
            {
                "setting": label,
                "method": method,
                "topk-fraction": fraction or None,
                "up-bytes-per-client": int(up),
                "up-bytes": int(up) * args.clients,
                "down-bytes": model_bytes * args.clients,
                "serialized-up-bytes-per-client": serialized_bytes(payload),
                "payload-arrays": len(payload),
                "compress-s": compress_s,
                "decompress-s": decompress_s,
                "delta-rel-error": error / delta_norm if delta_norm > 0 else float("nan"),
            }
        )
        del payload, restored
    none_up = rows[0]["up-bytes"]
    for row in rows:
        row["up-vs-none"] = row["up-bytes"] / none_up
        row["total-vs-none"] = (row["up-bytes"] + row["down-bytes"]) / (none_up + rows[0]["down-bytes"])
    return {
        "model": name,
        "params": sum(v.size for v in reference.values() if np.issubdtype(v.dtype, np.floating)),
        "tensors": len(reference),
        "model-bytes": model_bytes,
        "rows": rows,
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for name in args.models:
        results.append(measure_model(name, args))
        print(f"  measured {name}", flush=True)
    return {
        "benchmark": "bytes-per-round",
        "clients": args.clients,
        "num-classes": args.num_classes,
        "delta-std": args.delta_std,
        "models": results,
    }


def format_table(result: dict[str, Any]) -> str:
    mb = 1e6
    n = result["clients"]
    lines = [
        (
            f"{n} clients, {result['num-classes']} classes; MB = 10^6 bytes; up = payload tensor bytes "
            "(the round record's bytes-up), down = full model × clients (train phase)"
        ),
        "",
        (
            "| model | setting | up MB / client | up MB / round | down MB / round | up ÷ none | (up+down) ÷ none "
            "| serialized up MB / client | compress s | decompress s | delta rel. error |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in result["models"]:
        for row in model["rows"]:
            lines.append(
                f"| {model['model']} ({model['params'] / 1e6:.2f} M) | {row['setting']} | "
                f"{row['up-bytes-per-client'] / mb:.3f} | {row['up-bytes'] / mb:.2f} | {row['down-bytes'] / mb:.2f} | "
                f"{row['up-vs-none']:.4f} | {row['total-vs-none']:.3f} | "
                f"{row['serialized-up-bytes-per-client'] / mb:.3f} | {row['compress-s']:.3f} | "
                f"{row['decompress-s']:.3f} | {row['delta-rel-error']:.2g} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=101)
    parser.add_argument("--delta-std", type=float, default=1e-3, help="std of the simulated update's delta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error("--clients must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), benchmark, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
