"""The strategy a run config names: its stages from the registry (or the user's own rule), FedDF's
distiller, and Flower's DP wrapper when ``dp`` is on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedapp.plugins import PluginError, check_signature, is_plugin, load_plugin
from fedapp.task.config import AppConfig
from strategies.plugin_rule import PluginRule
from strategies.privacy import PrivateStrategy
from strategies.scaffold import Scaffold
from strategies.stage import Aggregator, RoundContext, Transform, Update, aggregator_name, registered
from strategies.strategy import VideoStrategy
from strategies.validation import check_tensors, reference_spec

logger = logging.getLogger(__name__)

Distiller = Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]]


def build_strategy(
    cfg: AppConfig,
    distiller: Distiller | None = None,
    extra_transforms: Sequence[Transform] = (),
    root_trainer: Any = None,
) -> VideoStrategy | PrivateStrategy:
    """The strategy ``cfg`` composes, inside Flower's DP wrapper when ``dp`` is on.
    ``distiller`` / ``root_trainer``: what the server built for FedDF / FLTrust.
    ``extra_transforms``: stages no run config selects (the attack test tool of benchmarks,
    ``bench/attacks.py``); one with a ``bind`` method is given the same resources."""
    resources = {"distiller": distiller, "root_trainer": root_trainer}
    for transform in extra_transforms:
        if hasattr(transform, "bind"):
            transform.bind(resources)
    transforms = [cls.from_config(cfg, resources) for cls in registered("transform").values() if cls.active(cfg)]
    strategy = VideoStrategy(
        aggregator=build_aggregator(cfg, resources),
        server_step=registered("server-step")[cfg.server_optimizer].from_config(cfg, resources),
        transforms=[*transforms, *extra_transforms],
        scaffold=Scaffold() if cfg.scaffold else None,
        proximal_mu=cfg.proximal_mu,
        ordered=cfg.deterministic,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
    )
    if cfg.dp == "none":
        return strategy
    return PrivateStrategy(
        strategy, cfg.dp, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_delta, compression=cfg.compression
    )


def build_aggregator(cfg: AppConfig, resources: dict[str, Any]) -> Aggregator:
    """The registered aggregator ``cfg`` selects, or the user's rule for ``fusion-fn="module:attr"``."""
    name = aggregator_name(cfg)
    if is_plugin(name):
        return PluginRule(name, load_rule(name))
    return registered("aggregator")[name].from_config(cfg, resources)


def load_rule(spec: str) -> Callable[..., Any]:
    """A user's rule from ``fusion-fn``: a function ``(models, weights)``, or a class instantiated once
    (no arguments) whose instances are called so; a :class:`fedapp.plugins.PluginError` otherwise."""
    obj = load_plugin("fusion-fn", spec)
    if isinstance(obj, type):
        obj = check_signature("fusion-fn", spec, obj, ())()
    return check_signature("fusion-fn", spec, obj, ("models", "weights"))


def check_plugins(cfg: AppConfig, num_classes: int = 2) -> None:
    """Load the user's own rule and model that ``cfg`` names and try each once on toy input, so that
    a mistake stops the run at start: a :class:`fedapp.plugins.PluginError` (or the model's
    ``ModelError``) naming the key, the value and what is wrong."""
    if cfg.strategy == "fusion" and is_plugin(cfg.fusion_fn):
        try_rule(cfg.fusion_fn)
    if is_plugin(cfg.model):
        from fedapp.task.models import ModelError, check_model

        try:
            check_model(cfg.model, num_classes, input_shape=(3, cfg.clip_len, cfg.crop_size, cfg.crop_size))
        except ModelError as exc:
            raise PluginError(str(exc)) from exc


def try_rule(spec: str) -> None:
    """Run the rule ``spec`` once on three toy models (a float layer and an integer counter)."""
    models = [
        {"layer.weight": np.full((2, 3), float(i), np.float32), "bn.num_batches_tracked": np.array(i, np.int64)}
        for i in range(3)
    ]
    updates = [Update(m, 1.0, [i + 1], {"num-examples": 1}) for i, m in enumerate(models)]
    rule = PluginRule(spec, load_rule(spec))
    try:
        merged, _ = rule.aggregate(updates, RoundContext(1, models[0]))
    except Exception as exc:  # whatever the user's code raises, said with the key
        raise PluginError(f'fusion-fn="{spec}" failed on three toy models: {type(exc).__name__}: {exc}') from exc
    reason = check_tensors(merged, reference_spec(models[0]))
    if reason:
        raise PluginError(f'fusion-fn="{spec}" returned a model unlike its inputs on three toy models: {reason}')


def make_distiller(cfg: AppConfig, num_classes: int, device: Any) -> Distiller:
    """FedDF's server side: distil the clients' ensemble on unlabeled clips held by the server."""
    import torch

    from datasets.clip_dataset import scan_videos
    from fedapp.task.data import eval_loader, unlabeled_samples
    from fedapp.task.devices import autocast_context, input_to_device
    from fedapp.task.models import build_model
    from strategies.distillation import DistillConfig, Placement, distill_arrays

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
