"""Certificates and keys for a TLS deployment with SuperNode authentication.

Writes, into OUT_DIR:

- ``ca.crt`` / ``ca.key``: a private certificate authority (the SuperLink's ``--ssl-ca-certfile``,
  every SuperNode's and the CLI's ``root-certificates``);
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for the
  SANs ``IP:127.0.0.1`` and ``DNS:localhost`` plus every ``--san`` (add the SuperLink's real host
  name or address when the nodes are on other machines);
- ``node-K`` / ``node-K.pub``: one ECDSA P-384 key pair per SuperNode in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` makes): the private key stays on the node
  (``--auth-supernode-private-key``), the public key is registered with
  ``flwr supernode register node-K.pub CONNECTION``.

Private keys are created with mode 0600 and never printed. Nothing is overwritten without --force.

    fedvideo certs OUT_DIR [--nodes N] [--san HOST_OR_IP ...] [--days 365] [--force]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedapp.files import atomic_write_bytes

DEFAULT_SANS = ("127.0.0.1", "localhost")
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


def node_key_name(k: int) -> str:
    return f"node-{k}"


def write_file(path: Path, data: bytes, *, private: bool, force: bool = False) -> None:
    """Write ``data`` atomically; a private file is created 0600 from the start, never chmod-ed later.

    The temp file beside ``path`` has its final mode before any byte is written and is renamed
    into place, so --force never leaves a key readable by others even if the old file was.
    """
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to overwrite)")
    # A certificate or public key is readable by all (whatever the umask), a private key by its owner only.
    atomic_write_bytes(path, data, mode=0o600 if private else 0o644)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedvideo deployment CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, sans: Sequence[str], days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's certificate: TLS server use only, valid for ``sans`` (clients check them)."""
    if not sans:
        raise ValueError("the server certificate needs at least one SAN")
    key = new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def write_node_key(path: Path, *, force: bool = False) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format: ``path`` (private, 0600) and ``path.pub``."""
    public_path = path.with_name(path.name + ".pub")
    for p in (path, public_path):
        if p.exists() and not force:
            raise FileExistsError(f"{p} exists (use --force to overwrite)")
    key = new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_file(path, private, private=True, force=force)
    write_file(public_path, public + f" {path.name}\n".encode(), private=False, force=force)
    return public_path


def make_certs(
    out_dir: Path, nodes: int = 0, sans: Sequence[str] = DEFAULT_SANS, days: int = 365, force: bool = False
) -> list[Path]:
    """CA, server certificate and ``nodes`` SuperNode key pairs in ``out_dir``; the files written.

    Every target is checked before anything is written, so a refusal leaves the folder as it was.
    """
    out_dir = Path(out_dir)
    targets = [out_dir / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
    for k in range(nodes):
        targets += [out_dir / node_key_name(k), out_dir / f"{node_key_name(k)}.pub"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"would overwrite {', '.join(existing)} (use --force)")
    ca_cert, ca_key = make_ca(days)
    server_cert, server_key = make_server_cert(ca_cert, ca_key, list(sans), days)
    write_file(out_dir / CA_KEY, private_pem(ca_key), private=True, force=force)
    write_file(out_dir / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    write_file(out_dir / SERVER_KEY, private_pem(server_key), private=True, force=force)
    write_file(out_dir / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    for k in range(nodes):
        write_node_key(out_dir / node_key_name(k), force=force)
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedvideo certs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="folder for the certificates and keys")
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make (node-0 .. node-N-1)")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        help=f"another name of the SuperLink (IP address or DNS name) besides {' and '.join(DEFAULT_SANS)}, repeatable",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates in days")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if args.nodes < 0 or args.days < 1:
        parser.error("--nodes must be >= 0 and --days >= 1")
    try:
        sans = list(dict.fromkeys([*DEFAULT_SANS, *args.san]))
        written = make_certs(args.out_dir, args.nodes, sans, args.days, args.force)
    except FileExistsError as e:
        print(f"certs: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)  # names only: key material is never printed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
