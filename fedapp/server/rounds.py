"""The steps of one server round: train, evaluate, record.

Each step takes what it needs and returns what it did; the round loop in ``fedapp.server.app``
strings them together and carries :class:`RunState` from round to round.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from datasets.layouts import VideoIndex
from datasets.partition import format_partition_summary
from fedapp.server.checkpoint import best_checkpoint, mark_best, prune_checkpoints, save_checkpoint
from fedapp.server.report import TensorBoardLog
from fedapp.server.results import RunResults
from fedapp.server.stopping import best_round, stop_reason
from fedapp.server.summary import strategy_label
from fedapp.task.config import AppConfig
from strategies.privacy import PrivateStrategy
from strategies.records import NamedArrays, numpy_to_arrays
from strategies.strategy import RoundReport, VideoStrategy

logger = logging.getLogger(__name__)

Strategy = VideoStrategy | PrivateStrategy


@dataclass
class RunState:
    """What the round loop carries between rounds."""

    arrays: dict[str, np.ndarray]  # the global model
    first_round: int
    classes: list[str]
    started: float  # wall-clock origin of the run, resumed runs included
    rounds_without_update: int = 0
    train: RoundReport | None = None  # the latest train phase, for the final verdict
    known_partitions: dict[int, list[int]] = field(default_factory=dict)
    dataset: VideoIndex | None = None  # the server's index, for split.csv's site column
    sites_recorded: bool = False  # split.csv has its site column (or the sites hold their own data)
    sent: dict[str, Any] = field(default_factory=dict)  # config entries every message carries


# Pull requests while replies are outstanding: the first poll comes soon, so a fast round is not
# held up, and the wait doubles up to Flower's own 3 s (``Grid.send_and_receive``) for slow ones.
FIRST_POLL_S, LAST_POLL_S = 0.1, 3.0
# Replies asked for per pull request: the replies the server holds undecoded at once.
PULL_BATCH = 1


@dataclass
class Waiting:
    """Seconds one phase spent waiting for replies (sleeping between pulls), to tell server work
    from client time."""

    seconds: float = 0.0


def replies_as_they_arrive(
    grid: Grid, messages: Iterable[Message], timeout: float | None, waiting: Waiting
) -> Iterator[Message]:
    """Push ``messages``, then yield each reply as soon as it is pulled, until all are in or
    ``timeout`` seconds have passed (later replies are lost, as with ``send_and_receive``).

    The caller folds each reply into the aggregate before the next is pulled, so the server never
    holds all N replies (``strategies.strategy.VideoStrategy.streams``)."""
    pending = [i for i in grid.push_messages(messages) if i]  # Flower gives None for one it could not push
    deadline = None if timeout is None else time.monotonic() + timeout
    poll = FIRST_POLL_S
    while pending and (deadline is None or time.monotonic() < deadline):
        arrived = False
        asked = list(pending)  # this sweep's requests; ``pending`` shrinks as replies come
        for start in range(0, len(asked), PULL_BATCH):
            for reply in grid.pull_messages(asked[start : start + PULL_BATCH]):
                arrived = True
                answered = reply.metadata.reply_to_message_id
                pending = [i for i in pending if i != answered]
                yield reply
        if arrived:
            poll = FIRST_POLL_S
        elif pending:
            pause = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
            time.sleep(pause)
            waiting.seconds += pause
            poll = min(poll * 2, LAST_POLL_S)


def train_round(
    strategy: Strategy,
    grid: Grid,
    server_round: int,
    arrays: dict[str, np.ndarray],
    timeout: float,
    config: dict[str, Any] | None = None,
) -> tuple[RoundReport, int, float]:
    """Send the global model (and ``config``) to the sampled nodes, aggregate their updates as they arrive.

    Returns the strategy's report, the bytes sent down and the seconds spent waiting for replies."""
    messages = strategy.configure_train_round(server_round, NamedArrays(numpy=arrays), grid, ConfigRecord(config or {}))
    # Measured before train_round, which moves SCAFFOLD's control variate on: these bytes went down.
    sent = (_model_bytes(arrays) + strategy.extra_bytes_down()) * len(messages)
    waiting = Waiting()
    report = strategy.train_round(server_round, replies_as_they_arrive(grid, messages, timeout, waiting))
    return report, sent, waiting.seconds


def evaluate_round(
    strategy: Strategy,
    grid: Grid,
    server_round: int,
    arrays: dict[str, np.ndarray],
    timeout: float,
    config: dict[str, Any] | None = None,
) -> tuple[RoundReport, int, float]:
    """Have the sampled nodes score the global model on their own data.

    Returns the strategy's report, the bytes sent down and the seconds spent waiting for replies."""
    record = ConfigRecord(config or {})
    messages = list(strategy.configure_evaluate(server_round, numpy_to_arrays(arrays), record, grid))
    waiting = Waiting()
    report = strategy.evaluate_round(server_round, replies_as_they_arrive(grid, messages, timeout, waiting))
    return report, _model_bytes(arrays) * len(messages), waiting.seconds


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


