"""The Flower ServerApp: claim the run folder, build the model and strategy, run the rounds, report.

The round steps live in ``fedapp.server.rounds``; where a run writes and what it resumes in
``fedapp.server.run_folder``; the strategy a config names in ``fedapp.server.build_strategy``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedapp.client.personal import run_token
from fedapp.config.personalization import RUN_FOLDER, RUN_TOKEN
from fedapp.config.secagg import settings_of, weight_metric
from fedapp.logs import route_app_logs_to_flower
from fedapp.server.build_strategy import build_strategy, make_distiller
from fedapp.server.central_eval import CentralEvaluator
from fedapp.server.checkpoint import (
    CheckpointError,
    check_compatible,
    check_resumable,
    load_checkpoint,
    remove_partial_writes,
)
from fedapp.server.report import TensorBoardLog, write_final_report
from fedapp.server.results import RunFolderError, RunResults, WriterLock
from fedapp.server.root_set import RootTrainer, root_samples
from fedapp.server.rounds import (
    RunState,
    Strategy,
    evaluate_round,
    record_partitions,
    record_round,
    round_record,
    train_round,
)
from fedapp.server.run_folder import locate_run
from fedapp.server.secure_round import secure_train_round
from fedapp.server.split import record_sites, warn_classes_without_test, write_split
from fedapp.server.stopping import BUDGET
from fedapp.server.summary import history_figures, summary_lines
from fedapp.task.config import AppConfig, parse_config
from fedapp.task.data import load_video_index
from fedapp.task.devices import select_device
from fedapp.task.models import build_model
from fedapp.task.train import set_deterministic, set_torch_threads
from strategies.blocks import set_threads
from strategies.privacy import PrivateStrategy
from strategies.stage import Transform

logger = logging.getLogger(__name__)
route_app_logs_to_flower()

app = ServerApp()


class NoUpdateError(RuntimeError):
    """Not one round produced a usable update: the run did no federated learning at all."""


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
        location = locate_run(run_config, run_id)
    except (RunFolderError, CheckpointError) as exc:
        logger.error("run refused: %s", exc)
        raise
    with WriterLock(location.folder):
        results = RunResults(location.folder)
        logger.info("results directory: %s", results.dir)
        started = time.time()
        try:
            summary = run_federation(grid, parse_config(run_config), results, location.checkpoint, started)
        except BaseException as exc:
            logger.error("run failed: %s: %s", type(exc).__name__, exc)
            if not location.resuming or results.config_written:
                completed = results.rounds[-1]["round"] if results.rounds else 0
                results.write_summary(
                    {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "rounds-completed": completed,
                     "run-id": run_id, "wall-time-s": time.time() - started, "results-dir": str(results.dir)}
                )  # fmt: skip
            raise
        summary = {"status": "completed", **summary, "run-id": run_id}
        results.write_summary(summary)
    for line in summary_lines(summary):  # the dict itself is in summary.json, its text in summary.txt
        logger.info("%s", line)
    return summary


def run_federation(
    grid: Grid,
    cfg: AppConfig,
    results: RunResults,
    checkpoint: Path | None,
    started: float | None = None,
    extra_transforms: Sequence[Transform] = (),
) -> dict[str, Any]:
    """The round loop: train, aggregate, evaluate on clients and centrally, checkpoint, record;
    until the round budget is spent or the stopping rule fires. ``checkpoint`` is what a resumed
    run continues (``locate_run`` decides it), None for a fresh run. ``started``: when a fresh run
    began (default: now), the origin of every ``wall-time-s``, set-up included.
    ``extra_transforms``: stages no run config selects (the in-process attack test tool)."""
    started = time.time() if started is None else started
    if cfg.resume and checkpoint is None:
        raise CheckpointError(f"resume={cfg.resume!r} but no checkpoint was given: locate the run with locate_run")
    set_torch_threads(cfg.torch_threads)
    set_deterministic(cfg.deterministic)
    set_threads(cfg.aggregation_threads)
    index = load_video_index(cfg)  # generates the synthetic default before any client needs it
    logger.info("dataset %s: %d classes, %d train / %d test videos", cfg.dataset, len(index.classes),
                len(index.train), len(index.test))  # fmt: skip
    model = initial_model(cfg, len(index.classes))
    device = select_device(cfg.device)
    evaluator = CentralEvaluator(cfg, model, index, device) if cfg.central_eval else None
    feddf = cfg.strategy == "fusion" and cfg.fusion_fn == "feddf"
    distiller = make_distiller(cfg, len(index.classes), device) if feddf else None
    fltrust = cfg.strategy == "fusion" and cfg.fusion_fn == "fltrust"
    root_trainer = RootTrainer(cfg, len(index.classes), root_samples(cfg, index), device) if fltrust else None
    strategy = build_strategy(cfg, distiller, extra_transforms, root_trainer)
    state = start_run(cfg, results, strategy, model, index.classes, evaluator, checkpoint, started)
    if cfg.deterministic:
        # Flower's node sampling draws from Python's `random`: seeded per run (and resume point), it
        # samples the same nodes in the same order each time. Not with dp (refused): the seed is public.
        random.seed(cfg.seed * 1_000_003 + state.first_round)
    results.write_config(cfg.to_dict())  # past the start checks: from here on a failure is recorded
    state.dataset = index
    if cfg.personalization != "none":
        # The sites keep their personal models under the run folder's name and token (a resume keeps both).
        state.sent = {RUN_FOLDER: results.dir.name, RUN_TOKEN: run_token(results.dir, create=True)}
    write_split(results.dir, index)  # the site column follows once the clients have reported
    warn_classes_without_test(index)

    tensorboard = TensorBoardLog(results.dir / "tensorboard") if cfg.tensorboard else None
    stop = None
    try:
        for server_round in range(state.first_round, cfg.num_server_rounds + 1):
            stop = run_round(grid, cfg, results, strategy, state, evaluator, tensorboard, server_round)
            if stop:
                logger.info("stopping after round %d: %s", server_round, stop)
                break
    finally:
        if tensorboard:
            tensorboard.close()
    return finish_run(cfg, results, strategy, state, evaluator, stop or BUDGET)


def initial_model(cfg: AppConfig, num_classes: int) -> torch.nn.Module:
    """The global model of round 0, its random initialisation seeded from ``seed``: two runs of a
    comparison start from the same point (the process's own random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(
            cfg.model, num_classes, pretrained_path=cfg.pretrained_path, freeze_backbone=cfg.freeze_backbone,
            pooling=cfg.pooling, pretrained=cfg.pretrained,
        )  # fmt: skip


