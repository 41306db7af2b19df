"""The one bridge between Flower's Message API and a ``NumPyClient``.

A Message-API server sends ``{"arrays": ArrayRecord, "config": ConfigRecord}``; a NumPyClient speaks
``fit(ndarrays, config)`` / ``evaluate(ndarrays, config)``, a positional list. Tensors travel by
name: the client declares the names its list stands for (``state_keys``), the bridge orders the
incoming ArrayRecord by those names (refusing a missing or unexpected one) and names the returned
list the same way. The order of the ArrayRecord itself never matters (a checkpoint read back from
safetensors, for one, comes in name order, not state_dict order).

The model is read from and the reply's model handed over through the message's exchange
(``fedapp.client.exchange``): decoded once for every layer, encoded once when the reply leaves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.client import NumPyClient

from fedapp.client.exchange import ARRAYS, message_exchange
from strategies.records import NamedArrays

FIT = "fit"
EVALUATE = "evaluate"


class NamedNumPyClient(NumPyClient):
    """A NumPyClient that names the tensors of its ``fit`` / ``evaluate`` parameter lists.

    Named records beside the model travel too: before ``fit`` the bridge puts every other
    ArrayRecord of the message in ``received_records`` (by record key, as numpy), and after it adds
    what ``fit`` left in ``reply_records`` to the reply (SCAFFOLD's control variates use both).
    """

    received_records: dict[str, dict[str, np.ndarray]]
    reply_records: dict[str, dict[str, np.ndarray]]

    def state_keys(self) -> list[str]:
        """The tensor names, in the order of the lists ``fit`` and ``evaluate`` take and return."""
        raise NotImplementedError


def ordered_arrays(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> list[np.ndarray]:
    """``arrays`` as a list in the order of ``keys``; refuses a missing or an unexpected name."""
    missing = [k for k in keys if k not in arrays]
    unexpected = [k for k in arrays if k not in set(keys)]
    if missing or unexpected:
        raise ValueError(
            f"the received model does not match this client's: missing tensors {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    return [arrays[k] for k in keys]


def call_numpy_client(client: NamedNumPyClient, msg: Message, phase: str) -> Message:
    """Run ``client.fit`` or ``client.evaluate`` on a Message and wrap the result as the reply."""
    names = client.state_keys()
    with message_exchange(msg) as exchange:
        ndarrays = ordered_arrays(exchange.received(ARRAYS).numpy(), names)
        config = dict(msg.content["config"]) if "config" in msg.content else {}
        if phase == FIT:
            client.received_records = {
                key: exchange.received(key).numpy() for key in msg.content.array_records if key != ARRAYS
            }
            client.reply_records = {}
            new_arrays, num_examples, metrics = client.fit(ndarrays, config)
            if len(new_arrays) != len(names):
                raise ValueError(f"client returned {len(new_arrays)} arrays for {len(names)} tensors")
            reply = Message(content=RecordDict({"metrics": to_metric_record(metrics, num_examples)}), reply_to=msg)
            # Pending until the reply leaves the outermost layer: a mod may still replace it.
            exchange.set_reply_arrays(reply, ARRAYS, NamedArrays(numpy=dict(zip(names, new_arrays))))
            for key, arrays in client.reply_records.items():
                exchange.set_reply_arrays(reply, key, NamedArrays(numpy=arrays))
        elif phase == EVALUATE:
            loss, num_examples, metrics = client.evaluate(ndarrays, config)
            content = RecordDict({"metrics": to_metric_record({**metrics, "loss": loss}, num_examples)})
            reply = Message(content=content, reply_to=msg)
        else:
            raise ValueError(f"phase={phase!r}: expected {FIT!r} or {EVALUATE!r}")
        return reply


def to_metric_record(metrics: Mapping[str, Any], num_examples: int) -> MetricRecord:
    """Metrics as a MetricRecord (numbers or lists of numbers) plus ``num-examples``."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, list | tuple | np.ndarray):
            values = [v.item() if isinstance(v, np.generic) else v for v in value]
            out[key] = (
                [float(v) for v in values] if any(isinstance(v, float) for v in values) else [int(v) for v in values]
            )
        elif isinstance(value, bool | np.bool_):
            out[key] = int(value)
        elif isinstance(value, int | float | np.number):
            out[key] = value.item() if isinstance(value, np.generic) else value
        else:
            raise TypeError(f"metric {key!r}={value!r} is not a number or a list of numbers")
    out["num-examples"] = int(num_examples)
    return MetricRecord(out)
