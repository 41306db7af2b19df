"""An in-process federation for benchmarks: the real ServerApp round loop, strategies and
ClientApp handlers, with Flower's transport replaced by direct calls.

``InProcessGrid`` stands in for ``flwr.serverapp.Grid`` (the round loop uses ``get_node_ids``,
``push_messages`` and ``pull_messages``): each message goes to the ClientApp itself (its mods
included, run when its reply is pulled, so replies arrive one at a time as the server asks) with
a per-node ``Context`` whose ``state`` persists across rounds, as in Flower's engines. A client
that raises becomes an error reply, as in Flower. With ``wire=True`` every message and reply crosses
Flower's own wire encoding (each nested object deflated to bytes and inflated back, as Flower's grid
pushes and pulls them), so what a strategy or client puts in a message must survive it. What is
skipped: the transport itself, process spawning and Ray; ~40 s of fixed start-up per run that
benchmarks with many runs, and tests of every strategy, cannot afford.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from bench.attacks import split_attack
from fedapp.client.app import app as client_app
from fedapp.server.app import run_federation
from fedapp.server.results import RunResults, WriterLock
from fedapp.task.config import parse_config


def over_the_wire(msg: Message) -> Message:
    """``msg`` as the other end receives it: every nested object (the message, its records, arrays
    and chunks) deflated to bytes and inflated back, as Flower's grid sends and receives them."""
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(msg).items()}
    received = inflate_object_from_contents(msg.object_id, contents)
    assert isinstance(received, Message)
    received.metadata.__dict__["_message_id"] = msg.metadata.message_id  # not part of the encoding
    return received


# Every grid is a run of its own, as in Flower: what a client keeps per run (warn-once scopes) must
# not carry over from one in-process run to the next in the same process.
_RUN_IDS = itertools.count(1)


class InProcessGrid:
    """Delivers messages to ClientApp handlers in this process, one simulated node per partition;
    with ``wire`` through Flower's wire encoding each way (:func:`over_the_wire`)."""

    def __init__(
        self, run_config: Mapping[str, Any], num_nodes: int, wire: bool = False, app: ClientApp | None = None
    ) -> None:
        self.wire = wire
        self.app = app  # None: the app's own ClientApp
        self.run_id = next(_RUN_IDS)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, 0, 1
        self.contexts = {
            node_id: Context(
                run_id=self.run_id,
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
            received = over_the_wire(msg) if self.wire else msg
            try:
                reply = (self.app or client_app)(received, context)
            except Exception as exc:  # a client that raises fails only its own reply, as in Flower
                reason = str(type(exc)) + ":<'" + str(exc) + "'>"  # Flower's own format (flower-supernode)
                reply = Message(Error(code=2, reason=reason), reply_to=received)
            replies.append(over_the_wire(reply) if self.wire else reply)
        return replies


def run_inprocess(config: Mapping[str, Any], num_nodes: int, run_dir: str | Path, wire: bool = False) -> RunResults:
    """One fresh federated run with the real server loop; returns its results (``rounds`` in memory).
    ``wire``: every message through Flower's wire encoding (see :class:`InProcessGrid`). ``config``
    is the run config, plus the attack test tool's keys where a run simulates attackers
    (``bench/attacks.py``: they never reach the app's config)."""
    attack, run_config = split_attack(config)
    # The sites find the run folder as launched sites do: results-dir plus the name the server sends.
    run_config = {**run_config, "results-dir": str(Path(run_dir).resolve().parent)}
    cfg = parse_config(run_config)
    app, stages = None, []
    if attack is not None:
        attack.check(num_nodes, cfg)
        app, stages = attack.client_app(), attack.server_stages()
    with WriterLock(run_dir):
        results = RunResults(run_dir)
        grid = InProcessGrid(run_config, num_nodes, wire, app)
        summary = run_federation(grid, cfg, results, checkpoint=None, extra_transforms=stages)
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
