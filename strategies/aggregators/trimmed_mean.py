"""Coordinate-wise trimmed mean (Yin et al., 2018): drop the β share of largest and smallest values."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key
from strategies.coordinatewise import trimmed_mean
from strategies.stage import Aggregator, Model, RoundContext, Update, register


@register
class TrimmedMean(Aggregator):
    name = "trimmed-mean"
    needs = 'strategy="fusion" and fusion-fn="trimmed-mean"'
    keys = (Key("trim-beta", 0.2, "share of values dropped at each end, per coordinate", low=0.0, high=0.49),)

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = beta

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> TrimmedMean:
        return cls(cfg.trim_beta)

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        return trimmed_mean([u.model for u in updates], self.beta), {}
