"""The Ray a simulation runs on: a Ray of its own, or the cluster of ``fedvideo run --ray-address``.

The cluster is probed before anything starts (``ray_cluster_problem``), so that a wrong address is
refused in seconds instead of ``ray.init`` retrying for minutes.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

from fedapp.ops.network import listen_address

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
