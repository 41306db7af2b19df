"""The app's run configuration: every knob of ``[tool.flwr.app.config]``, validated once at start.

Keys are declared by the stages and modules that read them (``strategies/`` stage files,
``fedapp/config/``); :data:`AppConfig` and the validator are assembled from those declarations.
``fedvideo config`` lists them; docs/config-keys.md is generated from them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, field, make_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets.synthetic import SyntheticSpec
from fedapp.config import data, model, personalization, run, secagg, training
from fedapp.config.data import parse_resize, parse_size
from fedapp.config.keys import ConfigError, Key, Owner, declared, toml, validate
from fedapp.task.pretrained import KINETICS400, weights_for, weights_path
from strategies import compression, privacy, strategy
from strategies.scaffold import Scaffold
from strategies.stage import registered, stage_owners

if TYPE_CHECKING:
    from datasets.clip_dataset import ClipSpec

__all__ = ["AppConfig", "ConfigError", "parse_config", "parse_resize", "parse_size", "toml"]


def owners() -> tuple[Owner, ...]:
    """Every owner of run-config keys, in the order the key reference lists them."""
    return (
        *run.OWNERS,
        strategy.KEYS,
        strategy.FUSION,
        *stage_owners(),
        Scaffold.owner(),
        privacy.KEYS,
        compression.KEYS,
        *data.OWNERS,
        *model.OWNERS,
        *training.OWNERS,
        *personalization.OWNERS,
        *secagg.OWNERS,
        Owner("crop check", checks=(lambda cfg: crop_problems(cfg),)),
    )


def all_keys() -> dict[str, Key]:
    """Every key by name, in declaration order."""
    return declared(owners())


class ConfigViews:
    """What the typed config derives from its keys."""

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


def app_config_class() -> type:
    """The typed view of the run config: one frozen field per declared key (``-`` → ``_``)."""
    cls = make_dataclass(
        "AppConfig",
        [(k.attr, k.kind, field(default=k.default)) for k in all_keys().values()],
        bases=(ConfigViews,),
        frozen=True,
    )
    cls.__module__ = __name__  # pickled by name (data loader workers): found here
    cls.__doc__ = "Typed view of the run config. Field names are the TOML keys with ``-`` replaced by ``_``."
    return cls


AppConfig = app_config_class()


def parse_config(
    run_config: Mapping[str, Any], check_paths: bool = True, explicit: Iterable[str] | None = None
) -> AppConfig:
    """Validate a Flower run config into an :data:`AppConfig`, or raise one :class:`ConfigError`
    listing every problem.

    An unknown key is refused with the closest valid one; missing keys take the defaults; a key the
    user set (``explicit``; by default: those that differ from their default) whose owning stage or
    module the config does not use is refused, whatever its value. ``check_paths`` verifies that
    the data paths exist (the server checks them before round 1; a SuperNode with its own data
    checks its own)."""
    cfg = resolve_preset(validate(run_config, owners(), lambda values: AppConfig(**values), explicit))
    if check_paths:
        check_data_paths(cfg)
    return cfg


def crop_problems(cfg: AppConfig) -> list[str]:
    """``crop-size`` must fit inside the resized frame (after the preset fills in ``auto`` / 0)."""
    try:
        resolved = resolve_preset(cfg)
        resize = parse_resize(resolved.resize, "resize")
    except (KeyError, ConfigError):  # reported by the model's or resize's own check
        return []
    limit = resize if isinstance(resize, int) else min(resize)
    if 8 <= resolved.crop_size <= limit:
        return []
    return [f"crop-size={resolved.crop_size!r} is out of range: allowed [8, {limit}]"]


def resolve_preset(cfg: AppConfig) -> AppConfig:
    """Fill in what a key leaves to a default of another's: ``resize="auto"`` and ``crop-size=0``
    take the pretrained weights' preset (torchvision's ``weights.transforms()``), or 64x64 / 64
    without pretrained weights; ``server-lr=0`` the server optimizer's own default."""
    preset = weights_for(cfg.model, cfg.pretrained).preset if cfg.pretrained != "none" else None
    return replace(
        cfg,
        resize=cfg.resize if cfg.resize != "auto" else (preset.resize if preset else "64x64"),
        crop_size=cfg.crop_size or (preset.crop_size if preset else 64),
        server_lr=cfg.server_lr or registered("server-step")[cfg.server_optimizer].default_lr,
    )


def config_keys() -> list[str]:
    """Every run-config key, in declaration order."""
    return list(all_keys())


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
    nodes that never come."""
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
