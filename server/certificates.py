"""A private CA for labs: the CA, the SuperLink's TLS certificate and SuperNode authentication keys.

    python -m server.certificates tls DIR --host 192.168.1.10 --host fl.lab.example
    python -m server.certificates node-key DIR/nodes/pi-kitchen

``tls`` writes the CA (``ca.pem`` + ``ca.key``) into its own directory, ``DIR-ca`` beside ``DIR`` unless
``--ca-dir``, never into ``DIR``, which the running server reads: keep ``ca.key`` offline once the server
certificate exists, and bring it back only to issue a new one (``tls DIR --ca-dir CA --force --host ...``).
``DIR`` gets ``server.pem`` + ``server.key`` for the SuperLink (SANs: every ``--host`` plus localhost and
127.0.0.1, which the SuperLink's own app processes use) and a copy of ``ca.pem``. Devices get ``ca.pem`` only.
Existing files are kept unless ``--force`` (a new server certificate from the same CA) or ``--new-ca``.
``node-key`` writes an EC P-384 key pair in OpenSSH format (``NAME`` private, for the device; ``NAME.pub``
public, registered on the server). Private keys are written owner-only (0600) through a temp file and a
rename, whatever the file they replace allowed. Real certificates (an ACME/Let's Encrypt or company CA) replace
``server.pem``/``server.key``/``ca.pem``; see server/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpetah.atomic import atomic_write_bytes, fsync_dir

CA_DAYS, SERVER_DAYS = 5 * 365, 825
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only (0600) whatever ``path`` was before: a new file renamed over it, never rewritten in place."""
    atomic_write_bytes(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o644)


def default_ca_dir(certs: Path) -> Path:
    """Where ``tls`` keeps the CA of the certificates in ``certs``: the sibling ``<certs>-ca``."""
    return certs.with_name(certs.name + "-ca")


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
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_public(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "ca.key", _pem_key(key))
    return out / "ca.pem", out / "ca.key"


