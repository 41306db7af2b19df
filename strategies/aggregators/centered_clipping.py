"""Centered clipping (Karimireddy et al., 2021): iterate the center by the mean of clipped differences."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedapp.config.keys import Key
from strategies.coordinatewise import coordinate_median
from strategies.defences import centered_clipping
from strategies.stage import Aggregator, Model, RoundContext, Update, register


@register
class CenteredClipping(Aggregator):
    name = "centered-clipping"
    needs = 'strategy="fusion" and fusion-fn="centered-clipping"'
    keys = (
        Key("cc-radius", 10.0, "τ, the clipping radius around the center", low=0.0, low_open=True),
        Key("cc-iterations", 1, "L, the clipping iterations per round", low=1),
    )

    def __init__(self, radius: float = 10.0, iterations: int = 1) -> None:
        self.radius, self.iterations = radius, iterations

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> CenteredClipping:
        return cls(cfg.cc_radius, cfg.cc_iterations)

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        models = [u.model for u in updates]
        # Centered on the round's global model (the updates' origin); without one (the rule used
        # outside a round) on the coordinate-wise median, a robust start too.
        center = ctx.global_model or coordinate_median(models)
        fused, info = centered_clipping(models, center, self.radius, self.iterations)
        return fused, {"clipped": info["clipped"], "update-norm-median": float(np.median(info["update-norms"]))}
