"""Nearest neighbour mixing (Allouah et al., 2023): each model becomes the mean of its N − f nearest.

The rule then still sees N models (sample counts unchanged), each now mostly an honest average."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key
from strategies.defences import nearest_neighbor_mixing
from strategies.stage import RoundContext, Transform, Update, aggregator_name, register, registered


def mixable_fusion(cfg: Any) -> bool:
    """Whether ``cfg`` runs a fusion rule that takes mixed models (every one but FedDF's ensemble)."""
    rule = registered("aggregator").get(aggregator_name(cfg))
    return cfg.strategy == "fusion" and (rule is None or rule.mixable)


@register
class NearestNeighbourMixing(Transform):
    name = "nnm"
    order = 20
    needs = 'strategy="fusion" and a fusion-fn other than "feddf"'
    keys = (Key("nnm-malicious", 0, "f for nearest neighbour mixing before the rule; 0: off", low=0),)

    def __init__(self, malicious: int) -> None:
        self.malicious = malicious
        self.neighbours: list[list[int]] = []

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return mixable_fusion(cfg)

    @classmethod
    def active(cls, cfg: Any) -> bool:
        return cfg.nnm_malicious > 0 and mixable_fusion(cfg)

    @classmethod
    def checks(cls, cfg: Any) -> list[str]:
        if cfg.nnm_malicious > 0 and cfg.bucket_size > 1:
            return [
                f"nnm-malicious={cfg.nnm_malicious} and bucket-size={cfg.bucket_size} are two alternative "
                "mixing steps before the rule: set one of them (nnm-malicious=0 or bucket-size=1)"
            ]
        return []

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> NearestNeighbourMixing:
        return cls(cfg.nnm_malicious)

    def apply(self, updates: list[Update], ctx: RoundContext) -> list[Update]:
        models, neighbours = nearest_neighbor_mixing([u.model for u in updates], self.malicious)
        self.neighbours = [[updates[j].nodes[0] for j in group] for group in neighbours]
        return [Update(m, u.count, u.nodes, u.metrics) for m, u in zip(models, updates)]

    def record(self) -> dict[str, Any]:
        return {"nnm-neighbours": self.neighbours}
