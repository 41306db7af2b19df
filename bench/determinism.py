"""What ``deterministic = true`` costs: the same seeded in-process federated run with it off and on,
measured in one process, one after the other (``--repeats`` times, interleaved, each mode's best).

Prints each mode's wall time, the on/off ratio, and whether the two runs with it on gave the same
final weights (the point of the key). The absolute seconds depend on the machine; the ratio is the
result.

    .venv/bin/python -m bench.determinism                      # tiny3d, 5 sites, 3 rounds (a minute or two)
    .venv/bin/python -m bench.determinism --rounds 5 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.inprocess import run_inprocess
from fedapp.server.results import load_weights


def run_once(config: dict[str, Any], nodes: int, folder: Path) -> tuple[float, str]:
    """Wall seconds of one in-process run, and the SHA-256 of its final weights (by name)."""
    started = time.perf_counter()
    run_inprocess(config, nodes, folder)
    seconds = time.perf_counter() - started
    weights = load_weights(folder / "model.safetensors")
    digest = hashlib.sha256(b"".join(weights[k].tobytes() for k in sorted(weights))).hexdigest()
    return seconds, digest


def measure(config: dict[str, Any], nodes: int, repeats: int) -> dict[str, Any]:
    """Best wall time per mode over ``repeats`` interleaved runs, and the deterministic runs' hashes."""
    times: dict[bool, list[float]] = {False: [], True: []}
    hashes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedvideo-determinism-") as tmp:
        for repeat in range(repeats):
            for on in (False, True):
                seconds, digest = run_once({**config, "deterministic": on}, nodes, Path(tmp) / f"{on}-{repeat}")
                times[on].append(seconds)
                if on:
                    hashes.append(digest)
    off, on = min(times[False]), min(times[True])
    return {"off-s": off, "on-s": on, "ratio": on / off, "identical": len(set(hashes)) == 1, "runs": len(hashes)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.determinism", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--clients", type=int, default=5, help="simulated sites (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, interleaved (default 2)")
    parser.add_argument("--cache-dir", default="", help="the synthetic dataset's cache (default: the app's)")
    parser.add_argument("--size", type=int, default=32, help="frame side of the synthetic videos (default 32)")
    args = parser.parse_args(argv)
    config: dict[str, Any] = {
        "synthetic-classes": 4, "synthetic-videos-per-class": 10, "synthetic-frames": 12,
        "synthetic-size": args.size, "clip-len": 8, "resize": f"{args.size}x{args.size}", "crop-size": args.size,
        "eval-clips": 2, "batch-size": 4, "local-epochs": 1, "torch-threads": 1, "tensorboard": False,
        "num-server-rounds": args.rounds, "min-train-nodes": args.clients, "min-available-nodes": args.clients,
        "min-evaluate-nodes": args.clients,
    }  # fmt: skip
    if args.cache_dir:
        config["cache-dir"] = args.cache_dir
    result = measure(config, args.clients, max(args.repeats, 1))
    print(f"deterministic=false: {result['off-s']:.2f} s   deterministic=true: {result['on-s']:.2f} s")
    same = result["identical"]
    print(f"ratio on/off: {result['ratio']:.3f}   {result['runs']} deterministic runs bit-identical: {same}")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
