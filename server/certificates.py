"""A private CA for labs: the CA, the SuperLink's TLS certificate and SuperNode authentication keys.

    python -m server.certificates tls DIR --host 192.168.1.10 --host fl.lab.example
    python -m server.certificates node-key DIR/nodes/pi-kitchen

``tls`` writes ``ca.pem`` + ``ca.key`` (keep the key offline once the server certificate exists),
``server.pem`` + ``server.key`` for the SuperLink (SANs: every ``--host`` plus localhost and 127.0.0.1,
which the SuperLink's own app processes use). Devices get ``ca.pem`` only. Existing files are kept
unless ``--force``. ``node-key`` writes an EC P-384 key pair in OpenSSH format (``NAME`` private, for
the device; ``NAME.pub`` public, registered on the server). Real certificates (an ACME/Let's Encrypt
or company CA) replace ``server.pem``/``server.key``/``ca.pem``; see server/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS, SERVER_DAYS = 5 * 365, 825
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path, name: str = "fedpetah lab CA") -> tuple[Path, Path]:
    """A self-signed CA certificate and its key: ``out/ca.pem``, ``out/ca.key``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "ca.key", _pem_key(key))
    return out / "ca.pem", out / "ca.key"


def make_server_cert(out: Path, hosts: list[str], ca_dir: Path | None = None) -> tuple[Path, Path]:
    """``out/server.pem`` + ``out/server.key`` signed by the CA in ``ca_dir`` (default ``out``)."""
    ca_dir = ca_dir or out
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / 'ca.key'} is not an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    common = hosts[0] if hosts else "localhost"
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "server.key", _pem_key(key))
    return out / "server.pem", out / "server.key"


def make_tls(out: Path, hosts: list[str], force: bool = False) -> list[Path]:
    """CA (if absent) and server certificate (if absent) in ``out``; returns the files written."""
    written: list[Path] = []
    if force or not (out / "ca.pem").is_file():
        written += make_ca(out)
    if force or written or not (out / "server.pem").is_file():
        written += make_server_cert(out, hosts)
    return written


def make_node_key(path: Path, force: bool = False) -> tuple[Path, Path]:
    """An EC P-384 SuperNode key pair in OpenSSH format: ``path`` (private) and ``path.pub``."""
    public = path.with_name(path.name + ".pub")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it (the old key must then be unregistered)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    comment = f" fedpetah-node-{path.name}".encode()
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + comment + b"\n")
    return path, public


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's certificate files."""

    ca: Path
    cert: Path
    key: Path


def server_files(directory: Path) -> TlsFiles:
    """Checked ``ca.pem``, ``server.pem``, ``server.key`` in ``directory``; ValueError says how to fix what is wrong."""
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    missing = [p.name for p in (files.ca, files.cert, files.key) if not p.is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} in {directory}: create them with "
                         f"`python -m server.certificates tls {directory} --host <name or IP devices use>`")
    try:
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except ValueError as err:
        raise ValueError(f"unreadable certificate or key in {directory}: {err}") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError(f"{files.cert} is not signed by {files.ca}; devices would refuse it") from None
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise ValueError(f"{files.key} is not the key of {files.cert}")
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
        raise ValueError(f"{files.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                         f"renew it with `python -m server.certificates tls {directory} --force --host ...`")
    return files


def node_keys(directory: Path) -> list[Path]:
    """The devices' public keys (``*.pub``) to register; ValueError if there are none or one is not an EC key."""
    keys = sorted(directory.glob("*.pub")) if directory.is_dir() else []
    if not keys:
        raise ValueError(f"no device keys (*.pub) in {directory}: create one per device with "
                         f"`python -m server.certificates node-key {directory}/<device>` and copy the private "
                         "key (without .pub) to that device")
    for key in keys:
        try:
            public = serialization.load_ssh_public_key(key.read_bytes())
        except (ValueError, UnsupportedAlgorithm) as err:
            raise ValueError(f"{key} is not an OpenSSH public key: {err}") from None
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValueError(f"{key} is not an EC (ecdsa-sha2-nistp*) key; Flower needs one")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.certificates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tls = commands.add_parser("tls", help="private CA + SuperLink certificate")
    tls.add_argument("dir", type=Path)
    tls.add_argument("--host", action="append", default=[],
                     help="a name or IP address devices use to reach the server (repeatable)")
    tls.add_argument("--force", action="store_true", help="replace existing files (devices then need the new ca.pem)")
    node = commands.add_parser("node-key", help="a SuperNode authentication key pair")
    node.add_argument("path", type=Path, help="private key path; the public key is PATH.pub")
    node.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "tls":
        written = make_tls(args.dir, args.host, args.force)
        print("\n".join(f"wrote {p}" for p in written) or f"kept the existing certificates in {args.dir}")
        print(f"give devices {args.dir / 'ca.pem'} (never ca.key or server.key)")
    else:
        private, public = make_node_key(args.path, args.force)
        print(f"wrote {private} (stays on the device) and {public} (register it on the server)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
