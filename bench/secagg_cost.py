"""Secure aggregation's cost: bytes and time per round with and without SecAgg+ (``secagg = true``).

Two parts, both from one invocation (the machine is shared: compare within a run, as ratios).

1. Whole rounds, for each ``--sites`` count: one round of the real server loop, strategies,
   ClientApp and mods in process, every message through Flower's wire encoding
   (``bench/inprocess.py``), with secagg off and on, same seed and data. From the round record:
   bytes down and up (SecAgg+'s key messages included) and the round's wall time; ratios secure ÷
   plain. In process the sites train one after another, so the round
   time is dominated by training; on real SuperNodes each of the three extra steps also starts one
   ClientApp process per site (not in this figure).
2. The protocol alone, per ``--models``: one site's masking of a model-sized update (quantizing,
   its private mask, one pairwise mask per neighbour) and the server's unmasking of ``--sites``
   sites' sum, timed without any training.

    .venv/bin/python -m bench.secagg_cost                                # 5 and 20 sites, tiny3d and r3d_18
    .venv/bin/python -m bench.secagg_cost --sites 3 --models tiny3d      # a quick look
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bytes_per_round import reference_model
from bench.inprocess import comparison_config, run_inprocess
from bench.run import run_benchmark
from strategies.secure_aggregation import (
    Settings,
    neighbours,
    secured_names,
    site_mask,
    site_receive_shares,
    site_reveal,
    site_setup,
    site_share_keys,
    sum_masked,
    unmask,
)

SMALL: dict[str, Any] = {  # bench/robustness.py's setting, one local epoch: the round is the point
    "model": "tiny3d",
    "synthetic-classes": 4,
    "synthetic-videos-per-class": 25,
    "synthetic-frames": 12,
    "synthetic-size": 32,
    "clip-len": 8,
    "resize": "32x32",
    "crop-size": 32,
    "eval-clips": 1,
    "local-epochs": 1,
    "batch-size": 8,
    "central-eval": False,
}


def round_costs(sites: int, secagg: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One in-process round's record, reduced to its costs."""
    config = {
        **comparison_config(1, sites, args.cache_dir),
        **SMALL,
        "torch-threads": args.threads,
        "deterministic": True,
        "secagg": secagg,
        "secagg-num-shares": args.num_shares,
        "secagg-threshold": args.threshold,
    }
    with tempfile.TemporaryDirectory() as tmp:
        record = run_inprocess(config, sites, Path(tmp) / "run", wire=True).rounds[1]
    secure = (record.get("fusion") or {}).get("secagg") or {}
    return {
        "bytes-down": record["bytes-down"],
        "bytes-up": record["bytes-up"] + secure.get("key-bytes-up", 0),
        "round-s": record["round-time-s"],
        "contributors": secure.get("contributors", len(record["train-clients"]["clients"])),
    }


def protocol_costs(model: str, sites: int, settings: Settings, seed: int) -> dict[str, Any]:
    """Seconds for one site to mask a model-sized update and for the server to unmask ``sites`` of them."""
    reference = reference_model(model, 101, seed)
    rng = np.random.default_rng(seed)
    update = {n: rng.normal(0, 1e-3, reference[n].shape) for n in secured_names(reference)}
    nodes = list(range(1, sites + 1))
    graph = neighbours(nodes, settings.num_shares, random.Random(seed))
    members = {n: site_setup(n, settings) for n in nodes}
    publics = {n: (s.mask_public, s.share_public) for n, s in members.items()}
    start = time.perf_counter()
    sent = {n: site_share_keys(members[n], {m: publics[m] for m in graph[n]}) for n in nodes}
    share_s = (time.perf_counter() - start) / sites
    total, mask_s = None, []
    for n in nodes:
        site_receive_shares(members[n], {src: c[n] for src, c in sent.items() if n in c})
        start = time.perf_counter()
        vector = site_mask(members[n], update, 10.0)
        mask_s.append(time.perf_counter() - start)
        total = sum_masked(total, vector, settings.modulus_range)
    shares: dict[int, list[bytes]] = {}
    for n in nodes:
        for owner, share in site_reveal(members[n], list(graph[n]), []).items():
            shares.setdefault(owner, []).append(share)
    start = time.perf_counter()
    unmask(total, settings, nodes, {}, {n: publics[n][0] for n in nodes}, shares, {})
    unmask_s = time.perf_counter() - start
    params = sum(v.size for v in update.values())
    return {"model": model, "sites": sites, "params": params, "share-keys-s": share_s,
            "mask-s": float(np.median(mask_s)), "unmask-s": unmask_s}  # fmt: skip


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    rounds = []
    for sites in args.sites:
        plain, secure = round_costs(sites, False, args), round_costs(sites, True, args)
        rounds.append({"sites": sites, "plain": plain, "secure": secure})
        print(f"  measured a round of {sites} sites", flush=True)
    settings = Settings(args.num_shares, args.threshold)
    protocol = [protocol_costs(m, s, settings, args.seed) for m in args.models for s in args.sites]
    return {"benchmark": "secagg-cost", "num-shares": args.num_shares, "threshold": args.threshold,
            "rounds": rounds, "protocol": protocol}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    mb = 1e6
    lines = [
        f"SecAgg+ with num-shares {result['num-shares']}, threshold {result['threshold']}; one in-process round "
        "(tiny3d, wire-encoded); MB = 10^6 bytes",
        "",
        "| sites | bytes down MB (plain → secure) | bytes up MB (plain → secure) | down ÷ | up ÷ "
        "| round s (plain → secure) | round ÷ |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rounds"]:
        p, s = row["plain"], row["secure"]
        lines.append(
            f"| {row['sites']} | {p['bytes-down'] / mb:.2f} → {s['bytes-down'] / mb:.2f} | "
            f"{p['bytes-up'] / mb:.2f} → {s['bytes-up'] / mb:.2f} | {s['bytes-down'] / p['bytes-down']:.3f} | "
            f"{s['bytes-up'] / p['bytes-up']:.3f} | {p['round-s']:.1f} → {s['round-s']:.1f} | "
            f"{s['round-s'] / p['round-s']:.2f} |"
        )
    lines += ["", "| model | parameters | sites | share keys s / site | mask s / site | unmask s (server) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["protocol"]:
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.2f} M | {row['sites']} | {row['share-keys-s']:.3f} | "
            f"{row['mask-s']:.3f} | {row['unmask-s']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", nargs="+", type=int, default=[5, 20])
    parser.add_argument("--models", nargs="+", default=["tiny3d", "r3d_18"])
    parser.add_argument("--num-shares", type=int, default=3)
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: the app's)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.sites) < max(args.threshold, 2):
        parser.error("every --sites count must be >= the threshold and >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), benchmark, format_table)


if __name__ == "__main__":
    raise SystemExit(main())
