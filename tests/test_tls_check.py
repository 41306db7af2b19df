"""The TLS check that replaces Flower CLI's "check your network" with the real cause."""

from __future__ import annotations

import socket
import ssl
import threading

from fedapp.ops import certs
from fedapp.ops.network import free_port, tls_problem


def serve_tls(cert_dir, port: int, stop: threading.Event) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_dir / certs.SERVER_CERT, cert_dir / certs.SERVER_KEY)
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass


def test_tls_problem_names_an_untrusted_certificate_and_an_unreachable_port(tmp_path):
    certs.make_certs(tmp_path / "ours")
    certs.make_certs(tmp_path / "other")
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=serve_tls, args=(tmp_path / "ours", port, stop), daemon=True)
    thread.start()
    try:
        for _ in range(50):
            if tls_problem("127.0.0.1", port, tmp_path / "ours" / certs.CA_CERT) is None:
                break
        assert tls_problem("127.0.0.1", port, tmp_path / "ours" / certs.CA_CERT) is None
        problem = tls_problem("127.0.0.1", port, tmp_path / "other" / certs.CA_CERT)
        assert problem is not None and "is not trusted by" in problem and "other/ca.crt" in problem
    finally:
        stop.set()
        thread.join(timeout=5)
    assert "cannot reach 127.0.0.1" in tls_problem("127.0.0.1", free_port(), tmp_path / "ours" / certs.CA_CERT)
