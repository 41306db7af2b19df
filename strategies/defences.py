"""Defences against Byzantine clients that wrap or extend the fusion rules, as plain numpy (no Flower).

- :func:`bucket_means` — bucketing (Karimireddy, He, Jaggi, ICLR 2022): average randomly formed
  buckets of ``s`` clients, then hand the bucket means to a robust rule. Averaging shrinks the
  spread that heterogeneous (non-iid) honest clients show, so the robust rule stops mistaking
  them for attackers, while f attackers still reach at most f buckets.
- :func:`centered_clipping` — centered clipping (Karimireddy, He, Jaggi, ICML 2021): step from
  the previous global model by the mean of the clients' updates, each clipped to norm τ, so one
  client moves the model by at most τ/N, however large its update.
- :func:`bulyan` — Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018): θ = N − 2f models picked
  by repeated Krum, then per coordinate the mean of the β = θ − 2f values closest to the median.
- :func:`nearest_neighbor_mixing` — NNM (Allouah et al., "Fixing by Mixing", AISTATS 2023): replace
  each model by the mean of its N − f nearest models (itself included) before a robust rule. Honest
  clients' noisy updates become near-copies of the honest mean, and an attacker far from them is
  diluted by the honest neighbours it has to take in.
- :func:`bound_update_norms` — norm bounding (Sun et al. 2019): scale each update to L2 norm
  ≤ M before any rule, which caps what a boosted (model-replacement) update can do.
- :func:`fltrust` — FLTrust (Cao, Fang, Liu, Gong, NDSS 2021): the server trains the global model
  on a small clean root set it holds; each client's update gets the trust ``ReLU(cos(gᵢ, g₀))``
  against the server's update g₀ and is rescaled to ‖g₀‖, so neither direction nor size alone
  lets an attacker steer the mean.
- :func:`adaptive_robust_clipping` — ARC (Allouah et al., ICLR 2025): clip the k = ⌊2(f/n)(n − f)⌋
  largest updates to the norm of the (k+1)-th largest. Unlike a fixed norm bound the threshold
  follows the round's own honest norms, which keeps a robust rule's guarantees under heterogeneous
  sites (where a fixed bound either clips honest sites or lets attackers through).

Norms and distances are over the learnable parameters (:func:`strategies.fusion.is_parameter`);
BatchNorm statistics and counters follow each rule's choice, as documented per function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from strategies.aggregation import Weights, average, cast_like, weighted_average
from strategies.fusion import Models, flat64, is_parameter, model_keys, pairwise_sq_distances, parameter_keys, sq_norms

# --- bucketing -----------------------------------------------------------------------------------


def bucket_assignment(num_models: int, bucket_size: int, seed: int | Sequence[int]) -> list[list[int]]:
    """The paper's buckets: a seeded random permutation of the N clients cut into ⌈N/s⌉ consecutive
    groups of ``s`` (the last one smaller when s does not divide N)."""
    if bucket_size < 1:
        raise ValueError(f"bucket size must be >= 1, got {bucket_size}")
    order = np.random.default_rng(seed).permutation(num_models)
    return [[int(i) for i in order[start : start + bucket_size]] for start in range(0, num_models, bucket_size)]


def bucket_means(
    models: Models,
    bucket_size: int,
    seed: int | Sequence[int],
    weights: Sequence[float] | None = None,
) -> tuple[list[Weights], list[float], list[list[int]]]:
    """``(bucket means, bucket weights, buckets)`` for a robust rule to fuse.

    Inside a bucket the models are averaged by ``weights`` (sample counts; default equal) and the
    bucket's weight is their sum, for the rules that take weights (geometric median, multi-Krum).
    Every tensor is averaged the same way (BatchNorm statistics included: a bucket stands for its
    clients as one model); dtypes are kept, integer counters rounded.
    """
    model_keys(models)
    w = np.ones(len(models)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(models),):
        raise ValueError(f"got {w.size} weights for {len(models)} models")
    buckets = bucket_assignment(len(models), bucket_size, seed)
    means = [weighted_average((models[i], float(w[i])) for i in bucket) for bucket in buckets]
    return means, [float(w[bucket].sum()) for bucket in buckets], buckets


# --- centered clipping ---------------------------------------------------------------------------


def centered_clipping(
    models: Models,
    center: Mapping[str, np.ndarray],
    radius: float,
    iterations: int = 1,
) -> tuple[Weights, dict[str, Any]]:
    """Centered clipping ``v ← v + (1/N) Σ clip_τ(θᵢ − v)``, ``clip_τ(z) = z·min(1, τ/‖z‖)``, L times.

    ``center`` is the starting v: the previous global model, so the first iteration clips the
    clients' updates. Each client gets equal weight 1/N, as in the paper: sample counts are
    client-reported, and weighting by them would let one client claim a larger share than τ/N.
    ‖·‖ is over the learnable parameters; BatchNorm statistics and counters move with the same
    per-client factor min(1, τ/‖θᵢ − v‖), so a clipped client's statistics are damped as much
    as its weights (counters rounded at the end). ``info["clipped"]`` counts the clipped clients
    of each iteration, ``info["update-norms"]`` the norms ‖θᵢ − center‖ of the first.
    """
    if not radius > 0:
        raise ValueError(f"centered clipping needs a radius > 0, got {radius}")
    if iterations < 1:
        raise ValueError(f"centered clipping needs >= 1 iteration, got {iterations}")
    keys = model_keys(models)
    missing = [k for k in keys if k not in center]
    if missing:
        raise ValueError(f"centered clipping: the center has no tensor {missing[0]!r}")
    params = parameter_keys(models)
    v = {k: np.asarray(center[k], dtype=np.float64).copy() for k in keys}
    n = len(models)
    clipped: list[int] = []
    first_norms: list[float] = []
    for _ in range(iterations):
        sq = np.zeros(n)
        for key in params:
            sq += sq_norms(flat64(models, key) - v[key].reshape(-1))
        norms = np.sqrt(sq)
        # min(1, τ/‖z‖), with a zero update left as it is (no division by zero).
        factors = np.where(norms > radius, radius / np.maximum(norms, 1e-300), 1.0)
        if not first_norms:
            first_norms = [float(x) for x in norms]
        clipped.append(int(np.sum(norms > radius)))
        for key in keys:
            diffs = flat64(models, key) - v[key].reshape(-1)
            v[key] = v[key] + (factors @ diffs / n).reshape(v[key].shape)
    dtypes = {k: np.asarray(models[0][k]).dtype for k in keys}
    model = {k: cast_like(v[k], dtypes[k]) for k in keys}
    return model, {"clipped": clipped, "update-norms": first_norms}


# --- Bulyan --------------------------------------------------------------------------------------


def bulyan_tolerance(num_models: int, num_malicious: int) -> int:
    """The ``f`` Bulyan can run with on ``num_models`` updates: the configured one, or, when screening
    left too few (Bulyan needs N ≥ 4f + 3), the largest that fits: ``(N - 3) // 4``."""
    if num_models < 3:
        raise ValueError(f"Bulyan needs at least 3 updates, got {num_models}")
    return min(num_malicious, (num_models - 3) // 4)


def _loose_krum_scores(distances: np.ndarray, num_malicious: int) -> np.ndarray:
    # Krum's score with max(1, n - f - 2) neighbours, as Flower's select_multikrum counts them: on
    # the shrinking sets of Bulyan's repeated Krum, n - f - 2 drops below 1 near the end.
    n = distances.shape[0]
    if n == 1:
        return np.zeros(1)
    others = distances[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    closest = min(max(1, n - num_malicious - 2), n - 1)
    return np.sort(others, axis=1)[:, :closest].sum(axis=1)


def bulyan_select(models: Models, num_malicious: int, repeated: bool = True) -> list[int]:
    """Bulyan's θ = N − 2f models, in the order picked.

    ``repeated`` (the paper): Krum picks one model, which leaves the set, and Krum runs again on
    the rest, until θ are picked. ``repeated=False``: the θ best Krum scores of one pass over all N
    (what Flower's ``Bulyan`` does with its default ``select_multikrum``). Ties go to the lower index.
    """
    n, f = len(models), num_malicious
    if f < 0 or n < 4 * f + 3:
        raise ValueError(f"Bulyan needs N >= 4f + 3 = {4 * f + 3} updates for f = {f}, got {n}")
    theta = n - 2 * f
    dist = pairwise_sq_distances(models)
    if not repeated:
        return [int(i) for i in np.argsort(_loose_krum_scores(dist, f), kind="stable")[:theta]]
    remaining, selected = list(range(n)), []
    while len(selected) < theta:
        sub = dist[np.ix_(remaining, remaining)]
        best = remaining[int(np.argmin(_loose_krum_scores(sub, f)))]  # argmin: first of ties
        selected.append(best)
        remaining.remove(best)
    return selected


def bulyan(models: Models, num_malicious: int, repeated: bool = True) -> tuple[Weights, list[int]]:
    """Bulyan: per coordinate, the mean of the β = θ − 2f selected values closest to their median.

    Returns the fused model and the selected indices (:func:`bulyan_select`). The coordinate step
    runs on every tensor, BatchNorm statistics included (like the coordinate-wise median: the
    statistics follow the selection, then the same per-coordinate trimming). Floating tensors are
    computed in their own dtype, as Flower's ``aggregate_n_closest_weights`` does (so the two agree
    bit for bit on the same selection); integer counters in float64, rounded back.
    """
    selected = bulyan_select(models, num_malicious, repeated)
    beta = len(selected) - 2 * num_malicious
    out = {}
    for key in model_keys(models):
        dtype = np.asarray(models[0][key]).dtype
        work = dtype if np.issubdtype(dtype, np.floating) else np.float64
        stacked = np.stack([np.asarray(models[i][key], dtype=work) for i in selected])
        median = np.median(stacked, axis=0)
        closest = np.argpartition(np.abs(stacked - median), beta - 1, axis=0)[:beta]
        out[key] = cast_like(np.asarray(np.mean(np.take_along_axis(stacked, closest, axis=0), axis=0)), dtype)
    return out, selected


# --- nearest neighbour mixing ------------------------------------------------------------------


def nearest_neighbor_mixing(models: Models, num_malicious: int) -> tuple[list[Weights], list[list[int]]]:
    """``(mixed models, neighbours)``: model i replaced by the unweighted mean of its N − f nearest
    models in L2 over the learnable parameters (itself included, at distance 0).

    Unweighted, as in the paper: sample counts are client-reported. Every tensor is averaged over
    the same neighbours (BatchNorm statistics included; integer counters rounded). Ties in distance
    go to the lower index. ``f`` ≥ N leaves each model its own only neighbour.
    """
    n = len(models)
    if num_malicious < 0:
        raise ValueError(f"nearest neighbour mixing needs f >= 0, got {num_malicious}")
    dist = pairwise_sq_distances(models)
    k = max(n - num_malicious, 1)
    # argsort of each row, stable: the model itself (distance 0) first unless an exact copy precedes it.
    neighbours = [[int(j) for j in np.argsort(dist[i], kind="stable")[:k]] for i in range(n)]
    mixed = [average(models[j] for j in group) for group in neighbours]
    return mixed, neighbours


# --- norm bounding -------------------------------------------------------------------------------


def update_norm(model: Mapping[str, np.ndarray], center: Mapping[str, np.ndarray]) -> float:
    """‖θ − center‖ over the learnable parameters the center holds."""
    total = 0.0
    for key, value in model.items():
        if key in center and is_parameter(key, value):
            diff = np.asarray(value, dtype=np.float64) - np.asarray(center[key], dtype=np.float64)
            total += float(np.vdot(diff, diff))
    return math.sqrt(total)


def bound_update_norm(
    model: Mapping[str, np.ndarray], center: Mapping[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], float]:
    """``(center + (θ − center)·min(1, M/‖θ − center‖), ‖θ − center‖)``.

    Only learnable parameters are scaled; BatchNorm statistics, counters and tensors the center
    lacks are passed through untouched (they are estimates, not the attack's lever: Sun et al.
    bound the weight update). A model within the bound is returned as it is.
    """
    if not bound > 0:
        raise ValueError(f"norm bound must be > 0, got {bound}")
    if not center:
        raise ValueError("norm bounding needs the global model the updates are taken from")
    norm = update_norm(model, center)
    if norm <= bound:
        return dict(model), norm
    scale = bound / norm
    out = dict(model)
    for key, value in model.items():
        if key in center and is_parameter(key, value):
            base = np.asarray(center[key], dtype=np.float64)
            bounded = base + scale * (np.asarray(value, dtype=np.float64) - base)
            out[key] = cast_like(bounded, np.asarray(value).dtype)
    return out, norm


# --- adaptive robust clipping --------------------------------------------------------------------


def arc_clipped_count(num_updates: int, num_malicious: int) -> int:
    """ARC's k = ⌊2·(f/n)·(n − f)⌋, at most n − 1 (one update always sets the threshold)."""
    if num_updates < 1:
        return 0
    k = math.floor(2 * num_malicious / num_updates * (num_updates - num_malicious))
    return max(0, min(k, num_updates - 1))


def adaptive_robust_clipping(
    models: Sequence[Mapping[str, np.ndarray]], center: Mapping[str, np.ndarray], num_malicious: int
) -> tuple[list[dict[str, np.ndarray]], float, list[int]]:
    """ARC: ``(models with the k largest updates clipped to the (k+1)-th largest norm, that norm,
    the indices clipped)``. Updates are ``model − center`` over learnable parameters; the rest of
    each model passes through as in :func:`bound_update_norm`."""
    if not center:
        raise ValueError("adaptive robust clipping needs the global model the updates are taken from")
    norms = np.array([update_norm(m, center) for m in models])
    k = arc_clipped_count(len(models), num_malicious)
    if k == 0:
        return [dict(m) for m in models], float(norms.max(initial=0.0)), []
    order = np.argsort(-norms, kind="stable")  # largest first; ties keep the reply order
    threshold = float(norms[order[k]])
    clipped = sorted(int(i) for i in order[:k] if norms[i] > threshold)
    out = [dict(m) for m in models]
    for i in clipped:
        out[i] = bound_update_norm(models[i], center, threshold)[0] if threshold > 0 else _at(center, models[i])
    return out, threshold, clipped


def _at(center: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model`` with its learnable parameters set to the center's (an update clipped to norm 0)."""
    return {k: (np.array(center[k], copy=True) if k in center and is_parameter(k, v) else v) for k, v in model.items()}


# --- FLTrust -------------------------------------------------------------------------------------


def fltrust(
    models: Sequence[Mapping[str, np.ndarray]],
    center: Mapping[str, np.ndarray],
    root_model: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], list[float], float]:
    """``(merged model, trust score per model, ‖g₀‖)``. With ``gᵢ = modelᵢ − center`` and
    ``g₀ = root_model − center`` over the learnable parameters, the merged update is
    ``Σ TSᵢ·(‖g₀‖/‖gᵢ‖)·gᵢ / Σ TSᵢ`` with ``TSᵢ = max(0, cos(gᵢ, g₀))``. BatchNorm statistics and
    counters are the trust-weighted mean of the models' own. Raises ValueError when no update is
    trusted (every cosine ≤ 0, or a zero server update): the caller keeps the global model."""
    keys = [k for k, v in center.items() if is_parameter(k, v)]
    if not keys:
        raise ValueError("FLTrust needs the global model the updates are taken from")
    flat_center = np.concatenate([np.asarray(center[k], np.float64).ravel() for k in keys])
    g0 = np.concatenate([np.asarray(root_model[k], np.float64).ravel() for k in keys]) - flat_center
    root_norm = float(np.linalg.norm(g0))
    if root_norm == 0.0:
        raise ValueError("the server's root-set update is zero: no direction to trust")
    scores, merged = [], np.zeros_like(g0)
    for model in models:
        g = np.concatenate([np.asarray(model[k], np.float64).ravel() for k in keys]) - flat_center
        norm = float(np.linalg.norm(g))
        score = max(0.0, float(g @ g0) / (norm * root_norm)) if norm > 0 else 0.0
        scores.append(score)
        if score > 0:
            merged += (score * root_norm / norm) * g
    total = sum(scores)
    if total <= 0:
        raise ValueError(f"FLTrust trusted none of the {len(models)} updates (no positive cosine with the server's)")
    # Statistics and counters: the trust-weighted mean of the models' own (parameters are done above).
    others = [k for k in models[0] if k not in set(keys)]
    rest = weighted_average(({k: m[k] for k in others}, s) for m, s in zip(models, scores) if s > 0) if others else {}
    merged = flat_center + merged / total
    params, offset = {}, 0
    for k in keys:
        size = int(np.asarray(center[k]).size)
        params[k] = cast_like(merged[offset : offset + size].reshape(np.shape(center[k])), np.asarray(center[k]).dtype)
        offset += size
    return {k: params[k] if k in params else rest[k] for k in models[0]}, scores, root_norm
