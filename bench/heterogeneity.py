"""Label skew × method: which answer to heterogeneous sites helps, over seeds.

Every cell is ``--seeds`` federated runs of the real server loop, strategies and clients (in
process: ``bench/inprocess.py``) on the small synthetic setting of ``bench/robustness.py``, scored
after the last round by the central test video accuracy and by the worst site's accuracy on its own
test videos (which follow its training labels: ``datasets.partition.follow_partition``). Writes
``heterogeneity.md``, ``heterogeneity.json`` and ``heterogeneity.png`` to ``--out`` and prints each
cell and the wall time.

    # the issue's setting: 10 clients, 20 rounds, 3 seeds, IID and Dirichlet 1.0 / 0.3 / 0.1
    .venv/bin/python -m bench.heterogeneity --out docs
    # a quick look
    .venv/bin/python -m bench.heterogeneity --rounds 3 --seeds 0 --partitionings dirichlet-0.1 --methods fedavg scaffold
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.inprocess import comparison_config, run_inprocess
from bench.paired import paired_difference, table_lines
from bench.robustness import SMALL, cell_text, json_key, mean_std, read_json
from fedapp.files import atomic_path, atomic_write_bytes, atomic_write_json
from fedapp.server.summary import site_figures

PARTITIONINGS: dict[str, dict[str, Any]] = {
    "iid": {"partitioning": "iid"},
    "dirichlet-1.0": {"partitioning": "dirichlet", "dirichlet-alpha": 1.0},
    "dirichlet-0.3": {"partitioning": "dirichlet", "dirichlet-alpha": 0.3},
    "dirichlet-0.1": {"partitioning": "dirichlet", "dirichlet-alpha": 0.1},
}
# Clients train with the app's AdamW (lr 0.002) except where a method needs plain SGD: SCAFFOLD's
# option II does, so "fedavg-sgd" is its like-for-like baseline (same optimizer, no control variates).
SGD: dict[str, Any] = {"optimizer": "sgd", "momentum": 0.0, "lr": 0.05}
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedavg", "proximal-mu": 0.01},
    # Effective step lr / (1 − β) = 1, FedAvg's, once the momentum builds up.
    "fedavgm": {"strategy": "fedavg", "server-lr": 0.5, "server-momentum": 0.5},
    "fedadam": {"strategy": "fedavg", "server-optimizer": "adam", "server-lr": 0.01},
    "fedbn": {"strategy": "fedavg", "fedbn": True},
    "fedavg-sgd": {"strategy": "fedavg", **SGD},
    "scaffold": {"strategy": "fedavg", "scaffold": True, **SGD},
    # FedDF: the server distils the clients' ensemble on unlabeled synthetic clips of another seed.
    "feddf": {"strategy": "fusion", "fusion-fn": "feddf"},
    # Personalization: each site is scored with the model it keeps (fedapp.client.personal).
    "fedper": {"strategy": "fedavg", "personalization": "fedper"},
    "fedrep": {"strategy": "fedavg", "personalization": "fedrep", "personal-epochs": 2},
    "ditto": {"strategy": "fedavg", "personalization": "ditto", "ditto-lambda": 0.1, "personal-epochs": 2},
}


BASELINE = "fedavg"  # what every method's paired difference is taken to
# What makes two grid runs one grid (merged only when equal), and the measures of every run.
SETTING = ("rounds", "clients", "seeds", "classes", "videos_per_class", "min_partition_videos", "pretrained_path")
MEASURES = ("central-video-accuracy", "site-mean-video-accuracy", "worst-site-video-accuracy")


def run_config(args: argparse.Namespace, partitioning: str, method: str, seed: int, clip_cache: str) -> dict[str, Any]:
    """The run config of one cell and seed; the seed drives the initial model, data order and split."""
    sizing = {"min-partition-videos": args.min_partition_videos} if partitioning.startswith("dirichlet") else {}
    if args.pretrained_path:  # a backbone pretrained on a disjoint task (bench/pretrain.py), new head
        sizing["pretrained-path"] = str(args.pretrained_path)
    return {
        **comparison_config(args.rounds, args.clients, args.cache_dir),
        **SMALL,
        "synthetic-classes": args.classes,
        "synthetic-videos-per-class": args.videos_per_class,
        **sizing,
        "fraction-evaluate": 1.0,  # every site scores the global model on its own test videos
        "min-evaluate-nodes": args.clients,
        "clip-cache-dir": clip_cache,
        "torch-threads": args.threads,
        "seed": seed,
        "partition-seed": 42 + seed,
        "deterministic": True,  # every method of a seed is the same run but for the method (paired)
        **PARTITIONINGS[partitioning],
        **METHODS[method],
    }


def run_grid(
    args: argparse.Namespace, command: str, save: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every partitioning × method × seed of ``args``; ``save`` gets the result so far after every
    run (``"partial": true`` until the last)."""
    started = time.perf_counter()
    setting = {k: v for k, v in vars(args).items() if k in SETTING}
    central: dict[str, dict[str, list[float]]] = {}
    site_mean: dict[str, dict[str, list[float]]] = {}
    worst: dict[str, dict[str, list[float]]] = {}
    smallest: dict[str, int] = {}
    curves: dict[str, list[float]] = {}

    def result(partial: bool) -> dict[str, Any]:
        return {
            "setting": setting,
            "partial": partial,
            "commands": [{"command": command.strip(), "wall-time-s": time.perf_counter() - started}],
            "central-video-accuracy": central,
            "site-mean-video-accuracy": site_mean,
            "worst-site-video-accuracy": worst,
            "fewest-test-videos-per-site": smallest,
            "video-accuracy-per-round": curves,
        }

    with tempfile.TemporaryDirectory() as tmp:
        for partitioning in args.partitionings:
            for method in args.methods:
                for table in (central, site_mean, worst):
                    table.setdefault(partitioning, {})[method] = []
                for seed in args.seeds:
                    config = run_config(args, partitioning, method, seed, str(Path(tmp) / "clips"))
                    cell = time.perf_counter()
                    name = f"{partitioning}-{method}-{seed}"
                    results = run_inprocess(config, args.clients, Path(tmp) / name)
                    accuracy = [r["central"]["video-accuracy"] for r in results.rounds]
                    sites = site_figures([r for r in results.rounds if r.get("round", 0) >= 1])
                    if sites is None or len(sites["sites"]) < args.clients:
                        raise SystemExit(f"{name}: not every site evaluated in the last rounds ({sites})")
                    used = site_model_figures(sites)
                    central[partitioning][method].append(accuracy[-1])
                    site_mean[partitioning][method].append(used["mean"])
                    worst[partitioning][method].append(used["worst"])
                    fewest = min(int(site["num-videos"]) for site in sites["sites"])
                    smallest[f"{partitioning}-{seed}"] = fewest  # the same split for every method of a seed
                    curves[name] = accuracy
                    print(
                        f"{partitioning:>13} | {method:<11} | seed {seed} | central {accuracy[-1]:.3f} | "
                        f"sites mean {used['mean']:.3f} worst {used['worst']:.3f} (fewest test videos {fewest}) | "
                        f"{time.perf_counter() - cell:.0f} s",
                        flush=True,
                    )
                    if save is not None:
                        save(result(partial=True))
    return result(partial=False)


