"""Site side of secure aggregation (``secagg = true``): a Flower mod that answers SecAgg+'s four steps.

Registered first (outermost) in the ClientApp's mods. Setup, share-keys and unmask messages are
answered here without reaching the app; the masked-update message goes through the app as a
normal train message (the bridge, the NumPyClient), and its reply leaves with the update
(``trained − received``, floating-point tensors, by name) weighted, quantized and masked in place
of the model. The round's secrets stay in this node's ``context.state`` between the steps and are
dropped after unmask. The protocol itself is ``strategies.secure_aggregation``; the server's side
``fedapp.server.secure_round``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedapp.client.exchange import ARRAYS, message_exchange
from strategies.records import NamedArrays
from strategies.secure_aggregation import (
    MASKED,
    MASKED_UPDATE,
    RECORD,
    ROUND,
    SETUP,
    SHARE_KEYS,
    STAGE,
    UNMASK,
    WEIGHT_METRIC,
    SecAggError,
    Settings,
    SiteSecrets,
    secured_names,
    site_mask,
    site_receive_shares,
    site_reveal,
    site_setup,
    site_share_keys,
)

logger = logging.getLogger(__name__)

STATE = "secagg-state"  # node state: this round's SiteSecrets and where the protocol stands
NEXT = {SETUP: SHARE_KEYS, SHARE_KEYS: MASKED_UPDATE, MASKED_UPDATE: UNMASK}


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer a SecAgg+ step; any other message passes through untouched."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or RECORD not in msg.content.config_records:
        return call_next(msg, context)
    values = dict(msg.content.config_records[RECORD])
    stage, server_round = values.pop(STAGE, None), int(values.pop(ROUND, -1))
    if stage == SETUP:
        site = site_setup(int(msg.metadata.dst_node_id), Settings.from_config(values))
        _save(context, site, SETUP, str(values.get(WEIGHT_METRIC, "")), server_round)
        return _reply(msg, {"mask-key": site.mask_public, "share-key": site.share_public})
    site, weight_metric = _load(context, stage, server_round)
    if stage == SHARE_KEYS:
        nodes = list(values["nodes"])
        public_keys = dict(zip(nodes, zip(values["mask-keys"], values["share-keys"])))
        ciphertexts = site_share_keys(site, public_keys)
        _save(context, site, stage, weight_metric, server_round)
        return _reply(msg, {"destinations": list(ciphertexts), "ciphertexts": list(ciphertexts.values())})
    if stage == MASKED_UPDATE:
        site_receive_shares(site, dict(zip(values["sources"], values["ciphertexts"])))
        del msg.content.config_records[RECORD]  # the app below sees a plain train message
        reply = _masked_update(msg, context, call_next, site, weight_metric, server_round)
        _save(context, site, stage, weight_metric, server_round)
        return reply
    if stage == UNMASK:
        shares = site_reveal(site, list(values["active"]), list(values["dropped"]))
        del context.state.config_records[STATE]  # the round is over: its secrets go
        return _reply(msg, {"owners": list(shares), "shares": list(shares.values())})
    raise SecAggError(f"unknown SecAgg+ step {stage!r}")


def _masked_update(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    site: SiteSecrets,
    weight_metric: str,
    server_round: int,
) -> Message:
    with message_exchange(msg) as exchange:
        received = exchange.received(ARRAYS).numpy()
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        models = exchange.reply_arrays(reply)
        if list(models) != [ARRAYS]:
            raise SecAggError(f"the train reply holds the records {list(models)}, expected only {ARRAYS!r}")
        trained = models[ARRAYS].numpy()
        names = secured_names(received)
        if sorted(set(names) - set(trained)):
            raise SecAggError(f"the trained model lacks {sorted(set(names) - set(trained))[:3]}")
        metrics = dict(next(iter(reply.content.metric_records.values())))
        weight = float(metrics[weight_metric]) if weight_metric else 1.0
        update = {name: trained[name].astype(np.float64) - received[name] for name in names}
        cfg = exchange.config(context.run_config)
        with _seeded(cfg.seed, server_round, metrics.get("partition-id"), cfg.deterministic):
            masked = site_mask(site, update, weight)
        exchange.remove_reply_arrays(reply, ARRAYS)
        exchange.set_reply_arrays(reply, MASKED, NamedArrays(numpy=masked))
        logger.info("secagg: update of %d tensors sent masked (weight %g)", len(names), weight)
        return reply


@contextmanager
def _seeded(seed: int, server_round: int, site: Any, deterministic: bool) -> Iterator[None]:
    """Under ``deterministic``, the quantizer's stochastic rounding (NumPy's global generator, in
    Flower's ``quantize``) follows the seed, the round and the site; the generator is restored after."""
    if not deterministic:
        yield
        return
    state = np.random.get_state()
    np.random.seed((seed * 1_000_003 + server_round * 1_009 + int(site or 0)) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def _save(context: Context, site: SiteSecrets, stage: str, weight_metric: str, server_round: int) -> None:
    record = {**site.to_record(), STAGE: stage, WEIGHT_METRIC: weight_metric, ROUND: server_round}
    context.state.config_records[STATE] = ConfigRecord(record)


def _load(context: Context, stage: str, server_round: int) -> tuple[SiteSecrets, str]:
    """This round's secrets, checked to be at the step before ``stage``."""
    record = context.state.config_records.get(STATE)
    if record is None:
        raise SecAggError(f"SecAgg+ step {stage!r} without a setup step before it on this node")
    if record[ROUND] != server_round or NEXT.get(str(record[STAGE])) != stage:
        raise SecAggError(
            f"SecAgg+ step {stage!r} of round {server_round} after step {record[STAGE]!r} of round {record[ROUND]}"
        )
    return SiteSecrets.from_record(record), str(record[WEIGHT_METRIC])


def _reply(msg: Message, values: dict[str, Any]) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(values)}), reply_to=msg)
