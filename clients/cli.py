"""``fedpetah-client``: this device as a Flower SuperNode of a fedpetah server, after checks that explain failures.

    fedpetah-client --server fl.lab.example:8000 --data ~/fedpetah-data \\
        --root-certificates ~/.fedpetah/ca.pem --auth-key ~/.fedpetah/node
    fedpetah-client predict IMAGE...      (offline, with the learned tasks this device keeps: see clients.predict)

Checked before Flower's SuperNode starts: the data dir (``DIR/<task>/<class>/*.png|jpg``), free disk for the
backbone cache, the CA and node key files, that the server is reachable (retried with exponential backoff) and
that its certificate verifies. Flower's own connection errors (a node key the server refuses) are translated
into the same exit codes. Exit codes: 0 stopped cleanly, 2 usage, 3 data, 4 disk, 5 unreachable,
6 certificate, 7 node key, 8 SuperNode failure.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from clients.predict import default_cache
from fedpetah.wire.profile import MAX_BUDGET_MB
from flower_glue.launch import (
    LOOPBACK_HOSTS,
    child_env,
    connect_with_retries,
    executable,
    port_is_free,
    signals_ignored,
    sigterm_interrupts,
    split_address,
    start,
    stop_tree,
    wait_for_port,
    warn_insecure,
)

EXIT_USAGE, EXIT_DATA, EXIT_DISK, EXIT_UNREACHABLE = 2, 3, 4, 5
EXIT_CERTIFICATE, EXIT_NODE_KEY, EXIT_SUPERNODE = 6, 7, 8
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})  # what fedpetah.tasks.folder reads (a test keeps them equal)


class ClientError(Exception):
    """A failure the device's owner can fix; ``code`` is the process exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


