"""FedAvg (McMahan et al., 2017): the mean of the client models weighted by their sample counts."""

from __future__ import annotations

from typing import Any

from strategies.aggregation import fedavg
from strategies.stage import Aggregator, Model, RoundContext, Update, register


@register
class FedAvg(Aggregator):
    name = "fedavg"
    family = "averaging"
    folds = True
    needs = 'strategy="fedavg"'

    def weight(self, metrics: dict[str, Any]) -> float:
        return float(metrics["num-examples"])

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        return fedavg((u.model, u.metrics["num-examples"]) for u in updates), {}