def round_record(
    server_round: int,
    train: RoundReport,
    evaluate: RoundReport | None,
    central: dict[str, Any],
    bytes_down: int,
    round_start: float,
    run_start: float,
    waited_s: float = 0.0,
) -> dict[str, Any]:
    """One line of ``rounds.jsonl``: the round's aggregated and per-client outcome.

    ``server-s`` is the round's wall time minus ``waited_s``, the time spent sleeping until
    replies came: the server's own work (sending, pulling and decoding, screening, aggregation,
    central evaluation), clients' training excluded as far as the server can tell."""
    now = time.time()
    return {
        "round": server_round,
        "train": dict(train.metrics),
        "train-clients": train.to_dict(),
        "evaluate": dict(evaluate.metrics) if evaluate else {},
        "evaluate-clients": evaluate.to_dict() if evaluate else None,
        "central": central,
        "fusion": train.fusion,
        **({"privacy": train.privacy} if train.privacy is not None else {}),
        "bytes-down": bytes_down,
        "bytes-up": train.bytes_received,  # as received: compressed when compression is on
        "round-time-s": now - round_start,
        "server-s": now - round_start - waited_s,
        "server-peak-rss-mb": peak_rss_mb(),
        "wall-time-s": now - run_start,
    }


def record_round(
    results: RunResults,
    record: dict[str, Any],
    cfg: AppConfig,
    state: RunState,
    strategy: Strategy,
    tensorboard: TensorBoardLog | None,
) -> str | None:
    """Checkpoint the round, then append it to the history; returns the stopping rule's reason to
    stop, if it fires."""
    history = [*results.rounds, record]
    stop = stop_reason(history, cfg.early_stop_patience, cfg.early_stop_min_delta, cfg.target_accuracy)
    # The checkpoint first, then the history file: a crash between the two is healed on resume,
    # which rewrites the history from the checkpoint's own copy.
    path = save_checkpoint(
        results.dir, record["round"], state.arrays, cfg.to_dict(), state.classes, strategy.state(), history
    )
    best = best_round(history)
    if best is not None and best[0] == record["round"]:
        mark_best(results.dir, path, best[1])
    prune_checkpoints(results.dir, cfg.checkpoint_keep, best_checkpoint(results.dir))
    results.append_round(record)
    if tensorboard:
        tensorboard.log_round(record)
    logger.info("%s", round_line(record, cfg))
    return stop


def round_line(record: dict[str, Any], cfg: AppConfig) -> str:
    """The round's one console line, e.g. ``round 3/10 · fedavg · train loss 0.812 acc 0.700 ·
    central video-acc 0.875 loss 0.421 · 3 clients (1 rejected, 0 failed) · 12.1 s``.

    Client evaluation is shown when there is no central one; a round that kept the global model
    says so instead of a train loss."""
    label = strategy_label(cfg.strategy, cfg.fusion_fn, cfg.dp, cfg.personalization, cfg.secagg)
    epsilon = (record.get("privacy") or {}).get("epsilon")
    if epsilon is not None:
        label += f" (epsilon {epsilon:.3f})"
    parts = [f"round {record['round']}/{cfg.num_server_rounds}", label]
    train, clients = record.get("train") or {}, record.get("train-clients") or {}
    if clients.get("skipped"):
        parts.append(f"no update: {clients['skipped']}")
    elif "train-loss" in train:
        parts.append(f"train loss {train['train-loss']:.3f} acc {train.get('train-accuracy', float('nan')):.3f}")
    for name, section in (("central", "central"), ("client-evaluate", "evaluate")):
        scores = record.get(section) or {}
        if scores.get("video-accuracy") is not None:
            parts.append(f"{name} video-acc {scores['video-accuracy']:.3f} loss {_fmt(scores.get('loss'))}")
            break
    personal = (record.get("evaluate") or {}).get("personal-video-accuracy")
    if personal is not None:
        parts.append(f"personal video-acc {personal:.3f}")
    accepted, rejected, failed = (len(clients.get(key) or []) for key in ("clients", "rejected", "failed"))
    parts.append(f"{accepted} clients ({rejected} rejected, {failed} failed)")
    parts.append(f"{record['round-time-s']:.1f} s")
    return " · ".join(parts)


def record_partitions(results: RunResults, state: RunState, train: RoundReport, server_round: int) -> None:
    """Videos per class per client, from the counts clients report (the server never sees data)."""
    summary = reported_partitions(state.classes, train, state.known_partitions)
    if server_round == state.first_round:
        logger.info("partition summary (videos per class):\n%s", format_partition_summary(summary))
    results.write_partitions(summary)


def reported_partitions(classes: list[str], report: RoundReport, known: dict[int, list[int]]) -> dict[str, Any]:
    """The partition table so far (``partitions.json``, the shape of ``partition_summary``):
    ``known`` updated with this round's reports."""
    for client in report.accepted:
        if "partition-id" in client.metrics and "class-counts" in client.metrics:
            known[int(client.metrics["partition-id"])] = [int(c) for c in client.metrics["class-counts"]]
    return {
        "num-partitions": len(known),
        "clients": [
            {
                "partition-id": pid,
                "num-videos": sum(counts),
                "per-class": {name: counts[i] if i < len(counts) else 0 for i, name in enumerate(classes)},
            }
            for pid, counts in sorted(known.items())
        ],
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
