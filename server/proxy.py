"""The TLS reverse proxy (nginx from the OS packages) that faces devices: it forwards Flower's Fleet API only.

Flower 1.42's SuperLink serves its Fleet API (devices), Control API (submit and stop runs, register node keys; no
authentication in open-source Flower) and Runtime API (its own app processes) as protobuf over HTTP/1.1 on one
uvicorn port. fedpetah-server binds that port to 127.0.0.1 and puts nginx on the devices' address in front of it:
``POST /v1/fleet/<name>`` is forwarded over TLS to the SuperLink, every other request is answered 403 by nginx.

    python -m server.proxy --listen 0.0.0.0:443 --superlink-port 8000 --certificates STATE/certs \\
        --cert /etc/letsencrypt/live/fl.example.org/fullchain.pem --key .../privkey.pem

prints the ``upstream`` and ``server`` blocks fedpetah-server generates, for an nginx you run yourself.
"""

from __future__ import annotations

import argparse
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
from server.certificates import TlsFiles

FLEET_PATHS = r"^/v1/fleet/[a-z-]+$"  # every Fleet API route of Flower 1.42 (all POST, no query string)
REFUSAL = "fedpetah proxy: only Flower's Fleet API (POST /v1/fleet/...) is served on this address"
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


def server_block(listen: tuple[str, int], superlink_port: int, ca: Path, cert: Path, key: Path,
                 max_body_mb: int = 64) -> str:
    """nginx ``upstream`` + ``server`` blocks: TLS on ``listen`` with ``cert``/``key``, Fleet API forwarded to the
    SuperLink on 127.0.0.1:``superlink_port`` (its certificate verified against ``ca`` for ``localhost``)."""
    return f"""\
upstream fedpetah_superlink {{
    server 127.0.0.1:{superlink_port};
    keepalive 32;
    keepalive_timeout 4s;  # below uvicorn's 5 s, so nginx never reuses a connection the SuperLink is closing
}}

server {{
    listen {_listen(*listen)} ssl;
    ssl_certificate {_quoted(cert)};
    ssl_certificate_key {_quoted(key)};
    ssl_protocols TLSv1.2 TLSv1.3;
    server_tokens off;
    default_type text/plain;
    client_max_body_size {max_body_mb}m;  # Flower sends arrays in 5 MiB chunks and app bundles up to 10 MB

    # Only the Fleet API. Locations match the normalised path, but nginx forwards the request line as sent, so the
    # raw request URI must be a plain Fleet route too (no "..", "%", "//" or query string to confuse the upstream).
    location /v1/fleet/ {{
        if ($request_uri !~ "{FLEET_PATHS}") {{
            return 403 "{REFUSAL}\\n";
        }}
        limit_except POST {{
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

    # The Control API (runs = code execution on this server and on every device), the Runtime API, /docs, /health.
    location / {{
        return 403 "{REFUSAL}\\n";
    }}
}}
"""


def _user_line() -> str:
    """As root, nginx would switch its workers to ``nobody``; keep them as the invoking user instead."""
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"


@dataclass(frozen=True)
class FleetProxy:
    """nginx on ``listen`` in front of the SuperLink on 127.0.0.1:``superlink_port``, its files in ``prefix``."""

    nginx: str
    listen: tuple[str, int]
    superlink_port: int
    tls: TlsFiles
    prefix: Path
    log: Path

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    def render(self) -> str:
        """The whole nginx.conf: in the foreground (our process supervises it), every path inside ``prefix``."""
        temp = "".join(f"    {kind}_temp_path {_quoted(self.prefix / 'tmp' / kind)};\n" for kind in TEMP_KINDS)
        block = server_block(self.listen, self.superlink_port, self.tls.ca, self.tls.cert, self.tls.key)
        return (f"# Written by fedpetah-server (server/proxy.py) at every start; edits are overwritten.\n"
                f"daemon off;\nmaster_process on;\nworker_processes 1;\n{_user_line()}"
                f"pid {_quoted(self.prefix / 'nginx.pid')};\nerror_log stderr warn;\n\n"
                f"events {{\n    worker_connections 4096;\n}}\n\nhttp {{\n{temp}"
                f"    map $status $refused {{\n        ~^[23] 0;\n        default 1;\n    }}\n"
                f"    access_log {_quoted(self.log.with_name('proxy-refused.log'))} combined if=$refused;\n\n"
                + "".join(f"    {line}\n" if line else "\n" for line in block.splitlines()) + "}\n")

    def write(self) -> Path:
        """nginx.conf and its temp folders in ``prefix``, and the log folder."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        for kind in TEMP_KINDS:
            (self.prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render())
        return self.conf

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
        """Reach the proxy over verified TLS as a device does: the Control API must be refused by nginx (403) and
        the Fleet API answered by Flower; (control status, fleet status)."""
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
            fleet, body = probe(host, port, self.tls.ca, "/v1/fleet/get-run")
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
    args = parser.parse_args(argv)
    certs = args.certificates.resolve()
    print(server_block(split_address(args.listen), args.superlink_port, certs / "ca.pem",
                       (args.cert or certs / "server.pem").resolve(), (args.key or certs / "server.key").resolve()),
          end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
