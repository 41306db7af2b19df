"""Deterministic partitioning of a video list among federated clients (IID and non-IID schemes).

Every function returns ``num_partitions`` sorted lists of indices into the sample list; the lists are
disjoint and together cover every index. Labels and groups are plain sequences, so any layout reader
can feed them.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("iid", "dirichlet", "k-classes", "groups")
_DIRICHLET_TRIES = 100
_NAME_WIDTH = 9  # widest class column in the printed summary


class PartitionError(ValueError):
    """The requested partition is impossible or its arguments are invalid."""


def _check_count(num_samples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise PartitionError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > num_samples:
        raise PartitionError(f"cannot split {num_samples} videos into {num_partitions} non-empty partitions")


def _sorted_lists(parts: Sequence[Sequence[int] | np.ndarray]) -> list[list[int]]:
    return [sorted(int(i) for i in part) for part in parts]


def _indices_by_class(labels: Sequence[int]) -> dict[int, np.ndarray]:
    labels = np.asarray(labels, dtype=np.int64)
    return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def partition_iid(num_samples: int, num_partitions: int, seed: int) -> list[list[int]]:
    """Uniformly random split into partitions whose sizes differ by at most one."""
    _check_count(num_samples, num_partitions)
    order = np.random.default_rng(seed).permutation(num_samples)
    return _sorted_lists(np.array_split(order, num_partitions))


def _dirichlet_draw(
    by_class: dict[int, np.ndarray], num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for indices in by_class.values():
        shuffled = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
        for part, chunk in zip(parts, np.split(shuffled, cuts)):
            part.extend(chunk.tolist())
    return parts


def partition_dirichlet(
    labels: Sequence[int], num_partitions: int, alpha: float, seed: int, min_per_partition: int = 1
) -> list[list[int]]:
    """Label skew: each class is spread over clients with proportions drawn from Dir(alpha).

    Small alpha gives clients few classes; large alpha approaches IID. Draws are repeated (a bounded
    number of times) until every partition holds ``min_per_partition`` videos; after that, videos move
    from the largest partition to the short ones.
    """
    _check_count(len(labels), num_partitions)
    if alpha <= 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}")
    if min_per_partition * num_partitions > len(labels):
        raise PartitionError(
            f"{len(labels)} videos cannot give {num_partitions} partitions {min_per_partition} videos each"
        )
    rng = np.random.default_rng(seed)
    by_class = _indices_by_class(labels)
    for _ in range(_DIRICHLET_TRIES):
        parts = _dirichlet_draw(by_class, num_partitions, alpha, rng)
        if min(map(len, parts)) >= min_per_partition:
            return _sorted_lists(parts)
    logger.warning(
        "dirichlet(alpha=%s): no draw in %d gave every partition %d videos; moving videos from the largest",
        alpha,
        _DIRICHLET_TRIES,
        min_per_partition,
    )
    parts = [sorted(part) for part in parts]
    # The largest partition (the first of equal ones) from a heap of (-size, index) whose stale
    # entries are skipped: a scan of all partitions per move was O(N^2) with hundreds of sites.
    largest_first = [(-len(part), i) for i, part in enumerate(parts)]
    heapq.heapify(largest_first)
    for i, part in enumerate(parts):
        while len(part) < min_per_partition:
            size, j = heapq.heappop(largest_first)
            if -size != len(parts[j]):
                continue
            part.append(parts[j].pop())
            heapq.heappush(largest_first, (-len(parts[j]), j))
            heapq.heappush(largest_first, (-len(part), i))
    return _sorted_lists(parts)


def partition_k_classes(labels: Sequence[int], num_partitions: int, k: int, seed: int) -> list[list[int]]:
    """Each client holds exactly ``k`` classes; each class's videos are split evenly among its holders.

    Classes are dealt round-robin from a shuffled order, so every class has at least one holder
    (which needs ``num_partitions * k >= num_classes``).
    """
    _check_count(len(labels), num_partitions)
    by_class = _indices_by_class(labels)
    classes = list(by_class)
    if not 1 <= k <= len(classes):
        raise PartitionError(f"k must be between 1 and the number of classes ({len(classes)}), got {k}")
    if num_partitions * k < len(classes):
        raise PartitionError(f"{num_partitions} clients with {k} classes each cannot cover all {len(classes)} classes")
    rng = np.random.default_rng(seed)
    order = [classes[i] for i in rng.permutation(len(classes))]
    # Consecutive slots of a cycle over `order`: k distinct classes per client since k <= #classes.
    holders: dict[int, list[int]] = {c: [] for c in classes}
    for client in range(num_partitions):
        for slot in range(client * k, (client + 1) * k):
            holders[order[slot % len(order)]].append(client)

    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for label, indices in by_class.items():
        clients = holders[label]
        if len(indices) < len(clients):
            logger.warning("class %d has %d videos for %d clients: some get none", label, len(indices), len(clients))
        for client, chunk in zip(rng.permutation(clients), np.array_split(rng.permutation(indices), len(clients))):
            parts[client].extend(chunk.tolist())
    empty = [i for i, part in enumerate(parts) if not part]
    if empty:
        raise PartitionError(f"k-classes left clients {empty} without videos: too few videos per class")
    return _sorted_lists(parts)


def partition_groups(groups: Sequence[str], num_partitions: int, seed: int) -> list[list[int]]:
    """Natural split: whole groups (UCF-101 actors, manifest groups) go to one client each.

    Groups are shuffled, then dealt largest first to the client with the fewest videos so far; the
    shuffle only breaks ties between equal-sized groups, as in UCF-101.
    """
    _check_count(len(groups), num_partitions)
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    if len(members) < num_partitions:
        raise PartitionError(f"only {len(members)} groups for {num_partitions} partitions: need at least one each")
    names = sorted(members)
    names = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    names.sort(key=lambda name: len(members[name]), reverse=True)  # stable: equal sizes keep shuffled order
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    fewest_first = [(0, i) for i in range(num_partitions)]  # (size, index): the first of equal sizes wins
    for name in names:
        size, i = heapq.heappop(fewest_first)
        parts[i].extend(members[name])
        heapq.heappush(fewest_first, (size + len(members[name]), i))
    return _sorted_lists(parts)


def partition_samples(
    labels: Sequence[int],
    groups: Sequence[str],
    method: str,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    k: int = 2,
    min_per_partition: int = 1,
) -> list[list[int]]:
    """Partition videos with ``method`` (one of METHODS); ``groups`` is used by "groups" only,
    ``min_per_partition`` by "dirichlet" only."""
    method = method.replace("_", "-")
    if method not in METHODS:
        raise PartitionError(f"unknown partition method {method!r}; choose one of {METHODS}")
    _check_count(len(labels), num_partitions)
    if method == "iid":
        return partition_iid(len(labels), num_partitions, seed)
    if method == "dirichlet":
        return partition_dirichlet(labels, num_partitions, alpha, seed, min_per_partition)
    if method == "k-classes":
        return partition_k_classes(labels, num_partitions, k, seed)
    if len(groups) != len(labels):
        raise PartitionError(f"{len(groups)} groups for {len(labels)} videos")
    return partition_groups(groups, num_partitions, seed)


def _class_counts(
    labels: np.ndarray, parts: Sequence[Sequence[int]], num_partitions: int, num_classes: int
) -> np.ndarray:
    """``counts[p, c]``: how many of ``parts[p]``'s indices have label ``c``."""
    counts = np.zeros((num_partitions, max(num_classes, 1)), dtype=np.int64)
    owners = np.repeat(np.arange(num_partitions), [len(part) for part in parts])
    members = np.fromiter((i for part in parts for i in part), dtype=np.int64, count=len(owners))
    np.add.at(counts, (owners, labels[members]), 1)
    return counts


