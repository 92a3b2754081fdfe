"""The TLS reverse proxy (nginx from the OS packages) that faces devices: it forwards Flower's Fleet API only.

Flower 1.42's SuperLink serves its Fleet API (devices), Control API (submit and stop runs, register node keys; no
authentication in open-source Flower) and Runtime API (its own app processes) as protobuf over HTTP/1.1 on one
uvicorn port. fedpetah-server binds that port to 127.0.0.1 and puts nginx on the devices' address in front of it:
``POST /v1/fleet/<name>`` is forwarded over TLS to the SuperLink, every other request is answered 403 by nginx.

    python -m server.proxy --listen 0.0.0.0:443 --superlink-port 8000 --certificates STATE/certs \\
        --nodes STATE/nodes --cert /etc/letsencrypt/live/fl.example.org/fullchain.pem --key .../privkey.pem

prints the blocks fedpetah-server generates (the limit zones, ``upstream`` and ``server``), for the ``http {}``
block of an nginx you run yourself, and the command of the signature check they need beside them
(``python -m server.keycheck --nodes STATE/nodes --listen 127.0.0.1:8001``, server/keycheck.py).

What reaches the SuperLink is bounded before Flower reads a byte of the body: a Fleet request must be signed by a
registered node key, which nginx asks the signature check with the request's headers only (``auth_request``;
except ``register-node`` / ``activate-node``, where Flower refuses an unknown key itself), its body is capped per
route at what a SuperNode sends (``BODY_CAPS``), and each client address is limited in requests per second and
concurrent requests (``RATE``, ``BURST``, ``CONNECTIONS``). The workers run as ``nobody`` under root.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flower_glue.launch import split_address, start, stop_tree, wait_for_port
from server import keycheck
from server.certificates import TlsFiles, node_keys

FLEET_PATHS = r"^/v1/fleet/[a-z-]+$"  # every Fleet API route of Flower 1.42 (all POST, no query string)
REFUSAL = "fedpetah proxy: only Flower's Fleet API (POST /v1/fleet/...) is served on this address"
REFUSED = "fedpetah proxy: "  # + the signature check's reason (server/keycheck.py): nginx's 401 body
UNREGISTERED = REFUSED + keycheck.UNREGISTERED
KEYCHECK_DOWN = "fedpetah proxy: the signature check (server/keycheck.py) does not answer; retry later"
KEYLESS_ROUTES = ("register-node", "activate-node")  # Flower answers an unregistered key here in its own words
# Request body caps, from what a Flower 1.42 SuperNode sends (flwr/supernode/fleet_http_connection.py):
# - push-object: one inflatable object per request; arrays travel as ArrayChunks of at most
#   FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE = 5,242,880 B (flwr/common/constant.py, flwr/app/message/array.py
#   slice_array) plus a header of ~30 B and ~120 B of protobuf (node, run id, 64-hex object id); the other objects
#   (Message, RecordDict, ArrayRecord, Array, Config/MetricRecord) are metadata: names and 65 B per child id. Our
#   devices put every large value in arrays (adapter state, router statistics), so 6 MiB leaves 1 MiB for metadata.
# - push-messages: one Message without content plus its object tree (~70 B per object): 1 MiB is ~15,000 objects.
# - every other route (pull-messages, pull-object, heartbeat, get-run, get-fab, confirm, register/activate...) is
#   a node id, a run id, an object id or a PEM public key: under 1 KB.
# Large bodies only ever flow to devices (pull-object answers, get-fab's bundle of at most FAB_MAX_SIZE = 10 MB,
# flwr/common/constant.py); nginx does not limit response sizes. A device with a larger
# FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE in its environment gets 413 and stops: leave it unset.
BODY_CAPS = {"push-object": "6m", "push-messages": "1m"}
SMALL_BODY = "64k"
# Per client address (devices behind one NAT share one): an honest SuperNode polls pull-messages every 3 s and sends
# a heartbeat every 30 s (flwr/supernode/start_client_internal.py, HEARTBEAT_DEFAULT_INTERVAL); it pushes and pulls
# objects 2 at a time (FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES / _PULLS), in bursts of one request per object (a
# reply's arrays, the backbone's 5 MiB chunks). Beyond the burst a request is answered 503, which Flower's SuperNode
# retries with backoff (flwr/supercore/retry/http_retry.py); 429 would make it give up.
RATE, BURST, CONNECTIONS = "20r/s", 400, 64
# register-node / activate-node pass without a registered key, and each refusal is an ERROR line of ~400 B in the
# SuperLink's log (and one in proxy-refused.log): an honest device activates once per start or reconnection.
KEYLESS_RATE, KEYLESS_BURST = "6r/m", 10
WORKER_USER = "nobody"  # nginx's workers when the server runs as root
INSTALL = "apt-get install nginx-light (Debian/Ubuntu; `nginx` elsewhere) or brew install nginx (macOS)"
SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/opt/homebrew/bin")  # sbin is off users' PATH
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
UNSAFE = set('"\\$;{}\'') | {chr(c) for c in range(32)}


class ProxyError(Exception):
    """The proxy could not be started or did not behave as configured."""


class ProxyMissing(ProxyError):
    """No nginx binary."""


class ProxyCertificate(ProxyError):
    """The proxy's certificate does not verify for the address devices use."""


