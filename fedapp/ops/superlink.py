"""A SuperLink of our own, started the same way by ``fedvideo run`` and ``fedvideo deploy``.

Every Flower process gets a hermetic environment (``flwr_env``: project-local ``FLWR_HOME``, no
runtime dependency installation); the CLI finds the SuperLink through the connection that
``write_connection`` writes into its ``FLWR_HOME``. ``start_superlink`` starts it, insecure or with
TLS (``TlsFiles``), and returns once it answers its health check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from fedapp.files import atomic_write_text
from fedapp.ops.network import wait_healthy
from fedapp.ops.processes import stop_process_group

# The Flower app every process runs: its pyproject.toml declares the app and its config.
PROJECT_DIR = Path(__file__).resolve().parents[2]
CONNECTION = "fedvideo-sim"


class TlsFiles(NamedTuple):
    """A SuperLink's TLS material: the CA that signed it, its certificate and its private key."""

    ca_cert: Path
    cert: Path
    key: Path


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process we start: hermetic home, no runtime installs."""
    env = dict(os.environ)
    # Flower's executables sit beside this interpreter; a venv used without activation is not on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def write_connection(
    flwr_home: Path, port: int, *, name: str = CONNECTION, root_certificates: Path | None = None
) -> None:
    """Point the CLI's connection at our SuperLink (Flower reads connections from FLWR_HOME).

    Without ``root_certificates`` the connection is insecure; with them the CLI verifies the
    SuperLink's certificate against that CA (Flower requires an absolute path).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        "insecure = true"
        if root_certificates is None
        else f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}"
    )
    # Atomic: a CLI reading it meanwhile (another launcher sharing FLWR_HOME) never sees half of it.
    atomic_write_text(
        flwr_home / "config.toml",
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n',
    )


def superlink_command(
    log_dir: Path, port: int, *, simulation: bool, tls: TlsFiles | None, supernode_auth: bool, database: Path | None
) -> list[str]:
    """The ``flower-superlink`` command line for :func:`start_superlink`."""
    cmd = [
        "flower-superlink",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(database or log_dir / "superlink.db"),
        "--log-file",
        str(log_dir / "superlink.log"),
        "--disable-runtime-dependency-installation",
    ]
    cmd += ["--simulation"] if simulation else []
    if tls is None:
        cmd += ["--insecure"]
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    cmd += ["--enable-supernode-auth"] if supernode_auth else []
    return cmd


def start_superlink(
    flwr_home: Path,
    log_dir: Path,
    port: int,
    env: dict[str, str],
    *,
    simulation: bool = True,
    tls: TlsFiles | None = None,
    supernode_auth: bool = False,
    database: Path | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> subprocess.Popen:
    """A SuperLink of our own on 127.0.0.1:``port``, in its own process group so it can be stopped whole.

    ``simulation`` runs ClientApps in the simulation engine; without it SuperNodes connect. No
    ``tls`` means ``--insecure``; ``supernode_auth`` (TLS only) admits registered SuperNodes only.
    ``on_start`` sees the process as soon as it exists (the launcher's watchdog guards it). Returns
    once the SuperLink answers its health check.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(
        log_dir, port, simulation=simulation, tls=tls, supernode_auth=supernode_auth, database=database
    )
    with open(log_dir / "superlink.stderr", "wb") as stderr:
        proc = subprocess.Popen(
            cmd,
            cwd=PROJECT_DIR,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    if on_start is not None:
        on_start(proc)
    try:
        wait_healthy(proc, port, tls.ca_cert if tls else None, log_dir / "superlink.stderr")
    except BaseException:
        stop_process_group(proc)
        raise
    return proc
