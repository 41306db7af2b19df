"""Readers for the dataset layouts users bring: UCF-101, HMDB-51, class folders and CSV manifests.

Every reader returns a VideoIndex: the class names (label i is ``classes[i]``) and train/test lists
of VideoSample. Each sample carries a natural *group* (UCF-101 actor group, HMDB-51 source video)
so that clips cut from one recording never straddle train and test, and so that federated
partitions can be made by group.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LAYOUTS = ("ucf101", "hmdb51", "folders", "manifest")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v")
FOLDS = (1, 2, 3)

_UCF_GROUP = re.compile(r"_(g\d+)_")
_TRAILING_CLIP_NUMBER = re.compile(r"_\d+$")


def list_videos(folder: str | Path) -> list[Path]:
    """Video files under ``folder`` (recursively, by extension), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())


class LayoutError(ValueError):
    """A dataset layout is missing a file or folder, or one of its files has a bad line."""


@dataclass(frozen=True)
class VideoSample:
    """One video file: absolute path, label index into VideoIndex.classes, natural group."""

    path: str
    label: int
    group: str


@dataclass
class VideoIndex:
    """Class names plus train and test samples of a dataset."""

    classes: list[str]
    train: list[VideoSample]
    test: list[VideoSample]


# ----------------------------------------------------------------------------- helpers


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise LayoutError(f"{what} not found: {path}")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise LayoutError(f"{what} not found: {path}")
    return path


def _check_fold(fold: int) -> None:
    if fold not in FOLDS:
        raise LayoutError(f"fold must be one of {FOLDS}, got {fold!r}")


