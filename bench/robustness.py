"""Attack × rule: how each robust aggregation rule holds against each attack, over seeds.

Every cell is ``--seeds`` federated runs of the real server loop, strategies and clients (in
process: ``bench/inprocess.py``) on the synthetic default, scored by the central test video
accuracy after the last round; the table gives mean ± std over the seeds and the attack-free row
is the price of robustness. Attacks are the test tool's (``attack``: the omniscient, colluding ones
are injected on the server from the round's honest updates, see README "Test tool"); the same
``--attackers`` clients attack in every run. Writes ``robustness.md``, ``robustness.json`` and
``robustness.png`` to ``--out`` and prints each cell and the wall time.

    # the issue's setting: 10 clients, 3 attackers, 20 rounds, 3 seeds, IID and Dirichlet 0.5
    .venv/bin/python -m bench.robustness --out docs
    # a quick look
    .venv/bin/python -m bench.robustness --rounds 3 --seeds 0 --attacks none alie --rules fedavg median
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.inprocess import comparison_config, run_inprocess
from bench.paired import paired_difference, table_lines
from fedapp.files import atomic_path, atomic_write_bytes, atomic_write_json

PARTITIONINGS: dict[str, dict[str, Any]] = {
    "iid": {"partitioning": "iid"},
    "dirichlet-0.5": {"partitioning": "dirichlet", "dirichlet-alpha": 0.5},
}
ATTACKS: dict[str, dict[str, Any]] = {
    "none": {},
    "alie": {"attack": "alie"},
    "ipm": {"attack": "ipm"},
    "min-max": {"attack": "min-max"},
    "sign-flip": {"attack": "sign-flip", "attack-scale": 10.0},
    "noise": {"attack": "noise", "attack-scale": 10.0},
    "label-flip": {"attack": "label-flip"},
    "free-rider": {"attack": "free-rider"},
    # FLTrust's own adaptive attack (Cao et al. 2021): run against fusion-fn="fltrust" only.
    "fltrust-adaptive": {"attack": "fltrust-adaptive"},
}
# Rules that assume f attackers get f = --attackers (below); bucketing uses s = 2 (the paper's).
RULES: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "median": {"strategy": "fusion", "fusion-fn": "median"},
    "trimmed-mean": {"strategy": "fusion", "fusion-fn": "trimmed-mean", "trim-beta": 0.3},
    "geometric-median": {"strategy": "fusion", "fusion-fn": "geometric-median"},
    "krum": {"strategy": "fusion", "fusion-fn": "krum", "krum-malicious": "f"},
    # Bulyan needs N >= 4f + 3: with 10 clients it can assume at most f = 1 (below).
    "bulyan": {"strategy": "fusion", "fusion-fn": "bulyan", "krum-malicious": "f-bulyan"},
    "centered-clipping": {"strategy": "fusion", "fusion-fn": "centered-clipping"},
    "bucketing+median": {"strategy": "fusion", "fusion-fn": "median", "bucket-size": 2},
    "bucketing+centered-clipping": {"strategy": "fusion", "fusion-fn": "centered-clipping", "bucket-size": 2},
    # Nearest neighbour mixing with f = --attackers (Allouah et al. 2023 pair it with these rules).
    "nnm+median": {"strategy": "fusion", "fusion-fn": "median", "nnm-malicious": "f"},
    "nnm+trimmed-mean": {"strategy": "fusion", "fusion-fn": "trimmed-mean", "trim-beta": 0.3, "nnm-malicious": "f"},
    "nnm+centered-clipping": {"strategy": "fusion", "fusion-fn": "centered-clipping", "nnm-malicious": "f"},
    # Worker momentum β = 0.5 on every client (Karimireddy et al. 2021; attackers too: their attack is
    # computed on, or applied to, momenta). β = 0.9, the paper's, learnt too slowly for 20 rounds here.
    "momentum+fedavg": {"strategy": "fedavg", "client-momentum": 0.5},
    "momentum+nnm+median": {"strategy": "fusion", "fusion-fn": "median", "nnm-malicious": "f", "client-momentum": 0.5},
    # FLTrust on a root set of --root-videos-per-class videos per class, generated with another seed.
    "fltrust": {"strategy": "fusion", "fusion-fn": "fltrust", "fltrust-root-dir": "root"},
    # ARC with f = --attackers before the robust rules Allouah et al. (ICLR 2025) pair it with.
    "arc+trimmed-mean": {"strategy": "fusion", "fusion-fn": "trimmed-mean", "trim-beta": 0.3, "arc-malicious": "f"},
    "arc+nnm+trimmed-mean": {
        "strategy": "fusion",
        "fusion-fn": "trimmed-mean",
        "trim-beta": 0.3,
        "nnm-malicious": "f",
        "arc-malicious": "f",
    },
}
# Small enough for 2 CPU cores (~30 s a run with the clip cache) and still learning: attack-free
# FedAvg reaches ~0.7 in 20 rounds. Measured first: 20 videos per class and one local epoch stayed
# at 0.26 ± 0.05, too close to chance (0.125) to tell a rule from an attack.
SMALL: dict[str, Any] = {
    "model": "tiny3d",
    "synthetic-videos-per-class": 35,
    "synthetic-frames": 16,
    "synthetic-size": 32,
    "clip-len": 8,
    "resize": "32x32",
    "crop-size": 32,
    "eval-clips": 2,
    "local-epochs": 2,
    "batch-size": 8,
}


def run_config(
    args: argparse.Namespace, partitioning: str, attack: str, rule: str, seed: int, clip_cache: str = ""
) -> dict[str, Any]:
    """The run config of one cell and seed; the seed drives the initial model, data order and noise."""
    f = {"f": args.attackers, "f-bulyan": min(args.attackers, (args.clients - 3) // 4), "root": str(args.root_dir)}
    rule_config = {k: f.get(v, v) if isinstance(v, str) else v for k, v in RULES[rule].items()}
    attackers = {"attack-fraction": args.attackers / args.clients} if attack != "none" else {}
    return {
        **comparison_config(args.rounds, args.clients, args.cache_dir),
        **SMALL,
        "clip-cache-dir": clip_cache,
        "torch-threads": args.threads,
        "seed": seed,
        "partition-seed": 42 + seed,
        "deterministic": True,  # every cell of a seed is the same run but for the attack and rule (paired)
        **PARTITIONINGS[partitioning],
        **ATTACKS[attack],
        **attackers,
        "min-train-nodes": min_train_nodes(args, rule_config),
        **rule_config,
    }


def applies(attack: str, rule: str) -> bool:
    """Whether the grid has the cell: FLTrust's adaptive attack is run against FLTrust only."""
    return attack != "fltrust-adaptive" or rule == "fltrust"


