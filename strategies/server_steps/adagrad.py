"""FedAdagrad: the sum of squared pseudo-gradients scales each coordinate's step (no first-moment decay)."""

from __future__ import annotations

from typing import Any

from strategies.server_steps.adaptive import AdaptiveStep
from strategies.stage import register


@register
class Adagrad(AdaptiveStep):
    name = "adagrad"
    needs = 'server-optimizer="adagrad"'
    default_lr = 0.1  # Flower's FedAdagrad eta
    reads = ("server-tau",)

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> Adagrad:
        return cls(cfg.server_lr, tau=cfg.server_tau)
