"""Client side of differential privacy: Flower's ``fixedclipping_mod``, kept to the tensors it can clip.

With ``dp = "client-side"`` the server's DP wrapper puts the clipping norm into every training
message and this node clips its own update before it leaves. Flower's mod would scale integer
tensors too (BatchNorm's ``num_batches_tracked``), which raises; so the mod sees only the
floating-point tensors, while the app in between still receives and returns the whole model
(see ``strategies.privacy``).
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # the key the server wrapper sends

from strategies.privacy import split_private, update_norm
from strategies.records import arrays_to_numpy, numpy_to_arrays

ARRAYS = "arrays"


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this node's update with Flower's ``fixedclipping_mod`` when the server asks for it."""
    configs = list(msg.content.config_records.values())
    wanted = msg.metadata.message_type == MessageType.TRAIN and any(KEY_CLIPPING_NORM in c for c in configs)
    if not wanted or ARRAYS not in msg.content.array_records:
        return call_next(msg, context)

    whole = msg.content[ARRAYS]
    reply = call_next(msg, context)  # the app trains on the whole model, counters included
    if reply.has_error() or ARRAYS not in reply.content.array_records:
        return reply
    sent, _ = split_private(arrays_to_numpy(whole))
    returned = arrays_to_numpy(reply.content[ARRAYS])
    private, counters = split_private(returned)
    if update_norm(private, sent) == 0:
        return reply  # nothing to clip, and Flower's clipping divides by the norm

    reply.content[ARRAYS] = numpy_to_arrays(private)
    msg.content[ARRAYS] = numpy_to_arrays(sent)
    try:
        out = fixedclipping_mod(msg, context, lambda _msg, _ctx: reply)
    finally:
        msg.content[ARRAYS] = whole  # the incoming message is left as it came
    if out.has_error():
        return out
    clipped = arrays_to_numpy(out.content[ARRAYS])
    out.content[ARRAYS] = numpy_to_arrays({k: clipped[k] if k in clipped else counters[k] for k in returned})
    return out