def synthetic_root_set(cfg: Any, per_class: int) -> Path:
    """A root set for FLTrust: ``per_class`` fresh videos per class of the run's synthetic task,
    generated with another seed (none of them a train or test video of the run), as class folders."""
    from dataclasses import replace

    from datasets.synthetic import ensure_synthetic

    spec = replace(cfg.synthetic_spec, seed=cfg.synthetic_spec.seed + 2_000_003, videos_per_class=per_class)
    return ensure_synthetic(cfg.cache_path, spec) / "UCF-101"


def min_train_nodes(args: argparse.Namespace, rule_config: dict[str, Any]) -> int:
    """Rounds go on without the f replies the rules assume lost (screening rejects free riders'
    unchanged models; needing every client, such a round would keep the old model), but never
    below what Krum (2f + 3) or Bulyan (4f + 3) need."""
    f = rule_config.get("krum-malicious", 0)
    needed = {"krum": 2 * f + 3, "bulyan": 4 * f + 3}.get(rule_config.get("fusion-fn", ""), 1)
    return max(args.clients - args.attackers, needed)


def rules_of(by_attack: dict[str, dict[str, list[float]]]) -> list[str]:
    """The rules of a table in first-seen order (merged parts may lack some cells)."""
    return list(dict.fromkeys(rule for by_rule in by_attack.values() for rule in by_rule))