def follow_partition(
    train_labels: Sequence[int], train_parts: Sequence[Sequence[int]], labels: Sequence[int], seed: int
) -> list[list[int]]:
    """Split other videos (a test split) the way ``train_parts`` split the training videos.

    Each client gets, of every class, its share of that class's training videos (largest
    remainders, ties broken at random), so a site is tested on its own label distribution: a class
    it never trains on never appears in its test videos. A class no client trains on is spread
    evenly. A client left without any video takes one of its most-trained class from the client
    holding most of them, when that client keeps at least one.
    """
    rng = np.random.default_rng(seed)
    train = np.asarray(train_labels, dtype=np.int64)
    label_of = np.asarray(labels, dtype=np.int64)
    num_partitions = len(train_parts)
    num_classes = int(max(train.max(initial=-1), label_of.max(initial=-1))) + 1
    # Per-client class counts as matrices, so that nothing below loops over clients per class or per
    # client (with hundreds of sites that was O(N^2) numpy calls: 0.15 s per lookup at N = 1000).
    held = _class_counts(train, train_parts, num_partitions, num_classes).astype(float)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for c, indices in _indices_by_class(labels).items():
        counts = held[:, c]
        shares = counts / counts.sum() if counts.sum() > 0 else np.full(num_partitions, 1 / num_partitions)
        quota = shares * len(indices)
        take = np.floor(quota).astype(int)
        remainder = quota - take
        order = np.lexsort((rng.random(num_partitions), -remainder))  # largest remainder first
        take[order[: len(indices) - take.sum()]] += 1
        for part, chunk in zip(parts, np.split(rng.permutation(indices), np.cumsum(take)[:-1])):
            part.extend(chunk.tolist())
    have = _class_counts(label_of, parts, num_partitions, num_classes)  # kept up to date by the moves
    sizes = have.sum(axis=1)
    for empty in [i for i, part in enumerate(parts) if not part]:
        mine = np.bincount(train[list(train_parts[empty])], minlength=num_classes)
        for c in np.argsort(-mine, kind="stable"):
            # Videos of class c each client could give without being left empty itself.
            spare = np.where(sizes > 1, have[:, c], 0)
            donor = int(np.argmax(spare))
            if spare[donor]:
                moved = next(j for j in parts[donor] if label_of[j] == c)
                parts[donor].remove(moved)
                parts[empty].append(moved)
                have[donor, c] -= 1
                have[empty, c] += 1
                sizes[donor] -= 1
                sizes[empty] += 1
                break
    return _sorted_lists(parts)


