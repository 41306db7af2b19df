"""Video classifiers (backbone + linear head) and offline transfer learning.

Every model is a :class:`VideoClassifier` whose ``backbone`` maps a ``B×C×T×H×W`` float clip to
``B×F`` features and whose ``head`` is ``nn.Linear(F, num_classes)``, so state_dict keys are
always ``backbone.*`` and ``head.*`` whatever the architecture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file as load_safetensors
from torch import nn

from fedapp.task.config import MODEL_NAMES, POOLINGS
from fedapp.task.pretrained import weights_path

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
_SHOW_KEYS = 4  # offending keys quoted per category in error messages


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
    net = _VIDEO_RESNETS[name](weights=None)
    return net, _drop_fc(net)


def build_model(
    name: str,
    num_classes: int,
    pretrained_path: str = "",
    freeze_backbone: bool = False,
    pooling: str = "mean",
    pretrained: str = "none",
) -> VideoClassifier:
    """Build a classifier by name; optionally load a pretrained backbone and freeze it.

    ``pretrained`` names torchvision weights (``"KINETICS400_V1"``...), read from torch.hub's cache
    and never downloaded; ``pretrained_path`` is a local file. ``pooling`` only matters for
    ``framepool_*`` models.
    """
    _check_choice("model", name, MODEL_NAMES)
    _check_choice("pooling", pooling, POOLINGS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
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
    logger.debug(
        "built %s: %.2f M params (%.2f M trainable), %d classes",
        name,
        count_parameters(model) / 1e6,
        count_parameters(model, trainable_only=True) / 1e6,
        num_classes,
    )
    return model


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
    return "an unknown architecture"


def load_pretrained_backbone(model: VideoClassifier, name: str, path: str) -> None:
    """Load backbone weights from a local file strictly; the head keeps its fresh initialization.

    Accepts the torchvision state dict of the underlying network (``stem.*``/``layer*``/``fc.*`` for
    video ResNets, ``conv1.*``... for the 2D ResNet of ``framepool_*``, TinyC3D keys for ``tiny3d``;
    ``fc.*`` is dropped) or a VideoClassifier state dict (``backbone.*``/``head.*``; ``head.*`` is
    dropped), optionally nested under ``state_dict`` or ``model``. ``.safetensors`` files are read
    with safetensors, anything else with ``torch.load(weights_only=True)``.
    """
    state = _read_state_dict(path)
    if any(k.startswith(("backbone.", "head.")) for k in state):
        target = model.backbone
        part = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    else:
        target = _transferable_part(model)
        part = {k: v for k, v in state.items() if not k.startswith("fc.")}
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
