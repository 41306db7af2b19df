"""Adaptive robust clipping (Allouah et al., ICLR 2025): before any rule, clip the
k = ⌊2(f/n)(n − f)⌋ largest updates to the norm of the (k+1)-th largest."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key
from strategies.defences import adaptive_robust_clipping
from strategies.stage import RoundContext, Transform, Update, register


@register
class AdaptiveRobustClipping(Transform):
    name = "arc"
    order = 15  # after the test tool's attack and a fixed norm bound, before mixing
    keys = (Key("arc-malicious", 0, "f for adaptive robust clipping before the rule (ARC); 0: off", low=0),)

    def __init__(self, malicious: int) -> None:
        self.malicious = malicious
        self.info: dict[str, Any] = {}

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return True  # the key is its own switch; every family takes clipped updates

    @classmethod
    def active(cls, cfg: Any) -> bool:
        return cfg.arc_malicious > 0

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> AdaptiveRobustClipping:
        return cls(cfg.arc_malicious)

    def start(self) -> None:
        self.info = {}

    def apply(self, updates: list[Update], ctx: RoundContext) -> list[Update]:
        models, threshold, clipped = adaptive_robust_clipping([u.model for u in updates], ctx.global_model,
                                                              self.malicious)  # fmt: skip
        self.info = {"threshold": threshold, "clipped-nodes": [updates[i].nodes[0] for i in clipped]}
        return [Update(m, u.count, u.nodes, u.metrics) for m, u in zip(models, updates)]

    def record(self) -> dict[str, Any]:
        return {"arc": self.info}
