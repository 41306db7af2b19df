"""The reverse proxy in front of a secure SuperLink: only the Fleet API faces the network.

In Flower 1.41's open-source SuperLink one HTTP port serves the Fleet API (``/v1/fleet/``, what
SuperNodes call; with SuperNode auth every request is signed by a registered key), the Control API
(``/v1/control/``: register nodes, list, start and stop runs; no authentication outside Flower's
enterprise plugin), the Runtime API (``/v1/runtime/``, the SuperLink's own ServerApp processes)
and ``/health``. Anyone who reaches that port with the public ``ca.crt`` could register a key of
their own and join, list and submit runs. So the SuperLink listens on loopback only, and nginx
(from the OS package) listens on the public address with the same TLS certificate, forwards
``/v1/fleet/`` and ``/health`` and answers 403 to everything else. The operator runs the Flower
CLI on the SuperLink's host (or through ``ssh -L``) against the loopback port.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from fedapp.launch import PROJECT_DIR, TlsFiles, stop_process_group, wait_healthy

NGINX_MISSING = ("nginx is not installed: the secure deployment needs it to keep the Control API off the "
                 "public port (Debian/Ubuntu: apt-get install nginx)")
PUBLIC_PATHS = ("/v1/fleet/", "/health")


def nginx_binary() -> str | None:
    """The nginx executable (``/usr/sbin`` is not on every user's PATH), or None."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def nginx_config(prefix: Path, log_dir: Path, public_host: str, public_port: int, upstream_port: int,
                 tls: TlsFiles) -> str:
    """An nginx configuration that exposes only ``PUBLIC_PATHS`` of the SuperLink on loopback."""
    forward = f"""
            proxy_pass https://superlink;
            # Keep-alive to the SuperLink; the node-auth signature headers pass through untouched.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate {tls.ca_cert};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            # Model arrays travel in chunks of several MB; pulls may wait long for a message.
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;"""
    locations = "".join(f"\n        location {'=' if p == '/health' else '^~'} {p} {{{forward}\n        }}"
                        for p in PUBLIC_PATHS)
    return f"""# Written by fedapp.deploy: only the Fleet API of the SuperLink faces the network.
daemon off;
worker_processes 1;
pid {prefix / 'nginx.pid'};
error_log {log_dir / 'proxy-error.log'} warn;
events {{
    worker_connections 512;
}}
http {{
    access_log {log_dir / 'proxy-access.log'};
    client_body_temp_path {prefix / 'tmp' / 'body'};
    proxy_temp_path {prefix / 'tmp' / 'proxy'};
    fastcgi_temp_path {prefix / 'tmp' / 'fastcgi'};
    uwsgi_temp_path {prefix / 'tmp' / 'uwsgi'};
    scgi_temp_path {prefix / 'tmp' / 'scgi'};
    client_max_body_size 256m;
    client_body_buffer_size 16m;
    upstream superlink {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    server {{
        listen {public_host}:{public_port} ssl;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;{locations}
        location / {{
            return 403;
        }}
    }}
}}
"""


def start_proxy(prefix: Path, log_dir: Path, public_host: str, public_port: int, upstream_port: int,
                tls: TlsFiles, on_start: Callable[[subprocess.Popen], None] | None = None) -> subprocess.Popen:
    """nginx in the foreground, in its own process group; returns once ``/health`` answers through it.

    Refuses (RuntimeError) where nginx is missing: no silent fallback to an exposed Control API.
    """
    nginx = nginx_binary()
    if nginx is None:
        raise RuntimeError(NGINX_MISSING)
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(prefix, log_dir, public_host, public_port, upstream_port, tls))
    cmd = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(log_dir / "proxy-error.log")]
    with open(log_dir / "proxy.stderr", "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    if on_start is not None:
        on_start(proc)
    try:
        wait_healthy(proc, public_port, tls.ca_cert, log_dir / "proxy-error.log", name="nginx")
    except BaseException:
        stop_process_group(proc)
        raise
    return proc
