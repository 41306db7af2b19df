"""Krum and Multi-Krum (Blanchard et al., 2017): the model(s) closest to their n − f − 2 nearest."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key
from strategies.fusion import krum, krum_tolerance
from strategies.stage import Aggregator, Model, RoundContext, Update, register


def federation_hint(n: int) -> str:
    """How to run a federation of ``n`` nodes, for messages that need one."""
    return (
        f"set min-train-nodes={n} min-available-nodes={n} and run at least {n} SuperNodes "
        f"(fedvideo run --federation-config 'num-supernodes={n}')"
    )


@register
class Krum(Aggregator):
    name = "krum"
    needs = 'strategy="fusion" and fusion-fn="krum"'
    min_models = 3
    keys = (
        Key("krum-malicious", 1, "f, the attackers Krum and Bulyan tolerate", low=0),
        Key("krum-selected", 1, "m, the models Krum averages (1: Krum, > 1: Multi-Krum)", low=1),
    )

    def __init__(self, malicious: int = 1, selected: int = 1) -> None:
        self.malicious, self.selected = malicious, selected

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> Krum:
        return cls(cfg.krum_malicious, cfg.krum_selected)

    @classmethod
    def checks(cls, cfg: Any) -> list[str]:
        f = cfg.krum_malicious
        if cfg.min_train_nodes > 2 * f + 2:
            return []
        return [
            f"fusion-fn='krum' with krum-malicious={f} needs min-train-nodes > 2·{f}+2 = {2 * f + 2}, got "
            f"min-train-nodes={cfg.min_train_nodes}: {federation_hint(2 * f + 3)}"
        ]

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        models = [u.model for u in updates]
        # Rejected replies can leave too few updates for the configured f: run with the f that fits.
        f = krum_tolerance(len(models), self.malicious)
        # Flower's MultiKrum weights: sample counts (bucket means: their summed counts).
        fused, chosen = krum(models, f, min(self.selected, len(models)), weights=[u.count for u in updates])
        return fused, {"selected-nodes": [n for i in chosen for n in updates[i].nodes], "krum-malicious": f}
