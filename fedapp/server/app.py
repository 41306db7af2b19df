"""The Flower ServerApp: initial model, the round loop with the configured strategy, central
evaluation of the global model on the held-out split, and the results directory."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from datasets.clip_dataset import scan_videos
from datasets.partition import format_partition_summary
from fedapp.task.config import AppConfig, parse_config
from fedapp.server.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointError,
    best_checkpoint,
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    mark_best,
    prune_checkpoints,
    remove_partial_writes,
    save_checkpoint,
)
from fedapp.task.data import eval_loader, load_video_index, unlabeled_samples
from fedapp.logs import route_app_logs_to_flower
from fedapp.task.devices import autocast_context, input_to_device, prepare_model, select_device
from fedapp.task.models import build_model
from fedapp.server.report import TensorBoardLog, write_final_report
from fedapp.server.results import RunFolderError, RunResults, WriterLock, run_folder_taken
from fedapp.server.stopping import BUDGET, best_round, stop_reason
from fedapp.task.train import evaluate_model, set_torch_threads
from strategies.records import arrays_to_numpy, numpy_to_arrays
from strategies.distillation import DistillConfig, Placement, distill_arrays
from strategies.privacy import PrivateStrategy
from strategies.strategy import AverageStrategy, FusionStrategy, RoundReport, VideoFedAvg, WeightedStrategy

logger = logging.getLogger(__name__)
route_app_logs_to_flower()

app = ServerApp()


class NoUpdateError(RuntimeError):
    """Not one round produced a usable update: the run did no federated learning at all."""


def build_strategy(
    cfg: AppConfig, distiller: Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]] | None = None
) -> VideoFedAvg | PrivateStrategy:
    """The strategy named by ``strategy`` (and its family's keys), inside Flower's DP wrapper when
    ``dp`` is on."""
    strategy = _base_strategy(cfg, distiller)
    if cfg.dp == "none":
        return strategy
    return PrivateStrategy(
        strategy, cfg.dp, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_delta, compression=cfg.compression
    )


def _base_strategy(
    cfg: AppConfig, distiller: Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]] | None
) -> VideoFedAvg:
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
        server_lr=cfg.server_lr,
        server_momentum=cfg.server_momentum,
        proximal_mu=cfg.proximal_mu,
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
            distiller=distiller,
            **common,
        )
    return VideoFedAvg(**common)


def make_distiller(
    cfg: AppConfig, num_classes: int, device: torch.device
) -> Callable[..., tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """FedDF's server side: distil the clients' ensemble on unlabeled clips held by the server."""
    samples = unlabeled_samples(cfg)
    usable, _ = scan_videos(samples)
    loader = eval_loader(cfg, usable)
    config = DistillConfig(
        steps=cfg.feddf_steps, lr=cfg.feddf_lr, temperature=cfg.feddf_temperature, patience=cfg.feddf_patience
    )
    logger.info("FedDF: %d unlabeled videos for distillation", len(usable))

    placement = Placement(  # the run's bf16 / channels-last settings apply to distillation too
        to_device=lambda clips, dev: input_to_device(clips, dev, cfg.channels_last),
        autocast=lambda dev: autocast_context(dev, cfg.bf16),
    )

    def build() -> torch.nn.Module:
        return build_model(cfg.model, num_classes, pooling=cfg.pooling)

    def distiller(start, models, weights):
        return distill_arrays(start, models, build, loader, config, device, weights, placement=placement)

    return distiller


def run_directory(run_config: Mapping[str, Any], run_id: int | str) -> Path:
    """The run's folder: ``results-dir/<run-name>`` (default name: a UTC timestamp plus Flower's run
    id), or, for a resumed run, its checkpoint's run folder.

    One folder, one run: a folder that already holds a run is refused unless ``resume`` names it,
    and a ``run-name`` that names another folder than the one ``resume`` continues is refused too
    (RunFolderError). Read from the raw run config (before validation) so that even a config error
    leaves a summary.
    """
    results_dir = Path(str(run_config.get("results-dir") or "results")).expanduser().resolve()
    run_name = str(run_config.get("run-name") or "")
    checkpoint = resume_path(run_config)
    if checkpoint is not None:
        folder = checkpoint.parent.parent
        if run_name and folder != results_dir / run_name:
            raise RunFolderError(
                f"resume={run_config.get('resume')!r} continues {folder}, but run-name={run_name!r} names "
                f"{results_dir / run_name}: leave run-name empty or name the resumed run"
            )
        return folder
    folder = results_dir / (run_name or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-run{run_id}")
    if run_folder_taken(folder):
        raise RunFolderError(
            f"run-name={run_name!r}: {folder} already holds a run; choose another run-name, or set "
            f"resume=\"{folder}\" to continue that one"
        )
    return folder


def resume_path(run_config: Mapping[str, Any]) -> Path | None:
    """The checkpoint folder ``resume`` names: a checkpoint, a run folder (its latest checkpoint),
    or ``latest`` (the latest checkpoint of ``run-name``, else of the newest run in ``results-dir``)."""
    resume = str(run_config.get("resume") or "")
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume).expanduser().resolve()
        return latest_checkpoint(path) if (path / CHECKPOINTS_DIR).is_dir() else path
    results_dir = Path(str(run_config.get("results-dir") or "results")).expanduser().resolve()
    run_name = str(run_config.get("run-name") or "")
    runs = [results_dir / run_name] if run_name else [p for p in results_dir.glob("*") if p.is_dir()]
    runs = [r for r in runs if list_checkpoints(r)]
    if not runs:
        raise CheckpointError(f"resume='latest': no checkpoint under {results_dir / (run_name or '*')}")
    return latest_checkpoint(max(runs, key=lambda r: latest_checkpoint(r).stat().st_mtime))


def partition_summary(classes: list[str], report: RoundReport, known: dict[int, list[int]]) -> dict[str, Any]:
    """Videos per class per client, from the counts clients report (the server never sees data)."""
    for client in report.accepted:
        if "partition-id" in client.metrics and "class-counts" in client.metrics:
            known[int(client.metrics["partition-id"])] = [int(c) for c in client.metrics["class-counts"]]
    return {
        "num_partitions": len(known),
        "clients": [
            {
                "partition_id": pid,
                "num_videos": sum(counts),
                "per_class": {name: counts[i] if i < len(counts) else 0 for i, name in enumerate(classes)},
            }
            for pid, counts in sorted(known.items())
        ],
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation; any failure, a config error included, is recorded in ``summary.json``
    and fails the run."""
    serve(grid, context.run_config, context.run_id)


