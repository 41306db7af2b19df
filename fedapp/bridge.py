"""The one bridge between Flower's Message API and a ``NumPyClient``.

A Message-API server sends ``{"arrays": ArrayRecord, "config": ConfigRecord}``; a NumPyClient speaks
``fit(ndarrays, config)`` / ``evaluate(ndarrays, config)``. This module translates both ways, keeping
the tensor names of the incoming ArrayRecord so the server can rebuild a state_dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.client import NumPyClient

from strategies.records import numpy_to_arrays

FIT = "fit"
EVALUATE = "evaluate"


def call_numpy_client(client: NumPyClient, msg: Message, phase: str) -> Message:
    """Run ``client.fit`` or ``client.evaluate`` on a Message and wrap the result as the reply."""
    record = msg.content["arrays"]
    names = list(record.keys())
    ndarrays = [array.numpy() for array in record.values()]
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    if phase == FIT:
        new_arrays, num_examples, metrics = client.fit(ndarrays, config)
        if len(new_arrays) != len(names):
            raise ValueError(f"client returned {len(new_arrays)} arrays for {len(names)} tensors")
        content = RecordDict(
            {
                "arrays": numpy_to_arrays(dict(zip(names, new_arrays))),
                "metrics": to_metric_record(metrics, num_examples),
            }
        )
    elif phase == EVALUATE:
        loss, num_examples, metrics = client.evaluate(ndarrays, config)
        content = RecordDict({"metrics": to_metric_record({**metrics, "loss": loss}, num_examples)})
    else:
        raise ValueError(f"phase={phase!r}: expected {FIT!r} or {EVALUATE!r}")
    return Message(content=content, reply_to=msg)


def to_metric_record(metrics: Mapping[str, Any], num_examples: int) -> MetricRecord:
    """Metrics as a MetricRecord (numbers or lists of numbers) plus ``num-examples``."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, list | tuple | np.ndarray):
            values = [v.item() if isinstance(v, np.generic) else v for v in value]
            out[key] = [float(v) for v in values] if any(isinstance(v, float) for v in values) else [int(v) for v in values]
        elif isinstance(value, bool | np.bool_):
            out[key] = int(value)
        elif isinstance(value, int | float | np.number):
            out[key] = value.item() if isinstance(value, np.generic) else value
        else:
            raise TypeError(f"metric {key!r}={value!r} is not a number or a list of numbers")
    out["num-examples"] = int(num_examples)
    return MetricRecord(out)
