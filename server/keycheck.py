"""The proxy's signature check: nginx asks it (``auth_request``, headers only) whether a Fleet request is signed by a
registered SuperNode key, before nginx reads or forwards the request's body.

Flower 1.42 checks a SuperNode's signature (``authenticate_node`` in flwr/superlink/routers/fleet/node_auth.py) only
after it has read and parsed the whole body, so a stranger who knows a registered device's public key (not a
secret) could make the SuperLink parse 5 MiB bodies it then refuses. This check is Flower's, with Flower's own
constants and functions, on the three headers a SuperNode sends (flwr/supernode/node_auth_http_interceptor.py):

- ``flwr-public-key``: base64 of the key's PEM (SubjectPublicKeyInfo); it must be one of the ``*.pub`` files in the
  nodes dir (the keys fedpetah-server registers; the dir is read again when it changes, so a key added while the
  server runs passes within :data:`RESCAN_S`, and a removed one is refused from then on);
- ``flwr-timestamp``: ISO 8601 with its UTC offset, at most ``TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE`` (305 s)
  old and at most ``SYSTEM_TIME_TOLERANCE`` (5 s) in the future;
- ``flwr-signature``: base64 of the ECDSA-SHA256 signature of the timestamp's ASCII bytes by that key.

It answers 204 when all three hold, else 401 with the reason in :data:`REASON_HEADER`, and never reads a body.
What it cannot check (the node id in the body belongs to that key) Flower still checks. fedpetah-server runs it
beside nginx; for an nginx you run yourself (``python -m server.proxy``), keep it running beside that nginx:

    python -m server.keycheck --nodes STATE/nodes --listen 127.0.0.1:8002
"""

from __future__ import annotations

import argparse
import binascii
import datetime
import ipaddress
import os
import sys
import threading
import time
from base64 import b64decode
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import verify_signature

from server.certificates import ec_public_key

HEADERS = (FLEET_HTTP_PUBLIC_KEY_HEADER, TIMESTAMP_HEADER, FLEET_HTTP_SIGNATURE_HEADER)
REASON_HEADER = "X-Fedpetah-Refusal"  # nginx puts it in its 401 body (server/proxy.py)
RESCAN_S = 1.0  # the nodes dir's listing is compared at most this often (its mtime on every request)
IDLE_S = 60.0  # an idle connection from nginx is closed after this (nginx's keepalive_timeout is shorter)
UNREGISTERED = "this SuperNode key is not registered on this server"
STALE = (f"the request's flwr-timestamp is more than {TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE} s old or "
         f"{SYSTEM_TIME_TOLERANCE} s ahead: is the device's clock right?")


def flower_public_key(path: Path) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """An OpenSSH EC public key file as the PEM bytes a SuperNode sends for it (base64 in ``flwr-public-key``;
    flwr/supercore/primitives/asymmetric.py ``public_key_to_bytes``) and the key; ValueError if it is not one."""
    key = ec_public_key(path)
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), key


class Keyring:
    """The registered keys: the ``*.pub`` files in ``directory`` by the PEM bytes a SuperNode sends, read again
    when the dir's mtime changes or, at most every :data:`RESCAN_S`, when a file's name, size or mtime does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._keys: dict[bytes, ec.EllipticCurvePublicKey] = {}
        self._listing: tuple[tuple[str, int, int], ...] | None = None
        self._dir_mtime = -1
        self._scanned = 0.0
        self._lock = threading.Lock()

    def get(self, pem: bytes) -> ec.EllipticCurvePublicKey | None:
        self.refresh()
        return self._keys.get(pem)

    def refresh(self) -> None:
        try:
            dir_mtime = self.directory.stat().st_mtime_ns
        except OSError:
            dir_mtime = -1
        if dir_mtime == self._dir_mtime and time.monotonic() - self._scanned < RESCAN_S:
            return
        with self._lock:
            self._dir_mtime, self._scanned = dir_mtime, time.monotonic()
            listing = self._list()
            if listing != self._listing:
                self._listing = listing
                self._keys = self._load([self.directory / name for name, _, _ in listing])
                print(f"server.keycheck: {len(self._keys)} registered keys in {self.directory}", file=sys.stderr,
                      flush=True)

    def _list(self) -> tuple[tuple[str, int, int], ...]:
        found = []
        for path in sorted(self.directory.glob("*.pub")) if self.directory.is_dir() else []:
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((path.name, stat.st_size, stat.st_mtime_ns))
        return tuple(found)

    @staticmethod
    def _load(paths: list[Path]) -> dict[bytes, ec.EllipticCurvePublicKey]:
        keys = {}
        for path in paths:
            try:
                pem, key = flower_public_key(path)
            except (OSError, ValueError) as err:  # one bad or half-written file does not lock the others out
                print(f"server.keycheck: skipped {err}", file=sys.stderr, flush=True)
                continue
            keys[pem] = key
        return keys


def refusal(headers: Message, keys: Keyring, at: datetime.datetime | None = None) -> str | None:
    """Why Flower would refuse a request with these headers as not signed by a registered key (None: it would not).
    Flower's ``authenticate_node`` step by step; each header must be sent exactly once."""
    values = {}
    for name in HEADERS:
        sent = headers.get_all(name) or []
        if len(sent) != 1:
            return f"{len(sent)} {name} headers, not one: a SuperNode signs every Fleet request"
        values[name] = sent[0]
    try:
        public_key = b64decode(values[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
        key = keys.get(public_key)
        if key is None:
            return UNREGISTERED
        signature = b64decode(values[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
        timestamp = values[TIMESTAMP_HEADER]
        age = ((at or now()) - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return STALE
        if not verify_signature(key, timestamp.encode("ascii"), signature):
            return "the flwr-signature is not this key's signature of the flwr-timestamp"
    except (ValueError, TypeError, UnicodeError, binascii.Error) as err:  # Flower's 401 for the same errors
        return f"malformed SuperNode authentication headers ({type(err).__name__})"
    return None


class KeyCheckServer(ThreadingHTTPServer):
    """HTTP/1.1 on loopback: every request, whatever its method and path, is answered by :func:`refusal`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], keys: Keyring) -> None:
        self.keys = keys
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with nginx's upstream pool
    timeout = IDLE_S
    server: KeyCheckServer

    def _answer(self) -> None:
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body is never read, so it must not be taken for the next request
        reason = refusal(self.headers, self.server.keys)
        if reason is None:
            self.send_response(204)
        else:
            self.send_response(401)
            self.send_header(REASON_HEADER, reason)
            self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_HEAD = _answer  # nginx's subrequest has the request's method

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: nginx logs every request it refuses (logs/proxy-refused.log)."""


def serve(nodes: Path, host: str, port: int) -> KeyCheckServer:
    """The check bound to ``host``:``port`` (0: any free port; ``server_address`` says which), not yet serving."""
    keys = Keyring(nodes)
    keys.refresh()
    return KeyCheckServer((host, port), keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.keycheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=Path, required=True, help="the registered devices' *.pub keys (STATE/nodes)")
    parser.add_argument("--listen", default="127.0.0.1:8002", help="HOST:PORT on loopback (default %(default)s)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        loopback = ipaddress.IPv4Address(host).is_loopback and port.isdigit()
    except ValueError:
        loopback = False
    if not loopback:
        parser.error(f"--listen must be 127.x.x.x:PORT (only nginx on this machine asks it), not {args.listen!r}")
    server = serve(args.nodes.resolve(), host, int(port))
    print(f"server.keycheck: listening on {args.listen} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
