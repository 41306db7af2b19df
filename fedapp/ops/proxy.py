"""The reverse proxy in front of a secure SuperLink: only the Fleet API faces the network.

In Flower 1.42's open-source SuperLink one HTTP port serves the Fleet API (``/v1/fleet/``, what
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

from fedapp.ops.network import listen_address, wait_healthy
from fedapp.ops.processes import stop_process_group
from fedapp.ops.superlink import PROJECT_DIR, TlsFiles

NGINX_MISSING = (
    "nginx is not installed: the secure deployment needs it to keep the Control API off the "
    "public port (Debian/Ubuntu: apt-get install nginx)"
)
PUBLIC_PATHS = ("/v1/fleet/", "/health")
# A Fleet RPC path as the SuperNodes send it (/v1/fleet/pull-messages ...): checked on the raw
# request URI as well, so that no percent-encoded or dotted path that nginx normalizes into a Fleet
# path reaches the SuperLink, which routes the raw path without that normalization.
FLEET_URI = r"^/v1/fleet/[A-Za-z0-9_-]+(\?.*)?$"


def nginx_binary() -> str | None:
    """The nginx executable (``/usr/sbin`` is not on every user's PATH), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def connect_host(public_host: str) -> str:
    """The address a process on this host dials to reach a server listening on ``public_host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(public_host, public_host)


# What every public location does: forward to the SuperLink. Field: {ca_cert}.
FORWARD_TEMPLATE = """
            proxy_pass https://superlink;
            # Keep-alive to the SuperLink; every client header (the node-auth flwr-public-key,
            # flwr-signature, flwr-timestamp) passes through untouched.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # The SuperLink's certificate is checked against the deployment's CA; nginx matches a
            # DNS name (not an IP SAN), and fedapp.ops.certs always includes DNS:localhost.
            proxy_ssl_trusted_certificate {ca_cert};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            # Model arrays travel in chunks of several MB; pulls may wait long for a message.
            # Streaming both ways also keeps bodies out of the temp folders, which the workers
            # (user nobody when nginx starts as root) cannot enter inside a private deployment folder.
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;"""
# The raw request URI checked as well (see FLEET_URI). Field: {fleet_uri}.
STRICT_TEMPLATE = """
            if ($request_uri !~ "{fleet_uri}") {{
                return 403;
            }}"""
# The public locations (PUBLIC_PATHS). Fields: {strict}, {forward}.
LOCATIONS_TEMPLATE = (
    "\n        location ~ ^/v1/fleet/[A-Za-z0-9_-]+$ {{{strict}{forward}\n        }}"
    "\n        location = /health {{{forward}\n        }}"
)
# The whole configuration; everything not a public location answers 403. Fields: {pid}, {error_log},
# {access_log}, {tmp}, {upstream_port}, {listen}, {cert}, {key}, {locations}.
NGINX_TEMPLATE = """# Written by fedapp.ops.deploy: only the Fleet API of the SuperLink faces the network.
daemon off;
worker_processes 1;
pid {pid};
error_log {error_log} warn;
events {{
    worker_connections 512;
}}
http {{
    access_log {access_log};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 256m;
    client_body_buffer_size 16m;
    upstream superlink {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
        # Shorter than uvicorn's 5 s keep-alive: nginx must not reuse a connection the SuperLink is
        # closing, since Fleet calls are POSTs, which nginx does not retry on another connection.
        keepalive_timeout 4s;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;{locations}
        location / {{
            return 403;
        }}
    }}
}}
"""


def nginx_config(
    prefix: Path, log_dir: Path, public_host: str, public_port: int, upstream_port: int, tls: TlsFiles
) -> str:
    """An nginx configuration that exposes only ``PUBLIC_PATHS`` of the SuperLink on loopback."""
    forward = FORWARD_TEMPLATE.format(ca_cert=tls.ca_cert)
    locations = LOCATIONS_TEMPLATE.format(strict=STRICT_TEMPLATE.format(fleet_uri=FLEET_URI), forward=forward)
    return NGINX_TEMPLATE.format(
        pid=prefix / "nginx.pid",
        error_log=log_dir / "proxy-error.log",
        access_log=log_dir / "proxy-access.log",
        tmp=prefix / "tmp",  # ends in "tmp", so the template's "{tmp}/body" is prefix/tmp/body
        upstream_port=upstream_port,
        listen=listen_address(public_host, public_port),
        cert=tls.cert,
        key=tls.key,
        locations=locations,
    )


def start_proxy(
    prefix: Path,
    log_dir: Path,
    public_host: str,
    public_port: int,
    upstream_port: int,
    tls: TlsFiles,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> subprocess.Popen:
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
        # Through nginx on the public address, with the certificate checked for that address (as
        # the SuperNodes will check it): nginx listens, TLS fits and the SuperLink answers.
        wait_healthy(
            proc, public_port, tls.ca_cert, log_dir / "proxy-error.log", name="nginx", host=connect_host(public_host)
        )
    except BaseException:
        stop_process_group(proc)
        raise
    return proc
