"""The live federation end to end on loopback, as processes: fedpetah-server behind its Fleet-only nginx proxy (TLS
from our private CA, registered node keys), fedpetah-client devices with private image folders, tasks declared with
``fedpetah-server task add`` while the server runs, a device that joins late, a SIGKILL of the whole server in the
middle of a task and its ``--resume``, then the operator's status and every device predicting offline.

Addresses: the proxy listens on 127.0.0.2 (the devices' address; the SuperLink stays on 127.0.0.1) and device i
connects *from* 127.0.0.(2 + i): the first three from .2, .3 and .4, the late one from .5. Flower's SuperNode has no
source-address option, so tests/loopback_site/sitecustomize.py binds it in the devices' processes (only for
connections to the proxy); the test checks the source address of each device's live connections, so nginx's
per-address limits see four hosts, as in a real fleet. (The in-process twin, with the hostile evaluation replies,
is tests/test_live.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from loopback import Loopback, running

from server.proxy import ProxyMissing, find_nginx

SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
TASKS = {"mnist_0_1": "0,1", "mnist_2_3": "2,3"}
OVERRIDES = ["tasks=catalog", "rounds_per_task=2", "clients=3", "min_devices=2", "start_wait_s=60",
             "reply_timeout_s=120", "backbone=edgenext_xx_small", "backbone.img_size=32", "backbone.weights=random",
             "pruning=none", "adapter=lora", "train.epochs=4", "train.batch_size=16", "train.max_steps=10",
             "strategy.fraction=1.0"]
PLOTS = {"accuracy_matrix.png", "federated_accuracy_matrix.png", "task_free_matrix.png", "accuracy_per_task.png",
         "bytes_per_round.png"}
MAGIC = (b"\x89PNG", b"\xff\xd8\xff")  # PNG, JPEG
IDLE = "30"  # --exit-when-idle: the start-up waits are start_wait_s's; idle only between tasks and at the end
TIMEOUT = 480.0  # a guard, not a measurement


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Loopback]:
    """Four registered devices, each with its own folder and source address; all stopped, all ports freed."""
    try:
        find_nginx()
    except ProxyMissing as err:
        pytest.fail(f"this test needs nginx (the server's Fleet-only proxy): {err}")
    federation = Loopback(tmp_path, devices=4, per_class=40, sources=SOURCES)
    try:
        yield federation
    finally:
        assert federation.stop(), f"a port of {federation.ports} is still taken after the test"


class Sources:
    """The local addresses of each device's connections to the proxy, sampled at most once a second."""

    def __init__(self, federation: Loopback) -> None:
        self.federation, self.seen, self.last = federation, {d: set[str]() for d in range(4)}, -1.0

    def sample(self) -> None:
        if time.monotonic() - self.last < 1.0:
            return
        self.last, server = time.monotonic(), (self.federation.host, self.federation.port)
        for device in self.seen:
            process = self.federation.processes.get(f"client{device}")
            if process is None or process.poll() is not None:
                continue
            tree: list[psutil.Process] = []
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            for proc in tree:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    self.seen[device] |= {c.laddr.ip for c in proc.net_connections("tcp")
                                          if c.raddr and (c.raddr.ip, c.raddr.port) == server}


class Rounds:
    """The bank's committed rounds as the test sees them over time: they must never go back. Polling samples the
    devices' source addresses too."""

    def __init__(self, federation: Loopback) -> None:
        self.federation, self.seen, self.sources = federation, [0], Sources(federation)

    def now(self) -> int:
        self.sources.sample()
        bank = self.federation.run_dir / "bank" / "bank.json"
        value = int(json.loads(bank.read_text())["metadata"]["run"]["completed_rounds"]) if bank.is_file() else 0
        assert value >= self.seen[-1], f"the bank went back from round {self.seen[-1]} to {value}"
        if value != self.seen[-1]:
            self.seen.append(value)
        return value

    def wait(self, name: str, rounds: int) -> int:
        """Poll until ``rounds`` are committed while server process ``name`` runs; the value seen."""
        deadline = time.monotonic() + TIMEOUT
        while (value := self.now()) < rounds:
            log = self.federation.log(name)[-4000:]
            assert self.federation.processes[name].poll() is None, f"{name} exited at round {value}:\n{log}"
            assert time.monotonic() < deadline, f"round {rounds} not committed after {TIMEOUT:.0f} s:\n{log}"
            time.sleep(0.05)
        return value


def _task_add(federation: Loopback, name: str) -> None:
    done = federation.command("server.entry", "task", "add", name, "--classes", TASKS[name], "--state-dir",
                              str(federation.state))
    assert done.returncode == 0 and f"added task {list(TASKS).index(name)} {name!r}" in done.stdout, done


