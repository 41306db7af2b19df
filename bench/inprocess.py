"""An in-process federation for benchmarks: the real ServerApp round loop, strategies and
ClientApp handlers, with Flower's transport replaced by direct calls.

``InProcessGrid`` stands in for ``flwr.serverapp.Grid`` (the round loop uses ``get_node_ids``,
``push_messages`` and ``pull_messages``): each message goes to the ClientApp itself (its mods
included, run when its reply is pulled, so replies arrive one at a time as the server asks) with
a per-node ``Context`` whose ``state`` persists across rounds, as in Flower's engines. A client
that raises becomes an error reply, as in Flower. What is skipped: serialization over the wire, process
spawning and Ray; ~40 s of fixed start-up per run that benchmarks with many runs cannot afford.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedapp.client.app import app as client_app
from fedapp.server.app import run_federation
from fedapp.server.results import RunResults, WriterLock
from fedapp.task.config import parse_config


class InProcessGrid:
    """Delivers messages to ClientApp handlers in this process, one simulated node per partition."""

    def __init__(self, run_config: Mapping[str, Any], num_nodes: int) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": node_id - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id in range(1, num_nodes + 1)
        }
        self._queued: dict[str, Message] = {}
        self._pushed = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self._pushed += 1
            msg.metadata.__dict__["_message_id"] = f"inprocess-{self._pushed}"  # as Flower's grid sets it
            self._queued[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for message_id in message_ids:
            msg = self._queued.pop(message_id, None)
            if msg is None:
                continue
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                replies.append(client_app(msg, context))
            except Exception as exc:  # a client that raises fails only its own reply, as in Flower
                reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
                replies.append(Message(Error(code=2, reason=reason), reply_to=msg))
        return replies


def run_inprocess(run_config: Mapping[str, Any], num_nodes: int, run_dir: str | Path) -> RunResults:
    """One fresh federated run with the real server loop; returns its results (``rounds`` in memory)."""
    cfg = parse_config(run_config)
    with WriterLock(run_dir):
        results = RunResults(run_dir)
        summary = run_federation(InProcessGrid(run_config, num_nodes), cfg, results, checkpoint=None)
        results.write_summary({"status": "completed", **summary})
    return results


def comparison_config(rounds: int, clients: int, cache_dir: str = "") -> dict[str, Any]:
    """Run config of a learning comparison: every client trains every round, and the central test
    accuracy is the measure (client evaluation only costs time; no TensorBoard files)."""
    return {
        "num-server-rounds": rounds,
        "fraction-evaluate": 0.0,
        "min-train-nodes": clients,
        "min-available-nodes": clients,
        "torch-threads": 2,
        "cache-dir": cache_dir,
        "tensorboard": False,
    }
