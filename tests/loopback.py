"""A whole federation on loopback (for tests, benchmarks and demos): a private CA, device keys, image folders from
the offline MNIST sample, ``fedpetah-server`` and ``fedpetah-client`` processes on free ports, all stopped together
(process trees included) by :meth:`Loopback.stop`. Devices use 127.0.0.2, where only the server's nginx proxy
listens (the Fleet API); the SuperLink and everything else stay on 127.0.0.1. With ``sources`` each device also
connects from an address of its own (tests/loopback_site/sitecustomize.py), as devices on separate hosts do."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import psutil

from flower_glue.launch import child_env, executable, free_port, port_is_free, start, stop_tree
from server.bundle import REPO
from server.certificates import TlsFiles, make_node_key, make_tls, server_files


def start_superlink(root: Path, host: str, database: str) -> tuple[subprocess.Popen[bytes], TlsFiles, int]:
    """A bare SuperLink with TLS (a private CA in ``root/certs`` whose certificate names ``host``) and node
    authentication on a free port of 127.0.0.1, its log ``root/superlink.log``: (process, certificates, port).
    The caller waits for its port and stops it (``stop_tree``)."""
    make_tls(root / "certs", [host])
    certs, port = server_files(root / "certs"), free_port()
    env = child_env({"FLWR_HOME": str(root / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "FLWR_TELEMETRY_ENABLED": "0"})
    link = start([executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--database",
                  database, "--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert),
                  "--ssl-keyfile", str(certs.key), "--enable-supernode-auth",
                  "--disable-runtime-dependency-installation"], env, root / "superlink.log")
    return link, certs, port


def write_device_data(root: Path, clients: int, per_class: int, num_tasks: int = 2) -> list[Path]:
    """``root/c<i>/<task>/<class>/*.png`` from split MNIST's training images: device i gets images i, i+clients, ..."""
    from PIL import Image

    from fedpetah.tasks import TaskStreamConfig, build_stream

    dirs = [root / f"c{i}" for i in range(clients)]
    for task in build_stream(TaskStreamConfig(name="split_mnist", num_tasks=num_tasks)):
        counts: dict[tuple[int, int], int] = {}
        for index in range(len(task.train)):
            client, label = index % clients, int(task.train.labels[index])
            if counts.get((client, label), 0) == per_class:
                continue
            counts[(client, label)] = counts.get((client, label), 0) + 1
            folder = dirs[client] / task.name / task.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(task.train.images[index, 0].numpy()).save(folder / f"{index}.png")
    return dirs


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


SOURCE_SITE = Path(__file__).with_name("loopback_site")  # its sitecustomize binds a device's source address


class Loopback:
    """Certificates, keys (the first ``registered`` of ``devices`` are registered), data and processes in ``root``;
    devices connect to ``host`` (127.0.0.1: straight to the SuperLink, no proxy), device i from ``sources[i]`` when
    given (a loopback address of its own; else the kernel's choice, 127.0.0.1)."""

    def __init__(self, root: Path, devices: int, registered: int | None = None, per_class: int = 40,
                 num_tasks: int = 2, host: str = "127.0.0.2", sources: Sequence[str] = ()) -> None:
        if sources and len(sources) != devices:
            raise ValueError(f"{len(sources)} source addresses for {devices} devices")
        self.root, self.state, self.host, self.sources = root, root / "state", host, list(sources)
        self.run_dir = self.state / "run"
        make_tls(self.state / "certs", [host])
        self.keys = [make_node_key(root / "keys" / f"node{i}")[0] for i in range(devices)]
        (self.state / "nodes").mkdir(parents=True, exist_ok=True)
        for key in self.keys[: devices if registered is None else registered]:
            (self.state / "nodes" / f"{key.name}.pub").write_bytes(key.with_name(f"{key.name}.pub").read_bytes())
        self.data = write_device_data(root / "data", devices, per_class, num_tasks)
        self.port, self.superlink_port = free_port(host), free_port()
        self.runtime_ports = [free_port() for _ in range(devices)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def ports(self) -> list[tuple[str, int]]:
        """Every (host, port) the federation's processes listen on."""
        return [(self.host, self.port), *(("127.0.0.1", p) for p in [self.superlink_port, *self.runtime_ports])]

    def cache(self, device: int) -> Path:
        return self.root / f"cache{device}"

    def _start(self, name: str, module: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        environment = child_env({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                                 "FLWR_TELEMETRY_ENABLED": "0", **env})
        process = start([sys.executable, "-m", module, *args], environment, self.root / "logs" / f"{name}.log")
        self.processes[name] = process
        return process

    def start_server(self, name: str, overrides: list[str], *extra: str, module: str = "server.cli",
                     **env: str) -> subprocess.Popen[bytes]:
        """fedpetah-server (``module``: a wrapper taking the same arguments, e.g. benchmarks/flood.py's)."""
        args = ["--state-dir", str(self.state), "--host", self.host, "--port", str(self.port),
                "--superlink-port", str(self.superlink_port), *extra, *overrides]
        return self._start(name, module, args, **env)

    def start_client(self, device: int, *extra: str) -> subprocess.Popen[bytes]:
        source = {}
        if self.sources:  # every Python process of this device (its supervisor, SuperNode, worker) binds it
            source = {"PYTHONPATH": f"{SOURCE_SITE}:{REPO}",
                      "FEDPETAH_LOOPBACK_SOURCE": f"{self.sources[device]} {self.host} {self.port}"}
        return self._start(f"client{device}", "clients.cli", [
            "--server", f"{self.host}:{self.port}", "--data", str(self.data[device]),
            "--root-certificates", str(self.state / "certs" / "ca.pem"), "--auth-key", str(self.keys[device]),
            "--cache", str(self.cache(device)), "--runtime-port", str(self.runtime_ports[device]),
            "--retries", "20", "--backoff", "0.25", "--threads", "1", *extra,
        ], FLWR_HOME=str(self.root / f"flwr{device}"), **source)

    def command(self, module: str, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m module args`` to its end as an operator or a device owner would (``server.entry task
        add ...``, ``clients.cli predict ...``): its exit code, stdout and stderr."""
        environment = child_env({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        return subprocess.run([sys.executable, "-m", module, *args], env=environment, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def kill(self, name: str) -> set[int]:
        """SIGKILL process ``name`` and all its descendants, with no chance of a graceful shutdown (a power cut):
        the tree is frozen with SIGSTOP until no new process appears, then killed at once; the pids killed."""
        frozen: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            frozen[self.processes[name].pid] = psutil.Process(self.processes[name].pid)
        while True:
            for proc in list(frozen.values()):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.suspend()
            found = {}
            for proc in list(frozen.values()):
                with contextlib.suppress(psutil.NoSuchProcess):
                    found.update({child.pid: child for child in proc.children(recursive=True)})
            if found.keys() <= frozen.keys():
                break
            frozen.update(found)
        for proc in frozen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.processes[name].wait(timeout=10.0)
        deadline = time.monotonic() + 10.0  # the others are not our children: a zombie counts as gone
        while any(running(pid) for pid in frozen) and time.monotonic() < deadline:
            time.sleep(0.1)
        return set(frozen)

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait(self, name: str, timeout: float) -> int | None:
        """The exit code of process ``name``, or None if it still runs after ``timeout`` seconds."""
        try:
            return self.processes[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, port_timeout: float = 20.0) -> bool:
        """Stop every process and its descendants; True once every port is free again."""
        for process in self.processes.values():
            stop_tree(process, grace=10.0)
        deadline = time.monotonic() + port_timeout
        while not all(port_is_free(host, port) for host, port in self.ports):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
