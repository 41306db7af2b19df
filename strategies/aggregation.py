"""Aggregation math as plain numpy functions (no Flower import), testable on their own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

Weights = dict[str, np.ndarray]


# Coordinates per block of the blocked means: two float64 blocks (512 KiB each) stay in a core's
# cache while every client's slice is added, so memory traffic is one read of each input.
BLOCK = 1 << 16


def weighted_average(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Weighted mean ``Σ wᵢθᵢ / Σ wᵢ`` over ``(weights, wᵢ)`` pairs, summed in float64.

    Blocked over coordinates: for each block of a tensor every client's slice is scaled and added
    into a cache-sized float64 buffer, then the block is divided and cast into the output. Extra
    memory is the output plus two blocks; no full-size temporary. Each tensor keeps the dtype of
    the first update; integer tensors (BatchNorm's ``num_batches_tracked``) are rounded back to
    integers rather than becoming floats.
    """
    models, weights, total = _checked(updates)
    return {key: _blocked_mean(key, models, weights, total, np.asarray(models[0][key]).dtype) for key in models[0]}


def average(updates: Iterable[Mapping[str, np.ndarray]]) -> Weights:
    """Plain (unweighted) mean of client models."""
    return weighted_average((arrays, 1.0) for arrays in updates)


def _checked(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
) -> tuple[list[Mapping[str, np.ndarray]], list[float], float]:
    models: list[Mapping[str, np.ndarray]] = []
    weights: list[float] = []
    for arrays, weight in updates:
        # A Python float: numpy float64 scalars make ``weight * array`` allocate a fresh array
        # instead of reusing the temporary (1.5x slower, docs/BENCHMARKS.md).
        weight = float(weight)
        if weight < 0 or not np.isfinite(weight):
            raise ValueError(f"aggregation weight must be finite and >= 0, got {weight}")
        if models and arrays.keys() != models[0].keys():
            raise ValueError("updates have different tensor names")
        models.append(arrays)
        weights.append(weight)
    if not models:
        raise ValueError("no updates to aggregate")
    total = sum(weights)
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    return models, weights, total


def _blocked_mean(
    key: str, models: list[Mapping[str, np.ndarray]], weights: list[float], total: float, dtype: np.dtype
) -> np.ndarray:
    """One tensor's weighted mean, cast to ``dtype`` (float64 keeps it unrounded)."""
    shape = np.shape(models[0][key])
    flats = [np.asarray(m[key]).reshape(-1) for m in models]  # views of contiguous tensors, no copy
    out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=dtype)
    acc = np.empty(min(out.size, BLOCK), np.float64)
    term = np.empty_like(acc)
    for start in range(0, out.size, BLOCK):
        stop = min(start + BLOCK, out.size)
        a, t = acc[: stop - start], term[: stop - start]
        # Same operations in the same client order as a running float64 sum: identical results.
        np.multiply(flats[0][start:stop], weights[0], out=a, dtype=np.float64)
        for flat, weight in zip(flats[1:], weights[1:]):
            np.multiply(flat[start:stop], weight, out=t, dtype=np.float64)
            a += t
        a /= total
        out[start:stop] = np.rint(a) if np.issubdtype(dtype, np.integer) else a
    return out.reshape(shape)


def _weighted_mean64(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
) -> tuple[dict[str, np.ndarray], dict[str, np.dtype]]:
    # The float64 mean before casting back, for iterative rules (geometric median) whose iterate
    # must not be rounded to float32 between steps.
    models, weights, total = _checked(updates)
    dtypes = {k: np.asarray(v).dtype for k, v in models[0].items()}
    return {key: _blocked_mean(key, models, weights, total, np.dtype(np.float64)) for key in models[0]}, dtypes


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
    """FedAvg: the mean of client models weighted by their number of training examples."""
    return weighted_average((arrays, float(num_examples)) for arrays, num_examples in updates)


def _cast_like(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # np.asarray: numpy reductions turn 0-d results into scalars, which Flower's Array rejects.
    if np.issubdtype(dtype, np.integer):
        return np.asarray(np.rint(value).astype(dtype))
    return np.asarray(value.astype(dtype))