REFUSED = ("[code: 2004]", "Failed to activate SuperNode")  # Flower: this key is not registered (yet)
KEY_RETRIES = 3  # a device may connect while the server is still registering keys at its start
CACHE_KEEP, CACHE_MAX_MB = 4, 1024  # fedpetah.device.local's defaults (a test keeps them equal; no torch import here)
BANK_MAX_MB = 256  # fedpetah.device.keep's default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    cache = default_cache()
    parser = argparse.ArgumentParser(prog="fedpetah-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="HOST:PORT of fedpetah-server")
    parser.add_argument("--data", required=True, type=Path, help="image folder DIR/<task>/<class>/*.png|jpg")
    parser.add_argument("--root-certificates", type=Path, help="the server's CA (ca.pem); default: system CAs")
    parser.add_argument("--auth-key", type=Path, help="this device's private key (its .pub is registered)")
    parser.add_argument("--cache", type=Path, default=cache, help=f"backbone cache (default {cache})")
    parser.add_argument("--cache-keep", type=int, default=CACHE_KEEP,
                        help=f"backbones the cache keeps, least recently used evicted first (default {CACHE_KEEP})")
    parser.add_argument("--cache-max-mb", type=int, default=CACHE_MAX_MB,
                        help=f"disk the cached backbones may take (default {CACHE_MAX_MB}; the one in use is kept)")
    parser.add_argument("--bank-max-mb", type=int, default=BANK_MAX_MB,
                        help=f"the largest snapshot of the learned tasks this device keeps for `fedpetah-client "
                        f"predict` (default {BANK_MAX_MB})")
    parser.add_argument("--insecure", action="store_true", help="no TLS: only for a loopback demo server "
                        "(refused for any other host)")
    parser.add_argument("--runtime-port", type=int, default=9094, help="local port of the SuperNode's app API")
    parser.add_argument("--retries", type=int, default=int(env("FEDPETAH_CONNECT_RETRIES", "8")),
                        help="reconnection attempts before giving up (env FEDPETAH_CONNECT_RETRIES)")
    parser.add_argument("--backoff", type=float, default=float(env("FEDPETAH_CONNECT_BACKOFF", "2.0")),
                        help="first wait in seconds, doubled per attempt (env FEDPETAH_CONNECT_BACKOFF)")
    parser.add_argument("--key-retries", type=int, default=KEY_RETRIES,
                        help=f"new attempts after the server refused this device's key (default {KEY_RETRIES}: the "
                        "server may still be registering keys)")
    parser.add_argument("--min-free-mb", type=int, default=200, help="free disk the cache needs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    parser.add_argument("--memory-budget-mb", type=float,
                        help="memory training may take above the worker's resting footprint; work that needs more "
                        "is answered no-budget (default: the system's MemAvailable at each request)")
    parser.add_argument("--no-worker", action="store_true",
                        help="no device worker: every message imports torch in its own process (slow)")
    parser.add_argument("--worker-timeout", type=float, default=300.0,
                        help="seconds a message waits for the device worker's answer before an error reply")
    parser.add_argument("--check", action="store_true", help="run the checks, then exit without joining")
    return parser.parse_args(argv)


def _inside(path: Path, base: Path, kind: Callable[[int], bool]) -> bool:
    """Whether ``path`` resolves (symbolic links followed) to a ``kind`` of file inside ``base``: the rule
    fedpetah.tasks.folder reads images by, so the start-up summary counts what training will read."""
    try:
        real = path.resolve(strict=True)
        return real.is_relative_to(base) and kind(real.stat().st_mode)
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
        return False


def scan_data(root: Path) -> dict[str, dict[str, int]]:
    """Image files per task and class of ``root/<task>/<class>/``; ClientError if there are none."""
    if not root.is_dir():
        raise ClientError(EXIT_DATA, f"data dir {root} does not exist; lay out images as {root}/<task>/<class>/*.png")
    found: dict[str, dict[str, int]] = {}
    base = root.resolve()
    for task in sorted(p for p in root.iterdir() if _inside(p, base, stat.S_ISDIR) and not p.name.startswith(".")):
        for label in sorted(p for p in task.iterdir() if _inside(p, base, stat.S_ISDIR) and not p.name.startswith(".")):
            images = (f for f in label.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            count = sum(1 for f in images if _inside(f, base, stat.S_ISREG))
            if count:
                found.setdefault(task.name, {})[label.name] = count
    if not found:
        raise ClientError(EXIT_DATA, f"data dir {root} holds no images: expected {root}/<task>/<class>/*.png|jpg "
                                     "with the task and class names the server uses (e.g. mnist_0_1/0/img.png)")
    return found


def check_cache(cache: Path, min_free_mb: int) -> int:
    """Free MB in the cache dir (created if needed); ClientError if it is not writable or too full."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ClientError(EXIT_DISK, f"cannot write the backbone cache {cache}: {err}; pass --cache DIR") from None
    free_mb = shutil.disk_usage(cache).free // 2**20
    if free_mb < min_free_mb:
        raise ClientError(EXIT_DISK, f"only {free_mb} MB free for the backbone cache in {cache}, {min_free_mb} MB "
                                     "needed: free space or point --cache at a bigger disk")
    return int(free_mb)


def check_files(args: argparse.Namespace) -> None:
    if args.root_certificates is not None:
        try:
            ssl.create_default_context(cafile=str(args.root_certificates))
        except (OSError, ssl.SSLError) as err:
            raise ClientError(EXIT_CERTIFICATE, f"cannot use --root-certificates {args.root_certificates}: {err}; "
                                                "it must be the server's ca.pem (PEM)") from None
    if args.auth_key is not None:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        try:
            key = load_ssh_private_key(args.auth_key.read_bytes(), password=None)
        except (OSError, ValueError) as err:
            raise ClientError(EXIT_NODE_KEY, f"cannot read --auth-key {args.auth_key}: {err}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ClientError(EXIT_NODE_KEY, f"{args.auth_key} is not an EC key; create one with "
                                             "`python -m server.certificates node-key PATH`")


def check_server(host: str, port: int, args: argparse.Namespace) -> None:
    """Reachable (with retries), and its certificate verifies against the CA for ``host``."""

    def retrying(attempt: int, delay: float, error: OSError) -> None:
        print(f"fedpetah-client: {host}:{port} not reachable ({error}); retry {attempt}/{args.retries} "
              f"in {delay:.1f} s", file=sys.stderr)

    error = connect_with_retries(host, port, args.retries, args.backoff, retrying)
    if error is not None:
        raise ClientError(EXIT_UNREACHABLE, f"cannot reach {host}:{port} after {args.retries + 1} attempts "
                                            f"({error}): check the address, that fedpetah-server runs there, and "
                                            "that no firewall blocks the port")
    if args.insecure:
        return
    context = ssl.create_default_context(cafile=str(args.root_certificates) if args.root_certificates else None)
    try:
        with socket.create_connection((host, port), timeout=10) as sock, \
                context.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as err:
        source = args.root_certificates or "the system's CAs"
        raise ClientError(EXIT_CERTIFICATE, f"the certificate of {host}:{port} does not verify against {source}: "
                                            f"{err.verify_message}; get this server's ca.pem from its operator, "
                                            f"or have the server certificate issued for {host!r}") from None
    except (ssl.SSLError, OSError) as err:
        raise ClientError(EXIT_CERTIFICATE, f"no TLS handshake with {host}:{port} ({err}); is the server running "
                                            "with --insecure (then this device needs --insecure too)?") from None


def supernode_command(args: argparse.Namespace, address: str, secret: Path, worker: Path | None = None) -> list[str]:
    data, cache = args.data.expanduser().resolve(), args.cache.expanduser().resolve()
    if "'" in f"{data}{cache}":
        raise ClientError(EXIT_USAGE, "paths for --data and --cache must not contain a single quote")
    node_config = (f"data-dir='{data}' cache-dir='{cache}' cache-keep={args.cache_keep} "
                   f"cache-max-mb={args.cache_max_mb} bank-max-mb={args.bank_max_mb}")
    if worker is not None:
        node_config += f" worker-socket='{worker}' worker-timeout-s={float(args.worker_timeout)}"
    if args.memory_budget_mb is not None:
        node_config += f" memory-budget-mb={float(args.memory_budget_mb)}"
    # Isolation "process": we start the SuperExec ourselves, because only then does Flower 1.42 check the secret
    # (with "subprocess", the default, it ignores it), and without it any local user could take this device's tasks
    command = [executable("flower-supernode"), "--superlink", address, "--port", str(args.runtime_port),
               "--node-config", node_config, "--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    if args.insecure:
        command.append("--insecure")
    elif args.root_certificates is not None:
        command += ["--root-certificates", str(args.root_certificates.expanduser().resolve())]
    if args.auth_key is not None:
        command += ["--auth-supernode-private-key", str(args.auth_key.expanduser().resolve())]
    return command


def explain_exit(returncode: int, output: str, args: argparse.Namespace) -> ClientError | None:
    """Our exit code and advice for a SuperNode that stopped on its own; None for a clean stop."""
    key = args.auth_key
    if any(sign in output for sign in REFUSED):
        return ClientError(EXIT_NODE_KEY, f"the server refused this device's key: register {key}.pub there "
                                          "(put it in the server's nodes/ dir and restart fedpetah-server)")
    if "[code: 2001]" in output:
        return ClientError(EXIT_NODE_KEY, "the server only accepts registered devices: create a key with "
                                          "`python -m server.certificates node-key PATH`, have PATH.pub registered, "
                                          "and pass --auth-key PATH")
    if "Exit Code: 302" in output:
        return ClientError(EXIT_NODE_KEY, f"Flower could not use the node key {key}")
    if "CERTIFICATE_VERIFY_FAILED" in output:
        return ClientError(EXIT_CERTIFICATE, "the server's certificate does not verify (see above)")
    if returncode == 0:
        return None
    return ClientError(EXIT_SUPERNODE, f"Flower's SuperNode exited with code {returncode} (output above)")


def _pump(node: subprocess.Popen[bytes], tail: deque[str]) -> None:
    """Pass the SuperNode's output through, keeping its last lines for :func:`explain_exit`."""
    assert node.stdout is not None
    for raw in node.stdout:
        line = raw.decode(errors="replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line)


SUPEREXEC_POLL_S = "0.1"  # Flower's SuperExec looks for a new message every second by default
SECRET_FILE = "superexec.secret"
RUNTIME_API_S = 60.0  # how long the SuperNode may take to open its local app API


def write_secret(directory: Path) -> Path:
    """A fresh random SuperExec secret in ``directory`` (ours, 0700), readable by us only (0600).

    The SuperNode's local app API (``--runtime-port`` on 127.0.0.1) hands out this device's tasks only to a caller
    that signs with it: our SuperExec. Any other local user is refused (HTTP 401), so cannot pull the server's
    message or push a reply as this device."""
    path = directory / SECRET_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(secrets.token_hex(32).encode())
    return path


def superexec_command(args: argparse.Namespace, secret: Path, parent: int) -> list[str]:
    """Flower's SuperExec for our SuperNode (:mod:`clients.superexec`: task tokens in files of the secret's owner-only
    dir, not on command lines): it takes tasks from the app API (signed with ``secret``) and starts a ClientApp
    process for each; it stops when the SuperNode (``parent``) does."""
    return [sys.executable, "-m", "clients.superexec", "--token-dir", str(secret.parent),
            "--runtime-api-address", f"127.0.0.1:{args.runtime_port}", "--insecure",
            "--superexec-auth-secret-file", str(secret), "--parent-pid", str(parent)]


def supernode(args: argparse.Namespace, address: str, secret: Path, worker: Path | None) -> tuple[int, str] | None:
    """Run Flower's SuperNode and its SuperExec until the SuperNode exits (its code and last output) or we are
    stopped (None)."""
    extra = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
             "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)}
    if args.threads > 0:
        extra["FEDPETAH_TORCH_THREADS"] = str(args.threads)
    env = child_env(extra)
    node = start(supernode_command(args, address, secret, worker), env)
    tail: deque[str] = deque(maxlen=200)
    # Read in a thread and reap the SuperNode as soon as it exits: a process it started could hold our pipe
    # open until it sees its parent gone, which it cannot while the parent is an unreaped zombie.
    pump = threading.Thread(target=_pump, args=(node, tail), daemon=True)
    pump.start()
    runner: subprocess.Popen[bytes] | None = None
    try:
        if wait_for_port("127.0.0.1", args.runtime_port, node, RUNTIME_API_S):
            runner = subprocess.Popen(superexec_command(args, secret, node.pid), env=env, start_new_session=True)
        elif node.poll() is None:
            raise ClientError(EXIT_SUPERNODE, f"the SuperNode did not open its app API on 127.0.0.1:"
                                              f"{args.runtime_port} within {RUNTIME_API_S:g} s")
        returncode = node.wait()
    except KeyboardInterrupt:
        print("fedpetah-client: stopping", file=sys.stderr)
        return None
    finally:
        with signals_ignored():
            if runner is not None:
                stop_tree(runner)
            stop_tree(node)
        pump.join(timeout=15.0)
    return returncode, "".join(tail)


WORKER_READY_S = 600.0  # the worker imports torch before it listens: minutes on a slow device


def worker_command(args: argparse.Namespace, socket_path: Path) -> list[str]:
    return [sys.executable, "-m", "clients.worker", "--socket", str(socket_path),
            "--data", str(args.data.expanduser().resolve()), "--cache", str(args.cache.expanduser().resolve()),
            "--threads", str(args.threads), "--cache-keep", str(args.cache_keep),
            "--cache-max-mb", str(args.cache_max_mb), "--bank-max-mb", str(args.bank_max_mb),
            *([] if args.memory_budget_mb is None else ["--memory-budget-mb", str(float(args.memory_budget_mb))])]


class Supervisor:
    """The device worker: started beside the SuperNode, restarted whenever it dies (after 1 s, doubled per restart
    up to 60 s, back to 1 s once it ran a minute), stopped with its process tree."""

    def __init__(self, command: list[str], socket_path: Path, ready_s: float = WORKER_READY_S) -> None:
        self.command, self.socket, self.ready_s = command, socket_path, ready_s
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._launched = 0.0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def _launch(self) -> None:
        with self._lock:
            if not self._stopping.is_set():  # its output joins ours (the device's log)
                self.process = subprocess.Popen(self.command, env=child_env(), start_new_session=True)
                self._launched = time.monotonic()

    def ready(self, timeout: float) -> bool:
        """Whether the current worker answers a ping within ``timeout`` seconds (False once it exited)."""
        from clients.worker import PING, WorkerUnavailable, call
        from fedpetah.wire.protocol import Records

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                call(self.socket, PING, Records(), timeout_s=10.0)
                return True
            except WorkerUnavailable:
                time.sleep(0.2)
        return False

    def start(self) -> None:
        """Launch the worker and watch it; the SuperNode need not wait (a ClientApp waits for the socket)."""
        self._launch()
        self._watcher.start()

    def _watch(self) -> None:
        delay = 1.0
        while self.process is not None:
            if self.ready(self.ready_s):
                print(f"fedpetah-client: device worker ready on {self.socket}", file=sys.stderr)
            while (code := self.process.poll()) is None:
                if self._stopping.wait(0.5):
                    return
            if self._stopping.is_set():
                return
            if time.monotonic() - self._launched > 60.0:
                delay = 1.0
            print(f"fedpetah-client: the device worker exited with code {code}; restarting it in {delay:.0f} s",
                  file=sys.stderr)
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._launch()
            delay = min(60.0, 2 * delay)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5.0)
        if self.process is not None:
            stop_tree(self.process)


def join(args: argparse.Namespace, address: str) -> int:
    """Run the SuperNode; a refused key is retried ``--key-retries`` times (the server may be registering it)."""
    if not port_is_free("127.0.0.1", args.runtime_port):
        raise ClientError(EXIT_SUPERNODE, f"local port {args.runtime_port} is in use (another fedpetah-client?): "
                                          "pass --runtime-port")
    directory = Path(tempfile.mkdtemp(prefix="fedpetah-"))  # 0700: the secret and the worker's socket are ours
    worker = None if args.no_worker else Supervisor(worker_command(args, directory / "worker.sock"),
                                                    directory / "worker.sock")
    try:
        secret = write_secret(directory)
        if worker is not None:
            worker.start()
        return _join(args, address, secret, None if worker is None else worker.socket)
    finally:
        with signals_ignored():
            if worker is not None:
                worker.stop()
            shutil.rmtree(directory, ignore_errors=True)


def _join(args: argparse.Namespace, address: str, secret: Path, worker: Path | None) -> int:
    attempt = 0
    while True:
        outcome = supernode(args, address, secret, worker)
        if outcome is None:
            return 0
        returncode, output = outcome
        if attempt >= args.key_retries or not any(sign in output for sign in REFUSED):
            error = explain_exit(returncode, output, args)
            if error is not None:
                raise error
            return 0
        delay = min(60.0, 8 * args.backoff * 2**attempt)
        attempt += 1
        print(f"fedpetah-client: the server refused this device's key (not registered yet?); retry "
              f"{attempt}/{args.key_retries} in {delay:.0f} s", file=sys.stderr)
        time.sleep(delay)


def check_and_join(args: argparse.Namespace) -> int:
    """Every check in order (each raises ClientError with its exit code), then join unless ``--check``."""
    try:
        host, port = split_address(args.server)
    except ValueError as err:
        raise ClientError(EXIT_USAGE, f"--server: {err}") from None
    if min(args.retries, args.key_retries, args.cache_max_mb, args.bank_max_mb) < 0 or args.backoff < 0 or \
            args.cache_keep < 1:
        raise ClientError(EXIT_USAGE, "--retries, --key-retries, --backoff, --cache-max-mb and --bank-max-mb must "
                                      "not be negative, --cache-keep must be at least 1")
    if args.memory_budget_mb is not None and not 0 < args.memory_budget_mb <= MAX_BUDGET_MB:
        raise ClientError(EXIT_USAGE, f"--memory-budget-mb must be a positive number of MB (at most {MAX_BUDGET_MB}), "
                                      f"not {args.memory_budget_mb:g}: it is the memory training may take above "
                                      "the device worker's resting footprint")
    if args.insecure:
        if host not in LOOPBACK_HOSTS:
            loopback = ", ".join(sorted(LOOPBACK_HOSTS))
            raise ClientError(EXIT_USAGE, f"--insecure only for a server on this machine ({loopback}), not {host}: "
                                          "without TLS anyone on the way could read and change the backbone and "
                                          "the adapters; pass --root-certificates CA.pem instead")
        warn_insecure("fedpetah-client")
    data = scan_data(args.data.expanduser())
    summary = ", ".join(f"{task} ({sum(c.values())} images, {len(c)} classes)" for task, c in data.items())
    print(f"fedpetah-client: data {summary}", file=sys.stderr)
    free = check_cache(args.cache.expanduser(), args.min_free_mb)
    print(f"fedpetah-client: backbone cache {args.cache} ({free} MB free)", file=sys.stderr)
    check_files(args)
    check_server(host, port, args)
    if args.check:
        print("fedpetah-client: all checks passed", file=sys.stderr)
        return 0
    return join(args, args.server)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:  # offline: no server, no Flower
        from clients.predict import main as predict

        return predict(argv[1:])
    args = parse_args(argv)
    try:
        with sigterm_interrupts():
            return check_and_join(args)
    except ClientError as err:
        print(f"fedpetah-client: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