def find_nginx(explicit: str | None = None) -> str:
    """The nginx binary: ``explicit``, else on PATH or in the usual sbin folders; ProxyMissing says how to install."""
    if explicit is not None:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise ProxyMissing(f"nginx not found at {explicit}; install it ({INSTALL}) or pass its path with --nginx")
    found = shutil.which("nginx") or shutil.which("nginx", path=os.pathsep.join(SEARCH_DIRS))
    if found is None:
        raise ProxyMissing(f"nginx is needed to face devices (it forwards only the Fleet API) and was not found on "
                           f"PATH nor in {', '.join(SEARCH_DIRS)}: install it with `{INSTALL}`, or pass --nginx PATH")
    return found


def _quoted(path: Path | str) -> str:
    text = str(path)
    if UNSAFE & set(text):
        raise ProxyError(f"nginx cannot safely name the path {text!r} (quotes, $, ;, braces or control characters)")
    return f'"{text}"'


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def flower_key_header(public_key: Path) -> str:
    """The ``flwr-public-key`` header a SuperNode with this OpenSSH EC public key sends: base64 of the key's PEM
    (flwr/supernode/node_auth_http_interceptor.py, flwr/supercore/primitives/asymmetric.py public_key_to_bytes)."""
    return base64.b64encode(keycheck.flower_public_key(public_key)[0]).decode("ascii")


def _fleet_location(route: str | None, ca: Path) -> str:
    """One ``location`` for Fleet ``route`` (None: every other route) with its body cap, the raw-path check, the
    signature check (except the keyless routes) and the forwarding to the SuperLink."""
    keyed = route not in KEYLESS_ROUTES
    where = "/v1/fleet/" if route is None else f"= /v1/fleet/{route}"
    cap = BODY_CAPS.get(route or "", SMALL_BODY)
    limits = "" if keyed else (f"        limit_req zone=fedpetah_requests burst={BURST} nodelay;  # (not inherited)\n"
                               f"        limit_req zone=fedpetah_keyless burst={KEYLESS_BURST} nodelay;\n")
    reason = "$upstream_http_" + keycheck.REASON_HEADER.lower().replace("-", "_")
    signed = ("        auth_request /_fedpetah_keycheck;  # after the limits and the path check, before the body\n"
              f"        auth_request_set $fedpetah_refusal {reason};\n"
              "        error_page 401 @fedpetah_unsigned;\n"
              "        error_page 500 =503 @fedpetah_keycheck_down;  # the check is down: a SuperNode retries 503\n"
              ) if keyed else ""
    return f"""\
    location {where} {{
        client_max_body_size {cap};
{limits}        if ($request_uri !~ "{FLEET_PATHS}") {{
            return 403 "{REFUSAL}\\n";
        }}
{signed}        limit_except POST {{
            deny all;
        }}
        proxy_pass https://fedpetah_superlink;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Forwarded-For $remote_addr;  # uvicorn trusts it from 127.0.0.1: devices' IPs in its log
        proxy_set_header X-Forwarded-Proto https;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {_quoted(ca)};
        proxy_ssl_name localhost;  # server/certificates.py always names localhost (Flower's own processes use it)
        proxy_ssl_session_reuse on;
        proxy_request_buffering off;  # stream both ways: no 5 MiB array chunk written to a temp file
        proxy_buffering off;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
    }}
"""