def cell_text(values: list[float] | None, seeds: int) -> str:
    """mean ± std, with the number of seeds when a stopped grid left fewer than the setting's."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}" + (f" (n={len(values)})" if len(values) < seeds else "")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--attackers", type=int, default=3, help="attacking clients (and Krum/Bulyan's f)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partitionings", nargs="+", default=list(PARTITIONINGS), choices=list(PARTITIONINGS))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--root-videos-per-class", type=int, default=4, help="FLTrust's root set size per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--cache-dir", default="", help="synthetic data cache (default: the app's)")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=[], metavar="DIR",
        help="instead of running: merge the robustness.json of earlier runs (e.g. parts run side by side)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.root_dir = ""
    if "fltrust" in args.rules and not args.merge:
        from fedapp.task.config import parse_config

        cell = run_config(args, args.partitionings[0], "none", "fedavg", args.seeds[0])
        args.root_dir = synthetic_root_set(parse_config(cell, check_paths=False), args.root_videos_per_class)
    command = "python -m bench.robustness " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        result = merge([read_json(d / "robustness.json") for d in args.merge])
    else:
        result = run_grid(args, command, save=lambda so_far: save_json(args.out, so_far))
    save_json(args.out, result)
    table = markdown_table(result)
    atomic_write_bytes(args.out / "robustness.md", table.encode())
    plot(result["final-video-accuracy"], args.out / "robustness.png")
    print(table)
    return 0


def run_grid(
    args: argparse.Namespace, command: str, save: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every partitioning × attack × rule × seed of ``args``, one in-process run each; ``save`` gets
    the result so far after every run (``"partial": true`` until the last), so a grid stopped
    midway keeps what it finished."""
    started = time.perf_counter()
    setting = {k: v for k, v in vars(args).items() if k in ("rounds", "clients", "attackers", "seeds")}
    if "fltrust" in args.rules:
        setting["root-videos-per-class"] = args.root_videos_per_class

    def result(partial: bool) -> dict[str, Any]:
        return {
            "setting": setting,
            "partial": partial,
            "commands": [{"command": command.strip(), "wall-time-s": time.perf_counter() - started}],
            "final-video-accuracy": finals,
            "video-accuracy-per-round": curves,
        }

    finals: dict[str, dict[str, dict[str, list[float]]]] = {}
    curves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for partitioning in args.partitionings:
            for attack in args.attacks:
                row = finals.setdefault(partitioning, {}).setdefault(attack, {})
                for rule in (r for r in args.rules if applies(attack, r)):
                    row[rule] = []
                    for seed in args.seeds:
                        config = run_config(args, partitioning, attack, rule, seed, str(Path(tmp) / "clips"))
                        cell = time.perf_counter()
                        name = f"{partitioning}-{attack}-{rule}-{seed}"
                        results = run_inprocess(config, args.clients, Path(tmp) / name)
                        accuracy = [r["central"]["video-accuracy"] for r in results.rounds]
                        row[rule].append(accuracy[-1])
                        curves[name] = accuracy
                        print(
                            f"{partitioning:>13} | {attack:>10} | {rule:<28} | seed {seed} | "
                            f"final {accuracy[-1]:.3f} | {time.perf_counter() - cell:.0f} s",
                            flush=True,
                        )
                        if save is not None:
                            save(result(partial=True))
    return result(partial=False)


