"""Ports and addresses of the servers the launchers start, and the checks that they answer.

``wait_healthy`` polls a server's ``/health`` (the SuperLink, or nginx in front of it);
``tls_problem`` names why a TLS connection fails, which Flower's CLI reports as a network problem.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
