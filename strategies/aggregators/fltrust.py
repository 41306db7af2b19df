"""FLTrust (Cao et al., NDSS 2021): trust each update by its cosine with the server's own update on
a small clean root set, rescaled to that update's norm.

Training on the root set needs the model and the labeled root videos, which the server builds and
hands over as the ``root_trainer`` resource (``fedapp.server.build_strategy.make_root_trainer``)."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key
from strategies.defences import fltrust
from strategies.stage import Aggregator, Model, RoundContext, Update, register


@register
class FLTrust(Aggregator):
    name = "fltrust"
    needs = 'strategy="fusion" and fusion-fn="fltrust"'
    mixable = False  # trust is earned by each client's own update, not by a mix of several
    keys = (
        Key("fltrust-root-dir", "", "the server's root set: class folders of a few labeled videos of your task "
            "(never the test videos)"),
    )  # fmt: skip

    def __init__(self, root_trainer: Any) -> None:
        self.root_trainer = root_trainer

    @classmethod
    def checks(cls, cfg: Any) -> list[str]:
        if cfg.fltrust_root_dir:
            return []
        return [
            "fltrust-root-dir='' is not allowed with fusion-fn=\"fltrust\": FLTrust trusts updates by the server's "
            "own update on a small labeled root set it holds; name a folder of class folders with a few videos each"
        ]

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> FLTrust:
        if resources.get("root_trainer") is None:
            raise ValueError("fusion-fn='fltrust' needs a root trainer (the server's labeled root set)")
        return cls(resources["root_trainer"])

    def aggregate(self, updates: list[Update], ctx: RoundContext) -> tuple[Model, dict[str, Any]]:
        root_model = self.root_trainer(ctx.global_model, ctx.server_round)
        merged, scores, root_norm = fltrust([u.model for u in updates], ctx.global_model, root_model)
        return merged, {
            "root-videos": self.root_trainer.num_videos,
            "root-update-norm": root_norm,
            "trust": {str(u.nodes[0]): round(score, 6) for u, score in zip(updates, scores)},
        }
