"""Geometric median by Weiszfeld's iterations (RFA, Pillutla et al., 2022), weighted by sample counts."""

from __future__ import annotations

from typing import Any

from strategies.fusion import geometric_median
from strategies.stage import Aggregator, Model, RoundContext, Update, register


@register
class GeometricMedian(Aggregator):
    name = "geometric-median"
    needs = 'strategy="fusion" and fusion-fn="geometric-median"'

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        fused, info = geometric_median([u.model for u in updates], [u.count for u in updates])
        return fused, {"iterations": info["iterations"], "converged": info["converged"]}
