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
    mean, dtypes = _weighted_mean64(updates)
    return {key: _cast_like(value, dtypes[key]) for key, value in mean.items()}


def average(updates: Iterable[Mapping[str, np.ndarray]]) -> Weights:
    """Plain (unweighted) streaming mean of client models."""
    return weighted_average((arrays, 1.0) for arrays in updates)


def _weighted_mean64(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
) -> tuple[dict[str, np.ndarray], dict[str, np.dtype]]:
    # The float64 mean before casting back, for iterative rules (geometric median) whose iterate
    # must not be rounded to float32 between steps.
    acc: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}
    total = 0.0
    for arrays, weight in updates:
        # A Python float: numpy float64 scalars make ``weight * array`` allocate a fresh array
        # instead of reusing the temporary (1.5x slower, docs/BENCHMARKS.md).
        weight = float(weight)
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
    for value in acc.values():
        value /= total  # in place, so 0-d tensors stay arrays instead of becoming numpy scalars
    return acc, dtypes


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
    """FedAvg: the mean of client models weighted by their number of training examples."""
    return weighted_average((arrays, float(num_examples)) for arrays, num_examples in updates)


def _cast_like(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # np.asarray: numpy reductions turn 0-d results into scalars, which Flower's Array rejects.
    if np.issubdtype(dtype, np.integer):
        return np.asarray(np.rint(value).astype(dtype))
    return np.asarray(value.astype(dtype))
