"""Distance-based fusion rules over client models as plain numpy (no Flower import): Krum and the
geometric median (the coordinate-wise rules are in ``strategies.coordinatewise``).

Every rule walks the models in cache-sized coordinate blocks (``strategies.blocks``), on the
configured threads: the coordinate-wise rules (median, trimmed mean) sort each block's N values
with a sorting network of vectorized min/max steps; distances (Krum, geometric median) are summed
block by block. Extra memory is the output model plus a few blocks per thread, whatever N.

Distances (Krum, geometric median) are measured over the learnable parameters only. BatchNorm's
running statistics and counters are estimates, not parameters: an attacker need not touch them,
and honest clients' statistics differ far more than their weights do (in an attacked synthetic
run, 153 vs 8 between honest clients), so in a distance over every tensor they swamp what the
attack moves. They follow the rule's choice instead: Krum's selected clients, the geometric
median's final Weiszfeld weights. Every output tensor is cast back to its input dtype (integers
rounded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from strategies.aggregation import Weights, weighted_average
from strategies.blocks import WIDE_BLOCK_BYTES, Span, block_length, flat_views, gather, run_in_blocks, spans
from strategies.weighting import normalize_weights

Models = Sequence[Mapping[str, np.ndarray]]


# Suffixes of BatchNorm's buffers (torch's state_dict names): statistics and a step counter.
STATISTIC_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_parameter(key: str, value: np.ndarray) -> bool:
    """Whether a tensor is a learnable parameter: floating point and not a BatchNorm statistic."""
    return np.issubdtype(np.asarray(value).dtype, np.floating) and not key.endswith(STATISTIC_SUFFIXES)


def pairwise_sq_distances(models: Models) -> np.ndarray:
    """N×N squared L2 distances between models over their learnable parameters.

    BatchNorm statistics and integer tensors are left out (Flower's Krum includes every tensor).
    Distances are summed from differences, not Flower's ``‖x‖² + ‖y‖² − 2x·y``, so the diagonal
    and the distance between exact copies are exactly 0 and close models do not lose their distance
    to cancellation. Block by block: differences and their sums of squares are taken in float32
    (in cache; einsum, 1.2-1.5x faster than squaring and a pairwise sum) and each block's sums
    added in float64, so distances carry float32 accumulation error over a block: ~1e-6 relative
    against the float64 computation (tests/test_blocked_rules.py), far below any gap between
    Krum scores that is not an exact tie (exact copies stay exactly 0 apart).
    """
    n = len(models)
    keys = parameter_keys(models)
    flats = {key: flat_views(models, key) for key in keys}

    def one_segment(segment: list[Span]) -> np.ndarray:
        dist = np.zeros((n, n))
        for key, start, stop in segment:
            work = np.float32 if flats[key][0].dtype == np.float32 else np.float64
            block = gather(flats[key], start, stop, work, spare=n)
            rows, scratch = block[:n], block[n:]
            for i in range(n - 1):
                diff = np.subtract(rows[i + 1 :], rows[i], out=scratch[: n - 1 - i])
                dist[i, i + 1 :] += np.einsum("ij,ij->i", diff, diff)
        return dist

    parts = run_in_blocks(
        one_segment, segments(spans({k: flats[k][0].size for k in keys}, block_length(2 * n, 4, WIDE_BLOCK_BYTES)))
    )
    dist = np.sum(parts, axis=0) if parts else np.zeros((n, n))
    return dist + dist.T


def krum_scores(distances: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum score of each client: the sum of its ``N - f - 2`` smallest distances to the others."""
    d = np.asarray(distances, dtype=np.float64)
    n = d.shape[0]
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    if n <= 2 * num_malicious + 2:
        raise ValueError(
            f"Krum needs more than 2f + 2 = {2 * num_malicious + 2} clients to tolerate "
            f"f = {num_malicious} malicious ones, got {n}"
        )
    # Drop the diagonal by position: Flower instead skips the first entry of each sorted row,
    # which is the same thing as long as a model's distance to itself is the row's minimum.
    others = d[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    return np.sort(others, axis=1)[:, : n - num_malicious - 2].sum(axis=1)


def krum_tolerance(num_models: int, num_malicious: int) -> int:
    """The ``f`` Krum can run with on ``num_models`` updates: the configured one, or, when screening
    left too few updates for it (Krum needs N > 2f + 2), the largest that fits: ``(N - 3) // 2``."""
    if num_models < 3:
        raise ValueError(f"Krum needs at least 3 updates, got {num_models}")
    return min(num_malicious, (num_models - 3) // 2)


def krum(
    models: Models,
    num_malicious: int,
    num_selected: int = 1,
    weights: Sequence[float] | None = None,
) -> tuple[Weights, list[int]]:
    """Krum (``num_selected=1``) or multi-Krum: the mean of the ``num_selected`` lowest-scoring models.

    Returns the fused model and the selected client indices, best first. ``weights`` (e.g. sample
    counts, as Flower's MultiKrum uses) weight the mean of the selected models; default equal.
    Ties in score go to the lower client index.
    """
    scores = krum_scores(pairwise_sq_distances(models), num_malicious)
    if not 1 <= num_selected <= len(models):
        raise ValueError(f"num_selected must be in [1, {len(models)}], got {num_selected}")
    selected = [int(i) for i in np.argsort(scores, kind="stable")[:num_selected]]
    alphas = _alphas(weights, models)
    return weighted_average((models[i], float(alphas[i])) for i in selected), selected


def geometric_median(
    models: Models,
    weights: Sequence[float] | None = None,
    eps: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> tuple[Weights, dict[str, Any]]:
    """Weighted geometric median ``argmin_v Σ αᵢ‖v − θᵢ‖`` by smoothed Weiszfeld.

    As in RFA (Pillutla, Kakade, Harchaoui 2019): start from the weighted mean and iterate
    ``v ← Σ βᵢθᵢ / Σ βᵢ`` with ``βᵢ = αᵢ / max(eps, ‖v − θᵢ‖)`` until the objective changes by
    at most ``tol`` relative to its value. ``info["objective"]`` holds the objective (α normalized
    to sum 1) at the start and after each of ``info["iterations"]`` steps; ‖·‖ is over the learnable
    parameters (BatchNorm statistics and counters are averaged with the same βᵢ, counters rounded).
    """
    alphas = _alphas(weights, models)
    out = {key: np.empty(np.shape(v), np.asarray(v).dtype) for key, v in models[0].items()}
    dist = np.sqrt(_weiszfeld_pass(models, alphas, out))
    objective = [float(alphas @ dist)]
    iterations, converged = 0, False
    while iterations < max_iter and not converged:
        betas = alphas / np.maximum(eps, dist)
        dist = np.sqrt(_weiszfeld_pass(models, betas, out))
        objective.append(float(alphas @ dist))
        iterations += 1
        converged = abs(objective[-2] - objective[-1]) <= tol * objective[-1]
    return out, {"iterations": iterations, "objective": objective, "converged": converged}


def _weiszfeld_pass(models: Models, weights: np.ndarray, out: dict[str, np.ndarray]) -> np.ndarray:
    """One read of the models: the weighted mean ``v`` into ``out`` (cast to each tensor's dtype)
    and the squared distances ``‖v − θᵢ‖²`` over the learnable parameters, both per block while
    the block is in cache. ``v`` stays float64 inside the block, as an unrounded Weiszfeld iterate."""
    n = len(models)
    coefficients = np.asarray(weights, np.float64) / float(np.sum(weights))
    flats = {key: flat_views(models, key) for key in models[0]}
    outs = {key: value.reshape(-1) for key, value in out.items()}
    measured = set(parameter_keys(models))

    def one_segment(segment: list[Span]) -> np.ndarray:
        sq = np.zeros(n)
        for key, start, stop in segment:
            block = gather(flats[key], start, stop, np.float64, spare=n + 1)
            rows, center, diff = block[:n], block[n], block[n + 1 :]
            np.dot(coefficients, rows, out=center)
            target = outs[key][start:stop]
            target[...] = np.rint(center) if np.issubdtype(target.dtype, np.integer) else center
            if key in measured:
                np.subtract(rows, center, out=diff)
                sq += np.einsum("ij,ij->i", diff, diff)
        return sq

    parts = run_in_blocks(
        one_segment, segments(spans({k: v.size for k, v in outs.items()}, block_length(2 * n + 1, 8, WIDE_BLOCK_BYTES)))
    )
    return np.sum(parts, axis=0)


# Fixed groups of blocks whose partial sums are added in order: a sum over blocks then does not
# depend on the number of threads, and N×N partial matrices are kept per group, not per block.
SEGMENTS = 64


def segments(items: list[Span], count: int = SEGMENTS) -> list[list[Span]]:
    """``items`` cut into at most ``count`` contiguous groups of near-equal length."""
    step = -(-len(items) // count) if items else 1
    return [items[i : i + step] for i in range(0, len(items), step)]


def _alphas(weights: Sequence[float] | None, models: Models) -> np.ndarray:
    model_keys(models)  # empty or mismatched models fail here, with the offending model named
    n = len(models)
    alphas = normalize_weights(np.ones(n) if weights is None else weights)
    if len(alphas) != n:
        raise ValueError(f"got {len(alphas)} weights for {n} models")
    return alphas


def model_keys(models: Models) -> list[str]:
    if not models:
        raise ValueError("no models to fuse")
    for index, model in enumerate(models):
        if model.keys() != models[0].keys():
            raise ValueError(f"model {index} has different tensor names from model 0")
    return list(models[0].keys())


def parameter_keys(models: Models) -> list[str]:
    keys = [k for k in model_keys(models) if is_parameter(k, models[0][k])]
    if not keys:
        raise ValueError("the models have no learnable parameter to measure distances over")
    return keys


def flat64(models: Models, key: str) -> np.ndarray:
    return np.stack([np.asarray(m[key], dtype=np.float64).reshape(-1) for m in models])


def sq_norms(rows: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", rows, rows)
