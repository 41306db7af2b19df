"""The strategy a run config names: its family's class and keys, FedDF's distiller, the DP wrapper."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from datasets.clip_dataset import scan_videos
from fedapp.task.config import AppConfig
from fedapp.task.data import eval_loader, unlabeled_samples
from fedapp.task.devices import autocast_context, input_to_device
from fedapp.task.models import build_model
from strategies.attacks import OMNISCIENT_ATTACKS, ColludingAttack
from strategies.distillation import DistillConfig, Placement, distill_arrays
from strategies.privacy import PrivateStrategy
from strategies.strategy import AverageStrategy, FusionStrategy, VideoFedAvg, WeightedStrategy

logger = logging.getLogger(__name__)

Distiller = Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]]


def build_strategy(cfg: AppConfig, distiller: Distiller | None = None) -> VideoFedAvg | PrivateStrategy:
    """The strategy named by ``strategy`` (and its family's keys), inside Flower's DP wrapper when
    ``dp`` is on."""
    strategy = _base_strategy(cfg, distiller)
    if cfg.dp == "none":
        return strategy
    return PrivateStrategy(
        strategy, cfg.dp, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_delta, compression=cfg.compression
    )


def _base_strategy(cfg: AppConfig, distiller: Distiller | None) -> VideoFedAvg:
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        server_optimizer=cfg.server_optimizer,
        server_lr=cfg.server_lr,
        server_momentum=cfg.server_momentum,
        server_betas=(cfg.server_beta1, cfg.server_beta2),
        server_tau=cfg.server_tau,
        proximal_mu=cfg.proximal_mu,
        scaffold=cfg.scaffold,
        norm_bound=cfg.norm_bound,
        attack_injector=attack_injector(cfg),
    )
    if cfg.strategy == "average":
        return AverageStrategy(**common)
    if cfg.strategy == "weighted":
        return WeightedStrategy(weight_source=cfg.weight_source, staleness_decay=cfg.staleness_decay, **common)
    if cfg.strategy == "fusion":
        return FusionStrategy(
            fusion_fn=cfg.fusion_fn,
            trim_beta=cfg.trim_beta,
            krum_malicious=cfg.krum_malicious,
            krum_selected=cfg.krum_selected,
            bucket_size=cfg.bucket_size,
            bucket_seed=cfg.seed,
            nnm_malicious=cfg.nnm_malicious,
            cc_radius=cfg.cc_radius,
            cc_iterations=cfg.cc_iterations,
            distiller=distiller,
            **common,
        )
    return VideoFedAvg(**common)


def attack_injector(cfg: AppConfig) -> ColludingAttack | None:
    """TEST TOOL: the server-side step of an omniscient ``attack`` (``strategies.attacks``), else None."""
    if cfg.attack not in OMNISCIENT_ATTACKS or cfg.attack_fraction <= 0:
        return None
    return ColludingAttack(cfg.attack, z=cfg.attack_z, epsilon=cfg.attack_epsilon)


def make_distiller(cfg: AppConfig, num_classes: int, device: torch.device) -> Distiller:
    """FedDF's server side: distil the clients' ensemble on unlabeled clips held by the server."""
    samples = unlabeled_samples(cfg)
    usable, _ = scan_videos(samples)
    loader = eval_loader(cfg, usable)
    config = DistillConfig(
        steps=cfg.feddf_steps, lr=cfg.feddf_lr, temperature=cfg.feddf_temperature, patience=cfg.feddf_patience
    )
    placement = Placement(  # the run's bf16 / channels-last settings apply to distillation too
        to_device=lambda clips, dev: input_to_device(clips, dev, cfg.channels_last),
        autocast=lambda dev: autocast_context(dev, cfg.bf16),
    )
    logger.info("FedDF: %d unlabeled videos for distillation", len(usable))

    def build() -> torch.nn.Module:
        return build_model(cfg.model, num_classes, pooling=cfg.pooling)

    def distiller(start, models, weights):
        return distill_arrays(start, models, build, loader, config, device, weights, placement=placement)

    return distiller
