"""Server-side learning rate and momentum (FedAvgM, Hsu et al. 2019) as plain numpy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Weights = dict[str, np.ndarray]
RUNNING_STATS = ("running_mean", "running_var")


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
        if not np.issubdtype(agg.dtype, np.floating) or key.endswith(RUNNING_STATS):
            new[key] = agg
            continue
        delta = np.asarray(agg, np.float64) - np.asarray(current[key], np.float64)
        if momentum > 0:
            if velocity is not None and key in velocity:
                delta = momentum * np.asarray(velocity[key], np.float64) + delta
            new_velocity[key] = delta
        new[key] = (np.asarray(current[key], np.float64) + lr * delta).astype(agg.dtype)
    return new, (new_velocity if momentum > 0 else None)
