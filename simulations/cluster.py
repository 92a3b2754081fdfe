"""Run the simulation on an existing Ray cluster: check the address and the nodes first, then connect and put the
backbone artifact into every node's own cache through Ray's object store (no shared file system)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpetah.experiment import SimulationConfig

log = logging.getLogger("fedpetah.simulation")
KEY = "simulation.ray_address"
CONNECT_S = 5.0  # a TCP connection to the cluster's GCS port
PROBE_S = 20.0  # a whole test connection (a Ray driver in a child process), killed after this long
INSTALL_S = 300.0  # putting the artifact into each node's cache (a worker per node imports torch first)

_PROBE = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(json.dumps([{"node": n["NodeID"], "host": n["NodeManagerAddress"], "alive": bool(n["Alive"]),
                   "cpus": n["Resources"].get("CPU", 0.0), "gpus": n["Resources"].get("GPU", 0.0)}
                  for n in ray.nodes()]))
ray.shutdown()
"""


@dataclass(frozen=True)
class Node:
    """One node of the cluster as Ray reports it."""

    node: str
    host: str
    alive: bool
    cpus: float
    gpus: float


def cluster_address(sim: SimulationConfig) -> tuple[str, str] | None:
    """The cluster to run on and the setting that named it: ``simulation.ray_address``, else ``RAY_ADDRESS`` (which
    Ray itself honours); None for a local Ray started (and stopped) by this process."""
    if sim.ray_address:
        return sim.ray_address, KEY
    value = os.environ.get("RAY_ADDRESS", "").strip()
    return (value, f"{KEY} (unset; from RAY_ADDRESS)") if value else None


def check_local(sim: SimulationConfig, cpus: int) -> None:
    """A local Ray of ``cpus`` CPUs must hold one client (Flower's engine would end with an empty actor pool)."""
    if sim.cpus_per_client > cpus:
        raise ValueError(f"simulation.cpus_per_client={sim.cpus_per_client:g} needs more CPUs than this machine "
                         f"has ({cpus}): lower it, or run on a cluster (simulation.ray_address)")


def probe(address: str, key: str = KEY) -> list[Node]:
    """The cluster's nodes, or a ValueError naming ``key`` within about :data:`PROBE_S` + :data:`CONNECT_S` seconds.

    A Ray driver pointed at an open port that is no Ray cluster waits for the GCS for minutes, so the test
    connection runs in a child process that is killed at the deadline; a closed port fails at once."""
    target = address.removeprefix("ray://")
    if address != "auto":
        host, _, port = target.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S):
                pass
        except OSError as error:
            raise ValueError(f"{key}={address!r}: nothing answers at {target} ({error}); start the cluster "
                             f"(`ray start --head`) or fix the address") from None
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, address], env=env, capture_output=True, text=True,
                              timeout=PROBE_S, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{key}={address!r}: no Ray cluster answered within {PROBE_S:.0f} s (is that port a Ray "
                         f"head's GCS port, or ray://host:10001 for Ray Client?)") from None
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        raise ValueError(f"{key}={address!r}: cannot connect to a Ray cluster there: {' | '.join(last)}")
    return [Node(**row) for row in json.loads(done.stdout.strip().splitlines()[-1])]


def check_nodes(nodes: list[Node], sim: SimulationConfig, address: str) -> list[Node]:
    """The alive nodes that fit one client (``simulation.cpus_per_client`` / ``gpus_per_client``); an error that
    names the key when none does (Flower's engine would end with an empty actor pool)."""
    alive = [n for n in nodes if n.alive]
    fits = [n for n in alive if n.cpus >= sim.cpus_per_client and n.gpus >= sim.gpus_per_client]
    if not fits:
        sizes = ", ".join(f"{n.host}: {n.cpus:g} CPU {n.gpus:g} GPU" for n in alive) or "no alive node"
        raise ValueError(f"simulation.cpus_per_client={sim.cpus_per_client:g} (gpus_per_client="
                         f"{sim.gpus_per_client:g}) fits no node of the Ray cluster at {address} ({sizes}): lower "
                         f"it, or start nodes with more CPUs")
    if len(fits) < len(alive):
        log.warning("%d of %d Ray nodes have fewer CPUs than simulation.cpus_per_client=%g and run no client",
                    len(alive) - len(fits), len(alive), sim.cpus_per_client)
    return fits


def connect(address: str, env_vars: dict[str, str]) -> None:
    """Connect this process to the cluster as Flower's Ray backend would (which then keeps this connection), plus
    the environment the simulated ClientApp reads: a cluster's workers inherit their node's environment, not ours.

    Flower 1.42 passes ``backend_config["init_args"]`` to ``ray.init`` next to its own ``runtime_env``, so a
    ``runtime_env`` cannot travel that way; and ``num_cpus``, ``object_store_memory`` and ``_temp_dir`` are
    refused (or make the driver look for a node in the wrong temp dir) when connecting to a cluster."""
    import ray

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **env_vars}},
             log_to_driver=True, logging_level=logging.WARNING)


def install_everywhere(artifact_dir: Path, nodes: list[Node]) -> dict[str, str]:
    """Put the backbone artifact into the simulated clients' cache on each of ``nodes`` (their own disk, where
    ``FEDPETAH_CACHE`` of that node's ``ray start`` points, else ``~/.cache/fedpetah``): the bytes travel once
    through Ray's object store. Returns {node id: cache dir}.

    Without this a client's first train request carries the artifact to whichever node runs that message, and a
    later message of the same client may run on a node that has never seen it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from clients.app import install_backbone
    from fedpetah.artifact import MANIFEST, WEIGHTS, artifact_digest

    digest = artifact_digest(artifact_dir)
    weights, manifest = ray.put((artifact_dir / WEIGHTS).read_bytes()), ray.put((artifact_dir / MANIFEST).read_bytes())
    remote: Any = ray.remote(num_cpus=0)(install_backbone)
    refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node, soft=False)).remote(
        digest, weights, manifest) for n in nodes]
    roots = ray.get(refs, timeout=INSTALL_S)
    return {n.node: str(root) for n, root in zip(nodes, roots, strict=True)}
