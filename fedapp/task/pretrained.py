"""torchvision's pretrained weights by name: which file each is, where torchvision caches it, and
the input preset it was trained with.

Kept free of torch so the run config is checked before Flower starts (``fedvideo run`` refuses a
missing file in well under a second); ``tests/test_pretrained.py`` checks every entry against
torchvision's own weight enums (file names, ``transforms()``), so the table cannot drift. Its keys
are the built-in model names (``MODEL_NAMES``), the one list of them.
Nothing here downloads: ``fedvideo weights --download`` fetches a file once, through torchvision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    """The input a set of weights expects (torchvision's ``weights.transforms()``)."""

    resize: str  # a run-config ``resize`` value: "HxW" exact, or "short:N" (short side, aspect kept)
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Video ResNet weights: torchvision resizes every frame to exactly 128×171, then centre-crops 112
# (S3D's: 256×256, then 224, same statistics).
KINETICS400 = Preset("128x171", 112, (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Weights:
    """One torchvision weight enum member of a model: the file it downloads and its preset."""

    torchvision_model: str  # what torchvision.models.get_model_weights takes
    file: str
    preset: Preset
    accuracy: str  # top-1 from the weights' meta, for the README and `fedvideo weights`


_R3D = Weights("r3d_18", "r3d_18-b3b3357e.pth", KINETICS400, "Kinetics-400 top-1 63.2")
_MC3 = Weights("mc3_18", "mc3_18-a90a0ba3.pth", KINETICS400, "Kinetics-400 top-1 63.96")
_R21D = Weights("r2plus1d_18", "r2plus1d_18-91a641e6.pth", KINETICS400, "Kinetics-400 top-1 67.463")
_S3D = Weights("s3d", "s3d-d76dad2f.pth", Preset("256x256", 224, KINETICS400.mean, KINETICS400.std),
                "Kinetics-400 top-1 68.368")  # fmt: skip
_RN18 = Weights("resnet18", "resnet18-f37072fd.pth", Preset("short:256", 224, IMAGENET_MEAN, IMAGENET_STD),
                "ImageNet-1K top-1 69.758")  # fmt: skip
_RN50_V1 = Weights("resnet50", "resnet50-0676ba61.pth", Preset("short:256", 224, IMAGENET_MEAN, IMAGENET_STD),
                   "ImageNet-1K top-1 76.13")  # fmt: skip
_RN50_V2 = Weights("resnet50", "resnet50-11ad3fa6.pth", Preset("short:232", 224, IMAGENET_MEAN, IMAGENET_STD),
                   "ImageNet-1K top-1 80.858")  # fmt: skip

# Every enum name torchvision has for each model of the zoo (DEFAULT is torchvision's alias).
PRETRAINED: dict[str, dict[str, Weights]] = {
    "tiny3d": {},
    "r3d_18": {"KINETICS400_V1": _R3D, "DEFAULT": _R3D},
    "mc3_18": {"KINETICS400_V1": _MC3, "DEFAULT": _MC3},
    "r2plus1d_18": {"KINETICS400_V1": _R21D, "DEFAULT": _R21D},
    "s3d": {"KINETICS400_V1": _S3D, "DEFAULT": _S3D},
    "framepool_resnet18": {"IMAGENET1K_V1": _RN18, "DEFAULT": _RN18},
    "framepool_resnet50": {"IMAGENET1K_V1": _RN50_V1, "IMAGENET1K_V2": _RN50_V2, "DEFAULT": _RN50_V2},
}

# The built-in model names (fedapp.task.models builds them), here so that checking a run config never imports torch.
MODEL_NAMES: tuple[str, ...] = tuple(PRETRAINED)

# The smallest (clip-len, crop-size) each model accepts, where there is one: strided convs and unpadded
# pools shrink the feature map to nothing below it (measured; tests/test_models.py checks both edges).
MIN_INPUT: dict[str, tuple[int, int]] = {"tiny3d": (2, 15), "s3d": (5, 17)}


def weights_for(model: str, name: str) -> Weights:
    """The weights ``name`` of ``model``; raises KeyError naming what the model has."""
    if model not in PRETRAINED:  # a plug-in ("module:builder") or a typo: no table entry
        raise KeyError(
            f"model={model!r} has no pretrained weights {name!r}: only built-in models do "
            f"({', '.join(MODEL_NAMES)}); a model of your own loads its weights in its builder"
        )
    available = PRETRAINED[model]
    if name not in available:
        choices = ", ".join(available) if available else "none (train it from scratch)"
        raise KeyError(f"model={model!r} has no pretrained weights {name!r}: torchvision has {choices}")
    return available[name]


def torch_hub_dir() -> Path:
    """torch.hub's cache folder, as ``torch.hub.get_dir()`` finds it (``$TORCH_HOME/hub``,
    ``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``, that to ``~/.cache/torch``)."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def weights_path(model: str, name: str) -> Path:
    """Where torchvision keeps (and looks for) the file of weights ``name`` of ``model``."""
    return torch_hub_dir() / "checkpoints" / weights_for(model, name).file