def server_block(listen: tuple[str, int], superlink_port: int, ca: Path, cert: Path, key: Path,
                 keycheck_port: int) -> str:
    """nginx limit zones, ``upstream`` and ``server`` blocks (all valid in ``http {}``): TLS on ``listen`` with
    ``cert``/``key``, the Fleet API forwarded to the SuperLink on 127.0.0.1:``superlink_port`` (its certificate
    verified against ``ca`` for ``localhost``) for requests that the signature check on 127.0.0.1:``keycheck_port``
    (server/keycheck.py) accepts, bodies capped per route, requests and connections limited per address."""
    routes = [*BODY_CAPS, *KEYLESS_ROUTES, None]
    return f"""\
# Flower checks a node's signature only after reading and parsing the whole body (and the parsed body of a refused
# request stays in the SuperLink's memory until a full garbage collection): nginx asks the signature check
# (python -m server.keycheck --nodes STATE/nodes --listen 127.0.0.1:{keycheck_port}, which must run beside it) with
# the request's headers only, and refuses a request not signed by a registered node key before reading its body.
# Only the keyless routes pass without one.
limit_req_zone $binary_remote_addr zone=fedpetah_requests:10m rate={RATE};
limit_req_zone $binary_remote_addr zone=fedpetah_keyless:10m rate={KEYLESS_RATE};
limit_conn_zone $binary_remote_addr zone=fedpetah_connections:10m;

upstream fedpetah_superlink {{
    server 127.0.0.1:{superlink_port};
    keepalive 32;
    keepalive_timeout 4s;  # below uvicorn's 5 s, so nginx never reuses a connection the SuperLink is closing
}}

upstream fedpetah_keycheck {{
    server 127.0.0.1:{keycheck_port};
    keepalive 16;
    keepalive_timeout 30s;  # below the check's 60 s idle timeout (server/keycheck.py IDLE_S)
}}

server {{
    listen {_listen(*listen)} ssl;
    ssl_certificate {_quoted(cert)};
    ssl_certificate_key {_quoted(key)};
    ssl_protocols TLSv1.2 TLSv1.3;
    server_tokens off;
    default_type text/plain;
    client_max_body_size {SMALL_BODY};  # per Fleet route below (BODY_CAPS in server/proxy.py says why)
    limit_req zone=fedpetah_requests burst={BURST} nodelay;
    limit_conn fedpetah_connections {CONNECTIONS};
    limit_req_status 503;  # Flower's SuperNode retries 502/503/504 with backoff
    limit_conn_status 503;
    # Slow clients hold a connection only briefly (nginx's defaults: 60 s per header or body read, 75 s idle).
    client_header_timeout 10s;
    client_body_timeout 30s;
    send_timeout 60s;
    keepalive_timeout 30s;
    reset_timedout_connection on;

    # Only the Fleet API. Locations match the normalised path, but nginx forwards the request line as sent, so the
    # raw request URI must be a plain Fleet route too (no "..", "%", "//" or query string to confuse the upstream).
{"".join(_fleet_location(route, ca) for route in routes)}
    # The signature check, asked with the request's headers only (the subrequest carries no body).
    location = /_fedpetah_keycheck {{
        internal;
        client_max_body_size 0;  # the request's own location capped it; this subrequest forwards no body
        proxy_pass http://fedpetah_keycheck;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_connect_timeout 2s;
        proxy_read_timeout 10s;
    }}
    location @fedpetah_unsigned {{
        return 401 "{REFUSED}$fedpetah_refusal\\n";
    }}
    location @fedpetah_keycheck_down {{
        return 503 "{KEYCHECK_DOWN}\\n";
    }}
    # The Control API (runs = code execution on this server and on every device), the Runtime API, /docs, /health.
    location / {{
        return 403 "{REFUSAL}\\n";
    }}
}}
"""


