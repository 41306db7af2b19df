"""Video classifiers (backbone + linear head) and offline transfer learning.

Every built-in model is a :class:`VideoClassifier` whose ``backbone`` maps a ``B×C×T×H×W`` float
clip to ``B×F`` features and whose ``head`` is ``nn.Linear(F, num_classes)``, so state_dict keys are
always ``backbone.*`` and ``head.*`` whatever the architecture. A model of the user's own, named
``"module:builder"``, is the module ``builder(num_classes)`` returns, unwrapped (its keys are its
own); :func:`check_model` vets it once at start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file as load_safetensors
from torch import nn

from fedapp.config.model import POOLINGS
from fedapp.plugins import check_signature, is_plugin, load_plugin
from fedapp.task.pretrained import MODEL_NAMES, weights_path

logger = logging.getLogger(__name__)


_VIDEO_RESNETS: dict[str, Callable[..., nn.Module]] = {
    "r3d_18": torchvision.models.video.r3d_18,
    "mc3_18": torchvision.models.video.mc3_18,
    "r2plus1d_18": torchvision.models.video.r2plus1d_18,
}
_RESNETS_2D: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}
_TORCHVISION_HEADS = ("fc.", "classifier.")  # classifier keys of torchvision files, replaced by our head
_SHOW_KEYS = 4  # offending keys quoted per category in error messages
_CHECK_CLIP = (3, 8, 32, 32)  # C×T×H×W of check_model's dummy clip


class ModelError(ValueError):
    """Bad model configuration, weights file or device request."""


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ModelError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def _drop_fc(net: nn.Module) -> int:
    """Replace a torchvision classifier's ``fc`` by Identity; return the feature size it consumed."""
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return feature_dim


def _s3d() -> tuple[nn.Module, int]:
    """torchvision's S3D without its classifier: a ``B×1024`` global average of its last feature map.

    torchvision averages a fixed 2×7×7 window, which is the whole map of its 16×224×224 input, so the
    global mean is the same there and also takes small clips (down to 5 frames of 17×17, see
    ``MIN_INPUT``). BatchNorm keeps torchvision's eps, which the pretrained statistics go with, but
    PyTorch's default momentum 0.1 rather than 0.001 (TensorFlow's decay 0.999): at 0.001 the running
    statistics of a model trained from scratch stay near their initial values for thousands of
    steps, so evaluation would be off for many rounds.
    """
    net = torchvision.models.video.s3d(weights=None, norm_layer=partial(nn.BatchNorm3d, eps=1e-3))
    feature_dim = net.classifier[1].in_channels
    net.avgpool = nn.AdaptiveAvgPool3d(1)
    net.classifier = nn.Identity()  # S3D.forward then averages the 1×1×1 map away
    return net, feature_dim


