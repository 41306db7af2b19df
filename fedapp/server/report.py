"""A run's history in readable forms: ``history.csv``, TensorBoard scalars, figures.

The text summary (``summary.txt``) is rendered from ``summary.json``'s dict: ``fedapp.server.summary``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedapp.files import atomic_write_bytes, atomic_write_json
from fedapp.tools import plots
from fedapp.tools.plots import client_entries, client_label, get_metric, number

HISTORY_FILE = "history.csv"

# (column, section of the round record or None for top level, key in that section)
_HISTORY_SOURCES: tuple[tuple[str, str | None, str], ...] = (
    ("round", None, "round"),
    ("central-loss", "central", "loss"),
    ("central-video-accuracy", "central", "video-accuracy"),
    ("central-clip-accuracy", "central", "clip-accuracy"),
    ("train-loss", "train", "train-loss"),
    ("train-accuracy", "train", "train-accuracy"),
    ("evaluate-loss", "evaluate", "loss"),
    ("evaluate-video-accuracy", "evaluate", "video-accuracy"),
    ("clients-accepted", "train-clients", "clients"),
    ("clients-rejected", "train-clients", "rejected"),
    ("clients-failed", "train-clients", "failed"),
    ("bytes-down", None, "bytes-down"),
    ("bytes-up", None, "bytes-up"),
    ("round-time-s", None, "round-time-s"),
    ("wall-time-s", None, "wall-time-s"),
)
HISTORY_COLUMNS: tuple[str, ...] = tuple(column for column, _, _ in _HISTORY_SOURCES)


def _count(record: Mapping[str, Any], section: str, key: str) -> int | None:
    """Length of the list ``record[section][key]``; None when the phase did not run."""
    block = record.get(section)
    value = block.get(key) if isinstance(block, Mapping) else None
    return len(value) if isinstance(value, list) else None


def _cell(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # counts and byte totals read as integers
    return repr(value)  # shortest text that round-trips the float


def history_row(record: Mapping[str, Any]) -> dict[str, str]:
    """One ``history.csv`` row (every column; "" where the record has no value)."""
    row = {}
    for column, section, key in _HISTORY_SOURCES:
        if column.startswith("clients-"):
            value: float | int | None = _count(record, section or "", key)
        else:
            value = get_metric(record, section, key)
        row[column] = _cell(value)
    return row


def write_history_csv(run_dir: str | Path, rounds: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``history.csv``: one row per round, columns :data:`HISTORY_COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in rounds:
        writer.writerow(history_row(record))
    path = Path(run_dir) / HISTORY_FILE
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


class TensorBoardLog:
    """TensorBoard scalars of every round, flushed as they come so a long run can be watched live."""

    _SCALARS: tuple[tuple[str, str | None, str], ...] = (
        ("central/loss", "central", "loss"),
        ("central/video-accuracy", "central", "video-accuracy"),
        ("central/clip-accuracy", "central", "clip-accuracy"),
        ("train/loss", "train", "train-loss"),
        ("train/accuracy", "train", "train-accuracy"),
        ("evaluate/loss", "evaluate", "loss"),
        ("evaluate/video-accuracy", "evaluate", "video-accuracy"),
        ("comm/bytes-down", None, "bytes-down"),
        ("comm/bytes-up", None, "bytes-up"),
        ("time/round-s", None, "round-time-s"),
    )
    _CLIENT_SCALARS: tuple[tuple[str, str, str], ...] = (
        ("train-accuracy", "train-clients", "train-accuracy"),
        ("train-loss", "train-clients", "train-loss"),
        ("evaluate-video-accuracy", "evaluate-clients", "video-accuracy"),
    )

    def __init__(self, log_dir: str | Path) -> None:
        # Imported here: torch is heavy, and the CSV/plot paths of this module do not need it.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Write the record's scalars at ``global_step = round``; missing values are skipped."""
        step = number(record.get("round"))
        if step is None:
            return
        step = int(step)
        for tag, section, key in self._SCALARS:
            value = get_metric(record, section, key)
            if value is not None:
                self._writer.add_scalar(tag, value, global_step=step)
        for name, section, key in self._CLIENT_SCALARS:
            for client in client_entries(record, section):
                label, value = client_label(client), number(client.get(key))
                if label is not None and value is not None:
                    self._writer.add_scalar(f"clients/{label}/{name}", value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_final_report(
    run_dir: str | Path,
    rounds: Sequence[Mapping[str, Any]],
    classes: Sequence[str] | None,
    confusion: list[list[int]] | None,
) -> list[Path]:
    """Write history.csv and the figures (confusion matrix only when given). ``summary.txt`` is
    written with ``summary.json``, from the same dict (``RunResults.write_summary``)."""
    run_dir = Path(run_dir)
    written = [write_history_csv(run_dir, rounds)]
    written.append(plots.plot_accuracy_loss(rounds, run_dir / plots.ACCURACY_LOSS_PNG))
    written.append(plots.plot_client_accuracy(rounds, run_dir / plots.CLIENT_ACCURACY_PNG))
    if confusion is not None:
        names = list(classes) if classes else [str(i) for i in range(len(confusion))]
        written.append(plots.plot_confusion(confusion, names, run_dir / plots.CONFUSION_PNG))
        # Kept as data too (after the plot has checked its shape), so `fedvideo plot` can redraw it.
        confusion_json = run_dir / plots.CONFUSION_FILE
        atomic_write_json(confusion_json, {"classes": names, "matrix": [list(map(int, row)) for row in confusion]})
        written.append(confusion_json)
    return written
