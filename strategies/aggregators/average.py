"""The plain mean of the client models, whatever their sample counts."""

from __future__ import annotations

from typing import Any

from strategies.aggregation import average
from strategies.stage import Aggregator, Model, RoundContext, Update, register


@register
class Average(Aggregator):
    name = "average"
    family = "averaging"
    folds = True
    needs = 'strategy="average"'

    def weight(self, metrics: dict[str, Any]) -> float:
        return 1.0

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        return average(u.model for u in updates), {}
