"""Figures of a run's history (PNG, written atomically), and a CLI to re-plot or compare runs.

fedvideo plot RUN_DIR                       # re-plot one run's figures into RUN_DIR
fedvideo plot RUN_A RUN_B --out cmp.png     # central video accuracy per round, one line per run
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedapp.files import atomic_write_bytes
from fedapp.server.results import CLASSES_FILE, CONFIG_FILE, ROUNDS_FILE

ACCURACY_LOSS_PNG = "accuracy_loss.png"
CLIENT_ACCURACY_PNG = "client_accuracy.png"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_FILE = "confusion.json"
COMPARE_METRICS = ("video-accuracy", "loss", "clip-accuracy")

# Small on purpose: example figures are committed to the repository.
FIGSIZE = (8.0, 3.2)
DPI = 90


# --- reading records (shared with fedapp.server.report) -------------------------------------------------


def number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (bools and strings are not), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def get_metric(record: Mapping[str, Any], section: str | None, key: str) -> float | None:
    """``record[section][key]`` (or ``record[key]``) as a number; None when absent or malformed."""
    source = record.get(section) if section else record
    return number(source.get(key)) if isinstance(source, Mapping) else None


def series(rounds: Iterable[Mapping[str, Any]], section: str | None, key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of one metric over the records that have it."""
    xs: list[int] = []
    ys: list[float] = []
    for record in rounds:
        value = get_metric(record, section, key)
        r = number(record.get("round"))
        if value is not None and r is not None:
            xs.append(int(r))
            ys.append(value)
    return xs, ys


def client_label(client: Mapping[str, Any]) -> str | None:
    """A client's stable name: its partition id (node ids change when a SuperNode restarts)."""
    pid = client.get("partition-id")
    if pid is not None and not isinstance(pid, bool):
        return str(int(pid)) if isinstance(pid, float) and pid.is_integer() else str(pid)
    node = client.get("node-id")
    return None if node is None else f"node-{node}"


def client_entries(record: Mapping[str, Any], section: str) -> list[Mapping[str, Any]]:
    """The accepted clients of ``train-clients`` / ``evaluate-clients``; [] when absent."""
    block = record.get(section)
    clients = block.get("clients") if isinstance(block, Mapping) else None
    return [c for c in clients if isinstance(c, Mapping)] if isinstance(clients, list) else []


def client_series(
    rounds: Iterable[Mapping[str, Any]], section: str, key: str
) -> dict[str, tuple[list[int], list[float]]]:
    """Per-client (rounds, values) of one metric, keyed by :func:`client_label`."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in rounds:
        r = number(record.get("round"))
        if r is None:
            continue
        for client in client_entries(record, section):
            label, value = client_label(client), number(client.get(key))
            if label is not None and value is not None:
                xs, ys = out.setdefault(label, ([], []))
                xs.append(int(r))
                ys.append(value)
    return out


def read_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``rounds.jsonl``; FileNotFoundError if the folder has none."""
    path = Path(run_dir) / ROUNDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {ROUNDS_FILE} (not a run results folder?)")
    rounds = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a hand-edited or foreign line must not hide the rest of the history
        if isinstance(record, dict):
            rounds.append(record)
    return rounds


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- figures -------------------------------------------------------------------------------------


def _new_figure(ncols: int = 1, figsize: tuple[float, float] = FIGSIZE) -> tuple[Any, list[Any]]:
    # Figure without pyplot: Agg rendering, no global state, safe inside a long-running server.
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _round_axis(ax: Any, ylabel: str) -> None:
    """Label a per-round axis (after plotting): ticks on whole rounds only. MaxNLocator(integer=True)
    alone falls back to fractional ticks when fewer than two whole rounds are in view (a 1-round
    run), so a short run gets a tick at each of its rounds."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    rounds = sorted({int(x) for line in ax.lines for x in line.get_xdata()})
    if 0 < len(rounds) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(rounds))
        ax.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _no_data(ax: Any, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _legend(ax: Any, max_entries: int = 12) -> None:
    # With many clients a legend would cover the plot: the colours still tell lines apart.
    handles, labels = ax.get_legend_handles_labels()
    if 0 < len(handles) <= max_entries:
        ax.legend(fontsize="small", ncols=1 if len(handles) <= 6 else 2)


def plot_accuracy_loss(rounds: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Central (and client-evaluate) video accuracy, and central/train/evaluate loss, per round."""
    fig, (acc_ax, loss_ax) = _new_figure(2)
    lines = [
        (acc_ax, "central", "video-accuracy", "central", "-o"),
        (acc_ax, "evaluate", "video-accuracy", "clients (evaluate)", "--s"),
        (loss_ax, "central", "loss", "central", "-o"),
        (loss_ax, "train", "train-loss", "clients (train)", ":^"),
        (loss_ax, "evaluate", "loss", "clients (evaluate)", "--s"),
    ]
    for ax, section, key, label, style in lines:
        xs, ys = series(rounds, section, key)
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=3)
    acc_ax.set_title("video accuracy", fontsize="medium")
    loss_ax.set_title("loss", fontsize="medium")
    _round_axis(acc_ax, "accuracy")
    _round_axis(loss_ax, "loss")
    for ax in (acc_ax, loss_ax):
        if ax.lines:
            _legend(ax)
        else:
            _no_data(ax)
    return _save(fig, path)


