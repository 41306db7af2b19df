"""Bulyan (El Mhamdi et al., 2018): Krum selection of n − 2f models, then a trimmed mean around the median."""

from __future__ import annotations

from typing import Any

from strategies.aggregators.krum import federation_hint
from strategies.defences import bulyan, bulyan_tolerance
from strategies.stage import Aggregator, Model, RoundContext, Update, register


@register
class Bulyan(Aggregator):
    name = "bulyan"
    needs = 'strategy="fusion" and fusion-fn="bulyan"'
    min_models = 3
    reads = ("krum-malicious",)

    def __init__(self, malicious: int = 1) -> None:
        self.malicious = malicious

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> Bulyan:
        return cls(cfg.krum_malicious)

    @classmethod
    def checks(cls, cfg: Any) -> list[str]:
        f = cfg.krum_malicious
        if cfg.min_train_nodes >= 4 * f + 3:
            return []
        return [
            f"fusion-fn='bulyan' with krum-malicious={f} needs min-train-nodes >= 4·{f}+3 = {4 * f + 3}, got "
            f"min-train-nodes={cfg.min_train_nodes}: {federation_hint(4 * f + 3)}"
        ]

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        models = [u.model for u in updates]
        f = bulyan_tolerance(len(models), self.malicious)  # as Krum: the f the survivors allow
        fused, chosen = bulyan(models, f)
        return fused, {"selected-nodes": [n for i in chosen for n in updates[i].nodes], "bulyan-malicious": f}