def make_server_cert(out: Path, hosts: list[str], ca_dir: Path | None = None) -> tuple[Path, Path]:
    """``out/server.pem`` + ``out/server.key`` signed by the CA in ``ca_dir`` (default :func:`default_ca_dir`),
    and a copy of its ``ca.pem`` in ``out``."""
    ca_dir = default_ca_dir(out) if ca_dir is None else ca_dir
    missing = [p for p in (ca_dir / "ca.pem", ca_dir / "ca.key") if not p.is_file()]
    if missing:
        raise ValueError(f"the CA is needed to issue a server certificate, and {', '.join(map(str, missing))} "
                         f"is missing: pass --ca-dir with the directory that holds ca.pem and ca.key (kept "
                         "offline), or --new-ca for a new CA (devices then need its ca.pem)")
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
    _write_private(out / "server.key", _pem_key(key))
    _write_public(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write_public(out / "ca.pem", (ca_dir / "ca.pem").read_bytes())
    return out / "server.pem", out / "server.key"


def make_tls(out: Path, hosts: list[str], force: bool = False, ca_dir: Path | None = None,
             new_ca: bool = False) -> list[Path]:
    """The CA in ``ca_dir`` (default :func:`default_ca_dir`; made if there is none, or with ``new_ca``) and the
    server certificate in ``out`` (made if absent, or with ``force`` or a new CA); returns the files written.

    A ``ca.key`` left in ``out`` by older versions is moved into ``ca_dir`` first."""
    ca_dir = default_ca_dir(out) if ca_dir is None else ca_dir
    if ca_dir.resolve() == out.resolve():
        raise ValueError(f"the CA dir must not be {out}, which the running server reads; pass another --ca-dir")
    written = _move_ca_key(out, ca_dir)
    fresh = new_ca or not ((ca_dir / "ca.pem").is_file() or (out / "ca.pem").is_file())
    if fresh:
        written += make_ca(ca_dir)
    if fresh or force or not (out / "server.pem").is_file():
        written += [*make_server_cert(out, hosts, ca_dir), out / "ca.pem"]
    return written


def _move_ca_key(out: Path, ca_dir: Path) -> list[Path]:
    """Older versions wrote ``ca.key`` beside the server's files: move it (and its ``ca.pem``) into ``ca_dir``."""
    legacy = out / "ca.key"
    if not legacy.is_file():
        return []
    if (ca_dir / "ca.key").exists():
        raise ValueError(f"{legacy} and {ca_dir / 'ca.key'} both exist: keep the CA key that signed "
                         f"{out / 'server.pem'} in {ca_dir} and delete the other")
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_public(ca_dir / "ca.pem", (out / "ca.pem").read_bytes())
    os.replace(legacy, ca_dir / "ca.key")
    fsync_dir(out)
    return [ca_dir / "ca.pem", ca_dir / "ca.key"]


def make_node_key(path: Path, force: bool = False) -> tuple[Path, Path]:
    """An EC P-384 SuperNode key pair in OpenSSH format: ``path`` (private) and ``path.pub``."""
    public = path.with_name(path.name + ".pub")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it (the old key must then be unregistered)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    comment = f" fedpetah-node-{path.name}".encode()
    _write_public(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
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
    if (directory / "ca.key").exists():
        raise ValueError(f"{directory / 'ca.key'}: the CA's private key must not be where the running server reads; "
                         f"move it out with `python -m server.certificates tls {directory}` (it goes to "
                         f"{default_ca_dir(directory)}) and keep it offline")
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
                         f"renew it with `python -m server.certificates tls {directory} --force --host ... "
                         f"--ca-dir <the dir holding ca.key>`")
    return files


def ec_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """The key in an OpenSSH EC public key file (a device's ``*.pub``); ValueError if it is not one."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path} is not an OpenSSH public key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} is not an EC (ecdsa-sha2-nistp*) key; Flower needs one")
    return key


def node_keys(directory: Path) -> list[Path]:
    """The devices' public keys (``*.pub``) to register; ValueError if there are none or one is not an EC key."""
    keys = sorted(directory.glob("*.pub")) if directory.is_dir() else []
    if not keys:
        raise ValueError(f"no device keys (*.pub) in {directory}: create one per device with "
                         f"`python -m server.certificates node-key {directory}/<device>` and copy the private "
                         "key (without .pub) to that device")
    for key in keys:
        ec_public_key(key)
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.certificates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tls = commands.add_parser("tls", help="private CA + SuperLink certificate")
    tls.add_argument("dir", type=Path, help="the server's certificate dir (STATE/certs)")
    tls.add_argument("--host", action="append", default=[],
                     help="a name or IP address devices use to reach the server (repeatable)")
    tls.add_argument("--ca-dir", type=Path, help="where the CA's ca.pem and ca.key are or go (default DIR-ca)")
    tls.add_argument("--force", action="store_true", help="replace the server certificate (same CA)")
    tls.add_argument("--new-ca", action="store_true",
                     help="a new CA and server certificate (devices then need the new ca.pem)")
    node = commands.add_parser("node-key", help="a SuperNode authentication key pair")
    node.add_argument("path", type=Path, help="private key path; the public key is PATH.pub")
    node.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "node-key":
            private, public = make_node_key(args.path, args.force)
            print(f"wrote {private} (stays on the device) and {public} (register it on the server)")
            return 0
        ca_dir = default_ca_dir(args.dir) if args.ca_dir is None else args.ca_dir
        written = make_tls(args.dir, args.host, args.force, ca_dir, args.new_ca)
    except (ValueError, FileExistsError) as err:
        print(f"python -m server.certificates: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {p}" for p in written) or f"kept the existing certificates in {args.dir}")
    print(f"give devices {args.dir / 'ca.pem'} (never a .key file)")
    if (ca_dir / "ca.key").is_file():
        print(f"keep {ca_dir / 'ca.key'} offline (the server never needs it); bring it back only to issue a new "
              f"server certificate: python -m server.certificates tls {args.dir} --ca-dir {ca_dir} --force "
              "--host ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
