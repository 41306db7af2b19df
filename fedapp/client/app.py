"""The Flower ClientApp: builds this node's ``VideoClient`` and reaches it through the bridge."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from datasets.clip_dataset import reported_files, scan_videos, warn_unreadable
from fedapp.client.bridge import EVALUATE, FIT, call_numpy_client
from fedapp.client.compression_mod import compression_mod
from fedapp.client.dp_mod import dp_clipping_mod
from fedapp.client.exchange import message_exchange
from fedapp.client.secagg_mod import secagg_mod
from fedapp.client.video_client import VideoClient
from fedapp.logs import route_app_logs_to_flower
from fedapp.task.config import AppConfig, ConfigError
from fedapp.task.data import load_video_index, node_partition, partition_key
from strategies.records import arrays_to_numpy, numpy_to_arrays

logger = logging.getLogger(__name__)
route_app_logs_to_flower()

# Probing every file costs a pass over the data: remember the result per partition (a simulation
# process serves many virtual clients, so the key must include the partition).
_SCAN_CACHE: dict[tuple, tuple[list, list, list]] = {}


def node_settings(node_config: Mapping[str, Any]) -> tuple[int, int, str | None]:
    """``(partition-id, num-partitions, data-dir)`` from a node config, validated.

    Simulation injects ``partition-id``/``num-partitions``; a SuperNode with its own videos passes
    ``data-dir`` (and then holds one partition of its own unless it also names a partition).
    """
    data_dir = node_config.get("data-dir")
    if data_dir is not None and not isinstance(data_dir, str):
        raise ConfigError(f"node config data-dir={data_dir!r} must be a string")
    default_parts = 1 if data_dir else None
    num_partitions = node_config.get("num-partitions", default_parts)
    partition_id = node_config.get("partition-id", 0 if default_parts else None)
    if num_partitions is None or partition_id is None:
        raise ConfigError("node config needs partition-id and num-partitions, or data-dir")
    for key, value in (("partition-id", partition_id), ("num-partitions", num_partitions)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"node config {key}={value!r} must be an integer")
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node config partition-id={partition_id}, num-partitions={num_partitions}: "
            "need 0 <= partition-id < num-partitions"
        )
    return partition_id, num_partitions, data_dir


def make_client(
    cfg: AppConfig,
    node_config: Mapping[str, Any],
    local_state: dict[str, np.ndarray] | None = None,
    run_id: int | None = None,
    client_class: Callable[..., VideoClient] = VideoClient,
) -> VideoClient:
    """The VideoClient for this node: its partition of the dataset, unreadable files set aside
    (warned about once per ``run_id`` and partition in this process). ``client_class`` builds it
    (a test tool's subclass in benchmarks)."""
    partition_id, num_partitions, data_dir = node_settings(node_config)
    index = load_video_index(cfg, data_dir)
    key = (*partition_key(cfg, index, num_partitions), partition_id)
    if key not in _SCAN_CACHE:
        train, test = node_partition(cfg, index, partition_id, num_partitions)
        usable_train, skipped_train = scan_videos(train, warn=False)
        usable_test, skipped_test = scan_videos(test, warn=False)
        _SCAN_CACHE[key] = (usable_train, usable_test, skipped_train + skipped_test)
    train, test, skipped = _SCAN_CACHE[key]
    # Warned here, not by the cached scan: once in every run, however many rounds this process serves.
    reported = reported_files(("run", run_id, partition_id))
    for path, reason in skipped:
        warn_unreadable(path, reason, reported)
    return client_class(
        cfg,
        index.classes,
        train,
        test,
        skipped,
        partition_id,
        local_state=local_state,
        node_weight=node_weight(node_config),
        run_id=run_id,
        num_partitions=num_partitions,
        own_data=data_dir is not None,
        state_dir=node_state_dir(node_config),
    )


def node_state_dir(node_config: Mapping[str, Any]) -> str | None:
    """The folder a SuperNode keeps its personal models in (``--node-config 'state-dir="..."'``)."""
    state_dir = node_config.get("state-dir")
    if state_dir is not None and (not isinstance(state_dir, str) or not state_dir):
        raise ConfigError(f"node config state-dir={state_dir!r} must be a folder name")
    return state_dir


def node_weight(node_config: Mapping[str, Any]) -> float | None:
    """The explicit aggregation weight a SuperNode declares (``--node-config "weight=2.0"``)."""
    weight = node_config.get("weight")
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise ConfigError(f"node config weight={weight!r} must be a number >= 0")
    return float(weight)


# Node-local state kept between rounds in Flower's context.state (FedBN's BatchNorm layers).
LOCAL_STATE_KEY = "local-state"


MakeClient = Callable[..., VideoClient]


def handle(context: Context, msg: Message, phase: str, make: MakeClient | None = None) -> Message:
    """Build this node's client, run one phase through the bridge, keep node-local state."""
    with message_exchange(msg) as exchange:
        cfg = exchange.config(context.run_config)  # parsed once per message, for the mods too
        stored = context.state.array_records.get(LOCAL_STATE_KEY)
        local_state = arrays_to_numpy(stored) if stored is not None else {}
        client = (make or make_client)(cfg, context.node_config, local_state, context.run_id)
        reply = call_numpy_client(client, msg, phase)
        if client.local_state:
            context.state[LOCAL_STATE_KEY] = numpy_to_arrays(client.local_state)
        return reply


def build_client_app(make: MakeClient | None = None) -> ClientApp:
    """The ClientApp whose clients ``make`` builds (None: ``make_client``, looked up at each call;
    a test tool's in benchmarks)."""
    # dp_clipping_mod acts only when the server's client-side DP wrapper sends a clipping norm.
    # compression_mod comes before it: it encodes the final, already clipped update. secagg_mod is
    # outermost: it answers SecAgg+'s steps and masks the update as it leaves (secagg refuses the
    # other two at start, so they never meet).
    client_app = ClientApp(mods=[secagg_mod, compression_mod, dp_clipping_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Local training on this node's videos."""
        return handle(context, msg, FIT, make)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Local evaluation on this node's test videos."""
        return handle(context, msg, EVALUATE, make)

    return client_app


app = build_client_app()
