"""The run's train/test split, written down: ``split.csv`` in the results folder, one row per video
file (``path, class, group, split, site``), and a warning for every class or site without a test
video (its confusion-matrix row, or its local evaluation, would otherwise be silently empty).

The server holds the same dataset index as the clients when they partition one dataset (the
simulation, ``fedvideo deploy`` without per-node data folders): the site column is then the
partition that holds the video, computed with the clients' own function. Sites that hold data of
their own (node config ``data-dir``) keep their files to themselves: the column stays empty.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets.layouts import VideoIndex
from fedapp.files import atomic_write_text
from strategies.replies import NUM_PARTITIONS, OWN_DATA

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.csv"
COLUMNS = ("path", "class", "group", "split", "site")


def split_rows(index: VideoIndex, sites: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]] | None) -> list[tuple]:
    """One row per video, train then test; ``sites``: every site's train and test indices, or None."""
    site_of: dict[tuple[str, int], int] = {}
    for split, parts in zip(("train", "test"), sites or ((), ())):
        for site, indices in enumerate(parts):
            site_of.update({(split, i): site for i in indices})
    return [
        (sample.path, index.classes[sample.label], sample.group, split, site_of.get((split, i), ""))
        for split, samples in (("train", index.train), ("test", index.test))
        for i, sample in enumerate(samples)
    ]


def write_split(run_dir: str | Path, index: VideoIndex, sites: tuple[Sequence, Sequence] | None = None) -> Path:
    """Write ``split.csv`` (atomically) and return its path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(split_rows(index, sites))
    path = Path(run_dir) / SPLIT_FILE
    atomic_write_text(path, buffer.getvalue())
    return path


def classes_without_test(index: VideoIndex) -> list[str]:
    tested = {sample.label for sample in index.test}
    return [name for label, name in enumerate(index.classes) if label not in tested]


def warn_classes_without_test(index: VideoIndex) -> list[str]:
    """Log one warning naming the classes with no test video; returns them."""
    missing = classes_without_test(index)
    if missing:
        logger.warning(
            "%d of %d classes have no test video: %s. Their accuracy cannot be measured (empty rows in the "
            "confusion matrix); add videos of other groups, or raise test-fraction. Every file's side: %s",
            len(missing),
            len(index.classes),
            ", ".join(missing),
            SPLIT_FILE,
        )
    return missing


def shared_partitions(metrics: Iterable[Mapping[str, Any]]) -> int | None:
    """How many sites split the server's dataset between them, from the clients' reports: the one
    ``num-partitions`` > 1 they all report, when none holds data of its own; else None."""
    reported = [m for m in metrics if NUM_PARTITIONS in m]
    counts = {int(m[NUM_PARTITIONS]) for m in reported}
    if not reported or len(counts) != 1 or any(int(m.get(OWN_DATA, 0)) for m in reported):
        return None
    (count,) = counts
    return count if count > 1 else None


def sites_without_test(test_parts: Sequence[Sequence[int]]) -> list[int]:
    return [site for site, indices in enumerate(test_parts) if not indices]


def warn_sites_without_test(test_parts: Sequence[Sequence[int]]) -> list[int]:
    """Log one warning naming the sites with no test video; returns them."""
    missing = sites_without_test(test_parts)
    if missing:
        logger.warning(
            "%d of %d sites have no test video (partition-id %s): they skip local evaluation; the central "
            "evaluation covers every test video. Every file's site: %s",
            len(missing),
            len(test_parts),
            ", ".join(map(str, missing)),
            SPLIT_FILE,
        )
    return missing


def record_sites(run_dir: str | Path, cfg: Any, index: VideoIndex, reports: Iterable[Mapping[str, Any]]) -> bool:
    """Rewrite ``split.csv`` with every file's site once the clients' reports tell how the sites
    split the dataset, and warn about sites without a test video. Returns whether it is decided:
    False while no client has reported yet (try again next round)."""
    from fedapp.task.data import federation_partition  # torch: the ServerApp has it loaded already

    reports = list(reports)
    if not any(NUM_PARTITIONS in m for m in reports):
        return False
    count = shared_partitions(reports)
    if count is None:
        logger.info("sites hold data of their own: %s lists the server's dataset without a site column", SPLIT_FILE)
        return True
    train_parts, test_parts = federation_partition(cfg, index, count)
    write_split(run_dir, index, (train_parts, test_parts))
    warn_sites_without_test(test_parts)
    return True
