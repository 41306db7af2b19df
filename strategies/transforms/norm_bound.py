"""Norm bounding (Sun et al., 2019): scale each update (model − global) to L2 norm ≤ ``norm-bound``."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key
from strategies.defences import bound_update_norm
from strategies.stage import RoundContext, Transform, Update, register


@register
class NormBound(Transform):
    name = "norm-bound"
    order = 10  # after the test tool's attack (the defence bounds what attackers send), before mixing
    one_by_one = True
    keys = (Key("norm-bound", 0.0, "bound on each update's L2 norm (learnable tensors); 0: off", low=0.0),)

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.norms: list[tuple[int, float]] = []

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return True  # the key is its own switch

    @classmethod
    def active(cls, cfg: Any) -> bool:
        return cfg.norm_bound > 0

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> NormBound:
        return cls(cfg.norm_bound)

    def start(self) -> None:
        self.norms = []

    def apply_one(self, update: Update, ctx: RoundContext) -> Update:
        update.model, norm = bound_update_norm(update.model, ctx.global_model, self.bound)
        self.norms.append((update.nodes[0], norm))
        return update

    def record(self) -> dict[str, Any]:
        return {
            "norm-bound": {
                "bound": self.bound,
                "clipped-nodes": [node for node, norm in self.norms if norm > self.bound],
                "update-norm-max": max(norm for _, norm in self.norms),
            }
        }
