"""Client side of update compression: a Flower mod that encodes the train reply before it leaves.

Registered first in the ClientApp's mods, so it is the outermost layer and encodes the final update
(after any clipping by the mods inside it). The top-k residual (error feedback) lives in the node's
``context.state`` next to, and separate from, FedBN's ``local-state``. See ``strategies.compression``
for the payload format; the server decodes it in ``VideoFedAvg`` before checking the update.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedapp.task.config import parse_config
from strategies.compression import compress, payload_bytes
from strategies.records import arrays_to_numpy, numpy_to_arrays

logger = logging.getLogger(__name__)

# Node state key of the top-k residual: what earlier rounds computed but did not send.
RESIDUAL_KEY = "compression-residual"


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Compress a train reply's model against the model the server sent (run config ``compression``)."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    cfg = parse_config(context.run_config, check_paths=False)
    sent = list(msg.content.array_records.values())
    # Read before call_next: inner mods may swap the message's arrays while they run.
    reference = arrays_to_numpy(sent[0]) if cfg.compression != "none" and len(sent) == 1 else None
    reply = call_next(msg, context)
    if reference is None or reply.has_error():
        return reply
    records = list(reply.content.array_records.items())
    if len(records) != 1:
        raise ValueError(f"compression_mod: the train reply has {len(records)} ArrayRecords, expected 1")
    key, record = records[0]
    update = arrays_to_numpy(record)
    stored = context.state.array_records.get(RESIDUAL_KEY)
    residual = arrays_to_numpy(stored) if stored is not None else None
    payload, residual = compress(update, reference, cfg.compression, cfg.topk_fraction, residual)
    reply.content[key] = numpy_to_arrays(payload)
    if residual:
        context.state[RESIDUAL_KEY] = numpy_to_arrays(residual)
    elif stored is not None:
        del context.state[RESIDUAL_KEY]
    logger.info(
        "compression %s: update of %d bytes sent as %d bytes",
        cfg.compression, payload_bytes(update), payload_bytes(payload),
    )
    return reply