def _conv_block(
    cin: int, cout: int, stride: tuple[int, int, int] = (1, 1, 1), pool: tuple[int, int, int] | None = None
) -> nn.Sequential:
    # bias is redundant before BatchNorm
    layers: list[nn.Module] = [
        nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool is not None:
        layers.append(nn.MaxPool3d(pool))
    return nn.Sequential(*layers)


class TinyC3D(nn.Module):
    """Small 3D CNN (~0.57 M params) for CPU clients.

    Spatial resolution is cut early (strided first conv, 1×2×2 pools) to keep it cheap, while time
    is kept at full rate through three 3×3×3 convs and only halved before the last block, so the
    features can encode motion direction, not only appearance.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, int, int, int] = (24, 48, 96, 160)) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths
        self.blocks = nn.Sequential(
            _conv_block(in_channels, c1, stride=(1, 2, 2), pool=(1, 2, 2)),
            _conv_block(c1, c2, pool=(1, 2, 2)),
            _conv_block(c2, c3, pool=(2, 2, 2)),
            _conv_block(c3, c4, pool=None),
        )
        self.feature_dim = c4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3, 4))


class FramePooledResNet(nn.Module):
    """2D torchvision ResNet applied to every frame, features pooled over time.

    Mean pooling, or attention pooling (a learned score per frame, softmax over T, weighted sum).
    Both are invariant to frame order, so this is a control model that cannot use motion.
    """

    def __init__(self, arch: str = "resnet18", pooling: str = "mean") -> None:
        super().__init__()
        _check_choice("2D resnet", arch, tuple(_RESNETS_2D))
        _check_choice("pooling", pooling, POOLINGS)
        self.net = _RESNETS_2D[arch](weights=None)
        self.feature_dim = _drop_fc(self.net)
        self.attention = nn.Linear(self.feature_dim, 1) if pooling == "attention" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # fold time into batch; a channels_last_3d clip becomes channels_last frames without a copy
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        feats = self.net(frames).reshape(b, t, -1)
        if self.attention is None:
            return feats.mean(dim=1)
        weights = torch.softmax(self.attention(feats), dim=1)  # B×T×1
        return (weights * feats).sum(dim=1)


class VideoClassifier(nn.Module):
    """``backbone`` (clip -> features) followed by a linear ``head``.

    After :meth:`freeze_backbone`, ``train()`` keeps the frozen part in eval mode so its BatchNorm
    running statistics stay those of the pretrained weights.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``B×feature_dim`` (for retrieval / probing)."""
        return self.backbone(x)

    def train(self, mode: bool = True) -> VideoClassifier:
        super().train(mode)
        if self.backbone_frozen:
            _transferable_part(self).eval()
        return self

    def freeze_backbone(self) -> None:
        """Stop gradients into the pretrained part of the backbone and keep its BatchNorm in eval."""
        for param in _transferable_part(self).parameters():
            param.requires_grad_(False)
        self.backbone_frozen = True
        self.train(self.training)


def _transferable_part(model: VideoClassifier) -> nn.Module:
    """The module a pretrained torchvision file fills (and freezing freezes).

    For frame-pooled models that is the 2D ResNet only: the attention scorer never comes from a
    pretrained file, so it stays trainable, otherwise it would be a frozen random weighting.
    """
    backbone = model.backbone
    return backbone.net if isinstance(backbone, FramePooledResNet) else backbone


def _build_backbone(name: str, pooling: str) -> tuple[nn.Module, int]:
    if name == "tiny3d":
        net = TinyC3D()
        return net, net.feature_dim
    if name.startswith("framepool_"):
        net = FramePooledResNet(name.removeprefix("framepool_"), pooling)
        return net, net.feature_dim
    if name == "s3d":
        return _s3d()
    net = _VIDEO_RESNETS[name](weights=None)
    return net, _drop_fc(net)


def build_model(
    name: str,
    num_classes: int,
    pretrained_path: str = "",
    freeze_backbone: bool = False,
    pooling: str = "mean",
    pretrained: str = "none",
) -> nn.Module:
    """Build a classifier by name; optionally load a pretrained backbone and freeze it.

    ``pretrained`` names torchvision weights (``"KINETICS400_V1"``...), read from torch.hub's cache
    and never downloaded; ``pretrained_path`` is a local file. ``pooling`` only matters for
    ``framepool_*`` models. A ``"module:builder"`` name returns ``builder(num_classes)`` as is; the
    other options are refused for it (its builder owns its weights and what it trains).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    if is_plugin(name):
        _refuse_builtin_options(name, pretrained_path, freeze_backbone, pooling, pretrained)
        model = _build_plugin(name, num_classes)
    else:
        model = _build_builtin(name, num_classes, pooling, pretrained, pretrained_path, freeze_backbone)
    logger.debug(
        "built %s: %.2f M params (%.2f M trainable), %d classes",
        name,
        count_parameters(model) / 1e6,
        count_parameters(model, trainable_only=True) / 1e6,
        num_classes,
    )
    return model


def _check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ModelError(
            f'unknown model {name!r}; allowed: {", ".join(MODEL_NAMES)}, or a model of your own as "module:builder"'
        )


def _build_builtin(
    name: str, num_classes: int, pooling: str, pretrained: str, pretrained_path: str, freeze_backbone: bool
) -> VideoClassifier:
    _check_model_name(name)
    _check_choice("pooling", pooling, POOLINGS)
    if pooling != "mean" and not name.startswith("framepool_"):
        logger.info("pooling=%r ignored: it only applies to framepool_* models, not %s", pooling, name)
    backbone, feature_dim = _build_backbone(name, pooling)
    model = VideoClassifier(backbone, feature_dim, num_classes)
    if pretrained != "none":
        try:
            path = weights_path(name, pretrained)
        except KeyError as error:
            raise ModelError(error.args[0]) from None
        if not path.is_file():
            raise ModelError(
                f"torchvision's {pretrained} weights for {name} are not at {path}: "
                f"fetch them once with `fedvideo weights {name} {pretrained} --download`"
            )
        load_pretrained_backbone(model, name, str(path))
    if pretrained_path:
        load_pretrained_backbone(model, name, pretrained_path)
    if freeze_backbone:
        model.freeze_backbone()
    return model


def _refuse_builtin_options(
    name: str, pretrained_path: str, freeze_backbone: bool, pooling: str, pretrained: str
) -> None:
    """A plug-in model takes none of the built-in models' options: say which were set."""
    options = (
        ("pretrained", pretrained, "none"),
        ("pretrained-path", pretrained_path, ""),
        ("freeze-backbone", freeze_backbone, False),
        ("pooling", pooling, "mean"),
    )
    set_options = [f"{key}={value!r}" for key, value, default in options if value != default]
    if set_options:
        raise ModelError(
            f'model="{name}" is a model of your own: {", ".join(set_options)} only apply to built-in models; '
            "load weights or freeze layers in your builder instead"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _build_plugin(name: str, num_classes: int) -> nn.Module:
    """``builder(num_classes)`` of a ``"module:builder"`` name, checked to be a torch module."""
    builder = check_signature("model", name, load_plugin("model", name), ("num_classes",))
    try:
        model = builder(num_classes)
    except Exception as exc:  # the user's code may raise anything: name where it came from
        raise ModelError(f'model="{name}": building with num_classes={num_classes} raised {_first_line(exc)}') from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f'model="{name}" returned a {type(model).__name__}, not a torch.nn.Module')
    return model


def check_model(name: str, num_classes: int = 2, input_shape: tuple[int, int, int, int] = _CHECK_CLIP) -> None:
    """Refuse, before Flower starts, a model name that cannot train. Built-in names are only looked up.

    A ``"module:builder"`` model is imported, built once as ``builder(num_classes)`` and run (eval,
    no grad) on a random ``1×C×T×H×W`` clip of ``input_shape``; pass the run's
    ``(3, clip-len, crop-size, crop-size)`` to try what training will feed. It must have trainable
    parameters and return float logits of shape ``(1, num_classes)``. Failures raise PluginError or
    ModelError naming the key, the value and the problem.
    """
    if not is_plugin(name):
        _check_model_name(name)
        return
    with torch.random.fork_rng(devices=[]):  # building draws random weights: leave the caller's seed stream alone
        model = _build_plugin(name, num_classes)
        clip = torch.randn(1, *input_shape)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f'model="{name}" has no trainable parameters: there would be nothing to train or aggregate')
    try:
        model.eval()
        with torch.no_grad():
            out = model(clip)
    except Exception as exc:  # the user's forward may raise anything
        raise ModelError(
            f'model="{name}" failed on a dummy clip of shape {tuple(clip.shape)} (B×C×T×H×W): {_first_line(exc)}'
        ) from exc
    if not isinstance(out, torch.Tensor) or out.shape != (1, num_classes) or not out.is_floating_point():
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ModelError(
            f'model="{name}" maps a clip of shape {tuple(clip.shape)} to {got}; it must return float logits '
            f"of shape (1, {num_classes}), batch × num_classes"
        )


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a tensor-only state dict from a torch file or a .safetensors file, never unpickling objects."""
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"pretrained weights file not found: {path}")
    try:
        if file.suffix == ".safetensors":
            obj = load_safetensors(str(file), device="cpu")
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused pickles raise UnpicklingError, corrupt files vary
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot read weights from {path}: {reason}. Only state dicts of tensors are accepted "
            "(torch.save(model.state_dict()) loaded with weights_only=True, or .safetensors); "
            "pickled Python objects are refused"
        ) from exc
    # training checkpoints often nest the weights
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{path} is not a state dict of tensors: non-tensor entries {_few(map(str, bad))}")
    # checkpoints saved from DataParallel/DDP wrap every key
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _few(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else ""
    return ", ".join(keys[:_SHOW_KEYS]) + more


def _guess_architecture(state: Mapping[str, torch.Tensor]) -> str:
    """Name the model a state dict seems to come from, for error messages."""
    keys = {k.removeprefix("backbone.").removeprefix("net."): v.shape for k, v in state.items()}
    if "stem.0.weight" in keys:
        if keys["stem.0.weight"][2:3] == (1,):  # (2+1)D stem starts with a purely spatial conv
            return "r2plus1d_18"
        layer2 = keys.get("layer2.0.conv1.0.weight")
        # mc3 uses 3D convs only in layer1, later layers are 1×3×3
        return "mc3_18" if layer2 is not None and layer2[2:3] == (1,) else "r3d_18"
    if "conv1.weight" in keys and len(keys["conv1.weight"]) == 4:
        bottleneck = "layer1.0.conv3.weight" in keys
        blocks = len({".".join(k.split(".")[:2]) for k in keys if k.startswith("layer")})
        known = {(False, 8): "framepool_resnet18 (2D resnet18)", (True, 16): "framepool_resnet50 (2D resnet50)"}
        return known.get((bottleneck, blocks), f"a 2D ResNet with {blocks} blocks (unsupported)")
    if "blocks.0.0.weight" in keys:
        return "tiny3d"
    if "features.0.0.0.weight" in keys:
        return "s3d"
    return "an unknown architecture"


def load_pretrained_backbone(model: VideoClassifier, name: str, path: str) -> None:
    """Load backbone weights from a local file strictly; the head keeps its fresh initialization.

    Accepts the torchvision state dict of the underlying network (``stem.*``/``layer*``/``fc.*`` for
    video ResNets, ``features.*``/``classifier.*`` for S3D, ``conv1.*``... for the 2D ResNet of
    ``framepool_*``, TinyC3D keys for ``tiny3d``; ``fc.*`` and ``classifier.*`` are dropped) or a
    VideoClassifier state dict (``backbone.*``/``head.*``; ``head.*`` is dropped), optionally nested
    under ``state_dict`` or ``model``. ``.safetensors`` files are read with safetensors, anything
    else with ``torch.load(weights_only=True)``.
    """
    state = _read_state_dict(path)
    if any(k.startswith(("backbone.", "head.")) for k in state):
        target = model.backbone
        part = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    else:
        target = _transferable_part(model)
        part = {k: v for k, v in state.items() if not k.startswith(_TORCHVISION_HEADS)}
    expected = target.state_dict()
    missing = expected.keys() - part.keys()
    unexpected = part.keys() - expected.keys()
    mismatched = [
        f"{k} {tuple(part[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected.keys() & part.keys()
        if part[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(items)} {label}: {_few(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (file vs model)", mismatched),
            )
            if items
        ]
        raise ModelError(
            f"{path} does not fit the backbone of {name!r}: {'; '.join(problems)}. "
            f"The file seems to be for {_guess_architecture(state)}"
        )
    target.load_state_dict(part, strict=True)
    logger.info("loaded pretrained backbone for %s from %s (%d tensors)", name, path, len(part))


def freeze_backbone(model: VideoClassifier) -> None:
    """Freeze the pretrained part of the backbone (see :meth:`VideoClassifier.freeze_backbone`).

    Parameters stop receiving gradients and, because ``VideoClassifier.train()`` keeps that part
    in eval mode, its BatchNorm running statistics no longer update during training. For
    ``framepool_*`` the attention scorer stays trainable.
    """
    model.freeze_backbone()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, optionally only those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def batchnorm_state_keys(model: nn.Module) -> list[str]:
    """state_dict keys of every BatchNorm layer (affine params and running statistics), for FedBN."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys.update(f"{name}.{k}" for k in module.state_dict())
    return [k for k in model.state_dict() if k in keys]
