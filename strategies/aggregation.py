"""Aggregation math as plain numpy functions (no Flower import), testable on their own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from strategies.blocks import Span, block_length, flat_views, gather, run_in_blocks, spans

Weights = dict[str, np.ndarray]


def weighted_average(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Weighted mean ``Σ wᵢθᵢ / Σ wᵢ`` over ``(weights, wᵢ)`` pairs, computed in float64.

    Blocked over coordinates (``strategies.blocks``): each block of every client's tensor is cast
    into a cache-resident float64 buffer and the block's mean is one matrix-vector product with the
    normalized weights; the result is cast into the output. Extra memory is the output plus one
    block buffer, whatever N; no full-size temporary; one thread (see ``_blocked_means``). Each
    tensor keeps the dtype of the first update; integer tensors (BatchNorm's
    ``num_batches_tracked``) are rounded back to integers rather than becoming floats.
    """
    models, weights, total = _checked(updates)
    return _blocked_means(models, weights, total)


def average(updates: Iterable[Mapping[str, np.ndarray]]) -> Weights:
    """Plain (unweighted) mean of client models."""
    return weighted_average((arrays, 1.0) for arrays in updates)


def _checked(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
) -> tuple[list[Mapping[str, np.ndarray]], list[float], float]:
    models: list[Mapping[str, np.ndarray]] = []
    weights: list[float] = []
    for arrays, weight in updates:
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


def _blocked_means(models: list[Mapping[str, np.ndarray]], weights: list[float], total: float) -> Weights:
    """Every tensor's weighted mean, cast to its input dtype."""
    coefficients = np.asarray(weights, np.float64) / total
    flats = {key: flat_views(models, key) for key in models[0]}
    out = {}
    for key, first in models[0].items():
        out[key] = np.empty(np.shape(first), np.asarray(first).dtype)
    outs = {key: value.reshape(-1) for key, value in out.items()}  # views: blocks write into ``out``

    def one_block(span: Span) -> None:
        key, start, stop = span
        target = outs[key][start:stop]
        mean = coefficients @ gather(flats[key], start, stop, np.float64)
        target[...] = np.rint(mean) if np.issubdtype(target.dtype, np.integer) else mean

    # One thread: a block's mean is ~12 short numpy calls, and on two threads their hand-offs of
    # the GIL made the means 1.5x slower (0.29 -> 0.46 s for 10 r3d_18 clients, docs/BENCHMARKS.md),
    # while one thread already runs at 2.3x a single read pass.
    run_in_blocks(one_block, spans({k: v.size for k, v in outs.items()}, block_length(len(models))), threaded=False)
    return out


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
    """FedAvg: the mean of client models weighted by their number of training examples."""
    return weighted_average((arrays, float(num_examples)) for arrays, num_examples in updates)


def cast_like(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # np.asarray: numpy reductions turn 0-d results into scalars, which Flower's Array rejects.
    if np.issubdtype(dtype, np.integer):
        return np.asarray(np.rint(value).astype(dtype))
    return np.asarray(value.astype(dtype))


class RunningMean:
    """``Σ wᵢθᵢ / Σ wᵢ`` over updates added one at a time, as replies arrive, none of them kept.

    The sum is kept in each tensor's float dtype with Kahan's compensation term beside it, so
    memory is two models whatever N, and the result is within a few ulps of the float64 mean
    (:func:`weighted_average`, tested against it). Integer tensors are summed in float64 (they
    are counters: a few bytes) and rounded back. Each update is checked as :func:`weighted_average`
    checks its inputs: same tensor names, weight finite and >= 0.
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._compensation: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.total = 0.0
        self.count = 0

    def add(self, arrays: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold one update in; the caller may drop it afterwards."""
        weight = float(weight)
        if weight < 0 or not np.isfinite(weight):
            raise ValueError(f"aggregation weight must be finite and >= 0, got {weight}")
        if not self._sum:
            for key, value in arrays.items():
                dtype = np.asarray(value).dtype
                work = dtype if dtype in (np.float32, np.float64) else np.dtype(np.float64)
                self._dtypes[key], self._shapes[key] = dtype, np.shape(value)
                self._sum[key] = np.zeros(np.size(value), work)
                self._compensation[key] = np.zeros(np.size(value), work)
        elif arrays.keys() != self._sum.keys():
            raise ValueError("updates have different tensor names")
        for key, total in self._sum.items():
            flat = np.asarray(arrays[key]).reshape(-1)
            compensation = self._compensation[key]
            for start in range(0, total.size, MEAN_BLOCK):
                stop = min(start + MEAN_BLOCK, total.size)
                _kahan_add(total[start:stop], compensation[start:stop], flat[start:stop], weight)
        self.total += weight
        self.count += 1

    def result(self) -> Weights:
        """The mean so far, in each tensor's dtype; the running sums are consumed."""
        if not self.count:
            raise ValueError("no updates to aggregate")
        if self.total <= 0:
            raise ValueError("aggregation weights sum to zero")
        out: Weights = {}
        for key in list(self._sum):
            total = self._sum.pop(key)
            del self._compensation[key]
            total /= self.total
            dtype = self._dtypes[key]
            value = total if total.dtype == dtype else cast_like(total, dtype)
            out[key] = value.reshape(self._shapes[key])
        return out


# Coordinates per step of the running sums: the four block temporaries stay in cache.
MEAN_BLOCK = 1 << 14


def _kahan_add(total: np.ndarray, compensation: np.ndarray, values: np.ndarray, weight: float) -> None:
    # Kahan: y = w·x − c; t = s + y; c = (t − s) − y; s = t. All in the sum's dtype.
    y = np.multiply(values, weight, dtype=total.dtype)
    y -= compensation
    t = total + y
    np.subtract(t, total, out=compensation)
    compensation -= y
    total[...] = t
