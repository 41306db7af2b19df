"""What a setting costs in accuracy: differential privacy or update compression vs the plain run.

One federated run of the real server loop, strategy and ClientApp (its mods included; in process:
``bench/inprocess.py``) per variant, on the synthetic default with ``strategy = "average"``.
Prints and writes (``--out/<study>.md`` and ``.json``) the central test video accuracy after the
last round, its ratio to the first variant (the baseline), the bytes clients sent per round, and,
for the privacy study, the median update norm, the noise σ and ε.

    .venv/bin/python -m bench.accuracy_cost privacy --clients 8 --rounds 5 --clip 10 --noise 0.001 0.01 1.0
    .venv/bin/python -m bench.accuracy_cost compression --clients 3 --rounds 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.inprocess import comparison_config, run_inprocess
from fedapp.files import atomic_write_bytes, atomic_write_json


def privacy_variants(args: argparse.Namespace) -> dict[str, dict]:
    """No DP, clipping only, then clipping plus noise for each ``--noise`` multiplier."""
    dp = {"dp": args.mode, "dp-clipping-norm": args.clip, "dp-delta": args.delta}
    variants = {"no DP": {"dp": "none"}, f"clip {args.clip:g}, no noise": {**dp, "dp-noise-multiplier": 0.0}}
    for z in args.noise:
        variants[f"clip {args.clip:g}, noise ×{z:g}"] = {**dp, "dp-noise-multiplier": z}
    return variants


def compression_variants(args: argparse.Namespace) -> dict[str, dict]:
    """Each compression method; top-k at each ``--topk`` fraction."""
    variants = {m: {"compression": m} for m in ("none", "fp16", "int8")}
    for fraction in args.topk:
        variants[f"topk {fraction:g}"] = {"compression": "topk", "topk-fraction": fraction}
    return variants


STUDIES = {"privacy": privacy_variants, "compression": compression_variants}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=list(STUDIES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--clip", type=float, default=10.0, help="privacy: dp-clipping-norm")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.001, 0.01, 1.0], help="privacy: noise multipliers")
    parser.add_argument("--mode", choices=["server-side", "client-side"], default="server-side", help="privacy: dp")
    parser.add_argument("--delta", type=float, default=1e-5, help="privacy: dp-delta")
    parser.add_argument("--topk", type=float, nargs="+", default=[0.1, 0.01], help="compression: top-k fractions")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: the app's)")
    args = parser.parse_args(argv)

    base = {**comparison_config(args.rounds, args.clients, args.cache_dir), "strategy": "average"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, variant) in enumerate(STUDIES[args.study](args).items()):
            start = time.perf_counter()
            results = run_inprocess({**base, **variant}, args.clients, Path(tmp) / f"run{i}")
            trained = results.rounds[1:]
            privacy = trained[-1].get("privacy", {})
            rows.append(
                {
                    "variant": label,
                    "config": variant,
                    "video-accuracy": trained[-1]["central"]["video-accuracy"],
                    "bytes-up-per-round": sum(r["bytes-up"] for r in trained) / len(trained),
                    "bytes-down-per-round": sum(r["bytes-down"] for r in trained) / len(trained),
                    "update-norm-median": privacy.get("update-norm-median"),
                    "noise-stdv": privacy.get("noise-stdv"),
                    "epsilon": privacy.get("epsilon"),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(
                f"{label:<26} | video accuracy {rows[-1]['video-accuracy']:.3f} | "
                f"{rows[-1]['bytes-up-per-round'] / 1e6:.2f} MB up per round | {rows[-1]['seconds']:.0f} s",
                flush=True,
            )

    table = markdown_table(args, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.study}.json", {"base": base, "rows": rows})
    atomic_write_bytes(args.out / f"{args.study}.md", table.encode())
    print(table)
    return 0


def markdown_table(args: argparse.Namespace, rows: list[dict]) -> str:
    baseline = rows[0]
    privacy = args.study == "privacy"
    head = ["variant", "video accuracy", f"vs {baseline['variant']}", "MB up per round", "up vs baseline"]
    if privacy:
        head += ["median update norm (last round)", "noise σ per weight", f"ε at δ={args.delta:g}"]
    lines = [
        f'Central test video accuracy after {args.rounds} rounds, {args.clients} clients, `strategy = "average"`, '
        "tiny3d on the synthetic default (chance 0.125); one run per variant, in process. Produced by "
        f"`python -m bench.accuracy_cost {args.study}"
        + (f" --clip {args.clip:g} --noise " + " ".join(f"{z:g}" for z in args.noise) if privacy else "")
        + f" --clients {args.clients} --rounds {args.rounds}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [
            row["variant"],
            f"{row['video-accuracy']:.3f}",
            _ratio(row["video-accuracy"], baseline["video-accuracy"]),
            f"{row['bytes-up-per-round'] / 1e6:.3f}",
            _ratio(row["bytes-up-per-round"], baseline["bytes-up-per-round"]),
        ]
        if privacy:
            cells += [_fmt(row["update-norm-median"]), _fmt(row["noise-stdv"]), _fmt(row["epsilon"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.3f}" if reference else "n/a"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    raise SystemExit(main())