def site_model_figures(sites: dict[str, Any]) -> dict[str, float]:
    """Mean and worst over the sites of the model each site uses: its personal model where it has
    one (personalization), else the global model, each on the site's own test videos."""
    return sites["personal"] if sites.get("personal") else {"mean": sites["mean"], "worst": sites["worst"]}


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from parts of a grid run separately; refuses parts of different settings (a part
    written before a setting existed has its default: from scratch, no pretrained path)."""
    settings = [{"pretrained_path": "", **p["setting"]} for p in parts]
    if len({json_key(s) for s in settings}) > 1:
        raise SystemExit("cannot merge runs of different settings")
    merged: dict[str, Any] = {
        "setting": settings[0],
        "partial": any(p.get("partial", False) for p in parts),
        "commands": [c for p in parts for c in p["commands"]],
        "video-accuracy-per-round": {k: v for p in parts for k, v in p["video-accuracy-per-round"].items()},
        "fewest-test-videos-per-site": {
            k: v for p in parts for k, v in p.get("fewest-test-videos-per-site", {}).items()
        },
    }
    for measure in MEASURES:
        table: dict[str, dict[str, list[float]]] = {}
        for part in parts:
            for partitioning, by_method in part.get(measure, {}).items():
                table.setdefault(partitioning, {}).update(by_method)
        merged[measure] = table
    return merged


def markdown_table(result: dict[str, Any]) -> str:
    """Methods as rows, partitionings as columns; each cell mean ± std over the seeds: the central
    test accuracy of the global model, then over the sites (each with the model it uses, on its own
    test videos) the mean and the worst; then paired differences to FedAvg."""
    setting = result["setting"]
    seeds = len(setting["seeds"])
    classes = setting.get("classes", 8)
    commands = "; ".join(f"`{c['command']}` ({c['wall-time-s'] / 60:.0f} min)" for c in result["commands"])
    central = result["central-video-accuracy"]
    partitionings = sorted(central, key=_skew_order)
    methods = list(dict.fromkeys(m for by_method in central.values() for m in by_method))
    fewest = result.get("fewest-test-videos-per-site") or {}
    lines = [
        f"Video accuracy after {setting['rounds']} rounds, mean ± std over seeds {setting['seeds']} "
        f"({setting['clients']} clients, tiny3d, {classes} synthetic classes of "
        f"{setting.get('videos_per_class', 35)} videos, Dirichlet sites of >= "
        f"{setting.get('min_partition_videos', 1)} training videos; chance {1 / classes:.3f}"
        + (
            f"; backbone pretrained on a disjoint task: {setting['pretrained_path']}"
            if setting.get("pretrained_path")
            else "; from scratch"
        )  # fmt: skip
        + "). "
        "Central: the global model on the server's test split. Sites: each site's accuracy on its own test "
        "videos (which follow its training labels) with the model it uses: its personal model under "
        "personalization, else the global one. "
        + (f"Fewest test videos of any site: {min(fewest.values())}. " if fewest else "")
        + f"Run on this machine (2 cores) as {commands}.",
        "",
    ]
    if result.get("partial"):
        lines += ["**Partial**: stopped before the grid finished; (n=k) marks k seeds.", ""]
    titles = {"central-video-accuracy": "central", "site-mean-video-accuracy": "sites, mean",
              "worst-site-video-accuracy": "worst site"}  # fmt: skip
    for measure in MEASURES:
        table = result.get(measure)
        if not table:
            continue
        lines += [f"**{titles[measure]}**", "", "| method | " + " | ".join(partitionings) + " |"]
        lines.append("|---|" + "---|" * len(partitionings))
        for method in methods:
            cells = [cell_text(table.get(p, {}).get(method), seeds) for p in partitionings]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if BASELINE in methods:
        others = [m for m in methods if m != BASELINE]
        for measure in ("central-video-accuracy", "site-mean-video-accuracy"):
            if result.get(measure):
                lines += paired_table(result[measure], titles[measure], partitionings, others, seeds)
    return "\n".join(lines)


def paired_table(
    table: dict[str, dict[str, list[float]]], measure: str, partitionings: list[str], methods: list[str], seeds: int
) -> list[str]:
    """Each method's figure minus FedAvg's on the same seed: mean [95 % interval] verdict."""
    title = (
        f"**{measure}, paired difference to {BASELINE}** (per seed, same partition, initial model and data "
        f'order; mean [95 % t-interval] over {seeds} seeds; "no difference" where the interval holds 0)'
    )
    rows = []
    for method in methods:
        cells = []
        for p in partitionings:
            values, baseline = table.get(p, {}).get(method), table.get(p, {}).get(BASELINE)
            cells.append(paired_difference(values, baseline).text() if values and baseline else "—")
        rows.append((method, cells))
    return table_lines(title, "method", partitionings, rows)


def _skew_order(partitioning: str) -> int:
    """IID first, then decreasing Dirichlet α (merged parts may come in any order)."""
    order = list(PARTITIONINGS)
    return order.index(partitioning) if partitioning in order else len(order)


def plot(result: dict[str, Any], path: Path) -> None:
    """Mean ± std bars per partitioning and method: central above, worst site below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    measures = [(k, t) for k, t in (("central-video-accuracy", "central"), ("site-mean-video-accuracy", "sites, mean"),
                ("worst-site-video-accuracy", "worst site")) if result.get(k)]  # fmt: skip
    chance = 1 / result["setting"].get("classes", 8)
    fig, axes = plt.subplots(len(measures), 1, figsize=(11, 3.5 * len(measures)), squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], measures):
        table = result[key]
        partitionings = sorted(table, key=_skew_order)
        methods = list(dict.fromkeys(m for by_method in table.values() for m in by_method))
        width = 0.8 / max(len(methods), 1)
        for k, method in enumerate(methods):
            stats = [mean_std(table[p].get(method) or [0.0]) for p in partitionings]
            ax.bar(
                np.arange(len(partitionings)) + k * width,
                [m for m, _ in stats],
                width,
                yerr=[s for _, s in stats],
                label=method,
                capsize=2,
            )
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(np.arange(len(partitionings)) + 0.4 - width / 2, partitionings)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{title} video accuracy")
    axes[0][0].legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partitionings", nargs="+", default=list(PARTITIONINGS), choices=list(PARTITIONINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--classes", type=int, default=8, help="synthetic classes")
    parser.add_argument("--videos-per-class", type=int, default=35)
    parser.add_argument("--min-partition-videos", type=int, default=1, help="fewest training videos per Dirichlet site")
    parser.add_argument(
        "--pretrained-path", default="", help="start every run from this backbone (bench/pretrain.py writes one)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: the app's)")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=[], metavar="DIR",
        help="instead of running: merge the heterogeneity.json of earlier runs (e.g. parts run side by side)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    command = "python -m bench.heterogeneity " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        result = merge([read_json(d / "heterogeneity.json") for d in args.merge])
    else:
        result = run_grid(args, command, save=lambda so_far: _save(args.out, so_far))
    _save(args.out, result)
    table = markdown_table(result)
    atomic_write_bytes(args.out / "heterogeneity.md", table.encode())
    plot(result, args.out / "heterogeneity.png")
    print(table)
    return 0


def _save(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "heterogeneity.json", result)


if __name__ == "__main__":
    raise SystemExit(main())