def _client_colours(labels: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    def order(label: str) -> tuple[int, float, str]:
        return (0, float(label), "") if label.lstrip("-").isdigit() else (1, 0.0, label)

    ordered = sorted(set(labels), key=order)
    cmap = colormaps["tab10" if len(ordered) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(ordered)}


def plot_client_accuracy(rounds: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Per-client train accuracy (and evaluate video accuracy when present), one line per partition."""
    train = client_series(rounds, "train-clients", "train-accuracy")
    evaluate = client_series(rounds, "evaluate-clients", "video-accuracy")
    panels = [("train accuracy (per client)", train)]
    if evaluate:
        panels.append(("evaluate video accuracy (per client)", evaluate))
    colours = _client_colours([*train, *evaluate])
    fig, axes = _new_figure(len(panels), FIGSIZE if len(panels) == 2 else (FIGSIZE[0] * 0.6, FIGSIZE[1]))
    for ax, (title, data) in zip(axes, panels):
        for label in colours:
            if label in data:
                xs, ys = data[label]
                name = label if label.startswith("node-") else f"partition {label}"
                ax.plot(xs, ys, "-o", markersize=3, color=colours[label], label=name)
        ax.set_title(title, fontsize="medium")
        _round_axis(ax, "accuracy")
        if data:
            _legend(ax)
        else:
            _no_data(ax, "no per-client metrics")
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path) -> Path:
    """Confusion counts (row = true class, column = predicted), class names on both axes."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {counts.shape}, expected ({n}, {n}) for {n} classes")
    side = min(max(3.5, 0.32 * n + 2.0), 11.0)
    fig, (ax,) = _new_figure(1, (side + 0.8, side))
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    font = max(3.0, min(9.0, 160.0 / max(n, 1)))
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=font)
    ax.set_yticks(range(n), [str(c) for c in classes], fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({int(counts.sum())} videos)", fontsize="medium")
    if n <= 25:  # beyond that the numbers are unreadable; the colours carry it
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if counts[i, j] > threshold else "black",
                )
    return _save(fig, path)


def plot_compare(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, metric: str = "video-accuracy"
) -> Path:
    """One line per run: the central ``metric`` per round (client-evaluate when a run has no central)."""
    fig, (ax,) = _new_figure(1)
    for label, rounds in runs.items():
        xs, ys = series(rounds, "central", metric)
        if not xs:  # central evaluation was off for this run: its clients' evaluation is the next best
            xs, ys = series(rounds, "evaluate", metric)
            label = f"{label} (client eval)"
        if xs:
            ax.plot(xs, ys, "-o", markersize=3, label=label)
    ax.set_title(f"central {metric}", fontsize="medium")
    _round_axis(ax, metric)
    if ax.lines:
        _legend(ax, max_entries=20)
    else:
        _no_data(ax)
    return _save(fig, path)


# --- CLI -----------------------------------------------------------------------------------------


def replot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Redraw one run's figures from its folder (into ``out_dir`` when given)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    rounds = read_rounds(run_dir)
    written = [
        plot_accuracy_loss(rounds, out / ACCURACY_LOSS_PNG),
        plot_client_accuracy(rounds, out / CLIENT_ACCURACY_PNG),
    ]
    confusion = _read_json(run_dir / CONFUSION_FILE)
    if isinstance(confusion, dict) and confusion.get("matrix") is not None:
        classes = confusion.get("classes") or _read_json(run_dir / CLASSES_FILE)
        if isinstance(classes, list):
            written.append(plot_confusion(confusion["matrix"], classes, out / CONFUSION_PNG))
    return written


def run_label(run_dir: str | Path) -> str:
    """The folder name, with the strategy from ``run_config.json`` when it has one."""
    run_dir = Path(run_dir)
    name = run_dir.resolve().name
    config = _read_json(run_dir / CONFIG_FILE)
    strategy = config.get("strategy") if isinstance(config, dict) else None
    if not strategy:
        return name
    if strategy == "fusion" and config.get("fusion-fn"):
        strategy = f"fusion/{config['fusion-fn']}"
    return f"{name} ({strategy})"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="fedvideo plot",
        description="Re-plot one run's figures, or compare the central metric of several runs.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's results folder (several: compared)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="one run: the folder for its figures; several: the comparison PNG "
        "(default: compare-METRIC.png in the current folder)",
    )
    parser.add_argument(
        "--metric",
        choices=COMPARE_METRICS,
        default="video-accuracy",
        help="central metric to compare (several runs only)",
    )
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    args = parser.parse_args(argv)

    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        print(f"error: {len(args.labels)} labels for {len(args.run_dirs)} runs", file=sys.stderr)
        return 2
    try:
        histories = [read_rounds(run_dir) for run_dir in args.run_dirs]
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(args.run_dirs) == 1:
        written = replot_run(args.run_dirs[0], args.out)
    else:
        labels = args.labels or [run_label(d) for d in args.run_dirs]
        if len(set(labels)) < len(labels):  # same folder names in different parents: keep every line
            labels = [f"{label} [{i + 1}]" for i, label in enumerate(labels)]
        out = args.out or Path(f"compare-{args.metric}.png")
        written = [plot_compare(dict(zip(labels, histories)), out, args.metric)]
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
