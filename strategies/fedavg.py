"""FedAvg by sample count as a thin Message-API strategy: screen replies, call the numpy math, report."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation import fedavg
from strategies.validation import check_update, reference_spec

logger = logging.getLogger(__name__)

# Client metrics that are counts: summed over clients instead of averaged.
SUMMED_METRICS = frozenset({"num-examples", "skipped-videos", "failed-clips"})
# Client metrics that identify a client: meaningless when averaged, kept per client only.
IDENTITY_METRICS = frozenset({"partition-id"})


@dataclass
class ClientReply:
    """What one node sent back in a round, after screening."""

    node_id: int
    metrics: dict[str, Any]
    arrays: dict[str, np.ndarray] | None = None


@dataclass
class RoundReport:
    """Per-client outcome of one train or evaluate phase, for the run's history."""

    accepted: list[ClientReply] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # malformed replies
    failed: list[dict[str, Any]] = field(default_factory=list)  # clients that raised or vanished

    def to_dict(self) -> dict[str, Any]:
        return {
            "clients": [{"node-id": c.node_id, **c.metrics} for c in self.accepted],
            "rejected": self.rejected,
            "failed": self.failed,
        }


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered ``{name: ndarray}``."""
    return {key: array.numpy() for key, array in record.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Ordered ``{name: ndarray}`` -> ArrayRecord (names kept, so ``to_torch_state_dict`` works)."""
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})


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
    """Flower's FedAvg, made safe for untrusted replies.

    Every reply is checked against the global model (names, shapes, dtypes, finite values, positive
    sample count) before aggregation; a bad one is dropped, logged with its node id and reason, and
    counted, where Flower's own FedAvg would raise and end the run. Integer buffers stay integers.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reference: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.last_train = RoundReport()
        self.last_evaluate = RoundReport()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = reference_spec(arrays_to_numpy(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self._screen(server_round, replies, with_arrays=True)
        self.last_train = report
        if not report.accepted:
            return None, None
        merged = self.aggregate_arrays(report.accepted)
        return numpy_to_arrays(merged), MetricRecord(aggregate_metrics(report.accepted))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        report = self._screen(server_round, replies, with_arrays=False)
        self.last_evaluate = report
        if not report.accepted:
            return None
        return MetricRecord(aggregate_metrics(report.accepted))

    def aggregate_arrays(self, accepted: list[ClientReply]) -> dict[str, np.ndarray]:
        """FedAvg by sample count; subclasses swap the fusion rule here."""
        return fedavg((r.arrays, r.metrics["num-examples"]) for r in accepted if r.arrays is not None)

    def _screen(self, server_round: int, replies: Iterable[Message], with_arrays: bool) -> RoundReport:
        report = RoundReport()
        phase = "train" if with_arrays else "evaluate"
        for msg in replies:
            node_id = int(msg.metadata.src_node_id)
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
            report.accepted.append(reply)
        logger.info(
            "round %d %s: %d accepted, %d rejected, %d failed",
            server_round, phase, len(report.accepted), len(report.rejected), len(report.failed),
        )
        return report

    def _parse(self, msg: Message, with_arrays: bool) -> tuple[ClientReply | None, str]:
        content = msg.content
        metric_records = list(content.metric_records.values())
        if len(metric_records) != 1:
            return None, f"expected one MetricRecord, got {len(metric_records)}"
        metrics = dict(metric_records[0])
        arrays = None
        if with_arrays:
            array_records = list(content.array_records.values())
            if len(array_records) != 1:
                return None, f"expected one ArrayRecord, got {len(array_records)}"
            try:
                arrays = arrays_to_numpy(array_records[0])
            except Exception as exc:  # a reply we cannot even deserialize is just another bad reply
                return None, f"arrays could not be read: {exc}"
            reason = check_update(arrays, metrics.get("num-examples"), self._reference)
        else:
            n = metrics.get("num-examples")
            ok = _is_scalar(n) and np.isfinite(n) and n > 0
            reason = None if ok else f"num-examples is {n!r}, must be a number > 0"
        if reason is None:
            bad = [k for k, v in metrics.items() if _is_scalar(v) and not np.isfinite(v)]
            reason = f"non-finite metrics {bad}" if bad else None
        if reason is not None:
            return None, reason
        return ClientReply(int(msg.metadata.src_node_id), metrics, arrays), ""


