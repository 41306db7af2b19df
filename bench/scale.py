"""How a simulated federation's cost grows with the number of sites, measured in one run.

For each N in ``--clients`` (default 10, 50, 100, 200) this runs the real ``fedvideo run``
(SuperLink, Flower's simulation engine on Ray, the ServerApp, N virtual SuperNodes) on tiny3d and
the synthetic task with about ``--videos-per-client`` videos per site, ``fraction-train`` and
``fraction-evaluate`` set so that ``--sampled`` sites train and evaluate per round,
``min-available-nodes=N`` (so every round samples from all N) and ``central-eval=false`` (the server's
own test pass would grow with the test split, which grows with N, and is not federation cost).

Per N it reads, from the run's ``rounds.jsonl``: the round time, the server's own time in it
(``server-s``: the round time minus time spent waiting for replies: configuring, screening, aggregating,
recording) and the server process's peak RSS; from the clients' metrics, the compute time per
sampled client (``train-clips / clips-per-s``); and it samples, every ``--sample-s`` seconds, the
proportional set size (PSS: a page shared by k processes counts 1/k to each, so the total counts it
once) summed over the whole process tree of the run (launcher, SuperLink, simulation, Ray's daemons
and actors). Round 1 also starts the Ray actors, so the per-round figures are the mean of rounds
2..R; round 1 is printed on its own.

Each cost gets a growth exponent: the least-squares slope of log(cost) against log(N). With a
fixed number of sampled sites a well-behaved server's per-round cost is flat (exponent ≈ 0) and
anything held per known site grows at most linearly (≤ 1); a slope above 1.2 is flagged SUPER-LINEAR.

    .venv/bin/python -m bench.scale         # 10, 50, 100, 200: ~2.5 min, plus writing the datasets once
    .venv/bin/python -m bench.scale --clients 10 50 100 200 500 1000 --json docs/scale.json   # ~9 min
    .venv/bin/python -m bench.scale --clients 4 8 --sampled 2 --rounds 2   # a quick look (~1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.run import run_benchmark

SUPER_LINEAR = 1.2  # a growth exponent above this is flagged


def growth_exponent(sizes: Sequence[float], costs: Sequence[float]) -> float:
    """Least-squares slope of log(cost) on log(size): cost ∝ size ** slope. NaN with under two
    positive points (a cost of 0 has no logarithm)."""
    points = [(math.log(n), math.log(c)) for n, c in zip(sizes, costs) if n > 0 and c > 0]
    if len(points) < 2:
        return math.nan
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def _children() -> dict[int, list[int]]:
    """Every live process's children, from /proc (a process gone mid-scan is skipped)."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) is in parentheses and may hold spaces: the ppid follows the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pss_mb(root: int) -> float:
    """PSS summed over ``root`` and all its descendants, in MiB (a page shared by k processes counts
    1/k to each, so shared libraries and copy-on-write pages count once in the sum)."""
    tree, todo, total_kb = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, ()))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:  # exited, or not ours to read
            continue
    return total_kb / 1024


class PeakSampler:
    """Samples :func:`tree_pss_mb` of a process tree on a thread until stopped; keeps the peak."""

    def __init__(self, root: int, every_s: float) -> None:
        self.peak_mb = 0.0
        self._root, self._every = root, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak_mb = max(self.peak_mb, tree_pss_mb(self._root))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def run_config(n: int, args: argparse.Namespace, results_dir: Path, cache_dir: Path | None) -> str:
    """The ``--run-config`` of the run with ``n`` sites (datasets in ``cache_dir``, or the app's cache)."""
    from datasets.synthetic import GROUPS_PER_FOLD, NUM_GROUPS

    sampled = min(args.sampled, n)
    # The synthetic split tests on one fold's groups (UCF-101's layout): the rest are for training.
    train_share = 1 - GROUPS_PER_FOLD / NUM_GROUPS
    per_class = max(2, math.ceil(args.videos_per_client * n / train_share / args.classes))
    fraction = sampled / n
    return " ".join(
        [
            f"num-server-rounds={args.rounds}",
            f"fraction-train={fraction!r}",
            f"fraction-evaluate={fraction!r}",
            f"min-train-nodes={sampled}",
            f"min-evaluate-nodes={sampled}",
            f"min-available-nodes={n}",
            "local-epochs=1",
            "model='tiny3d'",
            f"synthetic-classes={args.classes}",
            f"synthetic-videos-per-class={per_class}",
            "central-eval=false",
            "tensorboard=false",
            "checkpoint-keep=1",
            f"seed={args.seed}",
            "torch-threads=1",
            f'results-dir="{results_dir}"',
            f'run-name="n{n}"',
            *([f'cache-dir="{cache_dir}"'] if cache_dir else []),
        ]
    )


def prepare_data(config: str) -> None:
    """Generate the run's synthetic dataset before it is timed (the first run of a spec writes it)."""
    from datasets.synthetic import ensure_synthetic
    from fedapp.ops.start_checks import check_run_config

    cfg = check_run_config([config], None)  # the config exactly as the run will validate it
    ensure_synthetic(cfg.cache_path, cfg.synthetic_spec)


