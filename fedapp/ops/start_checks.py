"""What is checked before any Flower process starts or anything is written: the run config, the
federation's size and the run's results folder.

Used by ``fedvideo run`` and ``fedvideo deploy run``. Light on purpose: the config checks import
neither torch nor Flower, so a refused start answers in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedapp.ops.superlink import PROJECT_DIR

FLOWER_DEFAULT_SUPERNODES = 2  # what Flower simulates without num-supernodes (since flwr 1.32)


def config_overrides(run_config: Sequence[str]) -> dict[str, Any]:
    """``--run-config`` texts merged into one dict (later texts win); ConfigError on a malformed one."""
    from fedapp.task.config import parse_overrides

    return parse_overrides(run_config)


def federation_size(federation_config: str) -> int:
    """``num-supernodes`` of a ``--federation-config`` text (Flower's default, 2, when absent)."""
    from fedapp.task.config import ConfigError, parse_overrides

    try:
        options = parse_overrides([federation_config])
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--run-config", "--federation-config")) from None
    size = options.get("num-supernodes", FLOWER_DEFAULT_SUPERNODES)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"--federation-config num-supernodes={size!r}: expected an integer >= 1")
    return size


def check_run_config(run_config: Sequence[str], federation_config: str | None) -> Any:
    """The run config exactly as the ServerApp will validate it (the app's declared config plus the
    overrides), checked here before any Flower process starts, plus what only the launcher knows:
    the simulated federation's size (``federation_config``; None where the size is not known here,
    a deployment), and which keys the user typed: one set to its default is refused too when its
    stage is not selected. A user's own rule or model is loaded and tried once. ConfigError names
    the key, the value and what is allowed."""
    import tomllib

    from fedapp.server.build_strategy import check_plugins
    from fedapp.task.config import check_federation_size, parse_config

    declared = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    overrides = config_overrides(run_config)
    cfg = parse_config({**declared, **overrides}, explicit=overrides)
    if federation_config is not None:
        check_federation_size(cfg, federation_size(federation_config))
    check_plugins(cfg)
    return cfg


def run_location(run_config: Sequence[str], cfg: Any = None) -> Path:
    """The run's results folder, absolute, checked before anything starts: ``results-dir/run-name``
    (a relative ``results-dir`` is taken from the current directory; the default name is a UTC
    timestamp), or the folder that ``resume`` continues.

    Refuses (RunFolderError, CheckpointError) a folder that holds another run unless ``resume``
    names it, a ``resume`` with nothing to resume, and a folder another process is writing: the
    same rules the ServerApp applies, checked here so that a refused start writes no log into it.
    With the validated ``cfg``, a resumed checkpoint of another model, or one with no round left to
    train, is refused here too.
    """
    from fedapp.server.checkpoint import check_resumable, read_manifest
    from fedapp.server.results import RunFolderError, lock_holder
    from fedapp.server.run_folder import locate_run  # imports torch: only when a run is launched

    overrides = config_overrides(run_config)
    results_dir = Path(str(overrides.get("results-dir", "results")))
    results_dir = (results_dir if results_dir.is_absolute() else (Path.cwd() / results_dir)).resolve()
    resume = absolute_resume(overrides.get("resume"))
    run_name = str(overrides.get("run-name") or ("" if resume else f"{datetime.now(UTC):%Y%m%d-%H%M%S}"))
    location = locate_run({"results-dir": str(results_dir), "run-name": run_name, "resume": resume}, run_id="")
    run_dir = location.folder
    if location.checkpoint is not None and cfg is not None:
        manifest = read_manifest(location.checkpoint)
        check_resumable(location.checkpoint, manifest, cfg.model, cfg.num_server_rounds)
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunFolderError(f"{run_dir} is being written by another process ({holder}): one writer per run folder")
    return run_dir


def absolute_resume(resume: Any) -> str:
    """``resume`` as the ServerApp must read it: ``latest``, or a path resolved from here (the
    ServerApp's working directory is the SuperLink's, not ours)."""
    resume = str(resume or "")
    return resume if resume in ("", "latest") else str(Path(resume).expanduser().resolve())
