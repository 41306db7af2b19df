"""A seeded synthetic video dataset whose classes differ only in motion, written in the UCF-101 layout.

Eight classes form four time-reversal pairs (move right/left, down/up, rotate cw/ccw, zoom in/out).
Every class draws its appearance (shape, colour, size, angle, position, background, noise) from the
same distributions, so a single frame or an order-free bag of frames carries almost no label
information: a model has to use time. Positions live on a torus (objects leaving one side re-enter on
the other), which makes the position at every frame index uniform for every class. Sizes of the zoom
classes span the same range as the static sizes, but at a fixed frame index a zoom video is biased
(ZoomIn starts small); over all frames the size distributions match.

CLI: ``fedvideo synthetic --out DIR [--classes 8 --videos-per-class 35 --frames 24 ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Bump when rendering or layout changes, so cached datasets of older versions are not reused.
GENERATOR_VERSION = 1

CLASS_NAMES: tuple[str, ...] = (
    "MoveRight",
    "MoveLeft",
    "MoveDown",
    "MoveUp",
    "RotateCW",
    "RotateCCW",
    "ZoomIn",
    "ZoomOut",
)
PRESETS = ("easy", "hard")
NUM_GROUPS = 25  # like the UCF-101 actor groups g01..g25
GROUPS_PER_FOLD = 7  # fold k tests on groups 7(k-1)+1 .. 7k, as UCF-101
NUM_FOLDS = 3
SPEC_FILE = "synthetic.json"
VIDEO_FOLDER = "UCF-101"
SPLITS_FOLDER = "ucfTrainTestlist"

# Per-class motion: (dx, dy) translation direction, rotation sign (+ = clockwise on screen, since
# image y points down), zoom sign.
_MOTIONS: dict[str, tuple[int, int, int, int]] = {
    "MoveRight": (1, 0, 0, 0),
    "MoveLeft": (-1, 0, 0, 0),
    "MoveDown": (0, 1, 0, 0),
    "MoveUp": (0, -1, 0, 0),
    "RotateCW": (0, 0, 1, 0),
    "RotateCCW": (0, 0, -1, 0),
    "ZoomIn": (0, 0, 0, 1),
    "ZoomOut": (0, 0, 0, -1),
}

# Base motion and sizes, as fractions of the frame side (presets scale them).
_SPEED = 0.012  # translation, frame sides per frame
_ANGULAR_SPEED = math.radians(3.0)  # per frame
_ZOOM_RATE = 0.02  # log-size change per frame
_SIZE_RANGE = (0.09, 0.22)  # half-length of the object, frame sides
_DISTRACTOR_SCALE = (0.5, 1.0)  # distractor size, relative to the smallest object size


@dataclass(frozen=True)
class _Preset:
    motion: float  # multiplies speeds and zoom rate
    size: float  # multiplies the size range
    noise: float  # pixel noise sigma, grey levels
    random_polarity: bool  # dark objects on a bright background half of the time
    distractors: tuple[int, int]  # min, max number of static distractor shapes


_PRESETS = {
    "easy": _Preset(motion=1.5, size=1.3, noise=6.0, random_polarity=False, distractors=(0, 0)),
    "hard": _Preset(motion=1.0, size=1.0, noise=10.0, random_polarity=True, distractors=(1, 3)),
}
_DARK = (0.0, 70.0)  # background channel range (bright-on-dark polarity)
_BRIGHT = (150.0, 255.0)  # object channel range


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic dataset (its cache key)."""

    num_classes: int = 8
    videos_per_class: int = 35  # spread evenly over the 25 groups g01..g25
    num_frames: int = 24  # more than the default clip length 16, so random temporal offsets exist
    size: int = 64  # square frames
    fps: int = 25
    preset: str = "easy"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_classes not in (2, 4, 6, 8):
            raise ValueError(f"num_classes must be 2, 4, 6 or 8 (whole time-reversal pairs), got {self.num_classes}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.videos_per_class < 1 or self.num_frames < 2 or self.size < 16 or self.fps < 1:
            raise ValueError(
                "need videos_per_class >= 1, num_frames >= 2, size >= 16 and fps >= 1, got "
                f"{self.videos_per_class}, {self.num_frames}, {self.size}, {self.fps}"
            )

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASS_NAMES[: self.num_classes]

    def key(self) -> str:
        """Stable short id of the spec and generator version, used to name cache folders."""
        payload = json.dumps({"generator_version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- shapes
# Signed distance functions in the shape's own units (half-length 1); negative inside. Exact
# distances are not needed: they only drive a one-pixel anti-aliased edge.


def _sdf_boxes(u: np.ndarray, v: np.ndarray, boxes: tuple[tuple[float, float, float, float], ...]) -> np.ndarray:
    """Union of axis-aligned boxes (cx, cy, half_w, half_h)."""
    dist = None
    for cx, cy, hx, hy in boxes:
        qx = np.abs(u - cx) - hx
        qy = np.abs(v - cy) - hy
        box = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
        dist = box if dist is None else np.minimum(dist, box)
    return dist


def _sdf_triangle(u: np.ndarray, v: np.ndarray, vertices: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Convex polygon with counter-clockwise vertices: max of the distances to its edge lines."""
    dist = None
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        length = math.hypot(x1 - x0, y1 - y0)
        nx, ny = (y1 - y0) / length, (x0 - x1) / length  # outward normal of a CCW edge
        edge = (u - x0) * nx + (v - y0) * ny
        dist = edge if dist is None else np.maximum(dist, edge)
    return dist


def _sdf_ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Ellipse with radii a, b (first-order distance estimate)."""
    k0 = np.hypot(u / a, v / b)
    k1 = np.hypot(u / (a * a), v / (b * b))
    return np.where(k1 > 1e-6, k0 * (k0 - 1) / np.maximum(k1, 1e-6), -min(a, b))


def _centered(sdf: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Shift a shape so its area centroid is the origin: rotation then turns it in place."""
    axis = np.linspace(-1.5, 1.5, 301)
    u, v = np.meshgrid(axis, axis)
    inside = sdf(u, v) < 0
    assert inside.any(), "empty shape (clockwise polygon?)"
    cu, cv = float(u[inside].mean()), float(v[inside].mean())
    return lambda uu, vv: sdf(uu + cu, vv + cv)


# None has 90-degree rotational symmetry, so a rotation is never ambiguous within a few frames.
_SHAPES: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = tuple(
    _centered(sdf)
    for sdf in (
        partial(_sdf_boxes, boxes=((0.0, 0.0, 1.0, 0.32),)),  # bar
        partial(_sdf_triangle, vertices=((1.0, -0.1), (-0.5, 0.7), (-0.7, -0.75))),  # scalene, counter-clockwise
        partial(_sdf_boxes, boxes=((-0.45, 0.0, 0.25, 1.0), (0.0, 0.75, 0.7, 0.25))),  # L
        partial(_sdf_boxes, boxes=((0.0, -0.75, 1.0, 0.25), (0.0, 0.25, 0.25, 0.75))),  # T
        partial(_sdf_ellipse, a=1.0, b=0.5),
    )
)


def _coverage(
    shape: int, cx: np.ndarray, cy: np.ndarray, angle: np.ndarray, scale: np.ndarray, side: int
) -> np.ndarray:
    """Anti-aliased coverage ``N×side×side`` of a shape at N poses (arrays of length N), on a torus."""
    grid = np.arange(side, dtype=np.float32) + 0.5
    half = side / 2
    # Wrapped offsets: an object crossing an edge re-enters on the opposite side.
    dx = (grid[None, None, :] - cx[:, None, None] + half) % side - half
    dy = (grid[None, :, None] - cy[:, None, None] + half) % side - half
    cos = np.cos(angle)[:, None, None]
    sin = np.sin(angle)[:, None, None]
    scale = scale[:, None, None]
    u = (cos * dx + sin * dy) / scale
    v = (cos * dy - sin * dx) / scale
    return np.clip(0.5 - _SHAPES[shape](u, v) * scale, 0.0, 1.0)


# ----------------------------------------------------------------------------- rendering


def render_video(class_name: str, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Render one video of ``class_name`` as uint8 ``T×H×W×3``; deterministic given the rng state."""
    if class_name not in _MOTIONS:
        raise ValueError(f"unknown class {class_name!r}; classes are {CLASS_NAMES}")
    move_x, move_y, turn, zoom = _MOTIONS[class_name]
    preset = _PRESETS[spec.preset]
    side, frames = spec.size, spec.num_frames
    f32 = np.float32
    t = np.arange(frames, dtype=f32)

    log_min = math.log(_SIZE_RANGE[0] * side * preset.size)
    log_max = math.log(_SIZE_RANGE[1] * side * preset.size)
    # Long videos zoom more slowly so that a whole zoom still fits in the size range.
    zoom_rate = min(_ZOOM_RATE * preset.motion, (log_max - log_min) / (frames - 1))

    shape = int(rng.integers(len(_SHAPES)))
    angle0 = rng.uniform(0, 2 * math.pi)
    x0, y0 = rng.uniform(0, side, 2)
    # Every class picks a would-be zoom trajectory; static classes sit at a random point of it, so
    # static sizes follow the zoom classes' size distribution over frames.
    log_low = rng.uniform(log_min, log_max - zoom_rate * (frames - 1))
    still_at = rng.uniform(0, frames - 1)
    background = rng.uniform(*_DARK, (2, 3))
    gradient_angle = rng.uniform(0, 2 * math.pi)
    colour = rng.uniform(*_BRIGHT, 3)

    speed = _SPEED * side * preset.motion
    cx = (x0 + move_x * speed * t).astype(f32)
    cy = (y0 + move_y * speed * t).astype(f32)
    angle = (angle0 + turn * _ANGULAR_SPEED * preset.motion * t).astype(f32)
    position = {1: t, -1: frames - 1 - t, 0: np.full(frames, still_at, f32)}[zoom]
    scale = np.exp(log_low + zoom_rate * position).astype(f32)

    grid = (np.arange(side, dtype=f32) + 0.5) / side - 0.5
    ramp = np.clip(grid[None, :] * math.cos(gradient_angle) + grid[:, None] * math.sin(gradient_angle) + 0.5, 0, 1)[
        ..., None
    ]
    scene = (background[0] + (background[1] - background[0]) * ramp).astype(f32)  # static H×W×3

    # Distractors are static, so they add clutter without adding motion of either direction.
    low, high = preset.distractors
    for _ in range(int(rng.integers(low, high + 1))):
        d_shape = int(rng.integers(len(_SHAPES)))
        d_x, d_y, d_angle, d_size = rng.uniform(0, 1, 4)
        d_scale = math.exp(log_min) * (_DISTRACTOR_SCALE[0] + d_size * (_DISTRACTOR_SCALE[1] - _DISTRACTOR_SCALE[0]))
        pose = (np.array([value], f32) for value in (d_x * side, d_y * side, d_angle * 2 * math.pi, d_scale))
        alpha = _coverage(d_shape, *pose, side)[0, ..., None]
        scene += alpha * (rng.uniform(*_BRIGHT, 3).astype(f32) - scene)

    alpha = _coverage(shape, cx, cy, angle, scale, side)[..., None]
    image = scene + alpha * (colour.astype(f32) - scene)  # T×H×W×3
    if preset.random_polarity and rng.random() < 0.5:
        np.subtract(255, image, out=image)
    noise = rng.standard_normal(image.shape, dtype=f32)
    noise *= preset.noise
    image += noise
    image += 0.5  # the uint8 cast truncates: +0.5 makes it round
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def _video_rng(spec: SyntheticSpec, class_name: str, index: int) -> np.random.Generator:
    # Keyed on the class's position in CLASS_NAMES, so a video does not change with num_classes.
    return np.random.default_rng([spec.seed, CLASS_NAMES.index(class_name), index])


def _video_groups(videos_per_class: int) -> list[tuple[int, int]]:
    """(group, clip) numbers of each video index, spread evenly over the groups (1-based)."""
    numbers = []
    clip = 0
    for index in range(videos_per_class):
        group = index * NUM_GROUPS // videos_per_class + 1
        clip = clip + 1 if numbers and numbers[-1][0] == group else 1
        numbers.append((group, clip))
    return numbers


def _test_groups(fold: int) -> range:
    return range(GROUPS_PER_FOLD * (fold - 1) + 1, GROUPS_PER_FOLD * fold + 1)


# ----------------------------------------------------------------------------- writing


def _write_dataset(root: Path, spec: SyntheticSpec) -> int:
    """Write videos, UCF-101 split lists and the spec file under ``root``; returns the video count."""
    # PyAV only here: the run config (which reads SyntheticSpec) and `--help` need no video library.
    from datasets.video_io import write_video

    started = time.perf_counter()
    entries = []  # (relative path, 1-based label, group)
    for label, name in enumerate(spec.classes, start=1):
        for index, (group, clip) in enumerate(_video_groups(spec.videos_per_class)):
            relative = f"{name}/v_{name}_g{group:02d}_c{clip:02d}.avi"
            frames = render_video(name, spec, _video_rng(spec, name, index))
            write_video(root / VIDEO_FOLDER / relative, frames, fps=spec.fps, codec="mpeg4", gop_size=8)
            entries.append((relative, label, group))

    splits = root / SPLITS_FOLDER
    splits.mkdir(parents=True)
    (splits / "classInd.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(spec.classes, start=1)))
    for fold in range(1, NUM_FOLDS + 1):
        test = set(_test_groups(fold))
        train_lines = [f"{path} {label}\n" for path, label, group in entries if group not in test]
        test_lines = [f"{path}\n" for path, _, group in entries if group in test]
        (splits / f"trainlist{fold:02d}.txt").write_text("".join(train_lines))
        (splits / f"testlist{fold:02d}.txt").write_text("".join(test_lines))

    # Written last: its presence marks a complete dataset.
    meta = {
        "generator": __name__,
        "generator_version": GENERATOR_VERSION,
        "key": spec.key(),
        "spec": asdict(spec),
        "classes": list(spec.classes),
        "num_videos": len(entries),
    }
    (root / SPEC_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("rendered %d synthetic videos in %.1f s", len(entries), time.perf_counter() - started)
    return len(entries)


def _build_beside(target: Path, spec: SyntheticSpec) -> Path:
    """Generate into a fresh hidden sibling of ``target``; removed again if generation fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_dataset(tmp, spec)
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset should be readable like any folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish(tmp: Path, target: Path) -> bool:
    """Atomically rename ``tmp`` to ``target``; False (and ``tmp`` removed) if ``target`` is taken."""
    try:
        os.rename(tmp, target)  # replaces an empty directory, fails on a non-empty one
        return True
    except OSError:
        if not target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def generate_dataset(out_dir: str | Path, spec: SyntheticSpec) -> Path:
    """Generate the dataset as ``out_dir`` (which must not exist or be empty); returns ``out_dir``.

    Writes ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi``, ``ucfTrainTestlist/{classInd,trainlist0k,testlist0k}.txt``
    and ``synthetic.json``. Everything is written to a temporary sibling folder first and renamed at
    the end, so an interrupted run never leaves a half dataset behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or _is_nonempty_dir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder")
    if not _publish(_build_beside(out_dir, spec), out_dir):
        raise FileExistsError(f"{out_dir} was created by someone else during generation")
    return out_dir


def ensure_synthetic(cache_dir: str | Path, spec: SyntheticSpec) -> Path:
    """Return ``cache_dir/synthetic-<key>``, generating it first unless a complete copy exists.

    Safe when processes race: each generates into its own temporary folder and the first rename wins.
    """
    target = Path(cache_dir) / f"synthetic-{spec.key()}"
    if (target / SPEC_FILE).is_file():
        return target
    if _is_nonempty_dir(target):
        raise FileExistsError(f"{target} exists but has no {SPEC_FILE}: not a complete synthetic dataset; remove it")
    logger.info("generating synthetic dataset %s", target)
    if not _publish(_build_beside(target, spec), target):
        logger.info("%s was generated concurrently by another process; using that copy", target)
        if not (target / SPEC_FILE).is_file():
            raise FileExistsError(f"{target} appeared during generation but is not a complete synthetic dataset")
    return target


# ----------------------------------------------------------------------------- CLI


def _folder_megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    """Generate a synthetic dataset from the command line; prints its path and counts."""
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(prog="fedvideo synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to create (absent or empty)")
    parser.add_argument(
        "--classes",
        type=int,
        default=defaults.num_classes,
        choices=(2, 4, 6, 8),
        help=f"motion classes, in time-reversed pairs (default {defaults.num_classes})",
    )
    parser.add_argument(
        "--videos-per-class",
        type=int,
        default=defaults.videos_per_class,
        help=f"videos of each class, spread over 25 groups g01..g25 (default {defaults.videos_per_class})",
    )
    parser.add_argument(
        "--frames", type=int, default=defaults.num_frames, help=f"frames per video (default {defaults.num_frames})"
    )
    parser.add_argument("--size", type=int, default=defaults.size, help="frame side in pixels")
    parser.add_argument("--fps", type=int, default=defaults.fps, help=f"frame rate stored (default {defaults.fps})")
    parser.add_argument(
        "--preset",
        default=defaults.preset,
        choices=PRESETS,
        help="easy: larger, faster objects, low noise; hard: distractors, random polarity, more noise "
        f"(default {defaults.preset})",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help=f"same seed, same videos (default {defaults.seed})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = SyntheticSpec(
            num_classes=args.classes,
            videos_per_class=args.videos_per_class,
            num_frames=args.frames,
            size=args.size,
            fps=args.fps,
            preset=args.preset,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))

    spec_file = args.out / SPEC_FILE
    started = time.perf_counter()
    if spec_file.is_file() and json.loads(spec_file.read_text()).get("key") == spec.key():
        status = "already present"
    else:
        try:
            generate_dataset(args.out, spec)
        except FileExistsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        status = f"generated in {time.perf_counter() - started:.1f} s"
    total = spec.num_classes * spec.videos_per_class
    print(f"{args.out}: {status}")
    print(
        f"{spec.num_classes} classes x {spec.videos_per_class} videos = {total} videos, "
        f"{spec.num_frames} frames of {spec.size}x{spec.size} ({spec.preset}), {_folder_megabytes(args.out):.1f} MB"
    )
    for fold in range(1, NUM_FOLDS + 1):
        train = len((args.out / SPLITS_FOLDER / f"trainlist{fold:02d}.txt").read_text().splitlines())
        print(f"fold {fold}: {train} train, {total - train} test videos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
