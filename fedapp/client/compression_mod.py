"""Client side of update compression: a Flower mod that encodes the train reply before it leaves.

Registered first in the ClientApp's mods, so it is the outermost layer and encodes the final update
(after any clipping by the mods inside it). The top-k residual (error feedback) lives in the node's
``context.state`` next to, and separate from, FedBN's ``local-state``. The encoder is
``fedapp.client.compression``; the server decodes the payload (``strategies.compression``) in
``VideoStrategy`` before checking the update. The sent model, the update and the run config come from
the message's exchange (``fedapp.client.exchange``), so nothing here converts or parses them again.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedapp.client.compression import compress
from fedapp.client.exchange import message_exchange
from strategies.compression import payload_bytes
from strategies.records import NamedArrays, arrays_to_numpy, numpy_to_arrays

logger = logging.getLogger(__name__)

# Node state key of the top-k residual: what earlier rounds computed but did not send.
RESIDUAL_KEY = "compression-residual"


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Compress a train reply's model against the model the server sent (run config ``compression``)."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    with message_exchange(msg) as exchange:
        cfg = exchange.config(context.run_config)
        sent = list(msg.content.array_records)
        # Taken before call_next (inner mods may swap the message's arrays while they run); decoded
        # only when used, and then once for every layer.
        reference = exchange.received(sent[0]) if cfg.compression != "none" and len(sent) == 1 else None
        reply = call_next(msg, context)
        if reference is None or reply.has_error():
            return reply
        models = list(exchange.reply_arrays(reply).items())
        if len(models) != 1:
            raise ValueError(f"compression_mod: the train reply has {len(models)} ArrayRecords, expected 1")
        key, update = models[0]
        stored = context.state.array_records.get(RESIDUAL_KEY)
        residual = arrays_to_numpy(stored) if stored is not None else None
        payload, residual = compress(update.numpy(), reference.numpy(), cfg.compression, cfg.topk_fraction, residual)
        exchange.set_reply_arrays(reply, key, NamedArrays(numpy=payload))  # encoded as the reply leaves
        if residual:
            context.state[RESIDUAL_KEY] = numpy_to_arrays(residual)
        elif stored is not None:
            del context.state[RESIDUAL_KEY]
        logger.info(
            "compression %s: update of %d bytes sent as %d bytes",
            cfg.compression,
            payload_bytes(update.numpy()),
            payload_bytes(payload),
        )
        return reply
