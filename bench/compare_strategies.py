"""Learning comparison of the aggregation strategies on the synthetic default.

For each scenario (IID; Dirichlet α = 0.1; IID with 30 % of clients sending sign-flipped ×10
updates) and each strategy, one federated run of the real server loop, strategies and clients
(in process: ``bench/inprocess.py``), recording the central test video accuracy per round.
Writes a markdown table, a PNG plot and the raw numbers to ``--out`` (default ``docs/``).

    .venv/bin/python -m bench.compare_strategies            # the committed table (about an hour on 2 CPU cores)
    .venv/bin/python -m bench.compare_strategies --rounds 2 --strategies fedavg median   # a quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.inprocess import comparison_config, run_inprocess
from fedapp.files import atomic_path, atomic_write_bytes, atomic_write_json

ATTACK_FRACTION = 0.3
DEFAULT_VIDEOS_PER_CLASS = 35  # the synthetic default's (pyproject.toml)
SCENARIOS = {
    "iid": {"partitioning": "iid"},
    "dirichlet-0.1": {"partitioning": "dirichlet", "dirichlet-alpha": 0.1},
    "30%-sign-flip": {
        "partitioning": "iid",
        "attack": "sign-flip",
        "attack-fraction": ATTACK_FRACTION,
        "attack-scale": 10.0,
    },
}
STRATEGIES = {
    "fedavg": {"strategy": "fedavg"},
    "weighted (inverse-loss)": {"strategy": "weighted", "weight-source": "inverse-loss"},
    "median": {"strategy": "fusion", "fusion-fn": "median"},
    "trimmed-mean β=0.3": {"strategy": "fusion", "fusion-fn": "trimmed-mean", "trim-beta": 0.3},
    "geometric-median": {"strategy": "fusion", "fusion-fn": "geometric-median"},
    "krum": {"strategy": "fusion", "fusion-fn": "krum", "krum-malicious": "f"},  # f = the attackers (below)
    "feddf": {"strategy": "fusion", "fusion-fn": "feddf", "feddf-steps": 50, "feddf-videos": 32},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: the app's)")
    parser.add_argument(
        "--videos-per-class", type=int, default=DEFAULT_VIDEOS_PER_CLASS, help="synthetic videos per class"
    )
    args = parser.parse_args(argv)

    base = comparison_config(args.rounds, args.clients, args.cache_dir)
    if args.videos_per_class != DEFAULT_VIDEOS_PER_CLASS:
        base["synthetic-videos-per-class"] = args.videos_per_class
    # Krum assumes f attackers: as many as the attack scenario has (round(0.3 × clients)). Only Krum
    # gets the key: elsewhere it has no effect, which the config refuses.
    f = max(1, round(ATTACK_FRACTION * args.clients))
    curves: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios:
            curves[scenario] = {}
            for name in args.strategies:
                strategy = {k: f if v == "f" else v for k, v in STRATEGIES[name].items()}
                config = {**base, **SCENARIOS[scenario], **strategy}
                start = time.perf_counter()
                results = run_inprocess(config, args.clients, Path(tmp) / f"{scenario}-{name}")
                accuracy = [r["central"]["video-accuracy"] for r in results.rounds]
                curves[scenario][name] = accuracy
                print(
                    f"{scenario:>14} | {name:<24} | final video accuracy {accuracy[-1]:.3f} "
                    f"| {time.perf_counter() - start:.0f} s",
                    flush=True,
                )

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        args.out / "strategies.json",
        {"config": base, "scenarios": SCENARIOS, "strategies": STRATEGIES, "video-accuracy": curves},
    )
    table = markdown_table(curves, args)
    atomic_write_bytes(args.out / "strategies.md", table.encode())
    plot(curves, args.out / "strategies.png")
    print(table)
    return 0


def markdown_table(curves: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    scenarios = list(curves)
    names = list(next(iter(curves.values())))
    videos = args.videos_per_class
    data = "" if videos == DEFAULT_VIDEOS_PER_CLASS else f" with {videos} videos per class"
    lines = [
        "**Superseded for robustness** by `docs/robustness.md` (3 seeds, 20 rounds): one seed of a few "
        "rounds cannot separate methods.",
        "",
        f"Central test video accuracy after {args.rounds} rounds ({args.clients} clients, tiny3d, synthetic "
        f"default{data}; chance 0.125). Produced by `python -m bench.compare_strategies`.",
        "",
        "| strategy | " + " | ".join(scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{curves[s][name][-1]:.3f}" for s in scenarios) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), sharey=True, squeeze=False)
    for ax, (scenario, by_strategy) in zip(axes[0], curves.items()):
        for name, accuracy in by_strategy.items():
            ax.plot(range(len(accuracy)), accuracy, marker="o", markersize=3, label=name)
        ax.axhline(0.125, color="grey", linestyle=":", linewidth=1)
        ax.set_title(scenario)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("central video accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")  # format: the temp file's name does not end in .png
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
