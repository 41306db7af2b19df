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
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from fedapp.files import atomic_write_text
from fedapp.ops.processes import stop_process_group
from fedapp.ops.verdict import ANSI_CODE, FlowerStatus, Outcome, judge, read_summary, wait_final_status

PROJECT_DIR = Path(__file__).resolve().parents[2]
DEFAULT_FEDERATION_CONFIG = "num-supernodes=3 client-resources-num-cpus=2 client-resources-num-gpus=0.0"
CONNECTION = "fedvideo-sim"
FLOWER_DEFAULT_SUPERNODES = 2  # what Flower simulates without num-supernodes (since flwr 1.32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# Ray reads RAY_ADDRESS in ray.init() (Flower's Ray backend passes no address). "local" makes it
# start a Ray of its own; without any value it would join a cluster that a `ray start --head` on
# this machine recorded in /tmp/ray/ray_current_cluster (tested: it does, silently).
RAY_PRIVATE = "local"
# ray.init() refuses these when it joins a cluster ("When connecting to an existing cluster, num_cpus
# and num_gpus must not be provided."; tested: the run fails after its folder was written).
RAY_CLUSTER_REFUSES = ("init-args-num-cpus", "init-args-num-gpus")
# A Ray head's GCS answers this RPC (an empty request) with the cluster's id; any other server
# (Ray Client, raylet, dashboard, another service) does not.
GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def parse_ray_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) of a Ray head's GCS as ``(host, port)``; ValueError naming
    what is wrong."""
    usage = "give the head's GCS address as HOST:PORT, the --port of `ray start --head` (default 6379)"
    if "://" in text:
        raise ValueError(f"--ray-address {text!r}: {usage}, not a URL (Ray Client ray:// is not supported)")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^\s:\[\]]+):(\d+)", text.strip())
    if m is None:
        raise ValueError(f"--ray-address {text!r}: {usage}")
    host, port = (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), int(m.group(4)))
    if not 0 < port < 65536:
        raise ValueError(f"--ray-address {text!r}: port {port} is out of range (1-65535)")
    return host, port


def ray_auth_token(environ: Mapping[str, str]) -> str | None:
    """The token Ray's token authentication (``RAY_AUTH_MODE=token``) would send, where Ray looks for
    it: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    if environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip()
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ray_cluster_problem(address: str, environ: Mapping[str, str] = os.environ, timeout: float = 5.0) -> str | None:
    """Why a simulation could not join the Ray cluster at ``address``, in words; None when a Ray
    head's GCS answers there.

    Checked before anything starts: given an address where nothing answers, ``ray.init`` retries
    for minutes (tested: over 2.5 min) and the run would hang until ``--timeout``. First a TCP
    connection, then one gRPC call that only a Ray GCS answers (with the token when
    ``RAY_AUTH_MODE=token``), so that another port of the head (Ray Client 10001, the dashboard) or
    another service is named as such.
    """
    try:
        host, port = parse_ray_address(address)
    except ValueError as exc:
        return str(exc)
    start = f"`ray start --head --port={port}` running on {host}"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"--ray-address {address}: cannot connect ({exc}): is {start}, and the port open to this host?"
    try:
        import grpc  # installed with ray
    except ImportError:  # pragma: no cover - ray depends on grpcio
        return None
    token = ray_auth_token(environ)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(listen_address(host, port)) as channel:
        call = channel.unary_unary(GCS_PROBE, request_serializer=lambda _: b"", response_deserializer=bytes)
        try:
            call(None, timeout=timeout, metadata=metadata)
            return None
        except grpc.RpcError as exc:
            code, details = exc.code(), (exc.details() or "").splitlines()[0][:200]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"--ray-address {address}: the Ray cluster requires token authentication and "
            f"{'the token here is wrong' if token else 'this shell has no token'}: set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        )
    return (
        f"--ray-address {address}: something listens there, but it is not a Ray head's GCS port "
        f"({code.name}: {details}); give the --port of `ray start --head` (default 6379), not the Ray "
        "Client (10001) or dashboard port"
    )


def check_ray_federation(federation_config: str) -> None:
    """Refuse (ConfigError) the ``--federation-config`` keys that Ray refuses when it joins a cluster:
    a cluster's size is set by ``ray start --num-cpus/--num-gpus`` on each host."""
    from fedapp.task.config import ConfigError, parse_overrides

    given = [key for key in RAY_CLUSTER_REFUSES if key in parse_overrides([federation_config])]
    if given:
        raise ConfigError(
            f"--federation-config {' '.join(given)} cannot be used with --ray-address: Ray refuses "
            "num_cpus/num_gpus when it joins a cluster (the cluster's resources are what `ray start "
            "--num-cpus/--num-gpus` gave each host); leave them out, client-resources-* still apply"
        )


def ray_environment(env: dict[str, str], ray_address: str | None) -> str | None:
    """Point the simulation's Ray at ``ray_address`` (RAY_ADDRESS, which the SuperLink's simulation
    process inherits), or at a Ray of its own (``RAY_ADDRESS=local``) when it is None. Returns a
    note for the console when an inherited RAY_ADDRESS is set aside."""
    inherited = env.get("RAY_ADDRESS", "")
    if ray_address is not None:
        host, port = parse_ray_address(ray_address)
        env["RAY_ADDRESS"] = listen_address(host, port)
        return None
    env["RAY_ADDRESS"] = RAY_PRIVATE
    if inherited and inherited != RAY_PRIVATE:
        return (
            f"note: RAY_ADDRESS={inherited} in your environment is ignored; this simulation starts a Ray of "
            f"its own. To run on that cluster: fedvideo run --ray-address {inherited} ..."
        )
    return None


