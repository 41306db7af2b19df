"""Accuracy cost of differential privacy on the synthetic default.

One federated run of the real server loop, strategy and ClientApp (mods included; in process:
``bench/inprocess.py``) per setting: no DP, clipping only, then clipping plus Gaussian noise for
each ``--noise`` multiplier; ``strategy = "average"`` (the setting whose ε is accounted). Prints
the central test video accuracy, its ratio to the no-DP run, the median client update norm before
clipping, the noise standard deviation and ε at δ = ``--delta``; writes the table to
``--out/privacy.md`` and the numbers to ``--out/privacy.json``.

    .venv/bin/python -m bench.dp_cost                      # the committed table (~15 min on 2 CPU cores)
    .venv/bin/python -m bench.dp_cost --rounds 1 --noise 0.1   # a quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.inprocess import run_inprocess
from fedapp.results import atomic_write_bytes, atomic_write_json


def settings(clip: float, noises: list[float], mode: str) -> dict[str, dict]:
    """The runs to compare, by label."""
    runs = {"no DP": {"dp": "none"}, f"clip {clip:g}, no noise": {"dp": mode, "dp-clipping-norm": clip,
                                                                   "dp-noise-multiplier": 0.0}}
    for z in noises:
        runs[f"clip {clip:g}, noise ×{z:g}"] = {"dp": mode, "dp-clipping-norm": clip, "dp-noise-multiplier": z}
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--clip", type=float, default=1.0, help="dp-clipping-norm")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.1], help="dp-noise-multiplier values")
    parser.add_argument("--mode", choices=["server-side", "client-side"], default="server-side")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: the app's)")
    args = parser.parse_args(argv)

    base = {
        "num-server-rounds": args.rounds,
        "strategy": "average",
        "fraction-evaluate": 0.0,
        "min-train-nodes": args.clients,
        "min-available-nodes": args.clients,
        "torch-threads": 2,
        "cache-dir": args.cache_dir,
        "tensorboard": False,
        "dp-delta": args.delta,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, dp) in enumerate(settings(args.clip, args.noise, args.mode).items()):
            start = time.perf_counter()
            results = run_inprocess({**base, **dp}, args.clients, Path(tmp) / f"run{i}")
            last = results.rounds[-1]
            privacy = last.get("privacy", {})
            rows.append({
                "setting": label,
                "video-accuracy": last["central"]["video-accuracy"],
                "update-norm-median": privacy.get("update-norm-median"),
                "noise-stdv": privacy.get("noise-stdv"),
                "epsilon": privacy.get("epsilon"),
                "seconds": time.perf_counter() - start,
            })
            print(f"{label:<26} | video accuracy {rows[-1]['video-accuracy']:.3f} | {rows[-1]['seconds']:.0f} s",
                  flush=True)

    table = markdown_table(rows, args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "privacy.json", {"config": base, "mode": args.mode, "rows": rows})
    atomic_write_bytes(args.out / "privacy.md", table.encode())
    print(table)
    return 0


def markdown_table(rows: list[dict], args: argparse.Namespace) -> str:
    reference = rows[0]["video-accuracy"]
    lines = [
        f"Central test video accuracy after {args.rounds} rounds, {args.clients} clients, `strategy = \"average\"`, "
        f"`dp = \"{args.mode}\"`, tiny3d on the synthetic default (chance 0.125). "
        "Produced by `python -m bench.dp_cost` (one run per setting, in process).",
        "",
        "| setting | video accuracy | vs no DP | median update norm (last round) | noise σ per weight | ε at δ="
        f"{args.delta:g} |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = row["video-accuracy"] / reference if reference else float("nan")
        lines.append(
            f"| {row['setting']} | {row['video-accuracy']:.3f} | {ratio:.2f} | {_fmt(row['update-norm-median'])} "
            f"| {_fmt(row['noise-stdv'])} | {_fmt(row['epsilon'])} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    raise SystemExit(main())
