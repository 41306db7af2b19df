"""Robust fusion rules f(θ₁..θ_N) over client models as plain numpy (no Flower import).

Coordinate-wise rules (median, trimmed mean) work one tensor at a time; rules that need distances
between whole models (Krum, geometric median) accumulate them tensor by tensor. Either way peak
memory is about N × the largest tensor, not N × the model.

Distances (Krum, geometric median) are measured over the learnable parameters only. BatchNorm's
running statistics and counters are estimates, not parameters: an attacker need not touch them,
and honest clients' statistics differ far more than their weights do (in an attacked synthetic
run, 153 vs 8 between honest clients), so in a distance over every tensor they swamp what the
attack moves. They follow the rule's choice instead: Krum's selected clients, the geometric
median's final Weiszfeld weights. Every output tensor is cast back to its input dtype (integers
rounded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from strategies.aggregation import Weights, _cast_like, _weighted_mean64, weighted_average
from strategies.weighting import normalize_weights

# "feddf" (ensemble distillation) needs torch and lives elsewhere; listed for config validation.
# "centered-clipping" and "bulyan" live in strategies/defences.py.
FUSION_FUNCTIONS = ("median", "trimmed-mean", "geometric-median", "krum", "centered-clipping", "bulyan", "feddf")

Models = Sequence[Mapping[str, np.ndarray]]


def coordinate_median(models: Models) -> Weights:
    """Coordinate-wise median; equals Flower's FedMedian (``np.median`` over the stacked clients)."""
    return _coordinatewise(models, lambda stacked: np.median(stacked, axis=0))


def trimmed_mean(models: Models, beta: float) -> Weights:
    """Coordinate-wise mean after dropping the ``int(beta * N)`` lowest and highest values.

    Equals Flower's FedTrimmedAvg(beta) (scipy's ``trim_mean``). The cut is ``int(beta * N)``
    computed in floating point, so e.g. beta=0.29, N=100 cuts 28 per side, not 29.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed-mean beta must be in [0, 0.5), got {beta}")

    def trim(stacked: np.ndarray) -> np.ndarray:
        n = stacked.shape[0]
        cut = int(beta * n)
        # beta < 0.5 guarantees 2 * cut < n, so at least one value per coordinate survives.
        part = np.partition(stacked, (cut, n - cut - 1), axis=0)
        return np.mean(part[cut : n - cut], axis=0)

    return _coordinatewise(models, trim)


# Suffixes of BatchNorm's buffers (torch's state_dict names): statistics and a step counter.
STATISTIC_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_parameter(key: str, value: np.ndarray) -> bool:
    """Whether a tensor is a learnable parameter: floating point and not a BatchNorm statistic."""
    return np.issubdtype(np.asarray(value).dtype, np.floating) and not key.endswith(STATISTIC_SUFFIXES)


def pairwise_sq_distances(models: Models) -> np.ndarray:
    """N×N squared L2 distances between models over their learnable parameters, in float64.

    BatchNorm statistics and integer tensors are left out (Flower's Krum includes every tensor).
    Distances are computed from differences, not Flower's ``‖x‖² + ‖y‖² − 2x·y``, so the diagonal is
    exactly 0 and close models do not lose their distance to cancellation.
    """
    n = len(models)
    dist = np.zeros((n, n))
    for key in _parameter_keys(models):
        flat = _flat64(models, key)
        for i in range(n - 1):
            dist[i, i + 1 :] += _sq_norms(flat[i + 1 :] - flat[i])
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
    center, dtypes = _weighted_mean64(zip(models, alphas))
    dist = np.sqrt(_sq_distances_to(center, models))
    objective = [float(alphas @ dist)]
    iterations, converged = 0, False
    while iterations < max_iter and not converged:
        betas = alphas / np.maximum(eps, dist)
        center, _ = _weighted_mean64(zip(models, betas))
        dist = np.sqrt(_sq_distances_to(center, models))
        objective.append(float(alphas @ dist))
        iterations += 1
        converged = abs(objective[-2] - objective[-1]) <= tol * objective[-1]
    model = {key: _cast_like(value, dtypes[key]) for key, value in center.items()}
    return model, {"iterations": iterations, "objective": objective, "converged": converged}


def _coordinatewise(models: Models, rule: Callable[[np.ndarray], np.ndarray]) -> Weights:
    # One tensor at a time: only N copies of a single tensor are ever stacked.
    out = {}
    for key in _keys(models):
        stacked = np.stack([np.asarray(m[key]) for m in models])
        out[key] = _cast_like(np.asarray(rule(stacked)), np.asarray(models[0][key]).dtype)
    return out


def _alphas(weights: Sequence[float] | None, models: Models) -> np.ndarray:
    _keys(models)  # empty or mismatched models fail here, with the offending model named
    n = len(models)
    alphas = normalize_weights(np.ones(n) if weights is None else weights)
    if len(alphas) != n:
        raise ValueError(f"got {len(alphas)} weights for {n} models")
    return alphas


def _sq_distances_to(center: Mapping[str, np.ndarray], models: Models) -> np.ndarray:
    out = np.zeros(len(models))
    for key in _parameter_keys(models):
        out += _sq_norms(_flat64(models, key) - np.reshape(center[key], -1))
    return out


def _keys(models: Models) -> list[str]:
    if not models:
        raise ValueError("no models to fuse")
    for index, model in enumerate(models):
        if model.keys() != models[0].keys():
            raise ValueError(f"model {index} has different tensor names from model 0")
    return list(models[0].keys())


def _parameter_keys(models: Models) -> list[str]:
    keys = [k for k in _keys(models) if is_parameter(k, models[0][k])]
    if not keys:
        raise ValueError("the models have no learnable parameter to measure distances over")
    return keys


def _flat64(models: Models, key: str) -> np.ndarray:
    return np.stack([np.asarray(m[key], dtype=np.float64).reshape(-1) for m in models])


def _sq_norms(rows: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", rows, rows)