def save_json(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "robustness.json", result)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from parts of a grid run separately; refuses parts of different settings."""
    settings = {json_key(p["setting"]) for p in parts}
    if len(settings) > 1:
        raise SystemExit(f"cannot merge runs of different settings: {sorted(settings)}")
    finals: dict[str, dict[str, dict[str, list[float]]]] = {}
    for part in parts:
        for partitioning, by_attack in part["final-video-accuracy"].items():
            for attack, by_rule in by_attack.items():
                finals.setdefault(partitioning, {}).setdefault(attack, {}).update(by_rule)
    return {
        "setting": parts[0]["setting"],
        "partial": any(p.get("partial", False) for p in parts),
        "commands": [c for p in parts for c in p["commands"]],
        "final-video-accuracy": finals,
        "video-accuracy-per-round": {k: v for p in parts for k, v in p["video-accuracy-per-round"].items()},
    }


def json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def markdown_table(result: dict[str, Any]) -> str:
    """One table per partitioning: attacks as rows, rules as columns, mean ± std over the seeds."""
    setting = result["setting"]
    commands = "; ".join(f"`{c['command']}` ({c['wall-time-s'] / 60:.0f} min)" for c in result["commands"])
    lines = [
        f"Central test video accuracy after {setting['rounds']} rounds, mean ± std over seeds {setting['seeds']} "
        f"({setting['clients']} clients of which {setting['attackers']} attack, tiny3d, small synthetic default; "
        f"chance 0.125)"
        + (
            f"; FLTrust's root set: {setting['root-videos-per-class']} videos per class (generated with another seed)"
            if "root-videos-per-class" in setting
            else ""
        )
        + f". Run on this machine (2 cores) as {commands}.",
        "",
    ]
    if result.get("partial"):
        lines += [
            "**Partial**: stopped before the grid finished; rows not shown were not run, (n=k) marks k seeds.",
            "",
        ]
    for partitioning, by_attack in result["final-video-accuracy"].items():
        rules = rules_of(by_attack)
        lines += [f"**{partitioning}**", "", "| attack | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
        for attack, by_rule in by_attack.items():
            cells = [cell_text(by_rule.get(rule), len(setting["seeds"])) for rule in rules]
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += paired_table(partitioning, by_attack, rules, len(setting["seeds"]))
    return "\n".join(lines)


def paired_table(
    partitioning: str, by_attack: dict[str, dict[str, list[float]]], rules: list[str], seeds: int
) -> list[str]:
    """Each cell minus attack-free FedAvg on the same seed: what a rule under an attack costs against
    the federation nobody attacks (mean [95 % t-interval] verdict)."""
    baseline = by_attack.get("none", {}).get("fedavg")
    if not baseline:
        return []
    title = (
        f"**{partitioning}, paired difference to attack-free fedavg** (same seed: same partition, initial "
        f"model and data order; mean [95 % t-interval] over {seeds} seeds)"
    )
    rows = [
        (attack, [paired_difference(by_rule[rule], baseline).text() if by_rule.get(rule) else "—" for rule in rules])
        for attack, by_rule in by_attack.items()
    ]
    return table_lines(title, "attack", rules, rows)


def plot(finals: dict[str, dict[str, dict[str, list[float]]]], path: Path) -> None:
    """Mean ± std bars per attack and rule, one panel per partitioning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(finals), 1, figsize=(12, 3.6 * len(finals)), squeeze=False)
    for ax, (partitioning, by_attack) in zip(axes[:, 0], finals.items()):
        attacks = list(by_attack)
        rules = rules_of(by_attack)
        width = 0.8 / len(rules)
        for k, rule in enumerate(rules):
            stats = [mean_std(by_attack[a].get(rule, [0.0])) for a in attacks]
            ax.bar(
                np.arange(len(attacks)) + k * width,
                [m for m, _ in stats],
                width,
                yerr=[s for _, s in stats],
                label=rule,
                capsize=2,
            )
        ax.axhline(0.125, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
        ax.set_ylim(0, 1)
        ax.set_ylabel("central video accuracy")
        ax.set_title(partitioning)
    axes[0][0].legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