def _exit_code(federation: Loopback, name: str, rounds: Rounds) -> int:
    deadline = time.monotonic() + TIMEOUT
    while (code := federation.processes[name].poll()) is None:
        rounds.now()
        assert time.monotonic() < deadline, f"{name} still runs after {TIMEOUT:.0f} s:\n{federation.log(name)[-4000:]}"
        time.sleep(0.2)
    return code


def _images_under(root: Path, devices: list[Path]) -> list[Path]:
    """Files under ``root`` that hold a device image's bytes, or are named or shaped (PNG / JPEG magic bytes) as
    images, except the run's own plots (fedpetah.serving.metrics.plot_run)."""
    copies = {hashlib.sha256(p.read_bytes()).digest() for d in devices for p in d.rglob("*") if p.is_file()}
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            shaped = path.suffix.lower() in (".png", ".jpg", ".jpeg") or content.startswith(MAGIC)
            if hashlib.sha256(content).digest() in copies or shaped and path.name not in PLOTS:
                found.append(path)
    return found


@pytest.mark.slow
def test_live_federation_through_the_proxy_new_task_late_device_sigkill_and_resume(live: Loopback) -> None:
    # Prepare: task A declared through the CLI as an operator would; three devices, then the server
    _task_add(live, "mnist_0_1")
    for device in range(3):
        live.start_client(device)
    live.start_server("server", OVERRIDES, "--exit-when-idle", IDLE)
    rounds = Rounds(live)

    # Execute: task A trains; task B is declared while the server runs and a fourth device joins during it
    rounds.wait("server", 2)
    _task_add(live, "mnist_2_3")
    added = time.time()
    live.start_client(3)
    # The whole server (nginx, signature check, SuperLink, SuperExec, ServerApp) is SIGKILLed once task B's first
    # round is committed, its second still in flight
    assert rounds.wait("server", 3) == 3, f"round 4 was committed before the kill:\n{live.log('server')[-3000:]}"
    serverapp = json.loads((live.run_dir / "status.json").read_text())["pid"]
    killed = live.kill("server")
    assert serverapp in killed and not any(running(pid) for pid in killed), (serverapp, killed)
    assert rounds.now() == 3
    live.start_server("resumed", OVERRIDES, "--resume", "--exit-when-idle", IDLE)
    assert _exit_code(live, "resumed", rounds) == 0, live.log("resumed")[-4000:]  # idle after task B: exit 0

    # Assert: each device connected from its own address; every committed round kept, each recorded once
    assert rounds.sources.seen == {device: {SOURCES[device]} for device in range(4)}, rounds.sources.seen
    assert rounds.seen == [0, 1, 2, 3, 4], rounds.seen  # never back (and no round skipped between the polls)
    metrics = (live.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in metrics] == [1, 2, 3, 4]
    # federated accuracy from the devices' held-out images: above chance for both tasks, also after task B
    summary = json.loads((live.run_dir / "summary.json").read_text())
    matrix = summary["federated_accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix), matrix
    assert all(v is not None and v > 0.5 for v in (matrix[0][0], matrix[1][0], matrix[1][1])), matrix
    assert summary["federated_task_free_accuracy"] > 0.25  # four classes
    # the operator's view: four devices, both tasks learned, the late device trained in task B, all keep both
    shown = live.command("server.entry", "status", "--state-dir", str(live.state), "--json")
    assert shown.returncode == 0, shown
    status = json.loads(shown.stdout)
    registered = dict(re.findall(r"registered (node\d+)\.pub as node (\d+)", live.log("server")))
    nodes = [int(registered[f"node{device}"]) for device in range(4)]
    devices = {d["client"]: d for d in status["devices"]}
    assert sorted(devices) == sorted(nodes) and not status["running"], status
    assert [(t["name"], t["state"]) for t in status["tasks"]] == [(n, "learned") for n in TASKS], status["tasks"]
    assert all(d["kept_version"] == 4 for d in devices.values())
    assert [devices[n]["first_seen"] > added for n in nodes] == [False, False, False, True]
    late = devices[nodes[3]]
    files = {str(task): len(list((live.data[3] / name).rglob("*.png"))) for task, name in enumerate(TASKS)}
    assert late["rounds_trained"] >= 1 and {t: late["images"][t] + late["held_out"][t] for t in files} == files
    # every device labels one of its own images offline, with the tasks it keeps
    labels = {f"{task}/{label}" for task, classes in TASKS.items() for label in classes.split(",")}
    for device, data in enumerate(live.data):
        image = min((data / "mnist_2_3" / "3").glob("*.png"))
        done = live.command("clients.cli", "predict", "--cache", str(live.cache(device)), str(image))
        assert done.returncode == 0, done
        [line] = done.stdout.splitlines()
        assert json.loads(line)["label"] in labels, line
    # raw data never left the devices: no image anywhere under the server's state dir
    assert _images_under(live.state, live.data) == []
