"""The one strategy Flower sees: Flower's Message-API FedAvg composed of named stages.

``VideoStrategy(aggregator, server_step, transforms, scaffold)`` screens every reply
(``strategies.screening``), passes the accepted updates through the active transforms, merges
them with the aggregator and steps the global model with the server step (``strategies.stage``
says what each kind of stage does). The three families of the run config are aggregators:
averaging (``fedavg``, ``average``), ``weighted`` and fusion (``fusion-fn``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedapp.config.keys import Key, Owner
from strategies.aggregation import RunningMean
from strategies.aggregators.fedavg import FedAvg as FedAvgRule
from strategies.records import NamedArrays
from strategies.replies import ClientReply, RoundReport, aggregate_metrics, is_scalar
from strategies.scaffold import Scaffold
from strategies.screening import ReplyScreen
from strategies.server_steps.sgd import SGD
from strategies.stage import (
    Aggregator,
    Model,
    RoundContext,
    ServerStep,
    Transform,
    Update,
    fusion_rules,
    registered,
    strategies,
)
from strategies.validation import check_tensors

logger = logging.getLogger(__name__)

__all__ = ["ClientReply", "RoundReport", "VideoStrategy", "aggregate_metrics"]


def _enough_nodes(cfg: Any) -> list[str]:
    if cfg.min_available_nodes >= max(cfg.min_train_nodes, cfg.min_evaluate_nodes):
        return []
    return [
        f"min-available-nodes={cfg.min_available_nodes} is smaller than min-train-nodes={cfg.min_train_nodes} / "
        f"min-evaluate-nodes={cfg.min_evaluate_nodes}: it must be >= both"
    ]


# The keys this strategy reads itself; each stage declares its own in its file.
KEYS = Owner(
    "the strategy",
    keys=(
        Key("strategy", "fedavg", "the aggregation family (fusion: the rule is fusion-fn)", choices=strategies),
        Key("fraction-train", 1.0, "share of available nodes sampled to train each round", low=0.0, high=1.0,
            low_open=True),
        Key("fraction-evaluate", 1.0, "share of available nodes sampled to evaluate (0: none)", low=0.0, high=1.0),
        Key("min-train-nodes", 2, "fewest usable updates that make a round (else the model is kept)", low=1),
        Key("min-evaluate-nodes", 2, "fewest nodes sampled to evaluate", low=0),
        Key("min-available-nodes", 2, "nodes to wait for before a round starts", low=1),
        Key("server-optimizer", "sgd", "the server step from the global model towards the aggregate",
            choices=lambda: tuple(registered("server-step"))),
        Key("server-lr", 0.0, "server learning rate; 0: the server optimizer's default (" + "sgd 1, adam 0.1, "
            "yogi 0.01, adagrad 0.1)", low=0.0),
        Key("proximal-mu", 0.0, "FedProx's proximal term μ, sent to the clients (0: off)", low=0.0),
    ),
    checks=(_enough_nodes,),
)  # fmt: skip
FUSION = Owner(
    "the fusion family",
    keys=(Key("fusion-fn", "median", "the fusion rule", choices=fusion_rules, plugin=True),),
    when=lambda cfg: cfg.strategy == "fusion",
    needs='strategy="fusion"',
)


def reply_order(reply: ClientReply) -> tuple[float, int]:
    """A run-independent order of replies: by the partition the site reports (node ids are drawn at
    random each run), then by node id."""
    site = reply.metrics.get("partition-id")
    return (float(site) if is_scalar(site) else float("inf"), reply.node_id)


class VideoStrategy(FedAvg):
    """Flower's FedAvg (sampling, configuration) with our screening and stages for aggregation.

    ``proximal_mu`` > 0 is sent to clients, which add FedProx's proximal term to their loss.
    Remaining keyword arguments are Flower's FedAvg's (fractions, minimum node counts)."""

    def __init__(
        self,
        aggregator: Aggregator | None = None,
        server_step: ServerStep | None = None,
        transforms: Sequence[Transform] = (),
        scaffold: Scaffold | None = None,
        proximal_mu: float = 0.0,
        ordered: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # deterministic=true: the accepted replies in partition order, not arrival order, so that
        # float sums (and every rule that breaks ties by position) see them the same way each run.
        self.ordered = ordered
        self.aggregator = aggregator or FedAvgRule()
        self.server_step = server_step or SGD()
        self.transforms = sorted(transforms, key=lambda t: t.order)
        self.scaffold = scaffold
        self.proximal_mu = proximal_mu
        self.screener = ReplyScreen()
        if scaffold is not None:
            self.screener.control_spec = lambda: scaffold.reference(self.screener.current)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.configure_train_round(server_round, NamedArrays(arrays), grid, config)

    def configure_train_round(
        self, server_round: int, model: NamedArrays, grid: Grid, config: ConfigRecord | None = None
    ) -> list[Message]:
        """The train messages for the sampled nodes. ``model`` is the global model in whichever form
        the caller holds it (the round loop: numpy), so it is encoded once and never decoded back."""
        self.set_global(model.numpy())
        config = ConfigRecord() if config is None else config
        if self.proximal_mu > 0:
            config["proximal-mu"] = self.proximal_mu
        sent = list(super().configure_train(server_round, model.record(), config, grid))
        self.screener.sent = sent
        if self.scaffold is not None:
            self.scaffold.attach(sent, self.screener.current, len(list(grid.get_node_ids())))
        return sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.screener.sent = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self.screener.sent

    def set_global(self, arrays: dict[str, Any]) -> None:
        """The global model this round's replies are checked against and stepped from.

        ``configure_train`` sets it to the model sent; the DP wrapper narrows it to the tensors it
        privatises (``strategies.privacy``)."""
        self.screener.set_global(arrays)

    def extra_bytes_down(self) -> int:
        """Bytes each train message carries beside the model (SCAFFOLD's control variate)."""
        return self.scaffold.extra_bytes() if self.scaffold is not None else 0

    def streams(self) -> bool:
        """Whether replies are folded into a running mean as they arrive and then dropped, so the
        server holds two models' worth of sums whatever N, instead of holding every update until
        all are in. Rules of all updates at once (robust fusion, weights normalized over the round),
        transforms of all updates and SCAFFOLD's Δcᵢ need them held."""
        one_by_one = all(t.one_by_one for t in self.transforms)
        return self.aggregator.folds and one_by_one and self.scaffold is None and not self.ordered

    def screen(
        self,
        server_round: int,
        replies: Iterable[Message],
        with_arrays: bool,
        fold: Callable[[ClientReply], None] | None = None,
    ) -> RoundReport:
        """Sort replies into accepted, rejected (malformed) and failed (errors), logging each."""
        return self.screener.screen(server_round, replies, with_arrays, fold)

    def train_round(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        """Screen the train replies, aggregate the accepted ones and step the global model."""
        ctx = RoundContext(server_round, self.screener.current)
        for transform in self.transforms:
            transform.start()
        running = RunningMean() if self.streams() else None

        def fold(reply: ClientReply) -> None:
            update = update_of(reply)
            for transform in self.transforms:
                update = transform.apply_one(update, ctx)
            running.add(update.model, self.aggregator.weight(reply.metrics))
            reply.arrays, reply.message = None, None  # folded in: nothing of the update is kept

        report = self.screen(server_round, replies, with_arrays=True, fold=fold if running is not None else None)
        if self.ordered:
            report.accepted.sort(key=reply_order)
        if len(report.accepted) < max(self.min_train_nodes, 1):
            report.skipped = (
                f"{len(report.accepted)} usable updates, fewer than min-train-nodes={self.min_train_nodes}: "
                "global model kept"
            )
            logger.warning("round %d: %s", server_round, report.skipped)
            return report
        try:
            merged, report.fusion = self.merge(report.accepted, running, ctx)
        except ValueError as exc:  # e.g. Krum with too few survivors, all-zero weights, a bad plug-in result
            report.skipped = f"aggregation failed ({exc}): global model kept"
            logger.error("round %d: %s", server_round, report.skipped)
            return report
        report.arrays = self.server_step.step(ctx.global_model, merged, server_round)
        if self.scaffold is not None:
            deltas = [r.control_delta for r in report.accepted if r.control_delta is not None]
            report.fusion = {**report.fusion, **self.scaffold.update(deltas, ctx.global_model)}
        report.metrics = aggregate_metrics(report.accepted)
        return report

    def merge(
        self, accepted: list[ClientReply], running: RunningMean | None, ctx: RoundContext
    ) -> tuple[Model, dict[str, Any]]:
        """The accepted updates as one model, and what the stages decided on the way."""
        if running is not None:
            merged, fusion = running.result(), {"streamed-replies": running.count}
        else:
            updates = [update_of(r) for r in accepted]
            for transform in self.transforms:
                updates = transform.apply(updates, ctx)
            merged, fusion = self.aggregator.aggregate(updates, ctx)
            reason = check_tensors(merged, self.screener.reference) if self.screener.reference else None
            if reason:
                raise ValueError(f"{self.aggregator.name} returned a model unlike the global one: {reason}")
        for transform in self.transforms:
            fusion = {**fusion, **transform.record()}
        return merged, fusion

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        """Screen the evaluate replies and aggregate the accepted clients' metrics."""
        report = self.screen(server_round, replies, with_arrays=False)
        if self.ordered:
            report.accepted.sort(key=reply_order)
        report.metrics = aggregate_metrics(report.accepted) if report.accepted else {}
        return report

    # Flower's Strategy interface, for callers that need Flower's types (Flower's DP wrappers).
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.train_round(server_round, replies).flower_result()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        report = self.evaluate_round(server_round, replies)
        return MetricRecord(report.metrics) if report.accepted else None

    def stages(self) -> list[Any]:
        return [self.aggregator, self.server_step, *self.transforms, *([self.scaffold] if self.scaffold else [])]

    def state(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume: every stage's state (momentum, moments, c)."""
        state: dict[str, Any] = {"velocity": None, "server-m": None, "server-v": None, "scaffold-control": None}
        for stage in self.stages():
            state.update(stage.state())
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state`."""
        for stage in self.stages():
            stage.load_state(state)


def update_of(reply: ClientReply) -> Update:
    """A screened reply as the update stages see."""
    return Update(reply.arrays, float(reply.metrics["num-examples"]), [reply.node_id], reply.metrics)
