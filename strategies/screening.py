"""Reply screening: every reply is checked before any rule sees it, and a bad one is dropped with
its node id and reason where Flower's own strategies would raise and end the run.

A train reply must carry one MetricRecord and one ArrayRecord (plus SCAFFOLD's Δcᵢ when on) whose
tensors match the global model by name, shape and dtype, are finite, and differ from the model
sent (an unchanged model is a free rider); its ``num-examples`` must be a number > 0."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from strategies.compression import decompress, payload_bytes
from strategies.records import arrays_to_numpy
from strategies.replies import NO_TEST_VIDEOS, ClientReply, RoundReport, is_scalar
from strategies.scaffold import CONTROL_DELTA
from strategies.validation import check_tensors, check_update, is_unchanged, reference_spec

logger = logging.getLogger(__name__)
Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Flower's error text: "<class 'pkg.SomeError'>:<'message'>" (the SuperNode's, and the simulation's
# around a Ray traceback whose last exception line is the client's own).
FLOWER_REASON = re.compile(r"^<class '([\w.]+)'>:<'(.*)'>$", re.DOTALL)
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure)\w*)(?::\s*(.*))?$")
WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")
REASON_CHARS = 300


def readable_reason(code: int, text: str) -> str:
    """A failed reply's reason as one readable line: ``error code 2: NoUsableVideoError: partition
    3: no usable training video``: colour codes removed, the innermost exception of a traceback
    kept, cut to 300 characters."""
    text = ANSI_ESCAPE.sub("", text or "").strip()
    match = FLOWER_REASON.match(text)
    name, message = (match.group(1), match.group(2).strip()) if match else ("", text)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    found = [m for line in lines if (m := EXCEPTION_LINE.match(line)) and not m.group(1).endswith(WRAPPERS)]
    if found:  # a traceback: its last exception line is what the client raised
        name, message = found[-1].group(1), (found[-1].group(2) or "").strip()
    elif lines:
        message = lines[-1] if name.endswith(WRAPPERS) or len(lines) > 1 else lines[0]
    name = name.rsplit(".", 1)[-1]
    line = f"{name}: {message}" if name and message else name or message
    line = f"error code {code}: {line}" if line else f"error code {code}"
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3] + "..."


def without_test_videos(msg: Message) -> int | None:
    """The partition id of an evaluate reply that says its site holds no test video (num-examples
    0 and the no-test-videos mark; -1 when it names none), else None."""
    if msg.has_error() or len(msg.content.metric_records) != 1:
        return None
    metrics = dict(next(iter(msg.content.metric_records.values())))
    if metrics.get(NO_TEST_VIDEOS) != 1 or metrics.get("num-examples") != 0:
        return None
    site = metrics.get("partition-id", -1)
    return int(site) if is_scalar(site) else -1


def origin(reply: Message, sent: Iterable[Message]) -> int:
    """The node a reply is about. An error the SuperLink writes for a node that vanished comes
    *from* the SuperLink, so look up where the message it answers was sent (the grid sets the
    sent messages' ids when it pushes them)."""
    wanted = reply.metadata.reply_to_message_id
    if reply.has_error() and wanted:
        for message in sent:
            if message.metadata.message_id == wanted:
                return int(message.metadata.dst_node_id)
    return int(reply.metadata.src_node_id)


class ReplyScreen:
    """Sorts a phase's replies into accepted, rejected (malformed) and failed (errors).

    ``current`` is the global model replies are checked against; ``sent`` the messages of the
    phase (to name the node behind an error the SuperLink wrote); ``control_spec`` gives the
    reference of SCAFFOLD's Δcᵢ (None: SCAFFOLD off, no such record expected)."""

    def __init__(self) -> None:
        self.current: dict[str, np.ndarray] = {}
        self.reference: Spec = {}
        self.sent: list[Message] = []
        self.control_spec: Callable[[], Spec] | None = None

    def set_global(self, arrays: dict[str, np.ndarray]) -> None:
        self.current = arrays
        self.reference = reference_spec(arrays)

    def origin(self, reply: Message) -> int:
        return origin(reply, self.sent)

    def screen(
        self,
        server_round: int,
        replies: Iterable[Message],
        with_arrays: bool,
        fold: Callable[[ClientReply], None] | None = None,
    ) -> RoundReport:
        """The phase's report; ``fold`` (streaming) takes each accepted reply as soon as it is
        screened, before the next one is read; one it cannot take is rejected with its reason."""
        report = RoundReport()
        phase = "train" if with_arrays else "evaluate"
        for msg in replies:
            if fold is not None:
                # Flower's messages hold reference cycles, so a folded reply is freed only by the
                # cyclic collector; a young-generation pass (microseconds) frees the previous one
                # now. Without it 40 replies of 1 MiB peaked at 25 MB, with it 7.7 MB (tested).
                gc.collect(1)
            node_id = self.origin(msg)
            if msg.has_error():
                reason = readable_reason(msg.error.code, msg.error.reason)
                report.failed.append({"node-id": node_id, "reason": reason})
                logger.warning("round %d %s: node %d failed: %s", server_round, phase, node_id, reason)
                # The whole text (a Ray traceback in simulation) for whoever debugs; the SuperLink's
                # or the SuperNode's own log holds the traceback too.
                logger.debug("node %d's error, in full: %s", node_id, msg.error.reason)
                continue
            if not with_arrays and (site := without_test_videos(msg)) is not None:
                report.not_evaluated.append({"node-id": node_id, "partition-id": site})
                logger.info("round %d evaluate: node %d (partition %s) has no test video", server_round, node_id, site)
                continue
            reply, reason = self.parse(msg, with_arrays)
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

    def parse(self, msg: Message, with_arrays: bool) -> tuple[ClientReply | None, str]:
        """``(reply, "")`` for a reply that passes, ``(None, reason)`` for one that does not."""
        metric_records = list(msg.content.metric_records.values())
        if len(metric_records) != 1:
            return None, f"expected one MetricRecord, got {len(metric_records)}"
        metrics = dict(metric_records[0])
        reply = ClientReply(int(msg.metadata.src_node_id), metrics, message=msg)
        if with_arrays:
            reason = self.parse_arrays(msg, reply)
        else:
            n = metrics.get("num-examples")
            ok = is_scalar(n) and np.isfinite(n) and n > 0
            reason = None if ok else f"num-examples is {n!r}, must be a number > 0"
        if reason is None:
            bad = [k for k, v in metrics.items() if is_scalar(v) and not np.isfinite(v)]
            reason = f"non-finite metrics {bad}" if bad else None
        return (None, reason) if reason is not None else (reply, "")

    def parse_arrays(self, msg: Message, reply: ClientReply) -> str | None:
        """Fill ``reply``'s model (and Δcᵢ) from ``msg``; the reason it is unusable, or None."""
        records = dict(msg.content.array_records)
        if self.control_spec is not None:
            reply.control_delta, reason = self.parse_control_delta(records.pop(CONTROL_DELTA, None))
            if reply.control_delta is None:
                return reason
        array_records = list(records.values())
        if len(array_records) != 1:
            return f"expected one ArrayRecord, got {len(array_records)}"
        try:
            payload = arrays_to_numpy(array_records[0])
        except Exception as exc:  # a reply we cannot even deserialize is just another bad reply
            return f"arrays could not be read: {exc}"
        reply.payload_bytes = payload_bytes(payload) + (
            payload_bytes(reply.control_delta) if reply.control_delta else 0
        )
        try:  # a compressed update (run config `compression`) becomes full tensors; plain ones pass
            reply.arrays = decompress(payload, self.current)
        except Exception as exc:  # malformed parts raise ValueError; nothing a client sends may crash us
            return f"compressed update could not be decoded: {exc}"
        reason = check_update(reply.arrays, reply.metrics.get("num-examples"), self.reference)
        if reason is None and is_unchanged(reply.arrays, self.current):
            reason = "update identical to the global model: nothing trained (free rider)"
        return reason

    def parse_control_delta(self, record: ArrayRecord | None) -> tuple[dict[str, Any] | None, str]:
        """A SCAFFOLD reply's Δcᵢ, checked against the control variate like a model against the global one."""
        if record is None:
            return None, f"SCAFFOLD is on but the reply carries no {CONTROL_DELTA!r} record"
        try:
            delta = arrays_to_numpy(record)
        except Exception as exc:
            return None, f"{CONTROL_DELTA} could not be read: {exc}"
        assert self.control_spec is not None
        reason = check_tensors(delta, self.control_spec())
        return (None, f"{CONTROL_DELTA}: {reason}") if reason else (delta, "")
