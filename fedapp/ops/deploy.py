"""Run the app on real Flower processes: one SuperLink and N SuperNodes, each its own OS process.

Here every process runs on this machine on 127.0.0.1; across machines it is the same pattern:
the SuperLink on one host (add its name to the server certificate with ``fedvideo certs --san``),
one ``flower-supernode`` per site pointing at it with its own ``--node-config``, and the CLI
(``flwr run``) wherever the project and ``ca.crt`` are.

    fedvideo deploy up [--dir DIR] [--nodes N | --node-data-dir PATH ...] [--port P]
                       [--secure [--certs DIR] [--public-host H]]
    fedvideo deploy run [--dir DIR] [--run-config "k=v ..."] [--timeout S]
    fedvideo deploy stop-node K [--dir DIR] [--kill]
    fedvideo deploy start-node K [--dir DIR]
    fedvideo deploy status [--dir DIR]
    fedvideo deploy down [--dir DIR]

``up`` starts the SuperLink (runtime dependency installation disabled), waits until it is
healthy, with ``--secure`` starts the reverse proxy (``fedapp.ops.proxy``: nginx on the public
address exposing only the Fleet API; the SuperLink itself and its Control API stay on loopback),
registers the SuperNodes' public keys (``--secure``: TLS and SuperNode authentication),
starts the SuperNodes (node K gets ``partition-id=K num-partitions=N``, or the K-th
``--node-data-dir`` as ``data-dir``) and waits until all are online. Every process runs in its own
process group, logs to DIR/logs/ and has its PID in DIR/state.json. ``run`` submits the app and
judges it like ``fedvideo run`` (fedapp/ops/verdict.py: exit 0 only when the app's
``summary.json`` of this run says completed and Flower's run status does not say it failed).
``down`` stops every process by its recorded PID (SIGTERM to the group, SIGKILL after a grace
period); it is safe to repeat.

Without ``--secure`` the SuperLink's one port serves every API with no authentication: for local
trials on loopback only.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from fedapp.config.keys import ConfigError
from fedapp.files import atomic_write_json, private_umask
from fedapp.ops import certs
from fedapp.ops.flwr_run import config_text, run_and_judge
from fedapp.ops.network import free_port, listen_address, tls_problem
from fedapp.ops.processes import exit_on_sigterm, group_alive, pid_reused, start_time, stop_group
from fedapp.ops.proxy import NGINX_MISSING, connect_host, nginx_binary, start_proxy
from fedapp.ops.start_checks import check_run_config, run_location
from fedapp.ops.superlink import PROJECT_DIR, TlsFiles, flwr_env, start_superlink, write_connection
from fedapp.ops.verdict import Outcome

CONNECTION = "fedvideo-deploy"
STATE_FILE = "state.json"
DEFAULT_DIR = Path("results") / "deployment"


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, described by ``run_dir/state.json``.

    ``with Deployment(...) as d:`` brings it up and always brings it down, also when the body fails.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        secure: bool = False,
        num_nodes: int = 2,
        data_dirs: Sequence[str] = (),
        certs_dir: Path | None = None,
        port: int | None = None,
        grace: float = 10.0,
        public_host: str = "127.0.0.1",
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.secure = secure
        self.certs_dir = Path(certs_dir).resolve() if certs_dir else self.run_dir / "certs"
        self.grace = grace
        self.log_dir = self.run_dir / "logs"
        self.flwr_home = self.run_dir / "flwr_home"
        self.env = flwr_env(self.flwr_home)
        self.port = port
        # Our own children, so that their exit status is collected (a refused SuperNode exits non-zero).
        self.procs: dict[str, subprocess.Popen] = {}
        configs = [
            config_text(self._with_state_dir(k, c))
            for k, c in enumerate(
                [{"data-dir": str(Path(d).resolve())} for d in data_dirs]
                if data_dirs
                else [{"partition-id": k, "num-partitions": num_nodes} for k in range(num_nodes)]
            )
        ]
        self.state: dict[str, Any] = {
            # port: where SuperNodes connect (the proxy's public port when secure); superlink-port:
            # the SuperLink itself, on loopback, where the operator's CLI connects.
            "secure": secure,
            "port": port,
            "superlink-port": None,
            "public-host": public_host,
            "connection": CONNECTION,
            "flwr_home": str(self.flwr_home),
            "certs": str(self.certs_dir) if secure else None,
            "superlink": {},
            "proxy": {},
            "nodes": [{"node_config": c, "key": self._key_path(k)} for k, c in enumerate(configs)],
        }

    # --- state

    @classmethod
    def load(cls, run_dir: Path, grace: float = 10.0) -> Deployment:
        """The deployment an earlier ``up`` left in ``run_dir``."""
        path = Path(run_dir) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no deployment in {Path(run_dir).resolve()} (no {STATE_FILE}): run `up` first")
        state = json.loads(path.read_text())
        deployment = cls(
            run_dir,
            secure=state["secure"],
            num_nodes=0,
            grace=grace,
            certs_dir=Path(state["certs"]) if state["certs"] else None,
            port=state["port"],
            public_host=state.get("public-host", "127.0.0.1"),
        )
        deployment.state = state
        return deployment

    def save(self) -> None:
        atomic_write_json(self.run_dir / STATE_FILE, self.state, mode=0o600)

    @property
    def superlink_port(self) -> int:
        """The SuperLink's own loopback port (the operator's CLI); ``port`` is where nodes connect."""
        return self.state.get("superlink-port") or self.state["port"]

    def _key_path(self, k: int) -> str | None:
        return str(self.certs_dir / certs.node_key_name(k)) if self.secure else None

    def _entries(self) -> list[tuple[str, dict[str, Any]]]:
        nodes = [(f"node-{k}", node) for k, node in enumerate(self.state["nodes"])]
        return [("superlink", self.state["superlink"]), ("proxy", self.state.setdefault("proxy", {})), *nodes]

    def _record(self, entry: dict[str, Any], name: str, proc: subprocess.Popen) -> None:
        self.procs[name] = proc
        # Its start time too, so that `down` never signals an unrelated process given the same PID later.
        # ("start-time": seconds since boot; the "started" of older state files was clock ticks.)
        entry.update({"pid": proc.pid, "start-time": start_time(proc.pid)})
        self.save()

    def _alive(self, name: str, entry: Mapping[str, Any]) -> bool:
        """Whether the process recorded in ``entry`` (or anything left in its group) still runs."""
        pid = entry.get("pid")
        if not pid:
            return False
        if name in self.procs:
            self.procs[name].poll()  # reap our own exited child, or it counts as alive
        if pid_reused(pid, entry.get("start-time")):
            return False  # that PID now belongs to another process
        return group_alive(pid)

    def alive(self) -> list[str]:
        """Names of the recorded processes still running."""
        return [name for name, entry in self._entries() if self._alive(name, entry)]

    def exit_code(self, k: int) -> int | None:
        """Exit status of SuperNode ``k`` if this object started it and it has exited."""
        proc = self.procs.get(f"node-{k}")
        return proc.poll() if proc else None

    def node_log(self, k: int) -> Path:
        return self.log_dir / f"supernode-{k}.log"

    # --- lifecycle

    def up(self, timeout: float = 120.0) -> None:
        """SuperLink, key registration, SuperNodes; returns when every SuperNode is online."""
        if (self.run_dir / STATE_FILE).exists() and Deployment.load(self.run_dir).alive():
            raise RuntimeError(f"a deployment in {self.run_dir} is still running: `down` it first")
        # The deployment's folder and all its processes write are the operator's only: the SuperLink's
        # database holds every message (model weights included), state.json the PIDs and key paths.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)
        try:
            with private_umask():
                self._up(timeout)
        except BaseException:
            self.down()
            raise

    def _up(self, timeout: float) -> None:
        if self.secure and nginx_binary() is None:
            # Refused before anything starts: no silent fallback to a public Control API.
            raise RuntimeError(NGINX_MISSING)
        tls = self._prepare_certs() if self.secure else None
        port = self.port or free_port()
        # Secure: nodes reach the proxy on `port`; the SuperLink listens on another loopback port.
        superlink_port = free_port() if self.secure else port
        self.state.update(port=port, **{"superlink-port": superlink_port})
        write_connection(
            self.flwr_home, superlink_port, name=CONNECTION, root_certificates=tls.ca_cert if tls else None
        )
        self.save()
        proc = start_superlink(
            self.flwr_home,
            self.log_dir,
            superlink_port,
            self.env,
            simulation=False,
            tls=tls,
            supernode_auth=self.secure,
            database=self.run_dir / "superlink.db",
        )
        self._record(self.state["superlink"], "superlink", proc)
        if tls is not None:
            # Recorded as soon as it exists, so that a failed start is still stopped by down().
            start_proxy(
                self.run_dir / "proxy",
                self.log_dir,
                self.state["public-host"],
                port,
                superlink_port,
                tls,
                on_start=lambda proc: self._record(self.state["proxy"], "proxy", proc),
            )
        for k in range(len(self.state["nodes"])):
            if self.secure:
                self.register(k)
            self.start_node(k, wait=False)
        for k in range(len(self.state["nodes"])):
            self.wait_joined(k, timeout)

    def _prepare_certs(self) -> TlsFiles:
        """The CA and server certificate (made on first use) and a key pair for every SuperNode."""
        if not (self.certs_dir / certs.CA_CERT).exists():
            certs.make_certs(self.certs_dir)
        for node in self.state["nodes"]:
            if not Path(node["key"]).exists():
                certs.write_node_key(Path(node["key"]))
        return TlsFiles(
            self.certs_dir / certs.CA_CERT, self.certs_dir / certs.SERVER_CERT, self.certs_dir / certs.SERVER_KEY
        )

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command against this deployment's connection."""
        return subprocess.run(
            ["flwr", *args], cwd=PROJECT_DIR, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def register(self, k: int) -> None:
        """Register SuperNode ``k``'s public key with the SuperLink (SuperNode authentication)."""
        public_key = self.state["nodes"][k]["key"] + ".pub"
        out = self.flwr("supernode", "register", public_key, CONNECTION, "--name", f"node-{k}")
        # The SuperLink's database outlives `down`: a key registered by an earlier `up` stays registered.
        if out.returncode != 0 and "Public key already in use" not in out.stdout + out.stderr:
            raise RuntimeError(
                f"flwr supernode register {public_key} failed ({out.returncode}): "
                f"{(out.stdout + out.stderr).strip()[-1000:]}"
            )

    def wait_joined(self, k: int, timeout: float = 120.0) -> int:
        """Wait until SuperNode ``k`` has joined the SuperLink; returns (and records) its node id.

        A SuperNode logs its id once the SuperLink accepted it; a refused one exits (Flower logs
        exit code 305, the process exits with 1).
        """
        node, proc = self._node(k), self.procs[f"node-{k}"]
        deadline = time.monotonic() + timeout
        while True:
            with open(self.node_log(k), "rb") as log:
                log.seek(node["log_offset"])
                if m := re.search(rb"SuperNode ID: (\d+)", log.read()):
                    node["node_id"] = int(m.group(1))
                    self.save()
                    return node["node_id"]
            if proc.poll() is not None:
                raise RuntimeError(f"SuperNode {k} exited with code {proc.returncode}; see {self.node_log(k)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"SuperNode {k} did not join within {timeout:.0f} s; see {self.node_log(k)}")
            time.sleep(0.3)

    def add_node(self, node_config: Mapping[str, Any], *, register: bool = True, wait: bool = True) -> int:
        """Start one more SuperNode K (secure: with key node-K, made if missing; ``register=False``
        leaves it unknown to the SuperLink, which then refuses the node). Returns K."""
        k = len(self.state["nodes"])
        self.state["nodes"].append(
            {"node_config": config_text(self._with_state_dir(k, node_config)), "key": self._key_path(k)}
        )
        if self.secure:
            if not Path(self.state["nodes"][k]["key"]).exists():
                certs.write_node_key(Path(self.state["nodes"][k]["key"]))
            if register:
                self.register(k)
        self.start_node(k, wait=wait)
        return k

    def node_home(self, k: int) -> Path:
        """Node K's own folder (its Flower home and state), as it would be on its own machine."""
        return self.run_dir / "nodes" / f"node-{k}"

    def _with_state_dir(self, k: int, node_config: Mapping[str, Any]) -> dict[str, Any]:
        """Node K's config with a ``state-dir`` of its own (personal models) unless it names one."""
        return {"state-dir": str(self.node_home(k) / "state"), **node_config}

    def _node(self, k: int) -> dict[str, Any]:
        if not 0 <= k < len(self.state["nodes"]):
            raise ValueError(f"no SuperNode {k}: this deployment has nodes 0..{len(self.state['nodes']) - 1}")
        return self.state["nodes"][k]

    def start_node(self, k: int, *, wait: bool = True, timeout: float = 120.0) -> None:
        """(Re)start SuperNode ``k`` with its recorded settings; ``wait``: until it has joined (it
        gets a new node id)."""
        node = self._node(k)
        if self._alive(f"node-{k}", node):
            self.stop_node(k)
        # Secure: the proxy's public address, the one a SuperNode on another machine would use.
        host = connect_host(self.state.get("public-host", "127.0.0.1")) if self.secure else "127.0.0.1"
        cmd = [
            "flower-supernode",
            "--superlink",
            listen_address(host, self.state["port"]),
            "--port",
            str(free_port()),
            "--node-config",
            node["node_config"],
        ]
        if self.secure:
            cmd += [
                "--root-certificates",
                str(self.certs_dir / certs.CA_CERT),
                "--auth-supernode-private-key",
                node["key"],
            ]
        else:
            cmd += ["--insecure"]
        # Each node has its own Flower home (where it unpacks the app), as on its own machine.
        env = flwr_env(self.node_home(k))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # private_umask: a node restarted by `start-node` writes as privately as one started by `up`.
        with private_umask(), open(self.node_log(k), "ab") as log:  # appended: a restart keeps the history
            node.update(log_offset=log.tell(), node_id=None)
            proc = subprocess.Popen(
                cmd, cwd=PROJECT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._record(node, f"node-{k}", proc)
        if wait:
            self.wait_joined(k, timeout)

    def stop_node(self, k: int, *, kill: bool = False) -> None:
        """Stop SuperNode ``k``: SIGTERM (it leaves the federation), or ``kill``: SIGKILL, like a crash."""
        self._stop(f"node-{k}", self._node(k), 0.0 if kill else self.grace)

    def _stop(self, name: str, entry: Mapping[str, Any], grace: float) -> None:
        if self._alive(name, entry):
            stop_group(entry["pid"], grace, self.procs.get(name))

    def down(self) -> None:
        """Stop every recorded process (SuperNodes first); a no-op for what is already stopped."""
        for name, entry in reversed(self._entries()):
            self._stop(name, entry, self.grace)

    def run(self, run_config: Mapping[str, Any] | Sequence[str] | str, timeout: float = 3600.0) -> Outcome:
        """``flwr run`` the app on this deployment and judge it (results in ``results-dir/run-name``).

        ``run_config``: a dict, or ``--run-config`` texts like ``'num-server-rounds=5 model="r3d_18"'``.
        """
        if isinstance(run_config, Mapping):
            texts = [config_text(run_config)]
        else:
            texts = [run_config] if isinstance(run_config, str) else list(run_config)
        # No size check: SuperNodes on other machines join a deployment without being in its state.
        cfg = check_run_config(texts, None)
        run_dir = run_location(texts, cfg)
        if not self._alive("superlink", self.state["superlink"]):
            return Outcome(False, f"the SuperLink of {self.run_dir} is not running (run `up` first)", run_dir, None)
        if self.secure:  # Flower's CLI calls every TLS failure "check your network": say what it is
            problem = tls_problem("127.0.0.1", self.superlink_port, self.certs_dir / certs.CA_CERT)
            if problem:
                return Outcome(False, problem, run_dir, None)
        return run_and_judge(texts, run_dir, self.env, timeout, connection=CONNECTION)

    def __enter__(self) -> Deployment:
        self.up()  # up() brings down what it started if it fails
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()


def build_parser() -> argparse.ArgumentParser:
    """The ``fedvideo deploy`` command line: one subcommand per step of a deployment's life."""
    parser = argparse.ArgumentParser(
        prog="fedvideo deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"the deployment's folder: state.json, logs, Flower homes, certs (default: {DEFAULT_DIR})",
    )
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL when stopping")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the SuperLink and the SuperNodes")
    up.add_argument("--nodes", type=int, default=2, help="SuperNodes, node K holding partition K of N (default 2)")
    up.add_argument(
        "--node-data-dir",
        action="append",
        default=[],
        help="one SuperNode with its own videos (node config data-dir), repeatable; replaces --nodes",
    )
    up.add_argument("--secure", action="store_true", help="TLS and SuperNode authentication (registered keys only)")
    up.add_argument(
        "--certs",
        type=Path,
        help="certificates and keys from `fedvideo certs` (default: made on first use in DIR/certs)",
    )
    up.add_argument(
        "--port",
        type=int,
        help="the port SuperNodes connect to (default: a free one); with --secure "
        "the proxy's, and the SuperLink gets a free loopback port of its own",
    )
    up.add_argument(
        "--public-host",
        default="127.0.0.1",
        help="--secure: the address the proxy listens on, e.g. 0.0.0.0 for other machines (default 127.0.0.1)",
    )
    run = sub.add_parser("run", help="run the app on the deployment and judge the outcome")
    run.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="overrides of [tool.flwr.app.config], e.g. 'num-server-rounds=5 model=\"r3d_18\"'",
    )
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    for name, text in (("start-node", "(re)start SuperNode K"), ("stop-node", "stop SuperNode K")):
        node = sub.add_parser(name, help=text)
        node.add_argument("k", type=int, metavar="K", help="the SuperNode's number (0 .. nodes-1)")
        if name == "stop-node":
            node.add_argument("--kill", action="store_true", help="SIGKILL at once, like a crashed machine")
    sub.add_parser("status", help="which recorded processes are running")
    sub.add_parser("down", help="stop every process of the deployment")
    return parser


def check_up_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``parser.error``: exit status 2) the ``up`` options that do not go together."""
    if args.command == "up" and args.nodes < 1 and not args.node_data_dir:
        parser.error("--nodes must be >= 1")
    if args.command == "up" and args.certs and not args.secure:
        parser.error("--certs needs --secure")
    if args.command == "up" and args.public_host != "127.0.0.1" and not args.secure:
        parser.error("--public-host needs --secure (insecure mode exposes every API: loopback only)")


def command_up(args: argparse.Namespace) -> int:
    """``up``: start the deployment and say where it listens."""
    deployment = Deployment(
        args.dir,
        secure=args.secure,
        num_nodes=args.nodes,
        data_dirs=args.node_data_dir,
        certs_dir=args.certs,
        port=args.port,
        grace=args.grace,
        public_host=args.public_host,
    )
    deployment.up()
    where = (
        f"SuperLink on 127.0.0.1:{deployment.superlink_port} (TLS, SuperNode auth; Control API on "
        f"loopback only), Fleet API through nginx on {args.public_host}:{deployment.state['port']}"
        if args.secure
        else f"SuperLink on 127.0.0.1:{deployment.state['port']} (insecure, every API open)"
    )
    print(f"up: {where}, {len(deployment.state['nodes'])} SuperNodes online; state: {deployment.run_dir / STATE_FILE}")
    return 0


def command_run(deployment: Deployment, args: argparse.Namespace) -> int:
    """``run``: run the app on the deployment; exit status 0 only when the verdict is OK."""
    try:
        outcome = deployment.run(args.run_config, args.timeout)
    except ConfigError as exc:  # refused before anything ran or was written
        print(f"FAILED: config: {exc}", file=sys.stderr)
        return 2
    if not outcome.ok:
        print(f"FAILED: {outcome.message}", file=sys.stderr)
        print(f"logs: {outcome.run_dir / 'logs'} and {deployment.log_dir}", file=sys.stderr)
        return 1
    if outcome.warning:
        print(outcome.warning, file=sys.stderr)
    print(
        f"OK: {outcome.summary.get('rounds-completed') if outcome.summary else '?'} rounds; results: {outcome.run_dir}"
    )
    return 0


def command_processes(deployment: Deployment, args: argparse.Namespace) -> int:
    """``start-node``, ``stop-node``, ``down`` and ``status``: act, then say what is running."""
    if args.command == "start-node":
        deployment.start_node(args.k)
    elif args.command == "stop-node":
        deployment.stop_node(args.k, kill=args.kill)
    elif args.command == "down":
        deployment.down()
    running = deployment.alive()
    print(f"running: {', '.join(running) if running else 'nothing'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fedvideo deploy``: the subcommand's exit status (1 when a step failed, 2 on bad options)."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_up_args(parser, args)
    try:
        if args.command == "up":
            return command_up(args)
        if args.command == "down" and not (args.dir / STATE_FILE).exists():
            print(f"down: nothing to stop in {args.dir.resolve()}")
            return 0
        deployment = Deployment.load(args.dir, grace=args.grace)
        if args.command == "run":
            return command_run(deployment, args)
        return command_processes(deployment, args)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