def serve(grid: Grid, run_config: Mapping[str, Any], run_id: int) -> dict[str, Any]:
    """Claim the run folder, run the federation, record the outcome in ``summary.json``.

    A refused start (the folder holds another run, another process writes it) writes nothing. A
    resumed run that fails before its first round leaves the folder's files as they were; any
    other failure is recorded as ``status: failed``.
    """
    try:
        run_dir = run_directory(run_config, run_id)
    except (RunFolderError, CheckpointError) as exc:
        logger.error("run refused: %s", exc)
        raise
    resuming = bool(run_config.get("resume"))
    with WriterLock(run_dir):
        results = RunResults(run_dir)
        logger.info("results directory: %s", results.dir)
        started = time.time()
        try:
            summary = run_federation(grid, parse_config(run_config), results)
        except BaseException as exc:
            logger.error("run failed: %s: %s", type(exc).__name__, exc)
            if not resuming or results.config_written:
                completed = results.rounds[-1]["round"] if results.rounds else 0
                results.write_summary(
                    {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "rounds-completed": completed,
                     "run-id": run_id, "wall-time-s": time.time() - started}
                )
            raise
        summary = {"status": "completed", **summary, "run-id": run_id, "wall-time-s": time.time() - started}
        results.write_summary(summary)
    logger.info("run completed: %s", summary)
    return summary