def measure_run(n: int, args: argparse.Namespace, results_dir: Path, cache_dir: Path | None) -> dict[str, Any]:
    """One ``fedvideo run`` with ``n`` sites: its per-round costs and peak memory."""
    config = run_config(n, args, results_dir, cache_dir)
    prepare_data(config)
    federation = f"num-supernodes={n} client-resources-num-cpus={args.client_cpus}"
    cmd = [sys.executable, "-m", "fedapp.cli", "run", "--run-config", config, "--federation-config", federation]
    log = results_dir / f"n{n}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        sampler = PeakSampler(process.pid, args.sample_s)
        code = process.wait()
        peak_mb = sampler.stop()
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"N={n}: fedvideo run exited {code}; see {log}")
    rounds = [json.loads(line) for line in (results_dir / f"n{n}" / "rounds.jsonl").read_text().splitlines()]
    try:
        costs = round_costs(rounds, args.rounds, min(args.sampled, n))
    except ValueError as exc:
        raise RuntimeError(f"N={n}: {exc}; see {log}") from None
    return {"clients": n, "sampled": min(args.sampled, n), "wall-s": wall, **costs, "tree-peak-pss-mb": peak_mb}


def round_costs(rounds: Sequence[dict[str, Any]], num_rounds: int, sampled: int) -> dict[str, float]:
    """The per-round costs of a run from its ``rounds.jsonl`` records: round 1 on its own (it also
    starts the Ray actors), the mean of rounds 2.. for the rest. ValueError unless every one of
    ``num_rounds`` rounds trained ``sampled`` clients: a cost of a round in which nothing trained
    would measure nothing."""
    trained = [r for r in rounds if r.get("round", 0) >= 1]
    counts = [len((r.get("train-clients") or {}).get("clients") or []) for r in trained]
    if len(trained) != num_rounds or any(c != sampled for c in counts):
        raise ValueError(f"expected {num_rounds} rounds of {sampled} trained clients, got {counts}")

    def train_s(r: dict[str, Any]) -> float:  # mean compute time of the round's trained clients
        clients = r["train-clients"]["clients"]
        return sum(c["train-clips"] / c["clips-per-s"] for c in clients) / len(clients)

    steady = trained[1:] or trained
    return {
        "first-round-s": float(trained[0]["round-time-s"]),
        "round-s": sum(float(r["round-time-s"]) for r in steady) / len(steady),
        "server-s": sum(float(r["server-s"]) for r in steady) / len(steady),
        "client-train-s": sum(train_s(r) for r in steady) / len(steady),
        "server-peak-rss-mb": max(float(r["server-peak-rss-mb"]) for r in trained),
    }


# The costs given a growth exponent, with their table headings.
COSTS = {
    "wall-s": "run wall s",
    "first-round-s": "round 1 s",
    "round-s": "round s",
    "server-s": "server s/round",
    "client-train-s": "train s/client",
    "server-peak-rss-mb": "server RSS MB",
    "tree-peak-pss-mb": "all PSS MB",
}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedvideo-scale-") as tmp:
        results_dir, cache_dir = Path(tmp) / "results", args.cache_dir
        results_dir.mkdir()
        runs = []
        for n in args.clients:
            print(f"N={n} ...", flush=True)
            runs.append(measure_run(n, args, results_dir, cache_dir))
    sizes = [r["clients"] for r in runs]
    exponents = {key: growth_exponent(sizes, [r[key] for r in runs]) for key in COSTS}
    return {
        "settings": {
            "clients": list(args.clients),
            "sampled": args.sampled,
            "rounds": args.rounds,
            "videos-per-client": args.videos_per_client,
            "client-cpus": args.client_cpus,
            "cpus": os.cpu_count(),
        },
        "runs": runs,
        "exponents": exponents,
    }


def report(result: dict[str, Any]) -> str:
    """The per-N table and each cost's growth exponent (flagged above SUPER_LINEAR)."""
    s = result["settings"]
    lines = [
        f"{s['sampled']} of N sites sampled per round, {s['rounds']} rounds, ~{s['videos-per-client']} videos "
        f"per site, tiny3d; per-round figures are rounds 2..{s['rounds']}",
        f"{'N':>5} " + " ".join(f"{h:>15}" for h in COSTS.values()),
    ]
    for r in result["runs"]:
        lines.append(f"{r['clients']:>5} " + " ".join(f"{r[k]:>15.3f}" for k in COSTS))
    exponents = result["exponents"]
    lines.append(f"{'exp':>5} " + " ".join(f"{exponents[k]:>15.2f}" for k in COSTS))
    flagged = [f"{COSTS[k]} (exp {exponents[k]:.2f})" for k in COSTS if exponents[k] > SUPER_LINEAR]
    verdict = f"SUPER-LINEAR in N: {', '.join(flagged)}" if flagged else f"no cost grows faster than N^{SUPER_LINEAR}"
    lines.append(verdict)
    lines.append("exp: the slope of log(cost) on log(N) (cost ∝ N^exp)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100, 200], help="federation sizes N")
    parser.add_argument("--sampled", type=int, default=10, help="sites that train (and evaluate) per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--videos-per-client", type=int, default=3, help="training videos per site (about)")
    parser.add_argument("--classes", type=int, default=8, choices=(2, 4, 6, 8))
    parser.add_argument(
        "--client-cpus", type=int, default=1, help="client-resources-num-cpus (Ray actors = cores / this)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument(
        "--cache-dir", type=Path, help="where the synthetic datasets are kept (default: the app's, ~/.cache/fedvideo)"
    )
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.sampled < 1 or args.rounds < 1:
        parser.error("--clients, --sampled and --rounds must be >= 1")
    return run_benchmark(args, benchmark, report)


if __name__ == "__main__":
    raise SystemExit(main())
