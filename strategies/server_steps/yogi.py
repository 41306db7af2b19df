"""FedYogi: Yogi's additive second moment, steadier than Adam's when updates are sparse or noisy."""

from __future__ import annotations

from strategies.server_steps.adaptive import AdaptiveStep
from strategies.stage import register


@register
class Yogi(AdaptiveStep):
    name = "yogi"
    needs = 'server-optimizer="yogi"'
    default_lr = 0.01  # Flower's FedYogi eta
    reads = ("server-beta1", "server-beta2", "server-tau")
