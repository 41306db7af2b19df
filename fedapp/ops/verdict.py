"""The launcher's verdict on a run: Flower's run status, asked until it is final, and the app's summary.

``flwr run`` exits 0 even when a run failed, so both ``fedvideo run`` and ``fedvideo deploy run``
ask ``flwr ls --run-id N --format json`` once the stream ends. On a loaded machine that answer can
be late (the CLI times out), not yet final (``running``) or unreadable; each of those is "could not
ask", which is not "Flower says failed". The launcher therefore asks again with back-off for a
bounded time, logs every raw answer, and judges:

- no summary of this run id from the app, or a summary that says failed: FAILED;
- Flower's final status is ``finished:failed`` / ``finished:stopped``: FAILED (Flower says so);
- Flower's final status is ``finished:completed`` and the summary says completed: OK;
- Flower's final status could not be had, but the app's summary for this run id says completed:
  OK, with a one-line warning naming what ``flwr ls`` answered and where the answers are logged.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FINAL_PREFIX = "finished:"
COMPLETED = "finished:completed"
# How long to keep asking for a final status after the stream ended, and how long one `flwr ls`
# may take: the CLI imports Flower and grpc, which takes seconds on a loaded 2-core machine.
STATUS_WAIT_S = 60.0
CALL_TIMEOUT_S = 30.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class FlowerStatus:
    """What ``flwr ls`` told of a run: ``status`` is Flower's status text when it answered (final
    or not), ``problem`` why the last question got no usable answer, ``asks`` how often it asked."""

    status: str | None
    problem: str | None = None
    asks: int = 1

    @property
    def final(self) -> bool:
        return self.status is not None and self.status.startswith(FINAL_PREFIX)

    def describe(self) -> str:
        """One phrase for messages: Flower's status, or why there was none."""
        if self.final:
            return f"Flower status {self.status!r}"
        asked = f"asked {self.asks} time{'s' if self.asks != 1 else ''}"
        if self.status is not None:
            last = f"; last: {self.problem}" if self.problem else ""
            return f"Flower status still {self.status!r} ({asked}{last})"
        return f"Flower status unknown ({asked}; last: {self.problem})"


@dataclass
class Outcome:
    """What the launcher found after the run; ``warning`` is a line the console shows before OK."""

    ok: bool
    message: str
    run_dir: Path
    summary: dict | None
    warning: str | None = None


def parse_ls_answer(run_id: int, returncode: int, stdout: str) -> tuple[str | None, str | None]:
    """``(status, problem)`` from one ``flwr ls --run-id N --format json`` answer: Flower's status
    text for run ``run_id``, or None and why the answer holds none."""
    text = ANSI_CODE.sub("", stdout).strip()  # Rich colours its JSON where FORCE_COLOR is set
    try:
        answer = json.loads(text[text.find("{") :]) if "{" in text else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        shown = text[:200] or "nothing"
        return None, f"flwr ls exited {returncode} and answered no JSON: {shown!r}"
    if answer.get("success") is not True:
        error = str(answer.get("error-message", "")).strip().splitlines()
        return None, f"flwr ls failed: {error[-1][:200] if error else answer}"
    runs = answer.get("runs")
    listed = runs if isinstance(runs, list) else []
    run = next((r for r in listed if isinstance(r, dict) and str(r.get("run-id")) == str(run_id)), None)
    if run is None:
        return None, f"flwr ls lists no run {run_id}"
    status = run.get("status")
    if not isinstance(status, str) or not status:
        return None, f"flwr ls gave run {run_id} no status: {run.get('status')!r}"
    return status, None


