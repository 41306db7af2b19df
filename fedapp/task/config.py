"""The app's run configuration: every knob of ``[tool.flwr.app.config]``, validated once at start."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets.layouts import LAYOUTS
from datasets.partition import METHODS as PARTITION_METHODS
from datasets.synthetic import SyntheticSpec
from fedapp.client.attacks import ATTACKS
from fedapp.task.pretrained import KINETICS400, weights_for, weights_path
from strategies.attacks import OMNISCIENT_ATTACKS
from strategies.compression import METHODS as COMPRESSION_METHODS
from strategies.fusion import FUSION_FUNCTIONS
from strategies.privacy import DP_MODES
from strategies.server_optimizer import ADAPTIVE, SERVER_OPTIMIZERS
from strategies.weighting import WEIGHT_SOURCES

STRATEGIES = ("fedavg", "average", "weighted", "fusion")
DATASETS = ("synthetic", *LAYOUTS)
OPTIMIZERS = ("sgd", "adam", "adamw")
SYNTHETIC_PRESETS = ("easy", "hard")
# The model zoo's names (fedapp.task.models builds them): kept here so that validating a run config
# never imports torch (the launcher checks the config in well under a second, before Flower starts).
MODEL_NAMES = ("tiny3d", "r3d_18", "mc3_18", "r2plus1d_18", "framepool_resnet18", "framepool_resnet50")
POOLINGS = ("mean", "attention")

if TYPE_CHECKING:
    from datasets.clip_dataset import ClipSpec


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class AppConfig:
    """Typed view of the run config. Field names are the TOML keys with ``-`` replaced by ``_``."""

    num_server_rounds: int = 10
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 900.0
    aggregation_threads: int = 0
    central_eval: bool = True
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001
    client_momentum: float = 0.0
    proximal_mu: float = 0.0
    scaffold: bool = False
    norm_bound: float = 0.0
    fedbn: bool = False
    weight_source: str = "num-examples"
    staleness_decay: float = 0.5
    fusion_fn: str = "median"
    trim_beta: float = 0.2
    krum_malicious: int = 1
    krum_selected: int = 1
    bucket_size: int = 1
    nnm_malicious: int = 0
    cc_radius: float = 10.0
    cc_iterations: int = 1
    feddf_steps: int = 100
    feddf_lr: float = 0.0005
    feddf_temperature: float = 1.0
    feddf_patience: int = 5
    feddf_data_dir: str = ""
    feddf_videos: int = 64
    dp: str = "none"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    compression: str = "none"
    topk_fraction: float = 0.01
    dataset: str = "synthetic"
    data_dir: str = ""
    splits_dir: str = ""
    fold: int = 1
    test_fraction: float = 0.2
    cache_dir: str = ""
    synthetic_classes: int = 8
    synthetic_videos_per_class: int = 35
    synthetic_frames: int = 24
    synthetic_size: int = 64
    synthetic_preset: str = "easy"
    synthetic_seed: int = 0
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    partition_seed: int = 42
    clip_len: int = 16
    clip_stride: int = 1
    resize: str = "auto"
    crop_size: int = 0
    eval_clips: int = 3
    clip_cache_dir: str = ""
    model: str = "tiny3d"
    pooling: str = "mean"
    pretrained: str = "none"
    pretrained_path: str = ""
    freeze_backbone: bool = False
    local_epochs: int = 2
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0001
    num_workers: int = 0
    torch_threads: int = 0
    device: str = "auto"
    bf16: bool = True
    channels_last: bool = True
    seed: int = 0
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = 10.0
    attack_z: float = 0.0
    attack_epsilon: float = 0.1
    results_dir: str = "results"
    run_name: str = ""
    checkpoint_keep: int = 3
    resume: str = ""
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    target_accuracy: float = 0.0
    tensorboard: bool = True

    @property
    def clip_spec(self) -> ClipSpec:
        from datasets.clip_dataset import ClipSpec  # imports torch: only where clips are decoded

        return ClipSpec(
            clip_len=self.clip_len,
            stride=self.clip_stride,
            resize=parse_resize(self.resize, "resize"),
            crop_size=self.crop_size,
        )

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the inputs: the pretrained weights' own, Kinetics-400's otherwise."""
        preset = weights_for(self.model, self.pretrained).preset if self.pretrained != "none" else KINETICS400
        return preset.mean, preset.std

    @property
    def synthetic_spec(self) -> SyntheticSpec:
        return SyntheticSpec(
            num_classes=self.synthetic_classes,
            videos_per_class=self.synthetic_videos_per_class,
            num_frames=self.synthetic_frames,
            size=self.synthetic_size,
            preset=self.synthetic_preset,
            seed=self.synthetic_seed,
        )

    @property
    def cache_path(self) -> Path:
        """Where generated data lives: outside the app folder, so it never enters the app bundle."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "fedvideo"

    def to_dict(self) -> dict[str, Any]:
        """The config with TOML key names, as saved in results."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def parse_size(text: str, key: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (or a single ``"S"`` for a square) into ``(height, width)``."""
    parts = str(text).lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2 or min(values) < 8:
        raise ConfigError(f"{key}={text!r} is invalid: expected 'HxW' with H, W >= 8 (e.g. '128x171')")
    return values  # type: ignore[return-value]