def partition_summary(labels: Sequence[int], parts: list[list[int]], classes: Sequence[str]) -> dict:
    """JSON-serializable per-client video counts, overall and per class (keys kebab-case, as in
    every results file: this is the shape of ``partitions.json``)."""
    clients = []
    for partition_id, part in enumerate(parts):
        counts = np.bincount(np.asarray(labels, dtype=np.int64)[part], minlength=len(classes))
        clients.append(
            {
                "partition-id": partition_id,
                "num-videos": len(part),
                "per-class": {name: int(count) for name, count in zip(classes, counts)},
            }
        )
    return {"num-partitions": len(parts), "clients": clients}


def _abbreviate(names: list[str]) -> tuple[list[str], str]:
    """Column headers for class names, plus a legend line when headers had to become numbers."""
    short = [name if len(name) <= _NAME_WIDTH else name[: _NAME_WIDTH - 1] + "." for name in names]
    if len(set(short)) == len(short):
        return short, ""
    numbers = [str(i) for i in range(1, len(names) + 1)]
    return numbers, "classes: " + ", ".join(f"{n}={name}" for n, name in zip(numbers, names))


def format_partition_summary(summary: dict) -> str:
    """Printable table: one row per client, one column per class, a totals row."""
    clients = summary["clients"]
    names = list(clients[0]["per-class"]) if clients else []
    headers, legend = _abbreviate(names)
    rows = [
        [str(c["partition-id"])] + [str(c["per-class"][n]) for n in names] + [str(c["num-videos"])] for c in clients
    ]
    totals = [sum(c["per-class"][n] for c in clients) for n in names]
    rows.append(["total"] + [str(t) for t in totals] + [str(sum(c["num-videos"] for c in clients))])
    table = [["client"] + headers + ["videos"]] + rows
    widths = [max(len(row[col]) for row in table) for col in range(len(table[0]))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in table]
    return "\n".join(lines + ([legend] if legend else []))
