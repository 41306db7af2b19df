"""Client side of differential privacy: Flower's ``fixedclipping_mod``, kept to the tensors it can clip.

With ``dp = "client-side"`` the server's DP wrapper puts the clipping norm into every training
message and this node clips its own update before it leaves. Flower's mod would scale integer
tensors too (BatchNorm's ``num_batches_tracked``), which raises; so the mod sees only the
floating-point tensors, while the app in between still receives and returns the whole model
(see ``strategies.privacy``).

The models come from the message's exchange (``fedapp.client.exchange``), converted once for all
layers; Flower's mod works on ArrayRecords, so the floating-point part of the reply is encoded for
it (the sent model's Arrays are reused as they came) and its clipped Arrays become the reply's.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,  # the key the server wrapper sends
)

from fedapp.client.exchange import ARRAYS, message_exchange
from strategies.privacy_budget import split_private, update_norm
from strategies.records import NamedArrays


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this node's update with Flower's ``fixedclipping_mod`` when the server asks for it."""
    configs = list(msg.content.config_records.values())
    wanted = msg.metadata.message_type == MessageType.TRAIN and any(KEY_CLIPPING_NORM in c for c in configs)
    if not wanted or ARRAYS not in msg.content.array_records:
        return call_next(msg, context)

    with message_exchange(msg) as exchange:
        sent = exchange.received(ARRAYS)
        reply = call_next(msg, context)  # the app trains on the whole model, counters included
        if reply.has_error():
            return reply
        returned = exchange.reply_arrays(reply).get(ARRAYS)
        if returned is None:
            return reply
        private, _ = split_private(returned.numpy())
        sent_private, _ = split_private(sent.numpy())
        # Flower's mod wants the two key lists equal, order included: the sent floats in the reply's
        # order (a record read back from a checkpoint comes in name order); other names it refuses.
        order = list(private) if set(sent_private) == set(private) else list(sent_private)
        if update_norm(private, sent.select(order).numpy()) == 0:
            return reply  # nothing to clip, and Flower's clipping divides by the norm

        whole = msg.content[ARRAYS]
        msg.content[ARRAYS] = sent.select(order).record()  # the Arrays the server sent: no encoding
        reply.content[ARRAYS] = returned.select(private).record()
        try:
            out = fixedclipping_mod(msg, context, lambda _msg, _ctx: reply)
        finally:
            msg.content[ARRAYS] = whole  # the incoming message is left as it came
        if out.has_error():
            return out
        # The whole model in the reply's order: Flower's clipped floats, the integer counters as they were.
        exchange.set_reply_arrays(out, ARRAYS, returned.updated(NamedArrays(out.content[ARRAYS])))
        return out
