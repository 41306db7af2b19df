"""Aggregation math as plain numpy functions (no Flower import), testable on their own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

Weights = dict[str, np.ndarray]


def weighted_average(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Streaming weighted mean ``Σ wᵢθᵢ / Σ wᵢ`` over ``(weights, wᵢ)`` pairs.

    Memory stays at one float64 accumulator per tensor plus the update being read, so clients can
    be consumed one at a time. Each tensor keeps the dtype of the first update; integer tensors
    (BatchNorm's ``num_batches_tracked``) are rounded back to integers rather than becoming floats.
    """
    acc: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}
    total = 0.0
    for arrays, weight in updates:
        if weight < 0 or not np.isfinite(weight):
            raise ValueError(f"aggregation weight must be finite and >= 0, got {weight}")
        if not acc:
            acc = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in arrays.items()}
            dtypes = {k: np.asarray(v).dtype for k, v in arrays.items()}
        if arrays.keys() != acc.keys():
            raise ValueError("updates have different tensor names")
        for key, value in arrays.items():
            acc[key] += weight * np.asarray(value, dtype=np.float64)
        total += weight
    if not acc:
        raise ValueError("no updates to aggregate")
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    return {key: _cast_like(value / total, dtypes[key]) for key, value in acc.items()}


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
    """FedAvg: the mean of client models weighted by their number of training examples."""
    return weighted_average((arrays, float(num_examples)) for arrays, num_examples in updates)


def _cast_like(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return np.rint(value).astype(dtype)
    return value.astype(dtype)
