"""Bucketing (Karimireddy et al., 2022): the rule fuses the means of random buckets of s clients.

f attackers spoil at most f buckets; buckets are drawn afresh every round, seeded by the run's
``seed`` and the round (reproducible), and each mean is weighted by its summed sample counts."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key
from strategies.defences import bucket_means
from strategies.stage import RoundContext, Transform, Update, aggregator_name, register, registered
from strategies.transforms.nnm import mixable_fusion


@register
class Bucketing(Transform):
    name = "bucketing"
    order = 20
    needs = 'strategy="fusion" and a fusion-fn other than "feddf"'
    keys = (Key("bucket-size", 1, "s, clients per bucket before the rule; 1: off", low=1),)
    reads = ("seed",)

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.buckets: list[list[int]] = []

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return mixable_fusion(cfg)

    @classmethod
    def active(cls, cfg: Any) -> bool:
        return cfg.bucket_size > 1 and mixable_fusion(cfg)

    @classmethod
    def checks(cls, cfg: Any) -> list[str]:
        rule = registered("aggregator").get(aggregator_name(cfg))
        need = getattr(rule, "min_models", 1)
        buckets = -(-cfg.min_train_nodes // cfg.bucket_size)
        if cfg.bucket_size <= 1 or buckets >= need:
            return []
        return [
            f"bucket-size={cfg.bucket_size} leaves ⌈min-train-nodes/bucket-size⌉ = {buckets} buckets, fewer than "
            f"the {need} fusion-fn={cfg.fusion_fn!r} needs: lower bucket-size to at most "
            f"{max((cfg.min_train_nodes - 1) // 2, 1)}"
        ]

    @classmethod
    def from_config(cls, cfg: Any, resources: dict[str, Any]) -> Bucketing:
        return cls(cfg.bucket_size, cfg.seed)

    def apply(self, updates: list[Update], ctx: RoundContext) -> list[Update]:
        models, counts, buckets = bucket_means(
            [u.model for u in updates], self.size, [self.seed, ctx.server_round], [u.count for u in updates]
        )
        groups = [[n for i in bucket for n in updates[i].nodes] for bucket in buckets]
        self.buckets = groups
        return [Update(m, c, g) for m, c, g in zip(models, counts, groups)]

    def record(self) -> dict[str, Any]:
        return {"buckets": self.buckets}
