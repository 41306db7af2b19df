"""Helpers that build Flower Messages outside a running Flower process (tests only)."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from strategies.records import numpy_to_arrays


def ensure_identity() -> None:
    # Messages read the current run/task identity, which Flower sets inside its own processes.
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


def instruction(node_id: int, arrays: dict[str, np.ndarray], message_type: str = "train") -> Message:
    ensure_identity()
    content = RecordDict({"arrays": numpy_to_arrays(arrays), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=node_id, message_type=message_type)


def reply(node_id: int, arrays: dict[str, np.ndarray] | None, metrics: dict) -> Message:
    content = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        content["arrays"] = numpy_to_arrays(arrays)
    return Message(content=RecordDict(content), reply_to=instruction(node_id, {}))


def error_reply(node_id: int, reason: str, code: int = 2) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=instruction(node_id, {}))
