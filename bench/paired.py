"""Paired comparisons of methods run on the same seeds (same partition, initial model and data order):
each method's per-seed difference to a baseline, its mean and 95 % interval (Student's t), and the
verdict the interval allows. Plain Python, no SciPy."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95 % quantiles of Student's t, t(0.975; df), df = 1..30; beyond, the normal's 1.96 is
# within 2 % of the exact value.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)  # fmt: skip


def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


@dataclass(frozen=True)
class PairedDifference:
    """``method − baseline`` over the seeds both ran: mean and its 95 % interval (None below 2 seeds)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "too few seeds"
        if self.low <= 0.0 <= self.high:
            return "no difference"
        return "better" if self.low > 0 else "worse"

    def text(self) -> str:
        """``+0.083 [-0.021, +0.187] no difference``."""
        if self.low is None or self.high is None:
            return f"{self.mean:+.3f} (n={self.n}: too few seeds)"
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] {self.verdict}"


def paired_difference(method: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
    """The paired difference of two per-seed result lists in the same seed order (a stopped grid's
    shorter list pairs with the baseline's first values)."""
    n = min(len(method), len(baseline))
    if n == 0:
        raise ValueError("no seed in common to pair")
    differences = [m - b for m, b in zip(method[:n], baseline[:n], strict=True)]
    mean = statistics.fmean(differences)
    if n < 2:
        return PairedDifference(mean, None, None, n)
    half = t975(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)


def table_lines(
    title: str, corner: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]
) -> list[str]:
    """A bold title and a markdown table: ``corner`` heads the row names, one row per ``(name, cells)``."""
    lines = [title, "", f"| {corner} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return [*lines, ""]