def _user_line() -> str:
    """As root, the workers (which parse every request) run as ``nobody``: the master reads the certificate and key
    and opens the logs as root before it forks them; nothing of the server's is theirs to read or write."""
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    try:
        nobody = pwd.getpwnam(WORKER_USER)
    except KeyError:
        raise ProxyError(f"as root nginx's workers must run as an unprivileged user, and there is no "
                         f"{WORKER_USER!r} user here; run fedpetah-server as a normal user") from None
    return f"user {nobody.pw_name} {grp.getgrgid(nobody.pw_gid).gr_name};\n"


@dataclass(frozen=True)
class FleetProxy:
    """nginx on ``listen`` in front of the SuperLink on 127.0.0.1:``superlink_port``, its files in ``prefix``."""

    nginx: str
    listen: tuple[str, int]
    superlink_port: int
    tls: TlsFiles
    prefix: Path
    log: Path
    keycheck_port: int  # the signature check (server/keycheck.py) on 127.0.0.1, asked before a body is read
    nodes: Path  # the registered devices' OpenSSH public keys (*.pub), which the signature check reads

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    def render(self) -> str:
        """The whole nginx.conf: in the foreground (our process supervises it), every path inside ``prefix``."""
        temp = "".join(f"    {kind}_temp_path {_quoted(self.prefix / 'tmp' / kind)};\n" for kind in TEMP_KINDS)
        block = server_block(self.listen, self.superlink_port, self.tls.ca, self.tls.cert, self.tls.key,
                             self.keycheck_port)
        return (f"# Written by fedpetah-server (server/proxy.py) at every start; edits are overwritten.\n"
                f"daemon off;\nmaster_process on;\nworker_processes 1;\n{_user_line()}"
                f"pid {_quoted(self.prefix / 'nginx.pid')};\nerror_log stderr warn;\n\n"
                f"events {{\n    worker_connections 4096;\n}}\n\nhttp {{\n{temp}\n"
                + "".join(f"    {line}\n" if line else "\n" for line in block.splitlines())
                + f"\n    map $status $refused {{\n        ~^[23] 0;\n        default 1;\n    }}\n"
                f"    access_log {_quoted(self.log.with_name('proxy-refused.log'))} combined if=$refused;\n}}\n")

    def write(self) -> Path:
        """nginx.conf and its temp folders in ``prefix``, and the log folder."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        for kind in TEMP_KINDS:
            (self.prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render())
        return self.conf

    def start_keycheck(self, timeout: float) -> subprocess.Popen[bytes]:
        """The signature check (``python -m server.keycheck``) on 127.0.0.1:``keycheck_port``, its output appended
        to ``keycheck.log`` beside ``log``; start it before nginx. ProxyError if it does not listen."""
        log = self.log.with_name("keycheck.log")
        process = start([sys.executable, "-m", "server.keycheck", "--nodes", str(self.nodes), "--listen",
                         f"127.0.0.1:{self.keycheck_port}"], os.environ, log)
        if not wait_for_port("127.0.0.1", self.keycheck_port, process, timeout):
            stop_tree(process)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ProxyError(f"the proxy's signature check did not start on 127.0.0.1:{self.keycheck_port} "
                             f"(log {log}):\n{tail}")
        return process

    def start(self, timeout: float) -> subprocess.Popen[bytes]:
        """Write the config, start nginx (its output appended to ``log``) and check it; ProxyError if it fails."""
        self.write()
        process = start([self.nginx, "-e", "stderr", "-p", str(self.prefix), "-c", str(self.conf)], os.environ,
                        self.log)
        try:
            self.check(process, timeout)
        except BaseException:
            stop_tree(process)
            raise
        return process

    def _tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()[-15:] if self.log.is_file() else []
        return "\n".join(lines)

    def check(self, process: subprocess.Popen[bytes] | None, timeout: float) -> tuple[int, int]:
        """Reach the proxy over verified TLS as a device does: the Control API must be refused by nginx (403), an
        unsigned Fleet request by the signature check (401) and the keyless Fleet route answered by Flower;
        (control status, fleet status)."""
        host, port = self.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        if not wait_for_port(host, port, process, timeout):
            raise ProxyError(f"nginx did not start on {_listen(host, port)} (log {self.log}):\n{self._tail()}")
        control, body = probe(host, port, self.tls.ca, "/v1/control/list-runs")
        if control != 403 or REFUSAL not in body:
            raise ProxyError(f"the proxy on {_listen(host, port)} answered the Control API with HTTP {control}, "
                             f"not the proxy's 403; is another server on that port? ({body[:200]!r})")
        deadline = time.monotonic() + timeout
        while True:
            unsigned, body = probe(host, port, self.tls.ca, "/v1/fleet/get-run")
            if unsigned == 401 and body.startswith(REFUSED):
                break
            if time.monotonic() > deadline:
                raise ProxyError(f"the proxy's signature check on 127.0.0.1:{self.keycheck_port} does not answer "
                                 f"(HTTP {unsigned}: {body[:200]!r}; log {self.log}):\n{self._tail()}")
            time.sleep(0.5)
        while True:
            fleet, body = probe(host, port, self.tls.ca, "/v1/fleet/activate-node")  # keyless: reaches Flower
            if fleet not in (403, 502, 503, 504):
                return control, fleet
            if time.monotonic() > deadline:
                raise ProxyError(f"the proxy does not reach the SuperLink on 127.0.0.1:{self.superlink_port} "
                                 f"(HTTP {fleet}; log {self.log}):\n{self._tail()}")
            time.sleep(0.5)


def probe(host: str, port: int, ca: Path, path: str) -> tuple[int, str]:
    """POST an empty body to ``path`` over TLS verified against ``ca`` for ``host``; (status, body text)."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=10)
    try:
        connection.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        response = connection.getresponse()
        return response.status, response.read(4096).decode(errors="replace")
    except ssl.SSLCertVerificationError as err:
        raise ProxyCertificate(f"the proxy's certificate does not verify for {host} ({err.verify_message}): name "
                               f"every address devices use: `python -m server.certificates tls {ca.parent} "
                               f"--force --host {host}` (devices then need the new ca.pem)") from None
    except (OSError, http.client.HTTPException) as err:
        raise ProxyError(f"no HTTPS answer from the proxy on {_listen(host, port)}: {err}") from None
    finally:
        connection.close()