class TlsFiles(NamedTuple):
    """A SuperLink's TLS material: the CA that signed it, its certificate and its private key."""

    ca_cert: Path
    cert: Path
    key: Path


def config_text(config: Mapping[str, Any]) -> str:
    """A dict as ``--run-config`` / ``--node-config`` text (TOML values: strings quoted)."""

    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in config.items())


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


def listen_address(host: str, port: int) -> str:
    """``host:port`` as URLs and nginx write it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_healthy(
    proc: subprocess.Popen,
    port: int,
    ca_cert: Path | None,
    log: Path,
    timeout: float = 60.0,
    name: str = "flower-superlink",
    host: str = "127.0.0.1",
) -> None:
    """Poll ``host:port/health`` (over HTTPS, checked against ``ca_cert``, when TLS is on) until it
    answers 200; raise if ``proc`` exits first or the time runs out (naming the last error)."""
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    url = f"{'https' if ca_cert else 'http'}://{listen_address(host, port)}/health"
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except OSError as exc:  # not listening yet, or (through a proxy) a 502 while its upstream starts
            last = exc
        time.sleep(0.3)
    hint = (
        " (add this address to the server certificate: fedvideo certs --san)"
        if isinstance(getattr(last, "reason", None), ssl.SSLCertVerificationError)
        else ""
    )
    raise RuntimeError(f"{name} did not answer {url} within {timeout:.0f} s: {last}{hint}; see {log}")


def tls_problem(host: str, port: int, ca_cert: Path, timeout: float = 10.0) -> str | None:
    """Why a TLS connection to ``host:port`` checked against ``ca_cert`` fails, in words; None if it works.

    Flower's CLI reports any TLS failure as a network problem ("check your network"); this names
    the real cause before a run is submitted.
    """
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as exc:
        return (
            f"TLS: the certificate served at {host}:{port} is not trusted by {ca_cert} ({exc.verify_message}): "
            "use the CA that signed the SuperLink's certificate, and a certificate whose SANs name this address"
        )
    except ssl.SSLError as exc:
        return f"TLS handshake with {host}:{port} failed ({exc}): is the SuperLink running with TLS?"
    except OSError as exc:
        return f"cannot reach {host}:{port}: {exc}"


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
    a deployment). ConfigError names the key, the value and what is allowed."""
    import tomllib

    from fedapp.task.config import check_federation_size, parse_config

    declared = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = parse_config({**declared, **config_overrides(run_config)})
    if federation_config is not None:
        check_federation_size(cfg, federation_size(federation_config))
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


def launch_log_dir(run_dir: Path) -> Path:
    """``run_dir/logs/launch-<UTC time>``: each launch (a resume too) keeps its own logs."""
    return run_dir / "logs" / f"launch-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}"


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


# Lines of ``flwr run --stream`` that tell a user of this launcher nothing. They are not echoed to
# the console; the log file keeps every line. Matched on the line without its ANSI colours.
CONSOLE_NOISE: tuple[re.Pattern[str], ...] = (
    # Printed by every simulation since flwr 1.32; the launcher always sets num-supernodes itself.
    re.compile(r"^WARNING\s*:\s*Since flwr \S+, default simulated SuperNodes changed"),
    # Flower's hint to resize with `flwr federation simulation-config` (two lines): with this
    # launcher the size is --federation-config, and the line before says what it is.
    re.compile(r"^INFO\s*:\s*To change federation size, use the following command:"),
    re.compile(r"^INFO\s*:\s*flwr federation simulation-config "),
    # An empty Flower log line (the stream ends with one).
    re.compile(r"^(INFO|WARNING)\s*:\s*$"),
)
# A Python warning raised inside Ray or Flower (Ray's FutureWarning about accelerator variables on
# every run): about the libraries' own future defaults, nothing a user of this app can act on. A
# Ray actor's output carries the actor's name first.
LIBRARY_WARNING = re.compile(
    r"^(\(\w+ pid=\d+\)\s*)?\S*/(ray|flwr)/\S+\.py:\d+: (Future|Deprecation|PendingDeprecation)Warning: "
)
# Python prints a warning's source line after it, indented by two spaces ("  warnings.warn(").
WARNING_CONTINUATION = re.compile(r"^(\(\w+ pid=\d+\)\s*)?  \S")


class ConsoleFilter:
    """Decides, line by line, which lines of the stream the console shows (see CONSOLE_NOISE)."""

    def __init__(self) -> None:
        self._in_warning = False  # the last line shown or not was a filtered library warning

    def shows(self, line: str) -> bool:
        text = ANSI_CODE.sub("", line).rstrip("\r\n")
        if self._in_warning and WARNING_CONTINUATION.match(text):
            return False
        self._in_warning = bool(LIBRARY_WARNING.match(text))
        return not self._in_warning and not any(pattern.match(text) for pattern in CONSOLE_NOISE)


def stream_run(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float, watchdog: Any = None) -> int | None:
    """Run ``flwr run --stream``, echoing its output (less ``CONSOLE_NOISE``) and saving all of it
    to ``log_path``; returns the run id it printed."""
    run_id = None
    deadline = time.monotonic() + timeout
    console = ConsoleFilter()
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
                    sys.stdout.write(line)
                log.write(line)
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


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into SystemExit so `finally` blocks stop the SuperLink we started.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(
        prog="fedvideo run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="overrides of [tool.flwr.app.config], e.g. 'num-server-rounds=5 model=\"r3d_18\"'",
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
    args = parser.parse_args(argv)
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
