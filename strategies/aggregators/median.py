"""Coordinate-wise median (Yin et al., 2018): each coordinate is the median of the client models'."""

from __future__ import annotations

from typing import Any

from strategies.coordinatewise import coordinate_median
from strategies.stage import Aggregator, Model, RoundContext, Update, register


@register
class Median(Aggregator):
    name = "median"
    needs = 'strategy="fusion" and fusion-fn="median"'

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        return coordinate_median([u.model for u in updates]), {}