def ask_run_status(
    run_id: int, env: Mapping[str, str], connection: str, log_path: Path | None, timeout: float = CALL_TIMEOUT_S
) -> tuple[str | None, str | None]:
    """Ask ``flwr ls`` once; append the raw answer (or the time-out) to ``log_path``."""
    cmd = ["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"]
    began = time.monotonic()
    try:
        out = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
        returncode, stdout, stderr = out.returncode, out.stdout, out.stderr
        status, problem = parse_ls_answer(run_id, returncode, stdout)
    except subprocess.TimeoutExpired as exc:
        returncode, stdout, stderr = None, _text(exc.stdout), _text(exc.stderr)
        status, problem = None, f"flwr ls did not answer within {timeout:.0f} s"
    except OSError as exc:
        returncode, stdout, stderr = None, "", ""
        status, problem = None, f"flwr ls could not be started: {exc}"
    if log_path is not None:
        with open(log_path, "a") as log:
            log.write(
                f"--- {datetime.now(UTC):%Y-%m-%dT%H:%M:%S.%fZ} $ {' '.join(cmd)}\n"
                f"exit: {returncode if returncode is not None else 'none (' + str(problem) + ')'}; "
                f"took {time.monotonic() - began:.2f} s; read as: {status or problem}\n"
                f"stdout:\n{stdout}\nstderr:\n{stderr}\n"
            )
    return status, problem


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def wait_final_status(
    run_id: int,
    env: Mapping[str, str],
    connection: str,
    log_path: Path | None = None,
    *,
    wait: float = STATUS_WAIT_S,
    call_timeout: float = CALL_TIMEOUT_S,
    first_backoff: float = FIRST_BACKOFF_S,
    ask: Callable[..., tuple[str | None, str | None]] = ask_run_status,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> FlowerStatus:
    """Ask Flower for run ``run_id``'s status until it is final (``finished:...``) or ``wait``
    seconds have passed (a question already asked may take ``call_timeout`` more), backing off
    from ``first_backoff`` doubling to 8 s. Returns the last status Flower gave and the last problem."""
    deadline = clock() + wait
    backoff = first_backoff
    seen: str | None = None
    asks = 0
    while True:
        status, problem = ask(run_id, env, connection, log_path, call_timeout)
        asks += 1
        seen = status or seen
        if status is not None and status.startswith(FINAL_PREFIX):
            return FlowerStatus(status, None, asks)
        if status is not None:
            problem = None  # a live answer that is just not final yet
        remaining = deadline - clock()
        if remaining <= 0:
            return FlowerStatus(seen, problem or (f"not final after {wait:.0f} s" if seen else None), asks)
        sleep(min(backoff, remaining))
        backoff = min(backoff * 2, MAX_BACKOFF_S)


def judge(
    flower: FlowerStatus, summary: dict | None, run_dir: Path, run_id: int | None, log: Path | None = None
) -> Outcome:
    """A run succeeded when the app wrote a completed summary for this run id and Flower does not
    say it failed: Flower's ``finished:completed``, or (with a warning) no final status to be had."""
    if run_id is None:
        return Outcome(False, "flwr run started no run (the reason is in the log above)", run_dir, None)
    if summary is None or summary.get("run-id") != run_id:
        # A resume refused at start leaves the earlier run's completed summary: not this run's.
        return Outcome(
            False,
            f"the app wrote no summary for run {run_id} in {run_dir} ({flower.describe()}; "
            "the reason is in the log above)",
            run_dir,
            None,
        )
    if summary.get("status") != "completed":
        return Outcome(
            False, f"run failed: {summary.get('error', 'unknown error')} ({flower.describe()})", run_dir, summary
        )
    if flower.final and flower.status != COMPLETED:
        return Outcome(False, f"Flower reports status {flower.status!r} for run {run_id}", run_dir, summary)
    if flower.final:
        return Outcome(True, "run completed", run_dir, summary)
    where = f"; its answers: {log}" if log is not None else ""
    warning = f"warning: {flower.describe()}; judged by the app's summary of run {run_id}, which says completed{where}"
    return Outcome(True, "run completed (by the app's summary)", run_dir, summary, warning)


def read_summary(run_dir: Path) -> dict | None:
    """``run_dir/summary.json``, or None where there is none (or it is unreadable)."""
    from fedapp.server.results import SUMMARY_FILE  # numpy and safetensors: not before a run is checked

    try:
        summary: Any = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None