def parse_resize(text: str, key: str) -> tuple[int, int] | int:
    """Parse ``"short:N"`` (the short side becomes N, aspect kept: an int) or ``"HxW"`` (exact)."""
    if str(text).lower().startswith("short:"):
        side = str(text)[len("short:") :]
        if not side.isdigit() or int(side) < 8:
            raise ConfigError(f"{key}={text!r} is invalid: expected 'short:N' with N >= 8 (e.g. 'short:128')")
        return int(side)
    return parse_size(text, key)


def _coerce(key: str, value: Any, kind: type) -> Any:
    # TOML gives int for `1` where a float is meant; bool is an int subclass and must not pass as one.
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {kind.__name__}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}")


def _range(key: str, value: float, low: float, high: float | None = None, low_open: bool = False) -> None:
    below = value <= low if low_open else value < low
    if below or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{key}={value!r} is out of range: allowed {bounds}")


def parse_config(run_config: Mapping[str, Any], check_paths: bool = True) -> AppConfig:
    """Validate a Flower run config into an :class:`AppConfig`.

    An unknown key is refused with the closest valid one; missing keys take the defaults; a key set
    to something other than its default that has no effect under the chosen options is refused too
    (:func:`check_no_effect`). ``check_paths`` verifies that the data paths exist (the server checks
    them before round 1; a SuperNode with its own data checks its own).
    """
    check_keys(run_config)
    values: dict[str, Any] = {}
    for field in fields(AppConfig):
        key = field.name.replace("_", "-")
        if key in run_config:
            values[field.name] = _coerce(key, run_config[key], type(field.default))
    cfg = AppConfig(**values)

    _range("num-server-rounds", cfg.num_server_rounds, 1)
    _choice("strategy", cfg.strategy, STRATEGIES)
    _range("fraction-train", cfg.fraction_train, 0.0, 1.0, low_open=True)
    _range("fraction-evaluate", cfg.fraction_evaluate, 0.0, 1.0)
    _range("min-train-nodes", cfg.min_train_nodes, 1)
    _range("min-evaluate-nodes", cfg.min_evaluate_nodes, 0)
    _range("min-available-nodes", cfg.min_available_nodes, 1)
    if cfg.min_available_nodes < max(cfg.min_train_nodes, cfg.min_evaluate_nodes):
        raise ConfigError(
            f"min-available-nodes={cfg.min_available_nodes} is smaller than min-train-nodes="
            f"{cfg.min_train_nodes} / min-evaluate-nodes={cfg.min_evaluate_nodes}: it must be >= both"
        )
    _range("round-timeout", cfg.round_timeout, 0.0, low_open=True)
    _range("aggregation-threads", cfg.aggregation_threads, 0)
    _range("server-lr", cfg.server_lr, 0.0, low_open=True)
    _range("server-momentum", cfg.server_momentum, 0.0, 1.0)
    _choice("server-optimizer", cfg.server_optimizer, SERVER_OPTIMIZERS)
    _range("server-beta1", cfg.server_beta1, 0.0, 0.999)
    _range("server-beta2", cfg.server_beta2, 0.0, 0.9999)
    _range("server-tau", cfg.server_tau, 0.0, low_open=True)
    if cfg.server_optimizer in ADAPTIVE and cfg.server_lr >= 1.0:
        # An adaptive step moves every coordinate by about server-lr: 1 wipes the model in a round.
        raise ConfigError(
            f"server-lr={cfg.server_lr!r} is out of range with server-optimizer={cfg.server_optimizer!r}: allowed "
            "(0, 1) (each coordinate moves by about server-lr per round; Flower's defaults: adam 0.1, yogi 0.01, "
            "adagrad 0.1)"
        )
    _range("client-momentum", cfg.client_momentum, 0.0, 0.99)
    _range("proximal-mu", cfg.proximal_mu, 0.0)
    _choice("weight-source", cfg.weight_source, WEIGHT_SOURCES)
    _range("staleness-decay", cfg.staleness_decay, 0.0, 1.0, low_open=True)
    _choice("fusion-fn", cfg.fusion_fn, FUSION_FUNCTIONS)
    _range("trim-beta", cfg.trim_beta, 0.0, 0.49)
    _range("krum-malicious", cfg.krum_malicious, 0)
    _range("krum-selected", cfg.krum_selected, 1)
    _range("bucket-size", cfg.bucket_size, 1)
    _range("nnm-malicious", cfg.nnm_malicious, 0)
    if cfg.nnm_malicious > 0 and cfg.bucket_size > 1:
        raise ConfigError(
            f"nnm-malicious={cfg.nnm_malicious} and bucket-size={cfg.bucket_size} are two alternative "
            "mixing steps before the rule: set one of them (nnm-malicious=0 or bucket-size=1)"
        )
    _range("cc-radius", cfg.cc_radius, 0.0, low_open=True)
    _range("cc-iterations", cfg.cc_iterations, 1)
    _range("norm-bound", cfg.norm_bound, 0.0)
    f = cfg.krum_malicious
    if cfg.strategy == "fusion" and cfg.fusion_fn == "bulyan" and cfg.min_train_nodes < 4 * f + 3:
        raise ConfigError(
            f"fusion-fn='bulyan' with krum-malicious={f} needs min-train-nodes >= 4·{f}+3 = {4 * f + 3}, got "
            f"min-train-nodes={cfg.min_train_nodes}: set min-train-nodes={4 * f + 3} min-available-nodes={4 * f + 3} "
            f"and run at least {4 * f + 3} SuperNodes (fedvideo run --federation-config 'num-supernodes={4 * f + 3}')"
        )
    if cfg.bucket_size > 1 and (_krum(cfg) or _bulyan(cfg)):
        # Krum and Bulyan need 3 models; with bucketing they see ⌈N/s⌉ bucket means, not N clients.
        if -(-cfg.min_train_nodes // cfg.bucket_size) < 3:
            raise ConfigError(
                f"bucket-size={cfg.bucket_size} leaves ⌈min-train-nodes/bucket-size⌉ = "
                f"{-(-cfg.min_train_nodes // cfg.bucket_size)} buckets, fewer than the 3 fusion-fn="
                f"{cfg.fusion_fn!r} needs: lower bucket-size to at most {max((cfg.min_train_nodes - 1) // 2, 1)}"
            )
    if cfg.strategy == "fusion" and cfg.fusion_fn == "krum" and cfg.min_train_nodes <= 2 * cfg.krum_malicious + 2:
        raise ConfigError(
            f"fusion-fn='krum' with krum-malicious={cfg.krum_malicious} needs min-train-nodes > "
            f"2·{cfg.krum_malicious}+2 = {2 * cfg.krum_malicious + 2}, got min-train-nodes={cfg.min_train_nodes}: "
            f"set min-train-nodes={2 * cfg.krum_malicious + 3} min-available-nodes={2 * cfg.krum_malicious + 3} and "
            f"run at least {2 * cfg.krum_malicious + 3} SuperNodes (fedvideo run --federation-config "
            f"'num-supernodes={2 * cfg.krum_malicious + 3}')"
        )
    _range("feddf-steps", cfg.feddf_steps, 0)
    _range("feddf-lr", cfg.feddf_lr, 0.0, low_open=True)
    _range("feddf-temperature", cfg.feddf_temperature, 0.0, low_open=True)
    _range("feddf-patience", cfg.feddf_patience, 1)
    _range("feddf-videos", cfg.feddf_videos, 1)
    _choice("dp", cfg.dp, DP_MODES)
    _range("dp-noise-multiplier", cfg.dp_noise_multiplier, 0.0)
    _range("dp-clipping-norm", cfg.dp_clipping_norm, 0.0, low_open=True)
    _range("dp-delta", cfg.dp_delta, 0.0, 0.1, low_open=True)
    _choice("compression", cfg.compression, COMPRESSION_METHODS)
    _range("topk-fraction", cfg.topk_fraction, 0.0, 1.0, low_open=True)
    _choice("dataset", cfg.dataset, DATASETS)
    _range("fold", cfg.fold, 1, 3)
    _range("test-fraction", cfg.test_fraction, 0.0, 1.0, low_open=True)
    _range("synthetic-classes", cfg.synthetic_classes, 2, 8)
    if cfg.synthetic_classes % 2:
        raise ConfigError(f"synthetic-classes={cfg.synthetic_classes} is not allowed: choose 2, 4, 6 or 8")
    _range("synthetic-videos-per-class", cfg.synthetic_videos_per_class, 2)
    _range("synthetic-frames", cfg.synthetic_frames, 2)
    _range("synthetic-size", cfg.synthetic_size, 16)
    _choice("synthetic-preset", cfg.synthetic_preset, SYNTHETIC_PRESETS)
    _choice("partitioning", cfg.partitioning, PARTITION_METHODS)
    _range("dirichlet-alpha", cfg.dirichlet_alpha, 0.0, low_open=True)
    _range("classes-per-client", cfg.classes_per_client, 1)
    _range("clip-len", cfg.clip_len, 1)
    _range("clip-stride", cfg.clip_stride, 1)
    _choice("model", cfg.model, MODEL_NAMES)
    if cfg.pretrained != "none":
        try:
            weights_for(cfg.model, cfg.pretrained)
        except KeyError as error:
            raise ConfigError(f"pretrained={cfg.pretrained!r}: {error.args[0]}, or 'none'") from None
        if cfg.pretrained_path:
            raise ConfigError(
                f"pretrained={cfg.pretrained!r} and pretrained-path={cfg.pretrained_path!r} both name the starting "
                "weights: keep one (pretrained-path for a file of your own)"
            )
    cfg = resolve_preset(cfg)
    resize = parse_resize(cfg.resize, "resize")
    _range("crop-size", cfg.crop_size, 8, resize if isinstance(resize, int) else min(resize))
    _range("eval-clips", cfg.eval_clips, 1)
    _check_clip_cache_dir(cfg.clip_cache_dir)
    _choice("pooling", cfg.pooling, POOLINGS)
    _range("local-epochs", cfg.local_epochs, 1)
    _range("batch-size", cfg.batch_size, 1)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _range("lr", cfg.lr, 0.0, low_open=True)
    _range("momentum", cfg.momentum, 0.0, 1.0)
    _range("weight-decay", cfg.weight_decay, 0.0)
    if cfg.num_workers < -1:
        raise ConfigError(
            f"num-workers={cfg.num_workers!r} is out of range: allowed -1 (auto: this process's CPUs minus one) or >= 0"
        )
    _range("torch-threads", cfg.torch_threads, 0)
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device={cfg.device!r} is not allowed: choose auto, cpu, cuda or cuda:N")
    _choice("attack", cfg.attack, ATTACKS)
    _range("attack-fraction", cfg.attack_fraction, 0.0, 1.0)
    _range("attack-scale", cfg.attack_scale, 0.0)
    _range("attack-z", cfg.attack_z, 0.0)
    _range("attack-epsilon", cfg.attack_epsilon, 0.0, low_open=True)
    if cfg.scaffold:
        check_scaffold(cfg)
    if cfg.attack in OMNISCIENT_ATTACKS and cfg.dp != "none":
        # Server-side DP clips inside Flower's wrapper before the inner strategy (where the test
        # tool injects) aggregates: the forged model would skip the clipping real replies get.
        raise ConfigError(f'attack={cfg.attack!r} is not simulated with dp={cfg.dp!r}: set dp="none"')
    if _feddf(cfg) and cfg.dataset != "synthetic" and not cfg.feddf_data_dir:
        # The synthetic generator is another task: distilling on it pulls the model away from
        # the user's classes (measured: 0.33 against 0.57 with in-domain clips).
        raise ConfigError(
            f"feddf-data-dir='' is not allowed with fusion-fn=\"feddf\" and dataset={cfg.dataset!r}: FedDF distils "
            "on unlabeled videos of your task held by the server; name a folder of them (never the test videos)"
        )
    _range("checkpoint-keep", cfg.checkpoint_keep, 0)
    _range("early-stop-patience", cfg.early_stop_patience, 0)
    _range("early-stop-min-delta", cfg.early_stop_min_delta, 0.0)
    _range("target-accuracy", cfg.target_accuracy, 0.0, 1.0)
    if not cfg.results_dir:
        raise ConfigError("results-dir='' is not allowed: name a directory for the run's outputs")
    check_no_effect(cfg)

    if check_paths:
        check_data_paths(cfg)
    return cfg


def resolve_preset(cfg: AppConfig) -> AppConfig:
    """``resize="auto"`` and ``crop-size=0`` take the pretrained weights' preset (torchvision's
    ``weights.transforms()``), or the small default 64x64 / 64 without pretrained weights."""
    preset = weights_for(cfg.model, cfg.pretrained).preset if cfg.pretrained != "none" else None
    return replace(
        cfg,
        resize=cfg.resize if cfg.resize != "auto" else (preset.resize if preset else "64x64"),
        crop_size=cfg.crop_size or (preset.crop_size if preset else 64),
    )


def config_keys() -> list[str]:
    """Every run-config key, in declaration order."""
    return [f.name.replace("_", "-") for f in fields(AppConfig)]


def check_keys(run_config: Mapping[str, Any]) -> None:
    """Refuse keys the app does not have, naming the closest valid key for each."""
    known = config_keys()
    unknown = [key for key in run_config if key not in known]
    if not unknown:
        return
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        problems.append(f"unknown key {key!r}" + (f": did you mean {close[0]!r}?" if close else ""))
    raise ConfigError("; ".join(problems) + " (every key: pyproject.toml [tool.flwr.app.config], README Configuration)")


def _krum(cfg: AppConfig) -> bool:
    return cfg.strategy == "fusion" and cfg.fusion_fn == "krum"


def _bulyan(cfg: AppConfig) -> bool:
    return cfg.strategy == "fusion" and cfg.fusion_fn == "bulyan"


def _feddf(cfg: AppConfig) -> bool:
    return cfg.strategy == "fusion" and cfg.fusion_fn == "feddf"


# Keys that only act under some options: (keys, whether they act, the options they need). A key set
# to anything but its default where it does nothing is a mistake the user would want to hear about
# (data-dir with the synthetic dataset trains on generated videos), so it is refused, not ignored.
_ACTS_ONLY_WITH: tuple[tuple[tuple[str, ...], Callable[[AppConfig], bool], str], ...] = (
    (("weight-source",), lambda c: c.strategy == "weighted", 'strategy="weighted"'),
    (("staleness-decay",), lambda c: c.strategy == "weighted" and c.weight_source == "staleness",
     'strategy="weighted" and weight-source="staleness"'),
    (("fusion-fn",), lambda c: c.strategy == "fusion", 'strategy="fusion"'),
    (("server-momentum",), lambda c: c.server_optimizer == "sgd", 'server-optimizer="sgd"'),
    (("server-beta1", "server-beta2"), lambda c: c.server_optimizer in ("adam", "yogi"),
     'server-optimizer="adam" or "yogi"'),
    (("server-tau",), lambda c: c.server_optimizer in ADAPTIVE, 'server-optimizer="adam", "yogi" or "adagrad"'),
    (("trim-beta",), lambda c: c.strategy == "fusion" and c.fusion_fn == "trimmed-mean",
     'strategy="fusion" and fusion-fn="trimmed-mean"'),
    (("krum-malicious",), lambda c: _krum(c) or _bulyan(c), 'strategy="fusion" and fusion-fn="krum" or "bulyan"'),
    (("krum-selected",), _krum, 'strategy="fusion" and fusion-fn="krum"'),
    (("bucket-size",), lambda c: c.strategy == "fusion" and c.fusion_fn != "feddf",
     'strategy="fusion" and a fusion-fn other than "feddf"'),
    (("nnm-malicious",), lambda c: c.strategy == "fusion" and c.fusion_fn != "feddf",
     'strategy="fusion" and a fusion-fn other than "feddf"'),
    (("cc-radius", "cc-iterations"), lambda c: c.strategy == "fusion" and c.fusion_fn == "centered-clipping",
     'strategy="fusion" and fusion-fn="centered-clipping"'),
    (("feddf-steps", "feddf-lr", "feddf-temperature", "feddf-patience", "feddf-data-dir", "feddf-videos"),
     _feddf, 'strategy="fusion" and fusion-fn="feddf"'),
    (("dp-noise-multiplier", "dp-clipping-norm", "dp-delta"), lambda c: c.dp != "none",
     'dp="server-side" or dp="client-side"'),
    (("topk-fraction",), lambda c: c.compression == "topk", 'compression="topk"'),
    (("data-dir",), lambda c: c.dataset != "synthetic", "a dataset of your own (dataset=" + " / ".join(
        f'"{d}"' for d in LAYOUTS) + ")"),
    (("splits-dir",), lambda c: c.dataset in ("ucf101", "hmdb51"), 'dataset="ucf101" or "hmdb51"'),
    (("fold",), lambda c: c.dataset in ("synthetic", "ucf101", "hmdb51"), 'dataset="synthetic", "ucf101" or "hmdb51"'),
    (("test-fraction",), lambda c: c.dataset in ("folders", "manifest"), 'dataset="folders" or "manifest"'),
    (("synthetic-classes", "synthetic-videos-per-class", "synthetic-frames", "synthetic-size", "synthetic-preset",
      "synthetic-seed"), lambda c: c.dataset == "synthetic", 'dataset="synthetic"'),
    (("dirichlet-alpha",), lambda c: c.partitioning == "dirichlet", 'partitioning="dirichlet"'),
    (("classes-per-client",), lambda c: c.partitioning == "k-classes", 'partitioning="k-classes"'),
    (("pooling",), lambda c: c.model.startswith("framepool_"), "a framepool_* model"),
    (("momentum",), lambda c: c.optimizer == "sgd", 'optimizer="sgd"'),
    (("attack-fraction",), lambda c: c.attack != "none", 'attack != "none"'),
    (("attack-scale",), lambda c: c.attack in ("sign-flip", "noise"), 'attack="sign-flip" or "noise"'),
    (("attack-z",), lambda c: c.attack == "alie", 'attack="alie"'),
    (("attack-epsilon",), lambda c: c.attack == "ipm", 'attack="ipm"'),
    (("attack",), lambda c: c.attack_fraction > 0, "attack-fraction > 0 (the share of clients that attack)"),
    (("early-stop-min-delta",), lambda c: c.early_stop_patience > 0, "early-stop-patience > 0"),
)  # fmt: skip


def check_scaffold(cfg: AppConfig) -> None:
    """SCAFFOLD (option II) reads each client's average gradient from its plain-SGD displacement and
    sends a second record beside the model: refuse what would make either wrong or silently off."""
    problems = []
    if cfg.optimizer != "sgd" or cfg.momentum != 0.0:
        problems.append(
            f'optimizer={_toml(cfg.optimizer)} momentum={_toml(cfg.momentum)}: set optimizer="sgd" momentum=0.0 '
            "(option II derives the control variate from plain SGD steps)"
        )
    if cfg.strategy == "fusion":
        problems.append('strategy="fusion": use "fedavg", "average" or "weighted" (the averaging family)')
    if cfg.dp != "none":
        problems.append(f'dp={_toml(cfg.dp)}: set dp="none" (the control variates are not clipped or noised)')
    if cfg.compression != "none":
        problems.append(f'compression={_toml(cfg.compression)}: set compression="none"')
    if cfg.client_momentum > 0:
        problems.append(f"client-momentum={cfg.client_momentum!r}: set client-momentum=0.0")
    if problems:
        raise ConfigError("scaffold=true does not work with " + "; ".join(problems))


def check_no_effect(cfg: AppConfig) -> None:
    """Refuse keys set away from their default that the chosen options make do nothing."""
    defaults = AppConfig()
    problems = []
    for keys, acts, needs in _ACTS_ONLY_WITH:
        if acts(cfg):
            continue
        for key in keys:
            name = key.replace("-", "_")
            value = getattr(cfg, name)
            if value != getattr(defaults, name):
                problems.append(f"{key}={_toml(value)} has no effect: it applies only with {needs}")
    if problems:
        raise ConfigError("; ".join(problems) + ". Set the option it needs, or leave the key out")


def _toml(value: Any) -> str:
    """A value as the user writes it in TOML (``"r3d_18"``, ``true``, ``0.5``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)


# A ``key=value`` pair as Flower's CLI reads it from ``--run-config`` (the same pattern).
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_overrides(texts: Sequence[str]) -> dict[str, Any]:
    """``--run-config`` texts (``'k=v k2="s"'``) as a dict, later texts winning, each pair read as
    TOML the way Flower reads it; refuses what Flower would fail on or silently drop: text that is
    not a ``key=value`` pair, and a value that is not TOML (above all an unquoted string)."""
    out: dict[str, Any] = {}
    for text in texts:
        leftover = _PAIR.sub("", text).strip()
        if leftover:
            raise ConfigError(
                f"--run-config {text!r}: {leftover!r} is not a key=value pair (pairs are separated by spaces: "
                "'num-server-rounds=5 model=\"r3d_18\"')"
            )
        for key, raw in _PAIR.findall(text):
            try:
                out.update(tomllib.loads(f"{key} = {raw}"))
            except tomllib.TOMLDecodeError:
                hint = f'{key}="{raw}"' if re.fullmatch(r"[^\s\"']+", raw) else f"{key}=<a TOML value>"
                raise ConfigError(
                    f"--run-config {key}={raw}: the value is not a number, true/false or a quoted string; "
                    f"strings need TOML quotes: {hint} (in a shell, inside single quotes: '{hint}')"
                ) from None
    return out


def check_federation_size(cfg: AppConfig, num_nodes: int) -> None:
    """Refuse what a federation of ``num_nodes`` SuperNodes cannot give: a run that would wait for
    nodes that never come, or an attack setting under which no client attacks."""
    need = {"min-available-nodes": cfg.min_available_nodes, "min-train-nodes": cfg.min_train_nodes}
    if cfg.fraction_evaluate > 0:
        need["min-evaluate-nodes"] = cfg.min_evaluate_nodes
    short = {k: v for k, v in need.items() if v > num_nodes}
    if short:
        wanted = max(short.values())
        raise ConfigError(
            ", ".join(f"{k}={v}" for k, v in short.items()) + f" but the federation has {num_nodes} SuperNodes "
            f"(num-supernodes={num_nodes}): the run would wait for nodes that never come; lower "
            f"{' / '.join(short)}, or run {wanted} SuperNodes (--federation-config 'num-supernodes={wanted}')"
        )
    if cfg.attack != "none" and round(cfg.attack_fraction * num_nodes) == 0:
        raise ConfigError(
            f"attack={cfg.attack!r} with attack-fraction={cfg.attack_fraction}: round({cfg.attack_fraction} × "
            f"{num_nodes} SuperNodes) = 0 clients attack; raise attack-fraction to at least {0.5 / num_nodes:.2f}"
        )


def _check_clip_cache_dir(value: str) -> None:
    """``clip-cache-dir``: empty (off) or an absolute folder outside the app (never bundled with it)."""
    if not value:
        return
    path = Path(value).expanduser()
    app_dir = Path(__file__).resolve().parents[2]
    if not path.is_absolute() or path.resolve().is_relative_to(app_dir):
        raise ConfigError(
            f"clip-cache-dir={value!r} is not allowed: give an absolute path (or ~/...) outside the app folder "
            f"{str(app_dir)!r}, or '' to turn the clip cache off"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"clip-cache-dir={value!r} is not a directory")


def check_data_paths(cfg: AppConfig) -> None:
    """Fail early when the data or weights the config names are missing."""
    if cfg.dataset != "synthetic":
        if not cfg.data_dir:
            raise ConfigError(f"data-dir='' is not allowed with dataset={cfg.dataset!r}: name the video folder")
        if not Path(cfg.data_dir).expanduser().exists():
            raise ConfigError(f"data-dir={cfg.data_dir!r} does not exist")
        if cfg.splits_dir and not Path(cfg.splits_dir).expanduser().is_dir():
            raise ConfigError(f"splits-dir={cfg.splits_dir!r} is not a directory")
    if cfg.feddf_data_dir and not Path(cfg.feddf_data_dir).expanduser().is_dir():
        raise ConfigError(f"feddf-data-dir={cfg.feddf_data_dir!r} is not a directory")
    if cfg.pretrained != "none" and not weights_path(cfg.model, cfg.pretrained).is_file():
        path = weights_path(cfg.model, cfg.pretrained)
        raise ConfigError(
            f"pretrained={cfg.pretrained!r}: torchvision's file for {cfg.model} is not at {path} (torch.hub's cache, "
            f"$TORCH_HOME/hub/checkpoints). Fetch it once with `fedvideo weights {cfg.model} {cfg.pretrained} "
            f"--download`, or copy {path.name} there from a machine that has it; the server loads it and sends it "
            "to the clients, which never need it"
        )
    if cfg.pretrained_path and not Path(cfg.pretrained_path).expanduser().is_file():
        raise ConfigError(f"pretrained-path={cfg.pretrained_path!r} is not a file")
