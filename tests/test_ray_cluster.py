"""Simulation on an existing Ray cluster (simulation.ray_address): a real 2-node cluster on loopback, and bad input."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import pytest
import torch

from fedpetah.adapters import adapter_config
from fedpetah.bank import AdapterBank
from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig, WarmupConfig
from fedpetah.experiment import ExperimentConfig, SimulationConfig, StrategyConfig
from fedpetah.tasks import PartitionConfig, TaskStreamConfig

RAY = str(Path(sys.executable).with_name("ray"))
NETNS = "FEDPETAH_RAY_NETNS"  # set by test_two_node_cluster_in_a_private_network_namespace for the run inside it
INNER_S = 1500  # the inner pytest: two simulations and a 2-node cluster on a shared 2-core machine
IN_NETNS = ("test_too_few_cpus_per_node_names_the_key", "test_clients_run_on_both_nodes_and_the_bank_equals_one_nodes")


def _config(**simulation: object) -> ExperimentConfig:
    return ExperimentConfig(
        clients=4, rounds_per_task=2,
        backbone=BackboneConfig(name="efficientvit_b0", img_size=32, warmup=WarmupConfig(epochs=2)),
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("lora", rank=2),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=1), partition=PartitionConfig(name="iid"),
        train=TrainConfig(epochs=1, batch_size=32, max_steps=6, loss="cross_entropy"),
        strategy=StrategyConfig(fraction=1.0, min_clients=4),
        simulation=SimulationConfig(cpus_per_client=1.0, **simulation),  # type: ignore[arg-type]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_address_fails_fast_naming_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from simulations import cluster
    from simulations.engine import simulate

    started = time.monotonic()
    with pytest.raises(ValueError, match=r"simulation\.ray_address='127\.0\.0\.1:\d+': nothing answers"):
        simulate(_config(ray_address=f"127.0.0.1:{_free_port()}"), tmp_path / "closed")
    assert time.monotonic() - started < 10
    monkeypatch.setattr(cluster, "PROBE_S", 6.0)  # an open port that is no Ray cluster: Ray itself waits minutes
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"simulation\.ray_address=.*no Ray cluster answered within 6 s"):
            simulate(_config(ray_address=address), tmp_path / "open")
    assert time.monotonic() - started < 15
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")  # Ray's own variable names the cluster too
    with pytest.raises(ValueError, match=r"simulation\.ray_address \(unset; from RAY_ADDRESS\)"):
        simulate(_config(), tmp_path / "env")
    assert not (tmp_path / "closed" / "summary.json").exists()


def test_address_and_local_cpus_are_checked_naming_the_key(tmp_path: Path) -> None:
    from simulations.engine import simulate

    for bad in ("localhost", "ray://head", "head:99999", "http://head:6379"):
        with pytest.raises(ValueError, match=r"simulation\.ray_address must be"):
            SimulationConfig(ray_address=bad)
    with pytest.raises(ValueError, match=r"simulation\.ray_memory_mb sizes a local Ray only"):
        SimulationConfig(ray_address="auto", ray_memory_mb=512)
    with pytest.raises(ValueError, match=r"simulation\.cpus_per_client=64 needs more CPUs"):
        simulate(replace(_config(), simulation=SimulationConfig(cpus_per_client=64)), tmp_path / "run")


@dataclass
class Cluster:
    address: str
    caches: dict[str, Path]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to one ``ray start --block`` process group (it stops its node), then kill whatever that node
    started and left running (only its own descendants)."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    for leftover in tree:
        with contextlib.suppress(psutil.Error):
            leftover.kill()


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    """A head and a second node, 1 CPU each, each with its own temp dir and its own FEDPETAH_CACHE.

    Only inside a private network namespace whose one interface is its loopback: Ray 2.55 lets a second node join
    only with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` unset or 1, and such a node advertises the machine's outbound
    address (``--node-ip-address 127.0.0.1`` is rewritten) and its servers listen beyond loopback. In a namespace
    that has no other address every Ray socket is on its 127.0.0.1, and nothing outside the namespace reaches it.
    Both nodes are stopped at the end, even on failure, through their own process groups (never ``ray stop``,
    which stops every Ray on the machine)."""
    if os.environ.get(NETNS) != "1":
        pytest.skip("runs inside the network namespace that "
                    "test_two_node_cluster_in_a_private_network_namespace creates")
    interfaces = sorted(name for _, name in socket.if_nameindex())
    assert interfaces == ["lo"], f"{NETNS}=1 but this network namespace has {interfaces}: Ray would listen on them"
    from simulations.cluster import probe

    root = Path(tempfile.mkdtemp(prefix="fpc", dir="/tmp"))  # short: Ray's socket paths live under the temp dirs
    port, processes = _free_port(), []
    caches = {name: root / f"cache-{name}" for name in ("head", "second")}
    temps = [str(root / "t-head"), str(root / "t-second")]
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        processes.append(subprocess.Popen(
            [RAY, "start", "--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", temps[0],
             *common], env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                            "FEDPETAH_CACHE": str(caches["head"])},
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                probe(address)
                break
            except ValueError:
                time.sleep(1)
        processes.append(subprocess.Popen(
            [RAY, "start", "--address", address, "--temp-dir", temps[1], *common],
            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "FEDPETAH_CACHE": str(caches["second"])},
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while time.monotonic() < deadline and len([n for n in probe(address) if n.alive]) < 2:
            time.sleep(1)
        assert len([n for n in probe(address) if n.alive]) == 2, "the second Ray node did not join within 90 s"
        yield Cluster(address, caches)
    finally:
        for process in reversed(processes):
            _stop(process)
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.slow
def test_too_few_cpus_per_node_names_the_key(two_nodes: Cluster, tmp_path: Path) -> None:
    from simulations.engine import simulate

    with pytest.raises(ValueError, match=r"simulation\.cpus_per_client=2 .*fits no node of the Ray cluster"):
        simulate(replace(_config(), simulation=SimulationConfig(cpus_per_client=2, ray_address=two_nodes.address)),
                 tmp_path / "run")


@pytest.mark.slow
def test_clients_run_on_both_nodes_and_the_bank_equals_one_nodes(two_nodes: Cluster, tmp_path: Path,
                                                                  cache_dir: Path) -> None:
    from fedpetah.artifact import WEIGHTS
    from simulations.engine import simulate

    simulate(_config(), tmp_path / "local", cache_dir)
    simulate(_config(ray_address=two_nodes.address), tmp_path / "cluster", cache_dir)

    local, spread = (AdapterBank.load(tmp_path / name / "bank") for name in ("local", "cluster"))
    assert local.tasks() == spread.tasks() == [0] and local[0].version == spread[0].version == 2
    assert local[0].state.keys() == spread[0].state.keys()
    for key, value in local[0].state.items():
        torch.testing.assert_close(spread[0].state[key], value, rtol=0, atol=0)
    for name, cache in two_nodes.caches.items():  # each node's own cache, which nothing but Ray filled
        installed = [d for d in (cache / "backbones").iterdir() if (d / WEIGHTS).is_file()]
        assert len(installed) == 1, name
        used = installed[0].stat().st_mtime - (installed[0] / WEIGHTS).stat().st_mtime
        assert used > 0.5, f"no client used the backbone on the {name} node"  # BackboneCache.get stamps the dir


def _netns_missing() -> str | None:
    """What keeps this process from making a private network namespace with its loopback up; None if nothing."""
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` ({package}) is not installed"
    done = subprocess.run(["unshare", "--net", "--", "ip", "link", "set", "lo", "up"], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        return f"`unshare --net` failed ({done.stderr.strip()}): it needs root or CAP_SYS_ADMIN"
    return None


def _in_namespace(namespace: str) -> list[psutil.Process]:
    """Every process in the network namespace ``namespace`` (the target of a ``/proc/PID/ns/net`` link)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{process.pid}/ns/net") == namespace:
                found.append(process)
    return found


@pytest.mark.slow
def test_two_node_cluster_in_a_private_network_namespace(tmp_path: Path) -> None:
    """The tests on ``two_nodes`` run in a pytest of their own inside a fresh network namespace: they must pass
    there (not skip), and leave no process behind in it; whatever is left, also after a timeout, is killed."""
    missing = _netns_missing()
    if missing:
        pytest.skip(f"the 2-node Ray cluster stays on loopback only in a private network namespace: {missing}")
    outside = os.readlink("/proc/self/ns/net")
    inner = " ".join(shlex.quote(f"tests/test_ray_cluster.py::{name}") for name in IN_NETNS)
    command = f"ip link set lo up && exec {shlex.quote(sys.executable)} -m pytest -q -p no:cacheprovider {inner}"
    output = tmp_path / "inner.log"
    with output.open("wb") as out:
        run = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", command], cwd=Path(__file__).parents[1],
                               env={**os.environ, NETNS: "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                               stdout=out, stderr=subprocess.STDOUT)
    namespace, left = outside, []
    try:
        deadline = time.monotonic() + 30
        while namespace == outside and run.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                namespace = os.readlink(f"/proc/{run.pid}/ns/net")
            time.sleep(0.05)
        assert namespace != outside, "the inner pytest never entered its own network namespace"
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(INNER_S)
    finally:
        if namespace != outside:
            left = [p for p in _in_namespace(namespace) if p.pid != run.pid]
            for process in [*left, psutil.Process(run.pid)] if run.poll() is None else left:
                with contextlib.suppress(psutil.Error):
                    process.kill()
        run.wait(30)
    text = output.read_text(errors="replace")
    assert run.returncode == 0, text[-6000:]
    assert re.search(r"\b2 passed\b", text) and "skipped" not in text, text[-6000:]
    assert not left, f"left running in the namespace: {[p.pid for p in left]}"


@pytest.mark.slow
def test_a_crashed_runtime_does_not_leave_the_server_waiting(tmp_path: Path, cache_dir: Path) -> None:
    from simulations.engine import simulate

    config = replace(_config(), reply_timeout_s=600.0, simulation=SimulationConfig(gpus_per_client=1.0))
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU (Flower's actor pool is then empty)")
    with pytest.raises(RuntimeError):
        simulate(config, tmp_path / "run", cache_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _server_threads():
        time.sleep(0.5)
    assert not _server_threads()


def _server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "server_th" in t.name and t.is_alive()]
