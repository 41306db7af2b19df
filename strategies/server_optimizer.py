"""Server optimizers on the pseudo-gradient (aggregate − global) as plain numpy: SGD with learning
rate and momentum (FedAvgM, Hsu et al. 2019) and the adaptive FedAdam / FedYogi / FedAdagrad
(Reddi et al. 2021, as Flower's ``flwr.serverapp.strategy`` implements them)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Weights = dict[str, np.ndarray]
RUNNING_STATS = ("running_mean", "running_var")
ADAPTIVE = ("adam", "yogi", "adagrad")


def is_learnable(key: str, value: np.ndarray) -> bool:
    """A tensor a server optimizer steps: floating and not a BatchNorm running statistic."""
    return np.issubdtype(value.dtype, np.floating) and not key.endswith(RUNNING_STATS)


def server_step(
    current: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    velocity: Mapping[str, np.ndarray] | None,
    lr: float = 1.0,
    momentum: float = 0.0,
) -> tuple[Weights, Weights | None]:
    """Treat ``current - aggregate`` as a pseudo-gradient and take one SGD(+momentum) step.

    ``lr=1, momentum=0`` returns the aggregate itself (plain FedAvg). BatchNorm's buffers are not
    parameters: the counter ``num_batches_tracked`` and the running statistics take the aggregate's
    value (a momentum step on ``running_var`` overshoots below zero within a few rounds, and the
    model turns NaN).
    Returns the new model and the new velocity (``None`` when momentum is off).
    """
    if lr == 1.0 and momentum == 0.0:
        return {k: np.asarray(v) for k, v in aggregate.items()}, None
    new: Weights = {}
    new_velocity: Weights = {}
    for key, agg in aggregate.items():
        agg = np.asarray(agg)
        if not is_learnable(key, agg):
            new[key] = agg
            continue
        delta = np.asarray(agg, np.float64) - np.asarray(current[key], np.float64)
        if momentum > 0:
            if velocity is not None and key in velocity:
                delta = momentum * np.asarray(velocity[key], np.float64) + delta
            # Kept in the parameter's dtype: a float64 state would double every checkpoint's size.
            new_velocity[key] = delta.astype(agg.dtype)
        new[key] = (np.asarray(current[key], np.float64) + lr * delta).astype(agg.dtype)
    return new, (new_velocity if momentum > 0 else None)


def adaptive_step(
    current: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    moments: Mapping[str, Mapping[str, np.ndarray]] | None,
    server_round: int,
    optimizer: str,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[Weights, dict[str, Weights]]:
    """One FedAdam / FedYogi / FedAdagrad step (Reddi et al. 2021, Algorithm 2) on Δ = aggregate − current.

    m ← β₁m + (1 − β₁)Δ (β₁ = 0 for Adagrad); v ← β₂v + (1 − β₂)Δ² (Adam),
    v − (1 − β₂)Δ² sign(v − Δ²) (Yogi), v + Δ² (Adagrad); x ← x + η m / (√v + τ). Adam's η carries
    Flower's bias correction √(1 − β₂^(t+1)) / (1 − β₁^(t+1)) with t the server round; m and v start
    at 0, as Flower's. The same numbers as Flower's strategies on learnable tensors; BatchNorm
    buffers (running statistics, counters) take the aggregate's value, as in :func:`server_step`,
    where Flower would step them too. ``moments`` is the previous ``{"m": ..., "v": ...}`` (None in
    round one); returns the new model and moments, the moments in each parameter's dtype.
    """
    if optimizer not in ADAPTIVE:
        raise ValueError(f"unknown adaptive server optimizer {optimizer!r}: choose one of {', '.join(ADAPTIVE)}")
    m_old = dict((moments or {}).get("m") or {})
    v_old = dict((moments or {}).get("v") or {})
    b1 = 0.0 if optimizer == "adagrad" else beta1
    eta = lr
    if optimizer == "adam":
        t = server_round + 1.0
        eta = lr * np.sqrt(1 - beta2**t) / (1 - beta1**t)
    new: Weights = {}
    m_new: Weights = {}
    v_new: Weights = {}
    for key, agg in aggregate.items():
        agg = np.asarray(agg)
        if not is_learnable(key, agg):
            new[key] = agg
            continue
        x = np.asarray(current[key], np.float64)
        delta = np.asarray(agg, np.float64) - x
        m = b1 * np.asarray(m_old.get(key, 0.0), np.float64) + (1 - b1) * delta
        v = np.asarray(v_old.get(key, 0.0), np.float64)
        if optimizer == "adam":
            v = beta2 * v + (1 - beta2) * delta**2
        elif optimizer == "yogi":
            v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
        else:
            v = v + delta**2
        # Computed in float64, kept in the parameter's dtype (as Flower's strategies keep them): float64
        # moments made an Adam checkpoint 5x the model's size instead of 3x.
        m_new[key] = np.broadcast_to(m, x.shape).astype(agg.dtype)
        v_new[key] = np.broadcast_to(v, x.shape).astype(agg.dtype)
        new[key] = (x + eta * m / (np.sqrt(v) + tau)).astype(agg.dtype)
    return new, {"m": m_new, "v": v_new}
