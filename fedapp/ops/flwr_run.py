"""``flwr run --stream`` the app against a SuperLink, keep its output, and judge the run.

Shared by ``fedvideo run`` (a simulation) and ``fedvideo deploy run`` (SuperNodes): the results
folder is pinned in the run config, the stream is echoed (less ``fedapp.ops.console``'s noise) and
logged, and the outcome is judged by Flower's run status and the app's summary (fedapp/ops/verdict.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedapp.ops.console import ConsoleFilter, wants_colour, without_colour
from fedapp.ops.processes import stop_process_group
from fedapp.ops.start_checks import absolute_resume, config_overrides
from fedapp.ops.superlink import CONNECTION, PROJECT_DIR
from fedapp.ops.verdict import FlowerStatus, Outcome, judge, read_summary, wait_final_status


def config_text(config: Mapping[str, Any]) -> str:
    """A dict as ``--run-config`` / ``--node-config`` text (TOML values: strings quoted)."""

    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in config.items())


def launch_log_dir(run_dir: Path) -> Path:
    """``run_dir/logs/launch-<UTC time>``: each launch (a resume too) keeps its own logs."""
    return run_dir / "logs" / f"launch-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}"


def run_and_judge(
    run_config: Sequence[str],
    run_dir: Path,
    env: dict[str, str],
    timeout: float,
    *,
    connection: str = CONNECTION,
    extra_args: Sequence[str] = (),
    log_dir: Path | None = None,
    watchdog: Any = None,
) -> Outcome:
    """``flwr run --stream`` the app against ``connection`` with its results in ``run_dir``, then
    judge it by Flower's run status and the app's ``summary.json``."""
    log_dir = log_dir or launch_log_dir(run_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    # Pinned so we know where the ServerApp writes, whatever its working directory.
    forced: dict[str, Any] = {"results-dir": str(run_dir.parent), "run-name": run_dir.name}
    resume = absolute_resume(config_overrides(run_config).get("resume"))
    if resume:
        forced["resume"] = resume
    cmd = ["flwr", "run", str(PROJECT_DIR), connection, "--stream", *extra_args]
    for text in [*run_config, config_text(forced)]:
        cmd += ["--run-config", text]
    print(f"$ {' '.join(cmd)}", flush=True)
    run_id = stream_run(cmd, env, log_dir / "flwr-run.log", timeout, watchdog)
    if run_id is None:
        return judge(FlowerStatus(None, "flwr run printed no run id", 0), None, run_dir, None)
    ls_log = log_dir / "flwr-ls.log"
    flower = wait_final_status(run_id, env, connection, ls_log)
    return judge(flower, read_summary(run_dir), run_dir, run_id, ls_log)


def stream_run(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float, watchdog: Any = None) -> int | None:
    """Run ``flwr run --stream``, echoing its output (less ``CONSOLE_NOISE``) and saving all of it
    to ``log_path`` (without colour codes); returns the run id it printed."""
    run_id = None
    deadline = time.monotonic() + timeout
    console = ConsoleFilter(colour=wants_colour())
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            cmd,
            cwd=PROJECT_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc,
    ):
        assert proc.stdout is not None
        if watchdog is not None:
            watchdog.guard(proc)
        try:
            for line in proc.stdout:
                if console.shows(line):
                    sys.stdout.write(console.render(line))
                log.write(without_colour(line))
                if run_id is None and (m := re.search(r"Successfully started run (\d+)", line)):
                    run_id = int(m.group(1))
                if time.monotonic() > deadline:
                    print(f"launcher: timeout after {timeout:.0f} s, stopping", flush=True)
                    break
        finally:
            # On timeout, SIGTERM or Ctrl-C too: otherwise leaving the `with` waits for the stream.
            stop_process_group(proc)
            if watchdog is not None:
                watchdog.release(proc)
        proc.wait()
    return run_id