def _split_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, whitespace-separated fields) of the non-blank lines of a text file."""
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            fields = line.split()
            if fields:
                yield line_number, fields


def _group_from_stem(stem: str) -> str:
    """UCF-101-style actor group ``gNN`` when the name has ``_gNN_``, else the stem itself."""
    match = _UCF_GROUP.search(stem)
    return match.group(1) if match else stem


def _folder_group(class_dir: Path, video: Path) -> str:
    """A class folder's video's group: ``gNN`` from ``_gNN_`` in its name; else the subfolder of the
    class folder it lies in (the segments of one recording, kept in a folder of their own, go
    together); else the file itself."""
    match = _UCF_GROUP.search(video.stem)
    if match:
        return match.group(1)
    relative = video.relative_to(class_dir)
    return f"{class_dir.name}/{relative.parts[0]}" if len(relative.parts) > 1 else video.stem


def _hash_fraction(key: str) -> float:
    """Stable map of a string to [0, 1): same on every machine and run (unlike Python's hash())."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check_test_fraction(test_fraction: float) -> None:
    if not 0.0 <= test_fraction <= 1.0:
        raise LayoutError(f"test_fraction must be in [0, 1], got {test_fraction}")


def _split_by_key(
    keyed_samples: list[tuple[VideoSample, str]], test_fraction: float, source: str
) -> tuple[list[VideoSample], list[VideoSample]]:
    """Test iff the hash of the sample's key falls below ``test_fraction``; equal keys stay together."""
    train = [sample for sample, key in keyed_samples if _hash_fraction(key) >= test_fraction]
    test = [sample for sample, key in keyed_samples if _hash_fraction(key) < test_fraction]
    if keyed_samples and (not train or not test) and 0.0 < test_fraction < 1.0:
        logger.warning(
            "%s: hash split with test_fraction=%s left %d train and %d test videos (too few groups?)",
            source,
            test_fraction,
            len(train),
            len(test),
        )
    return train, test


def _keep_existing(samples: list[VideoSample], source: str) -> list[VideoSample]:
    """Drop samples whose file is missing, with one warning counting them."""
    existing = [sample for sample in samples if os.path.isfile(sample.path)]
    missing = len(samples) - len(existing)
    if samples and not existing:
        raise LayoutError(f"{source}: none of the {len(samples)} listed videos exist (e.g. {samples[0].path})")
    if missing:
        logger.warning("%s: skipping %d of %d listed videos whose file is missing", source, missing, len(samples))
    return existing


# ----------------------------------------------------------------------------- UCF-101


def _read_ucf_classes(class_file: Path) -> list[str]:
    numbered: dict[int, str] = {}
    for line_number, fields in _split_lines(class_file):
        if len(fields) != 2 or not fields[0].isdigit():
            raise LayoutError(f"{class_file}:{line_number}: expected '<index> <ClassName>', got {' '.join(fields)!r}")
        numbered[int(fields[0])] = fields[1]
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise LayoutError(f"{class_file}: class indices must be 1..N without gaps")
    return [numbered[i] for i in range(1, len(numbered) + 1)]


def _read_ucf_list(list_file: Path, video_dir: Path, classes: list[str], labelled: bool) -> list[VideoSample]:
    """Samples of a UCF-101 train list (``Class/v_x.avi <1-based label>``) or test list (path only)."""
    class_index = {name: i for i, name in enumerate(classes)}
    samples = []
    for line_number, fields in _split_lines(list_file):
        where = f"{list_file}:{line_number}"
        relative = fields[0].replace("\\", "/")
        folder = relative.split("/")[0]
        if folder not in class_index:
            raise LayoutError(f"{where}: class folder {folder!r} is not in classInd.txt")
        label = class_index[folder]
        if labelled:
            if len(fields) != 2 or not fields[1].isdigit():
                raise LayoutError(f"{where}: expected '<Class>/<video> <label>', got {' '.join(fields)!r}")
            if int(fields[1]) - 1 != label:
                raise LayoutError(f"{where}: label {fields[1]} disagrees with folder {folder!r} (class {label + 1})")
        path = video_dir / relative
        samples.append(VideoSample(path=str(path), label=label, group=_group_from_stem(path.stem)))
    return samples


def load_ucf101(video_dir: str | Path, splits_dir: str | Path, fold: int = 1) -> VideoIndex:
    """Read UCF-101: ``video_dir/<Class>/v_<Class>_gXX_cYY.avi`` and the official split lists.

    ``splits_dir`` holds classInd.txt (class order, 1-based) and trainlist0N.txt / testlist0N.txt.
    Labels follow classInd.txt. Videos listed but missing on disk are skipped with a warning.
    """
    _check_fold(fold)
    video_dir = _require_dir(video_dir, "UCF-101 video folder")
    splits_dir = _require_dir(splits_dir, "UCF-101 splits folder")
    classes = _read_ucf_classes(_require_file(splits_dir / "classInd.txt", "UCF-101 class list"))
    splits = {}
    for split, labelled in (("train", True), ("test", False)):
        list_file = _require_file(splits_dir / f"{split}list0{fold}.txt", f"UCF-101 {split} list")
        splits[split] = _keep_existing(_read_ucf_list(list_file, video_dir, classes, labelled), str(list_file))
    return VideoIndex(classes=classes, train=splits["train"], test=splits["test"])


# ----------------------------------------------------------------------------- HMDB-51

_HMDB_TAGS = {"1": "train", "2": "test", "0": None}


def load_hmdb51(video_dir: str | Path, splits_dir: str | Path, fold: int = 1) -> VideoIndex:
    """Read HMDB-51: ``video_dir/<class>/*.avi`` and ``splits_dir/<class>_test_split<fold>.txt``.

    Split lines are ``<video> <tag>`` with tag 1 = train, 2 = test, 0 = unused. Classes are the
    sorted folder names that have a split file. The group is the video name minus its trailing
    ``_<n>`` (the clips cut from one source video).
    """
    _check_fold(fold)
    video_dir = _require_dir(video_dir, "HMDB-51 video folder")
    splits_dir = _require_dir(splits_dir, "HMDB-51 splits folder")
    folders = sorted(entry.name for entry in video_dir.iterdir() if entry.is_dir())
    classes = [name for name in folders if (splits_dir / f"{name}_test_split{fold}.txt").is_file()]
    if not classes:
        raise LayoutError(f"no <class>_test_split{fold}.txt in {splits_dir} matches a class folder of {video_dir}")
    if len(classes) < len(folders):
        logger.warning("HMDB-51: ignoring folders without a split file: %s", sorted(set(folders) - set(classes)))
    splits: dict[str, list[VideoSample]] = {"train": [], "test": []}
    for label, name in enumerate(classes):
        split_file = splits_dir / f"{name}_test_split{fold}.txt"
        for line_number, fields in _split_lines(split_file):
            if len(fields) != 2 or fields[1] not in _HMDB_TAGS:
                raise LayoutError(f"{split_file}:{line_number}: expected '<video> <0|1|2>', got {' '.join(fields)!r}")
            split = _HMDB_TAGS[fields[1]]
            if split is not None:
                path = video_dir / name / fields[0]
                group = _TRAILING_CLIP_NUMBER.sub("", path.stem)
                splits[split].append(VideoSample(path=str(path), label=label, group=group))
    source = f"HMDB-51 split {fold} in {splits_dir}"
    return VideoIndex(
        classes=classes,
        train=_keep_existing(splits["train"], source),
        test=_keep_existing(splits["test"], source),
    )


# ----------------------------------------------------------------------------- class folders


def load_class_folders(root: str | Path, test_fraction: float = 0.2, split_by: str = "group") -> VideoIndex:
    """Read ``root/<class>/<videos>`` (subfolders included); classes are the sorted folder names.

    The train/test split is deterministic: a video is a test video iff the SHA-1 of its group
    (``split_by="group"``: ``gNN`` from ``_gNN_`` in the name, else the subfolder of the class
    folder holding it, else the file stem) or of its path
    relative to root (``split_by="hash"``) maps below ``test_fraction``. Splitting by group keeps
    every clip of a group on one side. Folders without videos are not classes.
    """
    if split_by not in ("group", "hash"):
        raise LayoutError(f"split_by must be 'group' or 'hash', got {split_by!r}")
    _check_test_fraction(test_fraction)
    root = _require_dir(root, "video root folder")
    classes: list[str] = []
    keyed_samples: list[tuple[VideoSample, str]] = []
    for folder in sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")):
        videos = list_videos(folder)
        if not videos:
            logger.warning("class folder %s has no %s videos; not used as a class", folder, "/".join(VIDEO_EXTENSIONS))
            continue
        label = len(classes)
        classes.append(folder.name)
        for video in videos:
            sample = VideoSample(path=str(video), label=label, group=_folder_group(folder, video))
            key = sample.group if split_by == "group" else video.relative_to(root).as_posix()
            keyed_samples.append((sample, key))
    if not classes:
        raise LayoutError(f"no class folder with videos ({', '.join(VIDEO_EXTENSIONS)}) in {root}")
    train, test = _split_by_key(keyed_samples, test_fraction, str(root))
    return VideoIndex(classes=classes, train=train, test=test)


# ----------------------------------------------------------------------------- CSV manifest


def load_manifest(csv_path: str | Path, test_fraction: float = 0.2) -> VideoIndex:
    """Read a CSV manifest with header columns ``path,label`` and optional ``split``, ``group``.

    Labels are class names; classes are their sorted unique values. Relative paths are taken
    from the CSV's folder. ``split`` is ``train`` or ``test``; without that column the split is
    by group hash as in load_class_folders. A missing or empty ``group`` is the file stem.
    Listed files missing on disk are skipped with a warning.
    """
    _check_test_fraction(test_fraction)
    csv_path = _require_file(Path(csv_path).expanduser().resolve(), "manifest")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        missing_columns = [name for name in ("path", "label") if name not in columns]
        if missing_columns:
            raise LayoutError(f"{csv_path}: header lacks column(s) {missing_columns}; found {columns}")
        has_split = "split" in columns
        rows = []
        for row in reader:
            row = {key.strip(): (value or "").strip() for key, value in row.items() if key is not None}
            where = f"{csv_path}:{reader.line_num}"
            if not row["path"] or not row["label"]:
                raise LayoutError(f"{where}: empty path or label")
            if has_split and row["split"].lower() not in ("train", "test"):
                raise LayoutError(f"{where}: split must be 'train' or 'test', got {row['split']!r}")
            rows.append(row)
    if not rows:
        raise LayoutError(f"{csv_path}: no rows")
    classes = sorted({row["label"] for row in rows})
    class_index = {name: i for i, name in enumerate(classes)}
    samples = []
    for row in rows:
        path = Path(row["path"]).expanduser()
        path = path if path.is_absolute() else (csv_path.parent / path).resolve()
        samples.append(
            VideoSample(path=str(path), label=class_index[row["label"]], group=row.get("group") or path.stem)
        )
    if has_split:
        train = [sample for sample, row in zip(samples, rows) if row["split"].lower() == "train"]
        test = [sample for sample, row in zip(samples, rows) if row["split"].lower() == "test"]
    else:
        train, test = _split_by_key([(sample, sample.group) for sample in samples], test_fraction, str(csv_path))
    source = str(csv_path)
    return VideoIndex(classes=classes, train=_keep_existing(train, source), test=_keep_existing(test, source))
