"""Keys of the video model (read by ``fedapp.task.models``; the torch-free table of weights is
``fedapp.task.pretrained``, so that validating a config never imports torch)."""

from __future__ import annotations

from typing import Any

from fedapp.config.keys import Key, Owner
from fedapp.plugins import is_plugin
from fedapp.task.pretrained import MIN_INPUT, MODEL_NAMES, weights_for

POOLINGS = ("mean", "attention")


def _own_model(cfg: Any) -> list[str]:
    """A model of your own loads its weights and freezes its layers in its builder."""
    if not is_plugin(cfg.model):
        return []
    set_ = [f"{k}={v}" for k, v, off in (("pretrained", f'"{cfg.pretrained}"', cfg.pretrained == "none"),
            ("pretrained-path", f'"{cfg.pretrained_path}"', not cfg.pretrained_path),
            ("freeze-backbone", "true", not cfg.freeze_backbone)) if not off]  # fmt: skip
    if not set_:
        return []
    return [f"{', '.join(set_)} with model={cfg.model!r}: a model of your own loads its weights and freezes its "
            "layers in its builder; leave these keys out"]  # fmt: skip


def _min_input(cfg: Any) -> list[str]:
    """Strided convolutions and unpadded pools shrink small clips to nothing (measured per model)."""
    if cfg.model not in MIN_INPUT:
        return []
    frames, side = MIN_INPUT[cfg.model]
    crop = cfg.crop_size or side  # 0: the preset's, which is always large enough
    if cfg.clip_len >= frames and crop >= side:
        return []
    return [f"clip-len={cfg.clip_len} crop-size={cfg.crop_size} is too small for model={cfg.model!r}: it needs "
            f"clip-len >= {frames} and crop-size >= {side}"]  # fmt: skip


def _pretrained(cfg: Any) -> list[str]:
    if cfg.pretrained == "none" or is_plugin(cfg.model):
        return []
    try:
        weights_for(cfg.model, cfg.pretrained)
    except KeyError as error:
        return [f"pretrained={cfg.pretrained!r}: {error.args[0]}, or 'none'"]
    if cfg.pretrained_path:
        return [
            f"pretrained={cfg.pretrained!r} and pretrained-path={cfg.pretrained_path!r} both name the starting "
            "weights: keep one (pretrained-path for a file of your own)"
        ]
    return []


MODEL = Owner(
    "the model",
    keys=(
        Key("model", "tiny3d", "the video classifier", choices=MODEL_NAMES, plugin=True),
        Key("pooling", "mean", "how a framepool_* model pools its frames", choices=POOLINGS,
            when=lambda c: c.model.startswith("framepool_"), needs="a framepool_* model"),
        Key("pretrained", "none", "torchvision weights by name (fetch once: fedvideo weights MODEL NAME --download)"),
        Key("pretrained-path", "", "a file of your own starting weights (new head)"),
        Key("freeze-backbone", False, "train only the head"),
    ),
    checks=(_pretrained, _own_model, _min_input),
)  # fmt: skip
OWNERS = (MODEL,)
