"""Weighted mean with per-client weights from a named source (``strategies.weighting``).

The weights are normalized over the round's replies (e.g. the softmax of the losses), so no reply's
weight is known on its own: the round's updates are held until all are in."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key
from strategies.aggregation import weighted_average
from strategies.stage import Aggregator, Model, RoundContext, Update, register
from strategies.weighting import WEIGHT_SOURCES, client_weights


@register
class Weighted(Aggregator):
    name = "weighted"
    family = "weighted"
    needs = 'strategy="weighted"'
    keys = (
        Key("weight-source", "num-examples", "where each client's weight comes from", choices=WEIGHT_SOURCES),
        Key(
            "staleness-decay",
            0.5,
            'weight decay per round of staleness (weight-source="staleness")',
            low=0.0,
            high=1.0,
            low_open=True,
            when=lambda c: c.weight_source == "staleness",
            needs='strategy="weighted" and weight-source="staleness"',
        ),
    )

    def __init__(self, source: str = "num-examples", decay: float = 0.5) -> None:
        self.source, self.decay = source, decay

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> Weighted:
        return cls(cfg.weight_source, cfg.staleness_decay)

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        weights = client_weights(self.source, [u.metrics for u in updates], ctx.server_round, self.decay)
        info = {"weights": {str(u.nodes[0]): float(w) for u, w in zip(updates, weights)}}
        return weighted_average(zip((u.model for u in updates), weights)), info
