"""The train phase under secure aggregation (``secagg = true``): SecAgg+ on Flower's Message API.

Four exchanges with the sampled sites replace the one of :func:`fedapp.server.rounds.train_round`
(setup, share keys, masked update, unmask; ``strategies.secure_aggregation`` says what each does).
The third carries the strategy's own train message, so sampling, the model and the config are
as without secagg; what comes back is each site's update masked, and the server unmasks only their
weighted mean, steps the global model with the strategy's server step and records the round like any
other. A site that drops out after sharing its keys does not break the round while every site's
secrets keep ``threshold`` live holders; when they do not, the round keeps the global model and says why.

What the server still checks: each masked update's names, shapes and integer range; the metrics
(``num-examples`` > 0, finite); the unmasked mean's shapes and finiteness. Individual updates
cannot be screened: ``secagg-clipping-range`` is what bounds one site's influence.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedapp.server.rounds import Strategy, Waiting, replies_as_they_arrive
from strategies.records import NamedArrays, arrays_to_numpy
from strategies.replies import ClientReply, RoundReport, aggregate_metrics
from strategies.screening import ReplyScreen, origin, readable_reason
from strategies.secure_aggregation import (
    MASKED,
    MASKED_UPDATE,
    RECORD,
    ROUND,
    SETUP,
    SHARE_KEYS,
    STAGE,
    UNMASK,
    WEIGHT_METRIC,
    SecAggError,
    Settings,
    check_masked,
    layout,
    neighbours,
    secured_names,
    sum_masked,
    unmask,
)

logger = logging.getLogger(__name__)


def secure_train_round(
    strategy: Strategy,
    grid: Grid,
    server_round: int,
    arrays: dict[str, np.ndarray],
    timeout: float,
    config: dict[str, Any] | None,
    settings: Settings,
    weight_metric: str,
    rng: random.Random | None = None,
) -> tuple[RoundReport, int, float]:
    """One SecAgg+ train phase. Returns the strategy-shaped report (the new global model in
    ``arrays``, the protocol's record in ``fusion["secagg"]``), the bytes sent down and the seconds
    spent waiting for replies. ``rng`` draws the sharing graph (seeded under ``deterministic``)."""
    messages = strategy.configure_train_round(server_round, NamedArrays(numpy=arrays), grid, ConfigRecord(config or {}))
    train_messages = {int(m.metadata.dst_node_id): m for m in messages}
    run = SecureRound(grid, server_round, timeout, settings, arrays)
    report = run.report
    try:
        mean = run.protocol(train_messages, weight_metric, rng or random.Random())
    except SecAggError as exc:
        report.skipped = f"secure aggregation: {exc}: global model kept"
        logger.warning("round %d: %s", server_round, report.skipped)
        report.fusion = {"secagg": run.record}
        return report, run.bytes_down, run.waiting.seconds
    report.fusion = {"secagg": run.record}
    if len(report.accepted) < max(strategy.min_train_nodes, 1):
        report.skipped = (
            f"{len(report.accepted)} usable updates, fewer than min-train-nodes={strategy.min_train_nodes}: "
            "global model kept"
        )
        logger.warning("round %d: %s", server_round, report.skipped)
        return report, run.bytes_down, run.waiting.seconds
    merged = {
        name: (a + mean[name]).astype(a.dtype) if name in mean else a for name, a in arrays.items()
    }  # fmt: skip
    report.arrays = strategy.server_step.step(arrays, merged, server_round)
    report.metrics = aggregate_metrics(report.accepted)
    return report, run.bytes_down, run.waiting.seconds


class SecureRound:
    """One round's four exchanges and what each left: the live sites after each step, the shares
    in transit, the masked sum. ``record`` is what the round's history keeps of it."""

    def __init__(self, grid: Grid, server_round: int, timeout: float, settings: Settings, arrays: dict) -> None:
        self.grid, self.server_round, self.timeout, self.settings = grid, server_round, timeout, settings
        self.entries = layout({name: arrays[name].shape for name in secured_names(arrays)})
        self.report = RoundReport()
        self.waiting = Waiting()
        self.bytes_down = 0
        # key-bytes-up: what the sites' setup, share-keys and unmask replies carried (public keys,
        # encrypted shares, revealed shares), beside the masked updates the round's bytes-up counts.
        self.record: dict[str, Any] = {"num-shares": settings.num_shares, "threshold": settings.threshold,
                                       "key-bytes-up": 0}  # fmt: skip

    def protocol(self, train_messages: dict[int, Message], weight_metric: str, rng: random.Random) -> dict:
        """Run the four steps; the unmasked weighted mean update, or :class:`SecAggError`."""
        s = self.settings
        sampled = sorted(train_messages)
        self.record["sampled"] = len(sampled)
        if len(sampled) < s.threshold:
            raise SecAggError(f"{len(sampled)} sites sampled, fewer than secagg-threshold={s.threshold}")
        if len(sampled) > s.contributors_limit():
            raise SecAggError(
                f"{len(sampled)} sites sampled: above {s.contributors_limit()} the sum would wrap the modulus"
            )
        graph = {node: set(peers) for node, peers in neighbours(sampled, s.num_shares, rng).items()}

        # 1. setup: each site's two public keys
        setup = {**s.to_config(), WEIGHT_METRIC: weight_metric}
        replies = self.exchange({n: self.stage_message(n, SETUP, setup) for n in sampled}, "setup")
        publics: dict[int, tuple[bytes, bytes]] = {}
        for node, values in replies.items():
            mask, share = values.get("mask-key"), values.get("share-key")
            if isinstance(mask, bytes) and isinstance(share, bytes):
                publics[node] = (mask, share)
            else:
                self.reject(node, "setup reply without its two public keys")
        live = self.with_enough_neighbours(set(publics), graph, "setup")

        # 2. share keys: each site's shares, encrypted for its neighbours, forwarded in step 3
        def share_keys(node: int) -> Message:
            peers = sorted(graph[node] & live)
            keys = {"mask-keys": [publics[p][0] for p in peers], "share-keys": [publics[p][1] for p in peers]}
            return self.stage_message(node, SHARE_KEYS, {"nodes": peers, **keys})

        replies = self.exchange({n: share_keys(n) for n in sorted(live)}, "share keys")
        forwarded: dict[int, dict[int, bytes]] = {n: {} for n in replies}
        for node, values in replies.items():
            destinations, ciphertexts = values.get("destinations", []), values.get("ciphertexts", [])
            if (
                not _list_of(destinations, int)
                or not _list_of(ciphertexts, bytes)
                or (
                    sorted(destinations) != sorted(graph[node] & live - {node}) or len(ciphertexts) != len(destinations)
                )
            ):
                self.reject(node, "share-keys reply does not hold one encrypted share pair per live neighbour")
                forwarded.pop(node)
                continue
            for destination, ciphertext in zip(destinations, ciphertexts):
                forwarded.setdefault(destination, {})[node] = ciphertext
        shared = self.with_enough_neighbours(set(forwarded), graph, "share keys")
        sources = {n: {src: c for src, c in forwarded[n].items() if src in shared} for n in shared}
        self.record["shared-keys"] = len(shared)

        # 3. masked updates: the strategy's train message plus the shares addressed to the site
        def masked_update(node: int) -> Message:
            senders = sorted(sources[node])
            shares = {"sources": senders, "ciphertexts": [sources[node][src] for src in senders]}
            return self.stage_message(node, MASKED_UPDATE, shares, train_messages[node].content)

        total = None
        for node, reply in self.exchange_messages({n: masked_update(n) for n in sorted(shared)}, "masked update"):
            parsed = self.masked_reply(node, reply)
            if parsed is None:
                continue
            accepted, vector = parsed
            total = sum_masked(total, vector, s.modulus_range)
            self.report.accepted.append(accepted)
        contributors = sorted(r.node_id for r in self.report.accepted)
        dropped = sorted(shared - set(contributors))
        self.record.update({"contributors": len(contributors), "dropped": dropped})
        if total is None:
            raise SecAggError("no masked update arrived")

        # 4. unmask: shares of the contributors' seeds and of the dropped sites' mask keys
        def reveal(node: int) -> Message:
            holders = set(sources[node]) | {node}
            return self.stage_message(node, UNMASK, {
                "active": sorted(holders & set(contributors)), "dropped": sorted(holders & set(dropped)),
            })  # fmt: skip

        seed_shares: dict[int, list[bytes]] = {}
        key_shares: dict[int, list[bytes]] = {}
        replies = self.exchange({n: reveal(n) for n in contributors}, "unmask")
        for node, values in replies.items():
            owners, shares = values.get("owners", []), values.get("shares", [])
            holders = set(sources[node]) | {node}
            if (
                not _list_of(owners, int)
                or not _list_of(shares, bytes)
                or (len(owners) != len(shares) or not set(owners) <= holders)
            ):
                self.reject(node, "unmask reply names sites it holds no shares of")
                continue
            for owner, share in zip(owners, shares):
                (seed_shares if owner in contributors else key_shares).setdefault(owner, []).append(share)
        self.record["unmasked-by"] = len(replies)
        masked_with = {d: [p for p in contributors if d in sources[p]] for d in dropped}
        unmasked = unmask(
            total, s, contributors, masked_with, {n: publics[n][0] for n in publics}, seed_shares, key_shares
        )
        self.record["error-bound"] = unmasked.error_bound
        self.record["total-weight"] = unmasked.total_ratio * s.max_weight
        for name, values in unmasked.mean.items():
            if not np.all(np.isfinite(values)):
                raise SecAggError(f"the unmasked mean of {name} is not finite")
        return unmasked.mean

    def with_enough_neighbours(self, live: set[int], graph: dict[int, set[int]], step: str) -> set[int]:
        """The live sites, less those with fewer than ``threshold`` live neighbours (themselves
        included), repeated until none is left short: their secrets could not be rebuilt."""
        while True:
            short = {n for n in live if len(graph[n] & live) < self.settings.threshold}
            if not short:
                return live
            for node in short:
                self.reject(
                    node, f"after {step}, fewer than secagg-threshold={self.settings.threshold} live neighbours"
                )
            live -= short

    def stage_message(
        self, node: int, stage: str, values: dict[str, Any], with_content: RecordDict | None = None
    ) -> Message:
        """A step's message to ``node``; ``with_content``: what else it carries (the strategy's train
        message), copied: the strategy's messages share one content (the model is encoded once)."""
        content = RecordDict(dict(with_content.items())) if with_content is not None else RecordDict()
        content[RECORD] = ConfigRecord({STAGE: stage, ROUND: self.server_round, **values})
        return Message(
            content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(self.server_round)
        )

    def exchange(self, messages: dict[int, Message], step: str) -> dict[int, dict[str, Any]]:
        """Send one step's messages; the SecAgg+ record of each good reply by node (failures recorded)."""
        out = {}
        for node, reply in self.exchange_messages(messages, step):
            record = reply.content.config_records.get(RECORD)
            if record is None:
                self.reject(node, f"{step} reply without its {RECORD!r} record")
                continue
            self.record["key-bytes-up"] += _content_bytes(RecordDict({RECORD: record}))
            out[node] = dict(record)
        return out

    def exchange_messages(self, messages: dict[int, Message], step: str) -> Iterator[tuple[int, Message]]:
        """Push ``messages`` and yield ``(node, reply)`` for each reply that is not an error."""
        self.bytes_down += sum(_content_bytes(m.content) for m in messages.values())
        sent = list(messages.values())
        for reply in replies_as_they_arrive(self.grid, sent, self.timeout, self.waiting):
            node = origin(reply, sent)
            if reply.has_error():
                reason = readable_reason(reply.error.code, reply.error.reason)
                self.report.failed.append({"node-id": node, "reason": f"{step}: {reason}"})
                logger.warning("round %d secagg %s: node %d failed: %s", self.server_round, step, node, reason)
                continue
            yield node, reply

    def masked_reply(self, node: int, reply: Message) -> tuple[ClientReply, dict[str, np.ndarray]] | None:
        record = reply.content.array_records.get(MASKED)
        if record is None or len(reply.content.array_records) != 1:
            self.reject(node, f"masked-update reply must hold only the {MASKED!r} ArrayRecord")
            return None
        # Its metrics as any reply's: one MetricRecord, num-examples > 0, every value finite.
        accepted, reason = ReplyScreen().parse(reply, with_arrays=False)
        if accepted is None:
            self.reject(node, reason)
            return None
        try:
            vector = arrays_to_numpy(record)
        except Exception as exc:  # nothing a site sends may crash the round
            self.reject(node, f"masked update could not be read: {exc}")
            return None
        reason = check_masked(vector, self.entries, self.settings.modulus_range)
        if reason:
            self.reject(node, reason)
            return None
        accepted.message = None  # the masked vector goes into the sum; nothing of the reply is kept
        accepted.payload_bytes = sum(v.nbytes for v in vector.values())
        return accepted, vector

    def reject(self, node: int, reason: str) -> None:
        self.report.rejected.append({"node-id": node, "reason": reason})
        logger.warning("round %d secagg: node %d left out: %s", self.server_round, node, reason)


def _list_of(values: Any, kind: type) -> bool:
    return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


def _content_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: tensors and config values (Flower's framing not counted)."""
    size = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                size += len(item) if isinstance(item, bytes | str) else 8
    return size