def run_federation(grid: Grid, cfg: AppConfig, results: RunResults) -> dict[str, Any]:
    """The round loop: train, aggregate, evaluate on clients and centrally, checkpoint, record;
    until the round budget is spent or the stopping rule fires."""
    set_torch_threads(cfg.torch_threads)
    index = load_video_index(cfg)  # generates the synthetic default before any client needs it
    logger.info("dataset %s: %d classes, %d train / %d test videos", cfg.dataset, len(index.classes),
                len(index.train), len(index.test))
    model = build_model(
        cfg.model, len(index.classes), pretrained_path=cfg.pretrained_path, freeze_backbone=cfg.freeze_backbone,
        pooling=cfg.pooling,
    )
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    device = select_device(cfg.device)
    evaluator = CentralEvaluator(cfg, model, index, device) if cfg.central_eval else None
    feddf = cfg.strategy == "fusion" and cfg.fusion_fn == "feddf"
    distiller = make_distiller(cfg, len(index.classes), device) if feddf else None
    strategy = build_strategy(cfg, distiller)

    first_round = 1
    removed = remove_partial_writes(results.dir)  # left by a writer killed mid-write; we hold the lock
    if removed:
        logger.info("removed %d partial writes of an earlier process: %s", len(removed), [p.name for p in removed])
    checkpoint_path = resume_path(cfg.to_dict())
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        check_compatible(checkpoint, cfg.model, index.classes, arrays)
        if checkpoint.round >= cfg.num_server_rounds:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} is at round {checkpoint.round}: num-server-rounds="
                f"{cfg.num_server_rounds} leaves nothing to train; raise num-server-rounds to continue"
            )
        # In the model's own state_dict order (safetensors gives them back in name order).
        arrays = {key: checkpoint.arrays[key] for key in arrays}
        strategy.load_state(checkpoint.manifest["strategy-state"])
        results.restore_history(checkpoint.manifest["history"])
        first_round = checkpoint.round + 1
        logger.info("resuming from %s: round %d onwards", checkpoint.path, first_round)
    else:
        results.append_round({"round": 0, "central": evaluator(arrays) if evaluator else {}, "wall-time-s": 0.0})
    results.write_config(cfg.to_dict())  # past the start checks: from here on a failure is recorded

    tensorboard = TensorBoardLog(results.dir / "tensorboard") if cfg.tensorboard else None
    known_partitions: dict[int, list[int]] = {}
    rounds_without_update = 0
    stop = None
    start = time.time() - float(results.rounds[-1].get("wall-time-s", 0.0))
    for server_round in range(first_round, cfg.num_server_rounds + 1):
        round_start = time.time()
        logger.info("[ROUND %d/%d]", server_round, cfg.num_server_rounds)
        model_bytes = sum(a.nbytes for a in arrays.values())
        messages = list(strategy.configure_train(server_round, numpy_to_arrays(arrays), ConfigRecord(), grid))
        replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
        bytes_down = model_bytes * len(messages)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        bytes_up = sum(c.payload_bytes for c in strategy.last_train.accepted)  # as received: compressed if on
        if new_arrays is None:
            rounds_without_update += 1
        else:
            arrays = arrays_to_numpy(new_arrays)
        summary = partition_summary(index.classes, strategy.last_train, known_partitions)
        if server_round == first_round:
            logger.info("partition summary (videos per class):\n%s", format_partition_summary(summary))
        results.write_partitions(summary)

        evaluate_metrics = None
        if cfg.fraction_evaluate > 0:
            messages = list(strategy.configure_evaluate(server_round, numpy_to_arrays(arrays), ConfigRecord(), grid))
            bytes_down += model_bytes * len(messages)
            replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
            evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        central_metrics = evaluator(arrays) if evaluator else {}
        record = {
            "round": server_round,
            "train": dict(train_metrics or {}),
            "train-clients": strategy.last_train.to_dict(),
            "evaluate": dict(evaluate_metrics or {}),
            "evaluate-clients": strategy.last_evaluate.to_dict() if cfg.fraction_evaluate > 0 else None,
            "central": central_metrics,
            "fusion": strategy.last_fusion_info,
            **({"privacy": strategy.last_privacy} if isinstance(strategy, PrivateStrategy) else {}),
            "bytes-down": bytes_down,
            "bytes-up": bytes_up,
            "round-time-s": time.time() - round_start,
            "wall-time-s": time.time() - start,
        }
        history = [*results.rounds, record]
        stop = stop_reason(history, cfg.early_stop_patience, cfg.early_stop_min_delta, cfg.target_accuracy)
        # The checkpoint first, then the history file: a crash between the two is healed on resume,
        # which rewrites the history from the checkpoint's own copy.
        path = save_checkpoint(results.dir, server_round, arrays, cfg.to_dict(), index.classes, strategy.state(), history)
        best = best_round(history)
        if best is not None and best[0] == server_round:
            mark_best(results.dir, path, best[1])
        prune_checkpoints(results.dir, cfg.checkpoint_keep, best_checkpoint(results.dir))
        results.append_round(record)
        if tensorboard:
            tensorboard.log_round(record)
        logger.info(
            "round %d: train loss %.4f acc %.3f | central loss %s video-acc %s | %.1fs",
            server_round, record["train"].get("train-loss", float("nan")),
            record["train"].get("train-accuracy", float("nan")),
            _fmt(central_metrics.get("loss")), _fmt(central_metrics.get("video-accuracy")), record["round-time-s"],
        )
        if stop:
            logger.info("stopping after round %d: %s", server_round, stop)
            break
    if tensorboard:
        tensorboard.close()
    rounds_run = results.rounds[-1]["round"] - first_round + 1
    if rounds_without_update == rounds_run:  # resumed or not: a run that trained nothing failed
        raise NoUpdateError(
            f"no round produced a global update (rounds {first_round}..{results.rounds[-1]['round']}; last round: {strategy.last_train.skipped}; "
            f"failed: {strategy.last_train.failed}; rejected: {strategy.last_train.rejected})"
        )
    stop = stop or BUDGET
    results.save_model(arrays, index.classes, cfg.model)
    confusion = evaluator.confusion_of(arrays) if evaluator else None
    write_final_report(results.dir, results.rounds, index.classes, confusion, stop)
    best = best_round(results.rounds)
    return {
        "rounds-completed": results.rounds[-1]["round"],
        "rounds-without-update": rounds_without_update,
        "stop-reason": stop,
        "model": cfg.model,
        "classes": index.classes,
        "final-central": results.rounds[-1].get("central", {}),
        "best-round": best[0] if best else None,
        "best-video-accuracy": best[1] if best else None,
        "results-dir": str(results.dir),
        **({"privacy": strategy.settings()} if isinstance(strategy, PrivateStrategy) else {}),
    }


class CentralEvaluator:
    """Scores global weights on the held-out test split (unreadable files set aside once)."""

    def __init__(self, cfg: AppConfig, model: torch.nn.Module, index: Any, device: torch.device) -> None:
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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
