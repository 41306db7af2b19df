"""Differential privacy on top of any strategy, through Flower's own DP wrappers.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` / ``…ClientSideFixedClipping`` clip each
client's model update to an L2 norm (on the server, or on the client with ``fixedclipping_mod``)
and add Gaussian noise of standard deviation ``noise_multiplier × clipping_norm / clients`` to the
aggregate. They do that arithmetic on every array of the model, which breaks on integer tensors:
scaling BatchNorm's int64 ``num_batches_tracked`` in place raises, and its per-round step count
would dominate the update norm anyway. So the private release covers the floating-point state
(weights, BatchNorm affine parameters and running statistics); the integer step counters, which
the layers do not use with momentum-based BatchNorm, are averaged outside the mechanism.
Noise can push a running variance below zero: the released model clamps variances at zero, which
is post-processing and costs no privacy.

The privacy budget is accounted (Rényi DP through Flower's ``RdpAccountant``, no sampling
amplification, client-level add-or-remove neighbours) only where the sensitivity argument holds:
a uniform mean of the clipped updates (``strategy = "average"``, ``server-lr = 1``,
``server-momentum = 0``) with noise. Other strategies still run clipped and noised, with
``epsilon`` recorded as not accounted and the reason. Client metrics (losses, class counts) are
not privatised, as in Flower's accountant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedapp.config.keys import Key, Owner
from strategies.aggregation import average
from strategies.privacy_budget import accounting_gap, clamp_variances, epsilon_spent, split_private, update_norm
from strategies.records import NamedArrays, arrays_to_numpy, numpy_to_arrays
from strategies.replies import RoundReport
from strategies.strategy import VideoStrategy

logger = logging.getLogger(__name__)

DP_MODES = ("none", "server-side", "client-side")
_DP_ON = 'dp="server-side" or dp="client-side"'


def _on(cfg: Any) -> bool:
    return cfg.dp != "none"


# The mechanism's keys; `dp` is its own switch.
KEYS = Owner(
    "differential privacy",
    keys=(
        Key("dp", "none", "differential privacy: clip and noise on the server or on the clients", choices=DP_MODES),
        Key("dp-noise-multiplier", 1.0, "σ; the noise stdv is σ × clipping norm / clients", low=0.0, when=_on,
            needs=_DP_ON),
        Key("dp-clipping-norm", 1.0, "L2 bound on each client's update", low=0.0, low_open=True, when=_on,
            needs=_DP_ON),
        Key("dp-delta", 1e-5, "δ of the (ε, δ) guarantee", low=0.0, high=0.1, low_open=True, when=_on, needs=_DP_ON),
    ),
)  # fmt: skip


class _InnerAggregate:
    """The inner strategy as Flower's DP wrapper sees it.

    The wrapper calls ``aggregate_train`` and passes on only Flower's types; this keeps the inner
    strategy's full report of that one call (why a round was skipped, what the fusion rule
    decided) for :meth:`PrivateStrategy.train_round` to take and return. Anything else the
    wrapper asks for goes to the inner strategy.
    """

    def __init__(self, inner: VideoStrategy) -> None:
        self.inner = inner
        self.model: NamedArrays | None = None  # the global model of the round being configured
        self._report: RoundReport | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        # The wrapper passes on the record it was given: reuse its decoded view instead of decoding it again.
        model = self.model if self.model is not None and self.model.record() is arrays else NamedArrays(arrays)
        return self.inner.configure_train_round(server_round, model, grid, config)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._report = self.inner.train_round(server_round, replies)
        return self._report.flower_result()

    def take(self) -> RoundReport | None:
        """The report of the last ``aggregate_train`` call, handed over once."""
        report, self._report = self._report, None
        return report


class PrivateStrategy(Strategy):
    """One of our strategies inside Flower's fixed-clipping DP wrapper, integer tensors kept out.

    Replies are screened by the inner strategy first (a malformed one would otherwise crash
    Flower's clipping arithmetic); the survivors reach the wrapper with only their floating-point
    tensors, and the wrapper's noise is calibrated to the number of survivors, the clients that
    actually enter the mean.
    """

    def __init__(
        self,
        inner: VideoStrategy,
        mode: str,
        noise_multiplier: float,
        clipping_norm: float,
        delta: float,
        compression: str = "none",
    ) -> None:
        super().__init__()
        if mode not in ("server-side", "client-side"):
            raise ValueError(f"dp mode {mode!r}: expected 'server-side' or 'client-side'")
        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if mode == "server-side"
            else DifferentialPrivacyClientSideFixedClipping
        )
        self.inner = inner
        self.mode = mode
        self.delta = delta
        self._aggregator = _InnerAggregate(inner)
        self.dp = wrapper(self._aggregator, noise_multiplier, clipping_norm, num_sampled_clients=1)
        self.accounting_gap = accounting_gap(inner, noise_multiplier, mode, compression)
        self.releases = 0
        self._sent: dict[str, np.ndarray] = {}

    def settings(self) -> dict[str, Any]:
        """The privacy settings and budget spent so far, as recorded in the results."""
        accounted = not self.accounting_gap
        return {
            "mode": self.mode,
            "noise-multiplier": self.dp.noise_multiplier,
            "clipping-norm": self.dp.clipping_norm,
            "delta": self.delta,
            "releases": self.releases,
            "epsilon": epsilon_spent(self.dp.noise_multiplier, self.releases, self.delta) if accounted else None,
            "accounting": "rdp, no sampling amplification, client-level"
            if accounted
            else f"not accounted: {self.accounting_gap}",
            "private-tensors": "floating-point tensors; integer BatchNorm step counters averaged outside the mechanism",
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.configure_train_round(server_round, NamedArrays(arrays), grid, config)

    def configure_train_round(
        self, server_round: int, model: NamedArrays, grid: Grid, config: ConfigRecord | None = None
    ) -> list[Message]:
        """Flower's wrapper configures the round (client-side mode adds the clipping norm); the
        inner strategy samples the nodes from ``model`` as given."""
        self._sent = model.numpy()
        self._aggregator.model = model
        return list(
            self.dp.configure_train(server_round, model.record(), ConfigRecord() if config is None else config, grid)
        )

    def train_round(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        """Screen with the inner strategy, then clip, aggregate and noise through Flower's wrapper;
        the report is the inner strategy's plus the privacy step's figures."""
        report = self.inner.screen(server_round, replies, with_arrays=True)
        sent_private, _ = split_private(self._sent)
        survivors, counters, norms = [], [], []
        for reply in list(report.accepted):
            private, integer = split_private(reply.arrays)
            norm = update_norm(private, sent_private)
            if norm == 0:  # Flower's clipping divides by the norm; such a reply changes nothing
                report.accepted.remove(reply)
                report.rejected.append({"node-id": reply.node_id, "reason": "update is the global model (norm 0)"})
                continue
            norms.append(norm)
            counters.append(integer)
            reply.message.content["arrays"] = numpy_to_arrays(private)
            survivors.append(reply.message)

        # The wrapper clips against, and the inner strategy checks and steps from, the private part.
        self.inner.set_global(sent_private)
        server_side = isinstance(self.dp, DifferentialPrivacyServerSideFixedClipping)
        if server_side:
            self.dp.current_arrays = numpy_to_arrays(sent_private)
        self.dp.num_sampled_clients = max(len(survivors), 1)
        new_private, _ = self.dp.aggregate_train(server_round, survivors)
        inner = self._aggregator.take()  # None when the wrapper refused before aggregating
        report.skipped = inner.skipped if inner else "the DP wrapper aggregated nothing: global model kept"
        report.fusion = inner.fusion if inner else {}
        report.metrics = inner.metrics if inner else {}
        report.privacy = {
            # Client-side, the server only ever sees updates that are already clipped.
            "update-norm-median": float(np.median(norms)) if norms else None,
            "clipped-updates": sum(n > self.dp.clipping_norm for n in norms) if server_side else None,
        }
        if new_private is None:
            report.privacy.update(self.settings())
            return report
        released = arrays_to_numpy(new_private)
        negative = clamp_variances(released)
        merged_counters = average(counters) if counters and counters[0] else {}
        report.arrays = {k: released[k] if k in released else merged_counters[k] for k in self._sent}
        if self.dp.noise_multiplier > 0:
            self.releases += 1
        report.privacy.update(
            {
                "noise-stdv": self.dp.noise_multiplier * self.dp.clipping_norm / self.dp.num_sampled_clients,
                "clients-in-mean": len(survivors),
                "negative-variances-clamped": negative,
                **self.settings(),
            }
        )
        return report

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> RoundReport:
        return self.inner.evaluate_round(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.train_round(server_round, replies).flower_result()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.dp.summary()

    def extra_bytes_down(self) -> int:
        """Bytes each train message carries beside the model: none (SCAFFOLD is refused with DP)."""
        return 0

    def state(self) -> dict[str, Any]:
        """The inner strategy's state plus the number of private releases (the budget spent)."""
        return {**self.inner.state(), "dp-releases": self.releases}

    def load_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.releases = int(state.pop("dp-releases", 0))
        self.inner.load_state(state)
