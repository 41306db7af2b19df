"""FedAdam: Adam on the pseudo-gradient, with Flower's bias correction."""

from __future__ import annotations

from fedapp.config.keys import Key
from strategies.server_steps.adaptive import AdaptiveStep
from strategies.stage import register


@register
class Adam(AdaptiveStep):
    name = "adam"
    needs = 'server-optimizer="adam"'
    default_lr = 0.1  # Flower's FedAdam eta
    keys = (
        Key("server-beta1", 0.9, "first-moment decay (adam, yogi)", low=0.0, high=0.999),
        Key("server-beta2", 0.99, "second-moment decay (adam, yogi)", low=0.0, high=0.9999),
        Key("server-tau", 0.001, "τ, the adaptivity floor (adam, yogi, adagrad)", low=0.0, low_open=True),
    )