def start_run(
    cfg: AppConfig,
    results: RunResults,
    strategy: Strategy,
    model: torch.nn.Module,
    classes: list[str],
    evaluator: CentralEvaluator | None,
    checkpoint: Path | None,
    started: float,
) -> RunState:
    """The state round 1 starts from (the initial model, scored as round 0), or, resuming, the
    checkpoint's model, strategy state and history, after checking they fit this run. A fresh
    run's clock starts at ``started``; a resumed run's continues from its last round's wall time."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    removed = remove_partial_writes(results.dir)  # left by a writer killed mid-write; we hold the lock
    if removed:
        logger.info("removed %d partial writes of an earlier process: %s", len(removed), [p.name for p in removed])
    if checkpoint is None:
        central = evaluator(arrays) if evaluator else {}
        results.append_round({"round": 0, "central": central, "wall-time-s": time.time() - started})
        return RunState(arrays, first_round=1, classes=classes, started=started)
    loaded = load_checkpoint(checkpoint)
    check_resumable(loaded.path, loaded.manifest, cfg.model, cfg.num_server_rounds)
    check_compatible(loaded, cfg.model, classes, arrays)
    # In the model's own state_dict order (safetensors gives them back in name order).
    arrays = {key: loaded.arrays[key] for key in arrays}
    strategy.load_state(loaded.manifest["strategy-state"])
    results.restore_history(loaded.manifest["history"])
    logger.info("resuming from %s: round %d onwards", loaded.path, loaded.round + 1)
    started = time.time() - float(results.rounds[-1].get("wall-time-s", 0.0))
    return RunState(arrays, first_round=loaded.round + 1, classes=classes, started=started)


def run_round(
    grid: Grid,
    cfg: AppConfig,
    results: RunResults,
    strategy: Strategy,
    state: RunState,
    evaluator: CentralEvaluator | None,
    tensorboard: TensorBoardLog | None,
    server_round: int,
) -> str | None:
    """One round: train, evaluate on clients and centrally, record. Returns why to stop, if the
    stopping rule fired."""
    round_start = time.time()
    logger.info("[ROUND %d/%d]", server_round, cfg.num_server_rounds)
    if cfg.secagg:
        # The sharing graph: drawn afresh each round, from the seed under deterministic.
        rng = random.Random(cfg.seed * 1_000_003 + server_round) if cfg.deterministic else random.Random()
        train, bytes_down, waited = secure_train_round(
            strategy, grid, server_round, state.arrays, cfg.round_timeout, state.sent, settings_of(cfg),
            weight_metric(cfg), rng,
        )  # fmt: skip
    else:
        train, bytes_down, waited = train_round(
            strategy, grid, server_round, state.arrays, cfg.round_timeout, state.sent
        )
    state.train = train
    if train.arrays is None:
        state.rounds_without_update += 1
    else:
        state.arrays = train.arrays
    record_partitions(results, state, train, server_round)
    if not state.sites_recorded and state.dataset is not None:
        state.sites_recorded = record_sites(results.dir, cfg, state.dataset, [c.metrics for c in train.accepted])
    evaluate = None
    if cfg.fraction_evaluate > 0:
        evaluate, evaluate_bytes, evaluate_waited = evaluate_round(
            strategy, grid, server_round, state.arrays, cfg.round_timeout, state.sent
        )
        bytes_down += evaluate_bytes
        waited += evaluate_waited
    central = evaluator(state.arrays) if evaluator else {}
    record = round_record(server_round, train, evaluate, central, bytes_down, round_start, state.started, waited)
    return record_round(results, record, cfg, state, strategy, tensorboard)


def finish_run(
    cfg: AppConfig,
    results: RunResults,
    strategy: Strategy,
    state: RunState,
    evaluator: CentralEvaluator | None,
    stop: str,
) -> dict[str, Any]:
    """Refuse a run that trained nothing; else save the final model and report, and summarise."""
    last_round = results.rounds[-1]["round"]
    if state.rounds_without_update == last_round - state.first_round + 1:  # resumed or not
        train = state.train
        raise NoUpdateError(
            f"no round produced a global update (rounds {state.first_round}..{last_round}; last round: "
            f"{train.skipped}; failed: {train.failed}; rejected: {train.rejected})"
        )
    results.save_model(state.arrays, state.classes, cfg.model)
    confusion = evaluator.confusion_of(state.arrays) if evaluator else None
    write_final_report(results.dir, results.rounds, state.classes, confusion)
    # From the history, not this process's counters: a resumed run's earlier rounds count too.
    figures = history_figures(results.rounds)
    return {
        "rounds-completed": figures.pop("rounds-completed"),
        "rounds-without-update": figures.pop("rounds-without-update"),
        "stop-reason": stop,
        "strategy": cfg.strategy,
        **({"fusion-fn": cfg.fusion_fn} if cfg.strategy == "fusion" else {}),
        **({"personalization": cfg.personalization} if cfg.personalization != "none" else {}),
        **({"secagg": True} if cfg.secagg else {}),
        "model": cfg.model,
        "classes": state.classes,
        **figures,
        "results-dir": str(results.dir),
        **({"privacy": strategy.settings()} if isinstance(strategy, PrivateStrategy) else {}),
        "wall-time-s": time.time() - state.started,  # last: the whole run, final report included
    }
