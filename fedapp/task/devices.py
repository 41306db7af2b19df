"""Devices: choosing one, moving a model and a clip batch to it, and bf16 autocast on CUDA."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fedapp.task.models import ModelError


def select_device(preference: str = "auto") -> torch.device:
    """Resolve ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` to a device, failing clearly when absent."""
    pref = preference.strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        index = pref.partition(":")[2]
        if index and not index.isdigit():
            raise ModelError(f"bad device {preference!r}: expected cuda:N with an integer N")
        if not torch.cuda.is_available():
            raise ModelError(f"device {preference!r} requested but CUDA is not available")
        if index and int(index) >= torch.cuda.device_count():
            raise ModelError(f"device {preference!r} requested but only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(pref)
    raise ModelError(f"unknown device {preference!r}; allowed: auto, cpu, cuda, cuda:N")


def _channels_last_format(model: nn.Module) -> torch.memory_format:
    # channels_last_3d only applies to rank-5 weights; frame-pooled 2D ResNets have rank-4 convs
    return torch.channels_last_3d if any(p.dim() == 5 for p in model.parameters()) else torch.channels_last


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move to ``device``; on CUDA optionally switch conv weights to a channels-last layout."""
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=_channels_last_format(model))
    return model


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; a no-op otherwise.

    CPU bf16 autocast is deliberately never used: on CPUs without AMX it is slower than fp32.
    """
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_to_device(x: torch.Tensor, device: torch.device | str, channels_last: bool) -> torch.Tensor:
    """Copy a ``B×C×T×H×W`` batch to ``device`` (non-blocking; channels_last_3d on CUDA when asked)."""
    device = torch.device(device)
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda" and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x
