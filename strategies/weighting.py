"""Per-client aggregation weights from a named source (sample count, node config, quality, recency)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

WEIGHT_SOURCES = ("num-examples", "node", "inverse-loss", "accuracy", "staleness")


class WeightError(ValueError):
    """A client's aggregation weight is missing or invalid."""


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum to 1; each must be finite and >= 0, and at least one > 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise WeightError(f"expected one weight per client, got shape {w.shape}")
    for index, value in enumerate(w):
        if not np.isfinite(value):
            raise WeightError(f"client {index}: weight {value} is not finite")
        if value < 0:
            raise WeightError(f"client {index}: weight {value} is negative")
    if not w.any():
        raise WeightError(f"all {w.size} client weights are zero")
    # Divide by the largest first so that a sum of huge (finite) weights cannot overflow to inf.
    w = w / w.max()
    return w / w.sum()


def client_weights(
    source: str,
    metrics: Sequence[Mapping[str, Any]],
    server_round: int = 0,
    staleness_decay: float = 0.5,
) -> np.ndarray:
    """Normalized aggregation weight of each client, from the metrics of its reply.

    ``num-examples``: the reported sample count. ``node``: ``node-weight``, set per SuperNode in its
    node config. ``inverse-loss``: ``exp(-train-loss)``. ``accuracy``: ``val-accuracy``, else
    ``train-accuracy``. ``staleness``: ``staleness_decay ** (server_round - base-round)``, where a
    reply without ``base-round`` counts as fresh (staleness 0).
    """
    if source not in WEIGHT_SOURCES:
        raise WeightError(f"unknown weight source {source!r}; expected one of {', '.join(WEIGHT_SOURCES)}")
    if source == "num-examples":
        raw = [_metric(m, i, "num-examples") for i, m in enumerate(metrics)]
    elif source == "node":
        raw = [_metric(m, i, "node-weight") for i, m in enumerate(metrics)]
    elif source == "inverse-loss":
        raw = _exp_weights([-_metric(m, i, "train-loss") for i, m in enumerate(metrics)])
    elif source == "accuracy":
        raw = [_metric(m, i, "val-accuracy", "train-accuracy") for i, m in enumerate(metrics)]
    else:
        raw = _exp_weights(np.log(_check_decay(staleness_decay)) * _staleness(metrics, server_round))
    return normalize_weights(raw)


def _metric(metrics: Mapping[str, Any], index: int, *keys: str) -> float:
    # The first of ``keys`` the client reported; ``keys`` are alternatives in order of preference.
    for key in keys:
        if key in metrics:
            value = metrics[key]
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
                raise WeightError(f"client {index}: metric {key!r} is {value!r}, not a number")
            if not np.isfinite(value):
                raise WeightError(f"client {index}: metric {key!r} is {value}, not finite")
            return float(value)
    raise WeightError(f"client {index}: reply has no {' or '.join(repr(k) for k in keys)} metric")


def _staleness(metrics: Sequence[Mapping[str, Any]], server_round: int) -> np.ndarray:
    staleness = []
    for index, m in enumerate(metrics):
        base_round = _metric(m, index, "base-round") if "base-round" in m else server_round
        if base_round > server_round:
            raise WeightError(f"client {index}: base-round {base_round:g} is after server round {server_round}")
        staleness.append(server_round - base_round)
    return np.asarray(staleness, dtype=np.float64)


def _check_decay(decay: float) -> float:
    if not 0 < decay <= 1:
        raise WeightError(f"staleness decay must be in (0, 1], got {decay}")
    return decay


def _exp_weights(log_weights: Sequence[float] | np.ndarray) -> np.ndarray:
    # Shifting by the maximum leaves the normalized weights unchanged but keeps exp() from
    # underflowing to all zeros (e.g. every loss > 745, or a very stale round).
    x = np.asarray(log_weights, dtype=np.float64)
    if x.size == 0:
        return x
    return np.exp(x - x.max())
