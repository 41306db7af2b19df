"""Where a run writes and what it continues: the run folder and, for a resumed run, its checkpoint.

Decided once per run, by :func:`locate_run`: the ServerApp calls it when it starts and the launcher
calls it before starting anything (so a refused start leaves no log behind), and nothing else works
the folder or the resume source out again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedapp.server.checkpoint import CHECKPOINTS_DIR, CheckpointError, latest_checkpoint, list_checkpoints
from fedapp.server.results import RunFolderError, run_folder_taken


@dataclass(frozen=True)
class RunLocation:
    """A run's folder, and the checkpoint it resumes from (None for a fresh run)."""

    folder: Path
    checkpoint: Path | None = None

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None


def locate_run(run_config: Mapping[str, Any], run_id: int | str) -> RunLocation:
    """The run's folder: ``results-dir/<run-name>`` (default name: a UTC timestamp plus Flower's run
    id), or, for a resumed run, its checkpoint's run folder.

    One folder, one run: a folder that already holds a run is refused unless ``resume`` names it,
    and a ``run-name`` that names another folder than the one ``resume`` continues is refused too
    (RunFolderError); a ``resume`` with nothing to resume raises CheckpointError. Read from the raw
    run config (before validation) so that even a config error leaves a summary.
    """
    results_dir = Path(str(run_config.get("results-dir") or "results")).expanduser().resolve()
    run_name = str(run_config.get("run-name") or "")
    checkpoint = _resume_checkpoint(run_config, results_dir, run_name)
    if checkpoint is not None:
        folder = checkpoint.parent.parent
        if run_name and folder != results_dir / run_name:
            raise RunFolderError(
                f"resume={run_config.get('resume')!r} continues {folder}, but run-name={run_name!r} names "
                f"{results_dir / run_name}: leave run-name empty or name the resumed run"
            )
        return RunLocation(folder, checkpoint)
    suffix = f"-run{run_id}" if run_id != "" else ""
    folder = results_dir / (run_name or f"{datetime.now(UTC):%Y%m%d-%H%M%S}{suffix}")
    if run_folder_taken(folder):
        raise RunFolderError(
            f"run-name={run_name!r}: {folder} already holds a run; choose another run-name, or set "
            f'resume="{folder}" to continue that one'
        )
    return RunLocation(folder)


def _resume_checkpoint(run_config: Mapping[str, Any], results_dir: Path, run_name: str) -> Path | None:
    """The checkpoint folder ``resume`` names: a checkpoint, a run folder (its latest checkpoint),
    or ``latest`` (the latest checkpoint of ``run-name``, else of the newest run in ``results-dir``)."""
    resume = str(run_config.get("resume") or "")
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume).expanduser().resolve()
        return latest_checkpoint(path) if (path / CHECKPOINTS_DIR).is_dir() else path
    runs = [results_dir / run_name] if run_name else [p for p in results_dir.glob("*") if p.is_dir()]
    runs = [r for r in runs if list_checkpoints(r)]
    if not runs:
        raise CheckpointError(f"resume='latest': no checkpoint under {results_dir / (run_name or '*')}")
    return latest_checkpoint(max(runs, key=lambda r: latest_checkpoint(r).stat().st_mtime))
