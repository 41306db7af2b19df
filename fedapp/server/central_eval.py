"""Central evaluation: the global model scored on the held-out test split, on the server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from datasets.clip_dataset import scan_videos
from fedapp.task.config import AppConfig
from fedapp.task.data import VideoIndex, eval_loader
from fedapp.task.devices import prepare_model
from fedapp.task.train import evaluate_model


class CentralEvaluator:
    """Scores global weights on the held-out test split (unreadable files set aside once)."""

    def __init__(self, cfg: AppConfig, model: torch.nn.Module, index: VideoIndex, device: torch.device) -> None:
        usable, skipped = scan_videos(index.test)
        self.cfg, self.device, self.skipped = cfg, device, len(skipped)
        self.num_classes = len(index.classes)
        self.model = prepare_model(model, device, cfg.channels_last)
        self.loader = eval_loader(cfg, usable)
        # The confusion matrix of the weights scored last: the final report reuses it instead of
        # a second pass over the test split.
        self._last: tuple[Mapping[str, np.ndarray], list[list[int]]] | None = None

    def __call__(self, weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()}, strict=True)
        scores = evaluate_model(
            self.model, self.loader, self.device, self.cfg.bf16, self.cfg.channels_last, num_classes=self.num_classes
        )
        self._last = (weights, scores.pop("confusion"))
        return {**scores, "skipped-videos": self.skipped}

    def confusion_of(self, weights: Mapping[str, np.ndarray]) -> list[list[int]]:
        """Video-level confusion matrix of ``weights`` on the test split (rows: true class)."""
        if self._last is None or self._last[0] is not weights:
            self(weights)
        return self._last[1]