def warn_control_exposed(host: str, port: int) -> None:
    """The loud banner of ``--expose-control-api``."""
    line = "!" * 78
    print(f"{line}\nfedpetah-server: CONTROL API EXPOSED on {_listen(host, port)}. Open-source Flower does not\n"
          "authenticate it: anyone who reaches this port can submit a run (its code runs on this server and on\n"
          "every connected device), register node keys of their own, or stop runs. Only for a network where every\n"
          f"host is trusted; otherwise drop --expose-control-api (devices then reach the Fleet API only).\n{line}",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT devices connect to")
    parser.add_argument("--superlink-port", type=int, required=True, help="the SuperLink's port on 127.0.0.1")
    parser.add_argument("--certificates", type=Path, required=True, help="the SuperLink's dir with ca.pem")
    parser.add_argument("--cert", type=Path, help="certificate devices see (default CERTIFICATES/server.pem)")
    parser.add_argument("--key", type=Path, help="its key (default CERTIFICATES/server.key)")
    parser.add_argument("--nodes", type=Path, required=True,
                        help="the registered devices' *.pub keys (STATE/nodes), which the signature check reads")
    parser.add_argument("--keycheck-port", type=int,
                        help="the signature check's port on 127.0.0.1 (default SUPERLINK_PORT+1)")
    args = parser.parse_args(argv)
    certs = args.certificates.resolve()
    try:
        node_keys(args.nodes)
    except ValueError as err:
        parser.error(str(err))
    keycheck_port = args.keycheck_port or args.superlink_port + 1
    print(f"# Run the signature check beside this nginx (e.g. as a systemd unit), as the user who owns the keys:\n"
          f"#   {sys.executable} -m server.keycheck --nodes {args.nodes.resolve()} "
          f"--listen 127.0.0.1:{keycheck_port}\n"
          + server_block(split_address(args.listen), args.superlink_port, certs / "ca.pem",
                         (args.cert or certs / "server.pem").resolve(), (args.key or certs / "server.key").resolve(),
                         keycheck_port), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
