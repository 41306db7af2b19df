"""Which tensors differential privacy covers, the privacy budget spent, and when it can be accounted.

See ``strategies.privacy`` for the mechanism (Flower's fixed-clipping wrappers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from strategies.strategy import VideoStrategy


def is_private(array: np.ndarray) -> bool:
    """Whether a tensor goes through clipping and noise: floating-point ones do, counters don't."""
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def split_private(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(floating-point tensors, integer tensors)``, each in the model's order."""
    private = {k: v for k, v in arrays.items() if is_private(v)}
    return private, {k: v for k, v in arrays.items() if k not in private}


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all tensors (the norm Flower's clipping bounds)."""
    total = 0.0
    for key, value in update.items():
        delta = np.asarray(value, np.float64) - np.asarray(reference[key], np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return float(np.sqrt(total))


def clamp_variances(arrays: dict[str, np.ndarray]) -> int:
    """Set negative BatchNorm running variances to zero in place; return how many were negative."""
    clamped = 0
    for key, value in arrays.items():
        if key.endswith("running_var"):
            negative = value < 0
            clamped += int(negative.sum())
            value[negative] = 0
    return clamped


def epsilon_spent(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε after ``releases`` Gaussian releases of sensitivity-1/noise ``noise_multiplier`` at ``delta``."""
    from flwr.serverapp import (  # lazy: the accountant needs the optional dp-accounting package
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    if releases == 0:
        return 0.0
    accountant = RdpAccountant(
        PrivacyConfig(delta, 1, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), count=releases)
    return accountant.get_privacy_spent().epsilon


def accounting_gap(inner: VideoStrategy, noise_multiplier: float, mode: str, compression: str = "none") -> str:
    """Why ε cannot be accounted for this setup, or ``""`` when it can."""
    if mode == "client-side" and compression != "none":
        return f"compression={compression!r} re-encodes the clipped update after clipping, which can exceed the norm"
    if noise_multiplier <= 0:
        return "noise-multiplier is 0: clipping only, no privacy guarantee"
    if inner.aggregator.name != "average" or inner.transforms:
        return "the guarantee needs a uniform mean of clipped updates (strategy='average')"
    step = inner.server_step
    if step.name != "sgd" or step.lr != 1.0 or step.momentum != 0.0:
        return "server-optimizer/server-lr/server-momentum rescale the clipped mean after noise is calibrated"
    return ""
