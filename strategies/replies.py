"""What a round's replies become: one :class:`ClientReply` per accepted reply, and the
:class:`RoundReport` a strategy returns for a train or evaluate phase."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies.records import numpy_to_arrays

# Client metrics that are counts: summed over clients instead of averaged.
SUMMED_METRICS = frozenset({"num-examples", "skipped-videos", "failed-clips"})
# Client metrics that identify a client: meaningless when averaged, kept per client only.
# Where a site stands in the federation: how many sites split the dataset, and whether it holds data
# of its own (node config data-dir); the server writes split.csv's site column from them.
NUM_PARTITIONS, OWN_DATA = "num-partitions", "own-data"
IDENTITY_METRICS = frozenset({"partition-id", NUM_PARTITIONS, OWN_DATA, "attacker"})  # "attacker": test tool
# An evaluate reply of a site that holds no test video (num-examples 0): recorded as not evaluated.
NO_TEST_VIDEOS = "no-test-videos"


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
    raised or vanished) / ``not_evaluated`` (evaluate replies of sites without a test video) sort
    every reply; ``arrays`` is the new global model (train phase; None
    when the global model was kept, ``skipped`` says why); ``metrics`` the aggregated client
    metrics; ``fusion`` what the aggregation rule decided (weights, Krum's picks, distillation);
    ``privacy`` the DP step's clipping, noise and budget (None without DP).
    """

    accepted: list[ClientReply] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: str = ""
    not_evaluated: list[dict[str, Any]] = field(default_factory=list)  # sites without a test video
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
            # only when it happened: a key of its own would change every earlier round record
            **({"not-evaluated": self.not_evaluated} if self.not_evaluated else {}),
        }

    def flower_result(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The train outcome in Flower's ``aggregate_train`` types."""
        if self.arrays is None:
            return None, None
        return numpy_to_arrays(self.arrays), MetricRecord(self.metrics)


def aggregate_metrics(replies: list[ClientReply]) -> dict[str, float]:
    """Average scalar client metrics weighted by ``num-examples``; counts are summed."""
    weights = [float(r.metrics.get("num-examples", 0)) for r in replies]
    keys = {k for r in replies for k, v in r.metrics.items() if is_scalar(v)} - IDENTITY_METRICS
    out: dict[str, float] = {}
    for key in sorted(keys):
        pairs = [(float(r.metrics[key]), w) for r, w in zip(replies, weights) if is_scalar(r.metrics.get(key))]
        if key in SUMMED_METRICS:
            out[key] = sum(v for v, _ in pairs)
        elif sum(w for _, w in pairs) > 0:
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return out


def is_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
