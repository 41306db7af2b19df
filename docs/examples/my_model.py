"""An example model of your own: set ``model = "docs.examples.my_model:build"`` in the run config.

The builder is called as ``build(num_classes)`` and returns any ``torch.nn.Module`` that maps a
``B×C×T×H×W`` float clip to ``B×num_classes`` logits. The launcher builds it once and runs it on a
dummy clip before Flower starts, so a mistake stops the run there.
"""

from torch import nn


def build(num_classes: int) -> nn.Module:
    """Two 3D conv blocks, global average pooling and a linear classifier (~15 k parameters)."""
    return nn.Sequential(
        nn.Conv3d(3, 16, kernel_size=3, stride=(1, 2, 2), padding=1, bias=False),
        nn.BatchNorm3d(16),
        nn.ReLU(inplace=True),
        nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(16, 32, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm3d(32),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool3d(1),  # any clip length and size: one 32-wide vector per clip
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )
