"""Run the app in Flower's simulation engine and report the run's real outcome.

``flwr run`` exits 0 even when a run failed, and a run where every client failed still reads
"completed". This launcher therefore starts its own SuperLink (runtime dependency installation
disabled, a project-local ``FLWR_HOME``, logs in the run folder), runs the app, then judges it by
Flower's run status (asked until it is final) and the app's ``summary.json``: exit 0 only when the
app's summary of this run says completed and Flower does not say it failed (fedapp/ops/verdict.py).

    fedvideo run [--run-config "k=v ..."] [--federation-config "num-supernodes=3 ..."] [--ray-address HOST:PORT]

Without ``--ray-address`` the simulation starts a Ray of its own on this machine (an inherited
``RAY_ADDRESS`` is ignored, with a note). With it, the simulation joins the Ray cluster whose head's
GCS listens at HOST:PORT (``ray start --head --port=PORT``), checked before anything starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedapp.ops.flwr_run import launch_log_dir, run_and_judge
from fedapp.ops.network import free_port
from fedapp.ops.processes import exit_on_sigterm, stop_process_group
from fedapp.ops.ray_cluster import check_ray_federation, parse_ray_address, ray_cluster_problem, ray_environment
from fedapp.ops.start_checks import check_run_config, run_location
from fedapp.ops.superlink import PROJECT_DIR, flwr_env, start_superlink, write_connection
from fedapp.ops.verdict import Outcome

DEFAULT_FEDERATION_CONFIG = "num-supernodes=3 client-resources-num-cpus=2 client-resources-num-gpus=0.0"


def launch(
    run_config: list[str], federation_config: str, timeout: float, cfg: Any, ray_address: str | None = None
) -> Outcome:
    """Start a SuperLink, run the app with ``flwr run --stream``, stop everything, judge the outcome.
    ``cfg``: the run config as :func:`check_run_config` validated it. ``ray_address``: the Ray
    cluster the simulation joins (checked by :func:`ray_cluster_problem`); None: a Ray of its own."""
    from fedapp.ops.watchdog import Watchdog

    run_dir = run_location(run_config, cfg)
    log_dir = launch_log_dir(run_dir)
    flwr_home = Path(os.environ.get("FEDVIDEO_FLWR_HOME", PROJECT_DIR / ".flwr_home")).resolve()
    env = flwr_env(flwr_home)
    note = ray_environment(env, ray_address)
    if note:
        print(note, flush=True)
    if ray_address is not None:
        print(
            f"simulation on the Ray cluster at {env['RAY_ADDRESS']} (its nodes: ray status --address "
            f"{env['RAY_ADDRESS']})",
            flush=True,
        )
    port = free_port()
    # The CLI's connection is this launch's own (FLWR_HOME of `flwr run` and `flwr ls` in its log
    # folder): with one shared config.toml, a launch started meanwhile would point this launch's
    # CLI at its own SuperLink. The SuperLink keeps the shared home (unpacked apps are reused).
    cli_home = log_dir / "flwr-cli"
    write_connection(cli_home, port)
    cli_env = {**env, "FLWR_HOME": str(cli_home)}
    watchdog = Watchdog()  # stops what we start if this process dies without its finally blocks
    try:
        superlink = start_superlink(flwr_home, log_dir, port, env, on_start=watchdog.guard)
        try:
            return run_and_judge(
                run_config,
                run_dir,
                cli_env,
                timeout,
                log_dir=log_dir,
                watchdog=watchdog,
                extra_args=["--federation-config", federation_config],
            )
        finally:
            stop_process_group(superlink)
            watchdog.release(superlink)
    finally:
        watchdog.close()


def ok_line(summary: Mapping[str, Any]) -> str:
    """The launcher's last word on a completed run: rounds and the accuracy the run measured
    (central test split, else the clients' own test videos when central evaluation is off)."""
    rounds = summary.get("rounds-completed")
    head = f"OK: {rounds} round{'' if rounds == 1 else 's'}"
    central, clients = summary.get("final-central") or {}, summary.get("final-evaluate") or {}
    if "video-accuracy" in central:
        return (
            f"{head}; central test video accuracy {central['video-accuracy']:.3f}, "
            f"clip accuracy {central.get('clip-accuracy', float('nan')):.3f}"
        )
    if "video-accuracy" in clients:
        return f"{head}; clients' test video accuracy {clients['video-accuracy']:.3f} (central-eval is off)"
    return f"{head}; no accuracy measured (central-eval is off and no client evaluated)"


RUN_CONFIG_HELP = """run-config keys:
  `fedvideo config` lists every key (default, allowed values, the stage that reads it);
  `fedvideo config KEY ...` a few; docs/config-keys.md is the same reference.
  Your own videos, one folder per class:
    fedvideo run --run-config 'dataset="folders" data-dir="/path/to/videos"'
  Another strategy:
    fedvideo run --run-config 'strategy="fusion" fusion-fn="krum" min-train-nodes=5 min-available-nodes=5' \\
        --federation-config 'num-supernodes=5'"""


def build_parser() -> argparse.ArgumentParser:
    """The ``fedvideo run`` command line."""
    parser = argparse.ArgumentParser(
        prog="fedvideo run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RUN_CONFIG_HELP,
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="overrides of [tool.flwr.app.config], e.g. 'num-server-rounds=5 model=\"r3d_18\"' (keys: below)",
    )
    parser.add_argument(
        "--federation-config",
        default=DEFAULT_FEDERATION_CONFIG,
        help=f"simulation size and resources (default: {DEFAULT_FEDERATION_CONFIG!r})",
    )
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the simulation on this Ray cluster (the head's `ray start --head --port`), "
        "checked before anything starts; default: a Ray of its own on this machine",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``fedvideo run``: 0 when the run completed, 1 when it failed or was refused, 2 on a config error."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    args = build_parser().parse_args(argv)
    from fedapp.task.config import ConfigError

    try:  # before anything starts or is written, in well under a second (no torch, no Flower process)
        cfg = check_run_config(args.run_config, args.federation_config)
        if args.ray_address is not None:
            check_ray_federation(args.federation_config)
    except ConfigError as exc:
        print(f"FAILED: config: {exc}", file=sys.stderr)
        return 2
    if args.ray_address is not None:  # joined or refused: never a silent fallback to a Ray of its own
        try:
            parse_ray_address(args.ray_address)
        except ValueError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 2
        if problem := ray_cluster_problem(args.ray_address):
            print(f"FAILED: {problem}", file=sys.stderr)  # nothing started, nothing written
            return 1
    from fedapp.server.checkpoint import CheckpointError
    from fedapp.server.results import RunFolderError

    try:
        outcome = launch(args.run_config, args.federation_config, args.timeout, cfg, args.ray_address)
    except (RunFolderError, CheckpointError) as exc:  # refused before anything started or was written
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print()
    if outcome.ok and outcome.summary:
        if outcome.warning:
            print(outcome.warning, file=sys.stderr)
        print(ok_line(outcome.summary))
        print(f"results: {outcome.run_dir}")
        return 0
    print(f"FAILED: {outcome.message}", file=sys.stderr)
    print(f"logs: {outcome.run_dir / 'logs'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
