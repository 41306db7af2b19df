"""Tests for datasets.partition: determinism, disjoint covering partitions, skew, errors, summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasets.partition import (
    METHODS,
    PartitionError,
    follow_partition,
    format_partition_summary,
    partition_dirichlet,
    partition_groups,
    partition_k_classes,
    partition_samples,
    partition_summary,
)

NUM_CLASSES = 10
# UCF-101-like: 10 classes x 25 groups x 2 clips, listed class by class.
LABELS = [c for c in range(NUM_CLASSES) for _ in range(50)]
GROUPS = [f"g{g:02d}" for _ in range(NUM_CLASSES) for g in range(1, 26) for _ in range(2)]
CLASSES = [f"Class{c}" for c in range(NUM_CLASSES)]


def _check_valid(parts: list[list[int]], num_partitions: int, num_samples: int) -> None:
    assert len(parts) == num_partitions
    assert all(part == sorted(part) and part for part in parts)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(num_samples))  # disjoint and covering


@pytest.mark.parametrize("method", METHODS)
def test_methods_are_deterministic_disjoint_and_covering(method: str) -> None:
    parts = partition_samples(LABELS, GROUPS, method, 5, seed=3)
    _check_valid(parts, 5, len(LABELS))
    assert partition_samples(LABELS, GROUPS, method, 5, seed=3) == parts
    assert partition_samples(LABELS, GROUPS, method, 5, seed=4) != parts
    assert all(isinstance(i, int) for part in parts for i in part)


def test_iid_sizes_are_balanced() -> None:
    sizes = [len(p) for p in partition_samples(LABELS, GROUPS, "iid", 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def _mean_label_entropy(parts: list[list[int]], labels: list[int]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(np.asarray(labels)[part], minlength=NUM_CLASSES) / len(part)
        p = p[p > 0]
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))


def test_dirichlet_follows_alpha() -> None:
    labels = [c for c in range(NUM_CLASSES) for _ in range(200)]
    skewed = _mean_label_entropy(partition_dirichlet(labels, 10, alpha=0.1, seed=0), labels)
    near_iid = _mean_label_entropy(partition_dirichlet(labels, 10, alpha=100.0, seed=0), labels)
    assert near_iid > 0.97 * np.log(NUM_CLASSES)
    assert skewed < near_iid - 0.8, (skewed, near_iid)


def test_dirichlet_minimum_per_partition() -> None:
    # Tiny alpha with few videos: draws rarely satisfy the minimum, so the fix-up must.
    labels = [c for c in range(3) for _ in range(10)]
    parts = partition_dirichlet(labels, 8, alpha=0.01, seed=1, min_per_partition=3)
    _check_valid(parts, 8, len(labels))
    assert min(len(p) for p in parts) >= 3
    with pytest.raises(PartitionError):
        partition_dirichlet(labels, 8, alpha=0.5, seed=1, min_per_partition=4)
    with pytest.raises(PartitionError):
        partition_dirichlet(labels, 2, alpha=0.0, seed=1)


@pytest.mark.parametrize(("num_partitions", "k"), [(5, 2), (3, 4), (10, 1), (7, 3)])
def test_k_classes_gives_exactly_k_classes(num_partitions: int, k: int) -> None:
    parts = partition_k_classes(LABELS, num_partitions, k, seed=2)
    _check_valid(parts, num_partitions, len(LABELS))
    labels = np.asarray(LABELS)
    assert [len(set(labels[part])) for part in parts] == [k] * num_partitions


def test_k_classes_errors() -> None:
    with pytest.raises(PartitionError):
        partition_k_classes(LABELS, 3, 2, seed=0)  # 6 slots cannot cover 10 classes
    with pytest.raises(PartitionError):
        partition_k_classes(LABELS, 5, 11, seed=0)


def test_groups_are_never_split() -> None:
    parts = partition_groups(GROUPS, 6, seed=1)
    _check_valid(parts, 6, len(GROUPS))
    owners: dict[str, set[int]] = {}
    for client, part in enumerate(parts):
        for i in part:
            owners.setdefault(GROUPS[i], set()).add(client)
    assert all(len(clients) == 1 for clients in owners.values())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 20  # 25 equal groups of 20 videos over 6 clients: 4 or 5 each


def test_groups_balance_unequal_sizes() -> None:
    groups = ["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 10 + ["e"] * 10
    sizes = sorted(len(p) for p in partition_groups(groups, 2, seed=0))
    assert sizes == [60, 60]


def test_errors() -> None:
    with pytest.raises(PartitionError, match="unknown partition method 'shards'.*iid"):
        partition_samples(LABELS, GROUPS, "shards", 2, seed=0)
    with pytest.raises(PartitionError):
        partition_samples(LABELS, GROUPS, "iid", len(LABELS) + 1, seed=0)
    with pytest.raises(PartitionError):
        partition_samples(LABELS, GROUPS, "iid", 0, seed=0)
    with pytest.raises(PartitionError, match="groups"):
        partition_samples(LABELS, GROUPS, "groups", 26, seed=0)
    assert issubclass(PartitionError, ValueError)


def test_underscore_alias() -> None:
    expected = partition_samples(LABELS, GROUPS, "k-classes", 5, seed=0)
    assert partition_samples(LABELS, GROUPS, "k_classes", 5, seed=0) == expected


def test_summary_counts_match_and_format_prints_all_clients() -> None:
    parts = partition_samples(LABELS, GROUPS, "dirichlet", 4, seed=0, alpha=0.3)
    summary = partition_summary(LABELS, parts, CLASSES)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["num-partitions"] == 4
    for client, part in zip(summary["clients"], parts):
        assert client["num-videos"] == len(part)
        assert client["per-class"] == {name: sum(LABELS[i] == c for i in part) for c, name in enumerate(CLASSES)}
    text = format_partition_summary(summary)
    lines = text.splitlines()
    assert len(lines) == 1 + 4 + 1  # header, clients, totals
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2", "3", "total"]
    assert lines[-1].split()[1:] == ["50"] * NUM_CLASSES + [str(len(LABELS))]
    assert "Class9" in lines[0]


def test_format_abbreviates_long_class_names() -> None:
    classes = ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
    summary = partition_summary([0, 1, 2, 2], [[0, 1], [2, 3]], classes)
    header = format_partition_summary(summary).splitlines()[0]
    assert "ApplyEye." in header and "ApplyLip." in header and "Archery" in header
    clashing = partition_summary([0, 1], [[0], [1]], ["BasketballShooting", "BasketballDunk"])
    text = format_partition_summary(clashing)
    assert "1=BasketballShooting" in text and "2=BasketballDunk" in text


# ------------------------------------------------------------------ test splits that follow the training one

TEST_LABELS = [c for c in range(NUM_CLASSES) for _ in range(12)]


@pytest.mark.parametrize("method", METHODS)
def test_a_followed_test_split_gives_each_client_its_training_share_of_every_class(method: str) -> None:
    train_parts = partition_samples(LABELS, GROUPS, method, 5, seed=3, alpha=0.1, k=2)
    parts = follow_partition(LABELS, train_parts, TEST_LABELS, seed=9)
    _check_valid(parts, 5, len(TEST_LABELS))
    assert follow_partition(LABELS, train_parts, TEST_LABELS, seed=9) == parts
    train, test = np.asarray(LABELS), np.asarray(TEST_LABELS)
    for train_part, test_part in zip(train_parts, parts):
        trained = np.bincount(train[train_part], minlength=NUM_CLASSES)
        tested = np.bincount(test[test_part], minlength=NUM_CLASSES)
        # A site is tested on its own label distribution: its share of each class, to one video.
        assert np.all(np.abs(tested - 12 * trained / 50) < 1 + 1e-9)
        if method != "iid":  # skewed: a class the site never trains on is never in its test videos
            assert set(np.flatnonzero(tested)) <= set(np.flatnonzero(trained)) or len(test_part) == 1


def test_a_client_whose_share_rounds_to_nothing_still_gets_a_test_video() -> None:
    labels = [0] * 10 + [1] * 10
    train_parts = [list(range(0, 9)) + list(range(10, 20)), [9]]  # client 1: one video of class 0
    parts = follow_partition(labels, train_parts, [0, 0, 1, 1], seed=0)
    _check_valid(parts, 2, 4)
    assert [[0, 0, 1, 1][i] for i in parts[1]] == [0]  # its own class, taken from the other client


def test_a_class_nobody_trains_on_is_spread_evenly() -> None:
    parts = follow_partition([0, 0, 0, 0], [[0, 1], [2, 3]], [1] * 6, seed=0)
    _check_valid(parts, 2, 6)
    assert sorted(map(len, parts)) == [3, 3]


# ------------------------------------------------------------------ against the former per-client loops
# Reference copies of the implementations that looped over all clients once per class, per empty
# client or per group (O(N^2) with hundreds of sites); today's vectorized ones must give the same splits.


def _reference_follow_partition(train_labels, train_parts, labels, seed):
    rng = np.random.default_rng(seed)
    train = np.asarray(train_labels, dtype=np.int64)
    num_partitions = len(train_parts)
    parts = [[] for _ in range(num_partitions)]
    held = {c: np.array([np.sum(train[list(p)] == c) for p in train_parts], float) for c in np.unique(train)}
    label_of = np.asarray(labels, dtype=np.int64)
    for c in np.unique(label_of):
        indices = np.flatnonzero(label_of == c)
        counts = held.get(c, np.zeros(num_partitions))
        shares = counts / counts.sum() if counts.sum() > 0 else np.full(num_partitions, 1 / num_partitions)
        quota = shares * len(indices)
        take = np.floor(quota).astype(int)
        remainder = quota - take
        order = np.lexsort((rng.random(num_partitions), -remainder))
        take[order[: len(indices) - take.sum()]] += 1
        for part, chunk in zip(parts, np.split(rng.permutation(indices), np.cumsum(take)[:-1])):
            part.extend(chunk.tolist())
    for empty in [i for i, part in enumerate(parts) if not part]:
        mine = np.bincount(train[list(train_parts[empty])], minlength=int(label_of.max(initial=0)) + 1)
        for c in np.argsort(-mine, kind="stable"):
            spare = [int(np.sum(label_of[part] == c)) if len(part) > 1 else 0 for part in parts]
            donor = int(np.argmax(spare))
            if spare[donor]:
                moved = next(j for j in parts[donor] if label_of[j] == c)
                parts[donor].remove(moved)
                parts[empty].append(moved)
                break
    return [sorted(int(i) for i in part) for part in parts]


def _reference_groups(groups, num_partitions, seed):
    members = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    names = sorted(members)
    names = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    names.sort(key=lambda name: len(members[name]), reverse=True)
    parts = [[] for _ in range(num_partitions)]
    for name in names:
        min(parts, key=len).extend(members[name])
    return [sorted(part) for part in parts]


def _reference_dirichlet_refill(parts, min_per_partition):
    parts = [sorted(part) for part in parts]
    for part in parts:
        while len(part) < min_per_partition:
            largest = max(parts, key=len)
            part.append(largest.pop())
    return [sorted(part) for part in parts]


@pytest.mark.parametrize("trial", range(60))
def test_splits_equal_the_former_per_client_loops(trial: int, monkeypatch) -> None:
    rng = np.random.default_rng(trial)
    num_classes, clients = int(rng.integers(1, 12)), int(rng.integers(2, 80))
    labels = rng.integers(0, num_classes, int(rng.integers(clients, 5 * clients + 1))).tolist()
    # Fewer test videos than clients, and classes nobody trains on: the refill and the even spread.
    test_labels = rng.integers(0, num_classes + 1, int(rng.integers(0, 3 * clients))).tolist()
    method = ("iid", "dirichlet", "k-classes")[trial % 3]
    try:
        train_parts = partition_samples(labels, [], method, clients, seed=trial, alpha=0.3, k=min(2, num_classes))
    except PartitionError:  # k-classes with too few videos per class for this many clients
        train_parts = partition_samples(labels, [], "iid", clients, seed=trial)
    if trial % 4 == 0:  # parts that leave videos out or are empty: follow_partition takes any
        train_parts = [part[: len(part) // 2] for part in train_parts]
    expected = _reference_follow_partition(labels, train_parts, test_labels, trial)
    assert follow_partition(labels, train_parts, test_labels, trial) == expected

    groups = [f"g{g}" for g in rng.integers(0, max(clients, len(labels) // 2), len(labels))]
    if len(set(groups)) >= clients:
        assert partition_groups(groups, clients, trial) == _reference_groups(groups, clients, trial)

    # Dirichlet's refill after failed draws: its last draw moved video by video to the short parts.
    import datasets.partition as partition

    draws = []
    real_draw = partition._dirichlet_draw
    monkeypatch.setattr(partition, "_DIRICHLET_TRIES", 1)
    monkeypatch.setattr(partition, "_dirichlet_draw", lambda *a: draws.append(real_draw(*a)) or draws[-1])
    minimum = 2 if len(labels) >= 2 * clients else 1
    parts = partition_dirichlet(labels, clients, alpha=0.05, seed=trial, min_per_partition=minimum)
    assert parts == _reference_dirichlet_refill(draws[-1], minimum)


def test_min_partition_videos_sizes_every_skewed_site_and_its_test_videos():
    """``min-partition-videos``: at Dirichlet 0.1 every site gets that many training videos, and its
    test videos (which follow its labels) scale with them: what per-site figures need."""
    plain = partition_samples(LABELS, GROUPS, "dirichlet", 8, seed=1, alpha=0.1)
    assert min(map(len, plain)) < 20  # the draw alone leaves small sites
    parts = partition_samples(LABELS, GROUPS, "dirichlet", 8, seed=1, alpha=0.1, min_per_partition=40)
    _check_valid(parts, 8, len(LABELS))
    assert min(map(len, parts)) >= 40
    test_labels = [c for c in range(NUM_CLASSES) for _ in range(50)]
    assert min(map(len, follow_partition(LABELS, parts, test_labels, seed=2))) >= 35
    assert np.mean([len({LABELS[i] for i in p}) for p in parts]) < 5  # still skewed
