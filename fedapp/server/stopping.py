"""When to stop: the round budget, a target accuracy, or no improvement for ``patience`` rounds.

The decision is derived from the round history alone, so a resumed run decides exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BUDGET = "round budget spent (num-server-rounds)"


def round_score(record: Mapping[str, Any]) -> float | None:
    """The metric stopping watches: with personalization the sites' personal models' accuracy on
    their own test videos (the models the sites use), else the central video accuracy, else the
    clients' evaluate accuracy of the global model."""
    personal = (record.get("evaluate") or {}).get("personal-video-accuracy")
    if personal is not None:
        return float(personal)
    for section in ("central", "evaluate"):
        value = (record.get(section) or {}).get("video-accuracy")
        if value is not None:
            return float(value)
    return None


def stop_reason(history: Sequence[Mapping[str, Any]], patience: int, min_delta: float, target: float) -> str | None:
    """Why to stop after the last round of ``history`` (rounds ≥ 1), or ``None`` to go on."""
    scores = [s for s in (round_score(r) for r in history if r.get("round", 0) >= 1) if s is not None]
    if not scores:
        return None
    if target > 0 and scores[-1] >= target:
        return f"target-accuracy {target} reached ({scores[-1]:.4f})"
    if patience > 0:
        best, stale = float("-inf"), 0
        for score in scores:
            if score > best + min_delta:
                best, stale = score, 0
            else:
                stale += 1
        if stale >= patience:
            return f"no improvement of video-accuracy by more than {min_delta} for {patience} rounds (best {best:.4f})"
    return None


def best_round(history: Sequence[Mapping[str, Any]]) -> tuple[int, float] | None:
    """``(round, score)`` of the best round so far (the earliest on ties)."""
    scored = [(r["round"], round_score(r)) for r in history if r.get("round", 0) >= 1]
    scored = [(rnd, s) for rnd, s in scored if s is not None]
    return max(scored, key=lambda x: (x[1], -x[0])) if scored else None
