"""Starting and stopping Flower's own processes for fedpetah-server / fedpetah-client: executables, environment,
ports, reachability with bounded retries, and stopping a whole process tree (Flower detaches its SuperExec)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psutil

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def executable(name: str) -> str:
    """A Flower console script next to this interpreter (a venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH; is flwr installed?")
    return found


FLWR_INHERITED = frozenset({"FLWR_HOME", "FLWR_LOG_LEVEL", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK",
                            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"})
"""The only ``FLWR_*`` variables our environment passes on to Flower's processes. Flower reads others that open
ports or change security (``FLWR_INTERNAL_GRPC_CONTROL_API=1`` starts the SuperLink's gRPC Control API outside the
proxy, ``FLWR_INTERNAL_GRPC_FLEET_API``, ``FLWR_OIDC_ENABLED``, ``FLWR_DATABASE``, ``FLWR_TRACING_ENABLED`` ...);
those are dropped, whatever the shell or unit that started us sets. ``extra`` still sets any name."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: our interpreter's bin/ first on PATH (Flower starts
    ``flower-superexec`` and the app processes by name), unbuffered output, Ray kept on loopback, and of the
    inherited ``FLWR_*`` variables only :data:`FLWR_INHERITED`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_") or k in FLWR_INHERITED}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.update(extra or {})
    return env


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` into (host, port); raises ValueError with the expected form."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (e.g. 192.168.1.10:8000), got {address!r}")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def reachable(host: str, port: int, timeout: float = 3.0) -> OSError | None:
    """None if a TCP connection to host:port opens, else the error."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return err


def connect_with_retries(host: str, port: int, retries: int, backoff: float,
                         on_retry: Callable[[int, float, OSError], None] | None = None) -> OSError | None:
    """Try ``retries + 1`` times, waiting ``backoff * 2**i`` (at most 30 s) between tries; the last error or None."""
    error: OSError | None = None
    for attempt in range(retries + 1):
        error = reachable(host, port)
        if error is None:
            return None
        if attempt < retries:
            delay = min(30.0, backoff * 2**attempt)
            if on_retry is not None:
                on_retry(attempt + 1, delay, error)
            time.sleep(delay)
    return error


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """Wait until host:port accepts connections; False on timeout or when ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reachable(host, port, timeout=1.0) is None:
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def start(command: list[str], env: Mapping[str, str], log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session (so a terminal's Ctrl-C reaches us, and we stop it in order);
    output goes to ``log_path`` (appended) or a pipe the caller reads."""
    if log_path is None:
        return subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(command, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_tree(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM ``process`` and every descendant (including detached ones), SIGKILL what is left after ``grace``."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5.0)
    try:
        process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def warn_insecure(program: str) -> None:
    """The loud banner of ``--insecure``."""
    line = "!" * 78
    print(f"{line}\n{program}: INSECURE: no TLS and no node authentication. Everything, including model updates,\n"
          f"travels in clear text and any process that reaches the port can join. Loopback demos only.\n{line}",
          file=sys.stderr)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside the block (cleanup that must finish once started)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM (systemd stop, kill) raises KeyboardInterrupt, so ``finally`` blocks stop children."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
