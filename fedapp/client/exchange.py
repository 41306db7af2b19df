"""One message's trip through this client, shared by every layer it passes.

A train message goes ClientApp -> ``compression_mod`` -> ``dp_clipping_mod`` -> handler -> bridge
and its reply comes back the same way. Each of those layers needs the model the server sent as
numpy, and the outer ones rework the reply's model. Converting the ArrayRecord in each layer would
decode the same model several times and encode the reply once per layer; instead every layer opens
the message's :class:`Exchange` (``with message_exchange(msg) as ex``), the first one to do so owns
it, and the layers share through it:

- ``ex.received()``: the model the server sent, a :class:`NamedArrays` decoded once, on first use;
- ``ex.reply_arrays(reply)`` / ``ex.set_reply_arrays(reply, key, arrays)``: the reply's models,
  passed between layers as :class:`NamedArrays` and written into the reply as ArrayRecords only
  when it leaves the owner, the outermost layer (so a model an outer layer replaces is never
  encoded);
- ``ex.config(run_config)``: the run config parsed once per message.

Used on its own (a test calling the bridge or one mod), a layer owns its exchange and its reply
leaves complete, as with no exchange at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from flwr.app import ArrayRecord, Message

from fedapp.task.config import AppConfig, parse_config
from strategies.records import NamedArrays

ARRAYS = "arrays"  # the record key the server's messages and the client's replies carry the model under

# The exchange of the message being handled in this thread (Flower may run ClientApps concurrently).
_CURRENT: ContextVar[Exchange | None] = ContextVar("fedapp_client_exchange", default=None)


class Exchange:
    """What the layers handling one message derive from it, each derived once."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self._received: dict[str, tuple[ArrayRecord, NamedArrays]] = {}
        self._reply: Message | None = None
        self._reply_arrays: dict[str, NamedArrays] = {}
        self._config: tuple[dict[str, Any], AppConfig] | None = None

    def received(self, key: str = ARRAYS) -> NamedArrays:
        """The model the message carries under ``key`` (KeyError if none), decoded on first use."""
        record = self.msg.content.array_records[key]
        cached = self._received.get(key)
        if cached is None or cached[0] is not record:  # a layer may have put another record there
            cached = (record, NamedArrays(record))
            self._received[key] = cached
        return cached[1]

    def reply_arrays(self, reply: Message) -> dict[str, NamedArrays]:
        """The reply's models by record key: those set by inner layers and those already in it."""
        self._follow(reply)
        return dict(self._reply_arrays)

    def set_reply_arrays(self, reply: Message, key: str, arrays: NamedArrays) -> None:
        """Make ``arrays`` the reply's model ``key``; it is written into the reply when it leaves."""
        self.remove_reply_arrays(reply, key)  # nothing stale stays readable while the new model is pending
        self._reply_arrays[key] = arrays

    def remove_reply_arrays(self, reply: Message, key: str) -> None:
        """Take the model ``key`` out of the reply (an outer layer sends something else in its place)."""
        self._follow(reply)
        self._reply_arrays.pop(key, None)
        if key in reply.content.array_records:
            del reply.content[key]

    def config(self, run_config: Mapping[str, Any]) -> AppConfig:
        """The run config parsed (client side: paths are the server's to check), once per message."""
        if self._config is None or self._config[0] != dict(run_config):
            self._config = (dict(run_config), parse_config(run_config, check_paths=False))
        return self._config[1]

    def _follow(self, reply: Message) -> None:
        # The models belong to one reply; a layer that answers with another message starts afresh.
        if reply is not self._reply:
            self._reply = reply
            self._reply_arrays = (
                {}
                if reply.has_error()
                else {key: NamedArrays(record) for key, record in reply.content.array_records.items()}
            )

    def _deliver(self) -> None:
        """Write the pending models into the reply (the owner's exit: the reply leaves the client)."""
        reply = self._reply
        if reply is None or reply.has_error():
            return
        for key, arrays in self._reply_arrays.items():
            record = arrays.record()
            if reply.content.array_records.get(key) is not record:
                reply.content[key] = record


@contextmanager
def message_exchange(msg: Message) -> Iterator[Exchange]:
    """The exchange of ``msg``: the enclosing layer's, or a new one this layer owns and delivers."""
    current = _CURRENT.get()
    if current is not None and current.msg is msg:
        yield current
        return
    exchange = Exchange(msg)
    token = _CURRENT.set(exchange)
    try:
        yield exchange
    finally:
        _CURRENT.reset(token)
    exchange._deliver()  # reached only without an exception: the reply leaves complete
