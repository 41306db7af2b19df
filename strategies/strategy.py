"""The aggregation strategies as thin Message-API strategies: screen replies, call the numpy math, report.

``VideoFedAvg`` holds everything the families share (reply screening, server learning rate and
momentum, the FedProx coefficient sent to clients, per-client reports); each family only says how
the accepted client models become one: ``aggregate_arrays``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import RunningMean, average, fedavg, weighted_average
from strategies.attacks import AttackInjector
from strategies.compression import decompress, payload_bytes
from strategies.defences import (
    bound_update_norm,
    bucket_means,
    bulyan,
    bulyan_tolerance,
    centered_clipping,
    nearest_neighbor_mixing,
)
from strategies.fusion import coordinate_median, geometric_median, krum, krum_tolerance, trimmed_mean
from strategies.records import NamedArrays, arrays_to_numpy, numpy_to_arrays
from strategies.scaffold import CONTROL, CONTROL_DELTA, server_control, zero_control
from strategies.server_optimizer import SERVER_OPTIMIZERS, adaptive_step, server_step
from strategies.validation import check_tensors, check_update, is_unchanged, reference_spec
from strategies.weighting import client_weights

logger = logging.getLogger(__name__)

# Client metrics that are counts: summed over clients instead of averaged.
SUMMED_METRICS = frozenset({"num-examples", "skipped-videos", "failed-clips"})
# Client metrics that identify a client: meaningless when averaged, kept per client only.
IDENTITY_METRICS = frozenset({"partition-id", "attacker"})  # "attacker": the test tool's mark


@dataclass
class ClientReply:
    """What one node sent back in a round, after screening."""

    node_id: int
    metrics: dict[str, Any]
    arrays: dict[str, np.ndarray] | None = None
    message: Message | None = field(default=None, repr=False, compare=False)  # the reply it came from
    payload_bytes: int = 0  # tensor bytes as received, before decompression
    control_delta: dict[str, np.ndarray] | None = None  # SCAFFOLD's Δcᵢ (``scaffold`` on)


@dataclass
class RoundReport:
    """What one train or evaluate phase of a round did, as the strategy returns it.

    ``accepted`` / ``rejected`` (malformed replies, with the reason) / ``failed`` (clients that
    raised or vanished) sort every reply; ``arrays`` is the new global model (train phase; None
    when the global model was kept, ``skipped`` says why); ``metrics`` the aggregated client
    metrics; ``fusion`` what the aggregation rule decided (weights, Krum's picks, distillation);
    ``privacy`` the DP step's clipping, noise and budget (None without DP).
    """

    accepted: list[ClientReply] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: str = ""
    arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)
    metrics: dict[str, float] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None

    @property
    def bytes_received(self) -> int:
        """Tensor bytes of the accepted replies as received (compressed when compression is on)."""
        return sum(c.payload_bytes for c in self.accepted)

    def to_dict(self) -> dict[str, Any]:
        """The per-client part, as the run's history records it."""
        return {
            "clients": [{"node-id": c.node_id, **c.metrics} for c in self.accepted],
            "rejected": self.rejected,
            "failed": self.failed,
            "skipped": self.skipped,
        }

    def flower_result(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The train outcome in Flower's ``aggregate_train`` types."""
        if self.arrays is None:
            return None, None
        return numpy_to_arrays(self.arrays), MetricRecord(self.metrics)


def aggregate_metrics(replies: list[ClientReply]) -> dict[str, float]:
    """Average scalar client metrics weighted by ``num-examples``; counts are summed."""
    weights = [float(r.metrics.get("num-examples", 0)) for r in replies]
    keys = {k for r in replies for k, v in r.metrics.items() if _is_scalar(v)} - IDENTITY_METRICS
    out: dict[str, float] = {}
    for key in sorted(keys):
        pairs = [(float(r.metrics[key]), w) for r, w in zip(replies, weights) if _is_scalar(r.metrics.get(key))]
        if key in SUMMED_METRICS:
            out[key] = sum(v for v, _ in pairs)
        elif sum(w for _, w in pairs) > 0:
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return out


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class VideoFedAvg(FedAvg):
    """Flower's FedAvg (weights ∝ sample counts), made safe for untrusted replies.

    Every reply is checked against the global model (names, shapes, dtypes, finite values, positive
    sample count) before aggregation; a bad one is dropped, logged with its node id and reason, and
    counted, where Flower's own FedAvg would raise and end the run. Integer buffers stay integers.
    ``server_lr``/``server_momentum`` turn the average into a FedAvgM step, ``server_optimizer``
    "adam" / "yogi" / "adagrad" into FedAdam / FedYogi / FedAdagrad (with ``server_betas``,
    ``server_tau``; Flower's numbers, ``strategies.server_optimizer``); ``scaffold`` sends the
    server control variate with the model and updates it from the clients' Δcᵢ (SCAFFOLD option
    II, ``strategies.scaffold``); ``proximal_mu`` > 0 is
    sent to clients, which then add FedProx's proximal term to their loss. ``norm_bound`` > 0 scales
    each accepted update (model − global, learnable parameters) to L2 norm ≤ ``norm_bound`` before
    any family aggregates it (Sun et al. 2019), so every family gets it.
    """

    def __init__(
        self,
        *,
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_betas: tuple[float, float] = (0.9, 0.99),
        server_tau: float = 1e-3,
        proximal_mu: float = 0.0,
        norm_bound: float = 0.0,
        scaffold: bool = False,
        attack_injector: AttackInjector | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # TEST TOOL (strategies.attacks): simulated colluding attackers; None in any real federation.
        self.attack_injector = attack_injector
        if server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer={server_optimizer!r}: choose one of {', '.join(SERVER_OPTIMIZERS)}")
        self.server_optimizer = server_optimizer
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.server_betas = server_betas
        self.server_tau = server_tau
        # The adaptive optimizers' first and second moments {"m": ..., "v": ...} (None until a step).
        self.moments: dict[str, dict[str, np.ndarray]] | None = None
        self.proximal_mu = proximal_mu
        self.norm_bound = norm_bound
        self.scaffold = scaffold
        self.control: dict[str, np.ndarray] | None = None  # SCAFFOLD's server control variate c
        self._num_nodes = 0  # the clients there are (SCAFFOLD's N), counted when a round is configured
        self.velocity: dict[str, np.ndarray] | None = None
        self._current: dict[str, np.ndarray] = {}
        self._sent: list[Message] = []
        self._reference: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

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
        self._sent = list(super().configure_train(server_round, model.record(), config, grid))
        if self.scaffold:
            if self.control is None:
                self.control = zero_control(self._current)
            self._num_nodes = max(len(list(grid.get_node_ids())), len(self._sent))
            record = numpy_to_arrays(self.control)
            for message in self._sent:
                message.content[CONTROL] = record
        return self._sent

    def extra_bytes_down(self) -> int:
        """Bytes each train message carries beside the model (SCAFFOLD's control variate)."""
        return sum(v.nbytes for v in self.control.values()) if self.scaffold and self.control else 0

    def set_global(self, arrays: dict[str, np.ndarray]) -> None:
        """The global model this round's replies are checked against and stepped from.

        ``configure_train`` sets it to the model sent; the DP wrapper narrows it to the tensors it
        privatises (``strategies.privacy``)."""
        self._current = arrays
        self._reference = reference_spec(arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._sent

    def _origin_node(self, reply: Message) -> int:
        """The node a reply is about. An error the SuperLink writes for a node that vanished comes
        *from* the SuperLink, so look up where the message it answers was sent (the grid sets the
        sent messages' ids when it pushes them)."""
        wanted = reply.metadata.reply_to_message_id
        if reply.has_error() and wanted:
            for sent in self._sent:
                if sent.metadata.message_id == wanted:
                    return int(sent.metadata.dst_node_id)
        return int(reply.metadata.src_node_id)

    # Whether this family's merged model is the mean of the replies weighted by ``reply_weight``,
    # which each reply carries on its own: then replies can be folded in as they arrive.
    folds_replies = True

    def reply_weight(self, reply: ClientReply) -> float:
        """A reply's weight in the mean: its sample count (FedAvg)."""
        return float(reply.metrics["num-examples"])

    def streams(self) -> bool:
        """Whether replies are folded into a running mean as they arrive and then dropped, so the
        server holds two models' worth of sums whatever N, instead of holding every update until
        all are in. Rules that need all updates at once (robust fusion, weights normalized over the
        round, SCAFFOLD's Δcᵢ, the attack test tool) hold them."""
        return self.folds_replies and self.attack_injector is None and not self.scaffold

    def train_round(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        """Screen the train replies, aggregate the accepted ones and step the global model."""
        running = RunningMean() if self.streams() else None
        norms: list[tuple[int, float]] = []

        def fold(reply: ClientReply) -> None:
            if self.norm_bound > 0:
                reply.arrays, norm = bound_update_norm(reply.arrays, self._current, self.norm_bound)
                norms.append((reply.node_id, norm))
            running.add(reply.arrays, self.reply_weight(reply))
            reply.arrays, reply.message = None, None  # folded in: nothing of the update is kept

        report = self.screen(server_round, replies, with_arrays=True, fold=fold if running is not None else None)
        if len(report.accepted) < max(self.min_train_nodes, 1):
            report.skipped = (
                f"{len(report.accepted)} usable updates, fewer than min-train-nodes={self.min_train_nodes}: "
                "global model kept"
            )
            logger.warning("round %d: %s", server_round, report.skipped)
            return report
        # TEST TOOL: the simulated omniscient attackers replace their models here, after screening.
        attack = self.attack_injector(report.accepted, self._current) if self.attack_injector else None
        try:
            if running is not None:
                merged, report.fusion = running.result(), {"streamed-replies": running.count}
            else:
                # After the (test tool's) attack: the defence bounds what the attackers sent.
                if self.norm_bound > 0:
                    norms = self.bound_norms(report.accepted)
                merged, report.fusion = self.aggregate_arrays(report.accepted, server_round)
            if self.norm_bound > 0:
                report.fusion = {**report.fusion, "norm-bound": self.norm_record(norms)}
        except ValueError as exc:  # e.g. Krum with too few survivors, all-zero weights
            report.skipped = f"aggregation failed ({exc}): global model kept"
            logger.error("round %d: %s", server_round, report.skipped)
            return report
        if attack is not None:  # the round record says which nodes attacked, for benchmarks to check
            report.fusion = {**report.fusion, "attack": attack}
        if self.server_optimizer == "sgd":
            report.arrays, self.velocity = server_step(
                self._current or merged, merged, self.velocity, self.server_lr, self.server_momentum
            )
        else:
            beta1, beta2 = self.server_betas
            report.arrays, self.moments = adaptive_step(
                self._current or merged,
                merged,
                self.moments,
                server_round,
                self.server_optimizer,
                self.server_lr,
                beta1,
                beta2,
                self.server_tau,
            )
        if self.scaffold:
            deltas = [r.control_delta for r in report.accepted if r.control_delta is not None]
            self.control = server_control(self.control or zero_control(self._current), deltas, self._num_nodes)
            norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in self.control.values())))
            report.fusion = {**report.fusion, "scaffold": {"control-norm": norm, "clients": len(deltas)}}
        report.metrics = aggregate_metrics(report.accepted)
        return report

    def bound_norms(self, accepted: list[ClientReply]) -> list[tuple[int, float]]:
        """Scale each accepted update to norm ≤ ``norm_bound`` in place; ``(node, norm before)`` each."""
        norms = []
        for r in accepted:
            r.arrays, norm = bound_update_norm(r.arrays, self._current, self.norm_bound)
            norms.append((r.node_id, norm))
        return norms

    def norm_record(self, norms: list[tuple[int, float]]) -> dict[str, Any]:
        """What norm bounding did in a round, for the round's record."""
        return {
            "bound": self.norm_bound,
            "clipped-nodes": [node for node, norm in norms if norm > self.norm_bound],
            "update-norm-max": max(norm for _, norm in norms),
        }

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        """Screen the evaluate replies and aggregate the accepted clients' metrics."""
        report = self.screen(server_round, replies, with_arrays=False)
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

    def aggregate_arrays(
        self, accepted: list[ClientReply], server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(merged model, what the rule decided)``: FedAvg by sample count; each family overrides only this."""
        return fedavg((r.arrays, r.metrics["num-examples"]) for r in accepted), {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume this strategy (momentum buffer, adaptive moments)."""
        moments = self.moments or {}
        return {
            "velocity": self.velocity,
            "server-m": moments.get("m"),
            "server-v": moments.get("v"),
            "scaffold-control": self.control,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state`."""
        velocity = state.get("velocity")
        self.velocity = {k: np.asarray(v) for k, v in velocity.items()} if velocity else None
        m, v = state.get("server-m"), state.get("server-v")
        self.moments = (
            {"m": {k: np.asarray(x) for k, x in m.items()}, "v": {k: np.asarray(x) for k, x in v.items()}}
            if m and v
            else None
        )
        control = state.get("scaffold-control")
        self.control = {k: np.asarray(x) for k, x in control.items()} if control else None

    def screen(
        self,
        server_round: int,
        replies: Iterable[Message],
        with_arrays: bool,
        fold: Callable[[ClientReply], None] | None = None,
    ) -> RoundReport:
        """Sort replies into accepted, rejected (malformed) and failed (errors), logging each.

        ``fold`` (streaming, :meth:`streams`) takes each accepted reply as soon as it is screened,
        before the next one is read; one it cannot take is rejected with its reason."""
        report = RoundReport()
        phase = "train" if with_arrays else "evaluate"
        for msg in replies:
            if fold is not None:
                # Flower's messages hold reference cycles, so a folded reply is freed only by the
                # cyclic collector; a young-generation pass (microseconds) frees the previous one
                # now. Without it 40 replies of 1 MiB peaked at 25 MB, with it 7.7 MB (tested).
                gc.collect(1)
            node_id = self._origin_node(msg)
            if msg.has_error():
                reason = f"error code {msg.error.code}: {msg.error.reason}"
                report.failed.append({"node-id": node_id, "reason": reason[-2000:]})
                logger.warning("round %d %s: node %d failed: %s", server_round, phase, node_id, reason[-500:])
                continue
            reply, reason = self._parse(msg, with_arrays)
            if reply is None:
                report.rejected.append({"node-id": node_id, "reason": reason})
                logger.warning("round %d %s: rejected reply from node %d: %s", server_round, phase, node_id, reason)
                continue
            if fold is not None:
                try:
                    fold(reply)
                except ValueError as exc:  # screening passed it, so unexpected; still not a crash
                    report.rejected.append({"node-id": node_id, "reason": f"could not be aggregated: {exc}"})
                    logger.warning(
                        "round %d %s: reply from node %d not aggregated: %s", server_round, phase, node_id, exc
                    )
                    continue
            report.accepted.append(reply)
        logger.debug(  # the round's one console line (fedapp.server.rounds) carries these counts
            "round %d %s: %d accepted, %d rejected, %d failed",
            server_round,
            phase,
            len(report.accepted),
            len(report.rejected),
            len(report.failed),
        )
        return report

    def _parse(self, msg: Message, with_arrays: bool) -> tuple[ClientReply | None, str]:
        content = msg.content
        metric_records = list(content.metric_records.values())
        if len(metric_records) != 1:
            return None, f"expected one MetricRecord, got {len(metric_records)}"
        metrics = dict(metric_records[0])
        arrays = None
        received = 0
        control_delta = None
        if with_arrays:
            records = dict(content.array_records)
            if self.scaffold:
                control_delta, reason = self._parse_control_delta(records.pop(CONTROL_DELTA, None))
                if control_delta is None:
                    return None, reason
            array_records = list(records.values())
            if len(array_records) != 1:
                return None, f"expected one ArrayRecord, got {len(array_records)}"
            try:
                payload = arrays_to_numpy(array_records[0])
            except Exception as exc:  # a reply we cannot even deserialize is just another bad reply
                return None, f"arrays could not be read: {exc}"
            received = payload_bytes(payload) + (payload_bytes(control_delta) if control_delta else 0)
            try:  # a compressed update (run config `compression`) becomes full tensors; plain ones pass
                arrays = decompress(payload, self._current)
            except Exception as exc:  # malformed parts raise ValueError; nothing a client sends may crash us
                return None, f"compressed update could not be decoded: {exc}"
            reason = check_update(arrays, metrics.get("num-examples"), self._reference)
            if reason is None and is_unchanged(arrays, self._current):
                reason = "update identical to the global model: nothing trained (free rider)"
        else:
            n = metrics.get("num-examples")
            ok = _is_scalar(n) and np.isfinite(n) and n > 0
            reason = None if ok else f"num-examples is {n!r}, must be a number > 0"
        if reason is None:
            bad = [k for k, v in metrics.items() if _is_scalar(v) and not np.isfinite(v)]
            reason = f"non-finite metrics {bad}" if bad else None
        if reason is not None:
            return None, reason
        return (
            ClientReply(
                int(msg.metadata.src_node_id),
                metrics,
                arrays,
                message=msg,
                payload_bytes=received,
                control_delta=control_delta,
            ),
            "",
        )

    def _parse_control_delta(self, record: ArrayRecord | None) -> tuple[dict[str, np.ndarray] | None, str]:
        """A SCAFFOLD reply's Δcᵢ, checked against the control variate like a model against the global one."""
        if record is None:
            return None, f"SCAFFOLD is on but the reply carries no {CONTROL_DELTA!r} record"
        try:
            delta = arrays_to_numpy(record)
        except Exception as exc:
            return None, f"{CONTROL_DELTA} could not be read: {exc}"
        reason = check_tensors(delta, reference_spec(self.control or zero_control(self._current)))
        return (None, f"{CONTROL_DELTA}: {reason}") if reason else (delta, "")


class AverageStrategy(VideoFedAvg):
    """Plain mean of the client models, whatever their sample counts."""

    def reply_weight(self, reply: ClientReply) -> float:
        return 1.0

    def aggregate_arrays(
        self, accepted: list[ClientReply], server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return average(r.arrays for r in accepted), {}


class WeightedStrategy(VideoFedAvg):
    """Weighted mean with per-client weights from a named source (see ``strategies.weighting``).

    Holds the round's updates: the weights are normalized over the round's replies (e.g. the
    softmax of the losses), so no reply's weight is known on its own."""

    folds_replies = False

    def __init__(self, *, weight_source: str = "num-examples", staleness_decay: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weight_source = weight_source
        self.staleness_decay = staleness_decay

    def aggregate_arrays(
        self, accepted: list[ClientReply], server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        weights = client_weights(self.weight_source, [r.metrics for r in accepted], server_round, self.staleness_decay)
        info = {"weights": {str(r.node_id): float(w) for r, w in zip(accepted, weights)}}
        return weighted_average(zip((r.arrays for r in accepted), weights)), info


class FusionStrategy(VideoFedAvg):
    """A fusion function of all client models: robust statistics or ensemble distillation.

    ``fusion_fn`` is one of ``median``, ``trimmed-mean``, ``geometric-median``, ``krum``,
    ``centered-clipping``, ``bulyan`` or ``feddf``. FedDF needs ``distiller``: a callable ``(start,
    client_models, weights) -> (model, info)`` that distils the clients' ensemble into the start
    model on server-side unlabeled clips.

    ``bucket_size`` s > 1 (not with FedDF) first averages random buckets of s clients (seeded by
    ``bucket_seed`` and the round) and gives the rule the ⌈N/s⌉ bucket means, weighted by their
    summed sample counts. f attackers spoil at most f buckets, so Krum and Bulyan run with
    f_buckets = min(f, what the bucket count allows); ``selected-nodes`` then lists the nodes of
    the selected buckets.

    ``nnm_malicious`` f > 0 (not with FedDF or bucketing) first replaces every client's model by
    the mean of its N − f nearest (nearest neighbour mixing); the rule then fuses the N mixtures.

    Every rule here is a function of all N updates at once, so the round's updates are held.
    """

    folds_replies = False

    def __init__(
        self,
        *,
        fusion_fn: str = "median",
        trim_beta: float = 0.2,
        krum_malicious: int = 1,
        krum_selected: int = 1,
        bucket_size: int = 1,
        bucket_seed: int = 0,
        nnm_malicious: int = 0,
        cc_radius: float = 10.0,
        cc_iterations: int = 1,
        distiller: Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if fusion_fn == "feddf" and distiller is None:
            raise ValueError("fusion-fn='feddf' needs a distiller (server-side unlabeled clips)")
        self.fusion_fn = fusion_fn
        self.trim_beta = trim_beta
        self.krum_malicious = krum_malicious
        self.krum_selected = krum_selected
        self.bucket_size = bucket_size
        self.bucket_seed = bucket_seed
        self.nnm_malicious = nnm_malicious
        self.cc_radius = cc_radius
        self.cc_iterations = cc_iterations
        self.distiller = distiller

    def aggregate_arrays(
        self, accepted: list[ClientReply], server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        models = [r.arrays for r in accepted]
        counts = [float(r.metrics["num-examples"]) for r in accepted]
        groups = [[r.node_id] for r in accepted]  # the nodes behind each model the rule sees
        if self.nnm_malicious > 0 and self.fusion_fn != "feddf":
            # Each client's model stands in for the mean of its N − f nearest: the rule still sees N
            # models (sample counts unchanged), each now mostly honest average.
            models, neighbours = nearest_neighbor_mixing(models, self.nnm_malicious)
            fused, info = self._fuse(models, counts, groups)
            return fused, {"nnm-neighbours": [[accepted[j].node_id for j in g] for g in neighbours], **info}
        if self.bucket_size > 1 and self.fusion_fn != "feddf":
            # Seeded by (run seed, round): reproducible, yet fresh buckets every round, as the paper draws them.
            models, counts, buckets = bucket_means(models, self.bucket_size, [self.bucket_seed, server_round], counts)
            groups = [[accepted[i].node_id for i in bucket] for bucket in buckets]
            fused, info = self._fuse(models, counts, groups)
            return fused, {"buckets": groups, **info}
        return self._fuse(models, counts, groups)

    def _fuse(
        self, models: list[dict[str, np.ndarray]], counts: list[float], groups: list[list[int]]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The configured rule on ``models`` (client models or bucket means) standing for ``groups``."""
        if self.fusion_fn == "median":
            return coordinate_median(models), {}
        if self.fusion_fn == "trimmed-mean":
            return trimmed_mean(models, self.trim_beta), {}
        if self.fusion_fn == "geometric-median":
            fused, info = geometric_median(models, counts)
            return fused, {"iterations": info["iterations"], "converged": info["converged"]}
        if self.fusion_fn == "krum":
            # Rejected replies can leave too few updates for the configured f: run with the f that fits.
            f = krum_tolerance(len(models), self.krum_malicious)
            # Flower's MultiKrum weights: sample counts (bucket means: their summed counts).
            fused, selected = krum(models, f, min(self.krum_selected, len(models)), weights=counts)
            return fused, {"selected-nodes": [n for i in selected for n in groups[i]], "krum-malicious": f}
        if self.fusion_fn == "bulyan":
            f = bulyan_tolerance(len(models), self.krum_malicious)  # as Krum: the f the survivors allow
            fused, selected = bulyan(models, f)
            return fused, {"selected-nodes": [n for i in selected for n in groups[i]], "bulyan-malicious": f}
        if self.fusion_fn == "centered-clipping":
            # Centered on the round's global model (the updates' origin); without one (the strategy
            # used outside a round) on the coordinate-wise median, a robust start too.
            center = self._current or coordinate_median(models)
            fused, info = centered_clipping(models, center, self.cc_radius, self.cc_iterations)
            return fused, {"clipped": info["clipped"], "update-norm-median": float(np.median(info["update-norms"]))}
        if self.fusion_fn == "feddf":
            start = fedavg(zip(models, counts))
            fused, info = self.distiller(start, models, counts)
            return fused, dict(info)
        raise ValueError(f"unknown fusion function {self.fusion_fn!r}")
