"""Run the app in Flower's simulation engine and report the run's real outcome.

``flwr run`` exits 0 even when a run failed, and a run where every client failed still reads
"completed". This launcher therefore starts its own SuperLink (runtime dependency installation
disabled, a project-local ``FLWR_HOME``, logs in the run folder), runs the app, then checks both
Flower's run status and the app's ``summary.json``, and exits non-zero unless both say it worked.

    python -m fedapp.launch [--run-config "k=v ..."] [--federation-config "num-supernodes=3 ..."]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flwr.common.config import parse_config_args

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_FEDERATION_CONFIG = "num-supernodes=3 client-resources-num-cpus=2 client-resources-num-gpus=0.0"
CONNECTION = "fedvideo-sim"


@dataclass
class Outcome:
    """What the launcher found after the run."""

    ok: bool
    message: str
    run_dir: Path
    summary: dict | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process we start: hermetic home, no runtime installs."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def write_connection(flwr_home: Path, port: int) -> None:
    """Point the CLI's connection at our SuperLink (Flower reads connections from FLWR_HOME)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def start_superlink(flwr_home: Path, log_dir: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    """A simulation SuperLink of our own, in its own process group so it can be stopped whole."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--control-api-address", f"127.0.0.1:{free_port()}",
        "--database", str(log_dir / "superlink.db"),
        "--log-file", str(log_dir / "superlink.log"),
        "--disable-runtime-dependency-installation",
    ]
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=open(log_dir / "superlink.stderr", "wb"),
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}; see {log_dir / 'superlink.stderr'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_process_group(proc)
    raise RuntimeError("flower-superlink did not become healthy within 60 s")


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the whole process group, SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_status(run_id: int, env: dict[str, str]) -> str:
    """Flower's own verdict on the run, e.g. ``finished:completed`` or ``finished:failed``."""
    out = subprocess.run(
        ["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60,
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError, IndexError):
        return "unknown"


def judge(status: str, summary: dict | None, run_dir: Path) -> Outcome:
    """A run succeeded only if Flower says completed AND the app wrote a completed summary."""
    if summary is None:
        return Outcome(False, f"the app wrote no summary in {run_dir} (Flower status: {status})", run_dir, None)
    if summary.get("status") != "completed":
        return Outcome(False, f"run failed: {summary.get('error', 'unknown error')} (Flower status: {status})",
                       run_dir, summary)
    if status != "finished:completed":
        return Outcome(False, f"Flower reports status {status!r}", run_dir, summary)
    return Outcome(True, "run completed", run_dir, summary)


def launch(run_config: list[str], federation_config: str, timeout: float) -> Outcome:
    """Start a SuperLink, run the app with ``flwr run --stream``, stop everything, judge the outcome."""
    overrides: dict = {}
    for text in run_config:
        overrides.update(parse_config_args([text]))
    results_dir = Path(str(overrides.get("results-dir", "results")))
    results_dir = results_dir if results_dir.is_absolute() else (Path.cwd() / results_dir)
    run_name = str(overrides.get("run-name") or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    run_dir = results_dir.resolve() / run_name
    log_dir = run_dir / "logs"
    flwr_home = Path(os.environ.get("FEDVIDEO_FLWR_HOME", PROJECT_DIR / ".flwr_home")).resolve()
    env = flwr_env(flwr_home)
    port = free_port()
    write_connection(flwr_home, port)
    superlink = start_superlink(flwr_home, log_dir, port, env)
    try:
        forced = f'results-dir="{results_dir.resolve()}" run-name="{run_name}"'
        cmd = ["flwr", "run", str(PROJECT_DIR), CONNECTION, "--stream", "--federation-config", federation_config]
        for text in [*run_config, forced]:
            cmd += ["--run-config", text]
        print(f"$ {' '.join(cmd)}", flush=True)
        run_id = stream_run(cmd, env, log_dir / "flwr-run.log", timeout)
        status = run_status(run_id, env) if run_id is not None else "not started"
    finally:
        stop_process_group(superlink)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return judge(status, summary, run_dir)


def stream_run(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> int | None:
    """Run ``flwr run --stream``, echoing and saving its output; returns the run id it printed."""
    run_id = None
    deadline = time.monotonic() + timeout
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if run_id is None and (m := re.search(r"Successfully started run (\d+)", line)):
                run_id = int(m.group(1))
            if time.monotonic() > deadline:
                print(f"launcher: timeout after {timeout:.0f} s, stopping", flush=True)
                stop_process_group(proc)
                break
        proc.wait()
    return run_id


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into SystemExit so `finally` blocks stop the SuperLink we started.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", action="append", default=[],
                        help='overrides of [tool.flwr.app.config], e.g. \'num-server-rounds=5 model="r3d_18"\'')
    parser.add_argument("--federation-config", default=DEFAULT_FEDERATION_CONFIG,
                        help=f"simulation size and resources (default: {DEFAULT_FEDERATION_CONFIG!r})")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    args = parser.parse_args(argv)
    outcome = launch(args.run_config, args.federation_config, args.timeout)
    print()
    if outcome.ok and outcome.summary:
        final = outcome.summary.get("final-central", {})
        print(f"OK: {outcome.summary.get('rounds-completed')} rounds; central test video accuracy "
              f"{final.get('video-accuracy', float('nan')):.3f}, clip accuracy {final.get('clip-accuracy', float('nan')):.3f}")
        print(f"results: {outcome.run_dir}")
        return 0
    print(f"FAILED: {outcome.message}", file=sys.stderr)
    print(f"logs: {outcome.run_dir / 'logs'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
