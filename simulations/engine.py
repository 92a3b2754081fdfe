"""Run the same ServerApp and ClientApp under Flower's simulation engine (Ray backend), on loopback only."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from fedpetah.attacks import to_env
from fedpetah.experiment import ExperimentConfig, SimulationConfig
from fedpetah.wire.protocol import ATTACK_ENV
from simulations.cluster import Node, check_local, check_nodes, cluster_address, connect, install_everywhere, probe

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

log = logging.getLogger("fedpetah.simulation")

REPO = Path(__file__).resolve().parent.parent


def simulate(config: ExperimentConfig, run_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """One whole federated continual experiment with ``config.clients`` simulated SuperNodes."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray keeps all traffic on 127.0.0.1
    os.environ["FEDPETAH_TORCH_THREADS"] = str(config.simulation.torch_threads)
    os.environ[ATTACK_ENV] = to_env(config.simulation.attack_config())  # read by the simulated ClientApp
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if cache_dir is not None:
        os.environ["FEDPETAH_CACHE"] = str(cache_dir)
    sim = config.simulation
    cluster = cluster_address(sim)
    if cluster is None:
        check_local(sim, os.cpu_count() or 1)
    nodes = _check_cluster(cluster, sim) if cluster else []
    restore_console = _quiet_console()  # before importing Flower: alembic logs its plugins at import
    from flwr.simulation import run_simulation

    from clients.app import app as client_app

    ray_tmp = tempfile.mkdtemp(prefix="fpray-", dir="/tmp" if sys.platform != "win32" else None)
    init_args: dict[str, Any] = {"_temp_dir": ray_tmp, "include_dashboard": False,
                                 "num_cpus": os.cpu_count() or 1, "log_to_driver": True}
    if sim.ray_memory_mb:
        init_args["object_store_memory"] = sim.ray_memory_mb * 2**20
    backend = {"init_args": init_args,
               "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client}}
    summary_path = run_dir / "summary.json"
    restore = _terminate_as_interrupt()
    crashed = threading.Event()
    try:
        if cluster:  # Flower's Ray backend keeps a connection it finds (and then ignores init_args)
            _join_cluster(cluster[0], nodes, config, cache_dir)
        run_simulation(server_app=_server_app(config, run_dir, cache_dir, crashed), client_app=client_app,
                       num_supernodes=config.clients, backend_config=backend)
    except BaseException:
        crashed.set()  # the ServerApp thread ends at its next call to the grid instead of waiting for replies
        raise
    finally:
        _shutdown_ray()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        restore()
        restore_console()
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without a summary in {run_dir}; see the log above")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


def _check_cluster(cluster: tuple[str, str], sim: SimulationConfig) -> list[Node]:
    """The cluster's nodes that fit one client; a ValueError naming the setting within about 30 s otherwise."""
    address, key = cluster
    nodes = check_nodes(probe(address, key), sim, address)
    log.info("Ray cluster at %s (%s): %d node(s) fit a client: %s", address, key, len(nodes),
             ", ".join(f"{n.host} {n.cpus:g} CPU" for n in nodes))
    return nodes


def _join_cluster(address: str, nodes: list[Node], config: ExperimentConfig, cache_dir: Path | None) -> None:
    """Connect with the ClientApp's environment, and put the backbone into each node's own cache."""
    from fedpetah.serving.pipeline import prepare_artifact

    if config.simulation.ray_memory_mb is not None:
        raise ValueError("simulation.ray_memory_mb sizes a local Ray only: on a cluster (RAY_ADDRESS), give "
                         "`ray start --object-store-memory` on each node instead")
    artifact = prepare_artifact(config, cache_dir)  # the ServerApp finds it in the cache
    connect(address, {k: os.environ[k] for k in ("FEDPETAH_TORCH_THREADS", ATTACK_ENV)})
    roots = install_everywhere(artifact, nodes)
    log.info("backbone %s installed on %d node(s) through Ray's object store: %s", artifact.name, len(roots),
             sorted(set(roots.values())))


class _StopWhenCrashed:
    """The ServerApp's grid, which raises once ``crashed`` is set: when Flower's simulation runtime fails (an empty
    actor pool, a lost cluster), Flower ends but leaves the ServerApp's thread running, which would otherwise wait
    for replies that never come and keep the process alive (``reply_timeout_s``, 600 s by default)."""

    def __init__(self, grid: Grid, crashed: threading.Event) -> None:
        self._grid, self._crashed = grid, crashed

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._grid, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._crashed.is_set():
                raise RuntimeError("the simulation runtime ended: stopping the ServerApp")
            return value(*args, **kwargs)

        return call


def _server_app(config: ExperimentConfig, run_dir: Path, cache_dir: Path | None, crashed: threading.Event
                ) -> ServerApp:
    from flwr.serverapp import ServerApp

    from server.app import run

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(cast("Grid", _StopWhenCrashed(grid, crashed)), config, run_dir, cache_dir)

    return app


RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"
"""Ray's FutureWarning at ``ray.init`` about a default we do not rely on (clients get GPUs only by
``simulation.gpus_per_client``, and train on ``train.device``)."""


class _OnceWithReason(logging.Filter):
    """Replaces Flower's multi-line deprecation notice for ``run_simulation`` by one line that says why we use it."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.levelno == logging.WARNING and "`run_simulation` function is deprecated" in record.getMessage()):
            return True
        if not self.shown:
            self.shown = True
            logging.getLogger("fedpetah.simulation").warning(
                "Flower deprecates run_simulation in favour of `flwr run`; fedpetah keeps it for simulations because "
                "it runs our apps in this process with a typed config (`flwr run .` works too, see pyproject.toml)")
        return False


def _quiet_console() -> Callable[[], None]:
    """Our progress and results, not third-party chatter; returns a function that restores what it changed.

    - Flower's logger has its own console handler and also propagates to the root logger (Hydra's handler):
      every Flower line came out twice. It keeps its own handler only, at INFO (its DEBUG lines would drown
      the progress display).
    - alembic logs its plugin set-up at INFO each time Flower's state database starts: WARNING and up only.
    - Flower's deprecation notice for ``run_simulation`` becomes one line with the reason (see
      :class:`_OnceWithReason`); Ray's accelerator FutureWarning (:data:`RAY_ACCELERATOR_TIP`) is ignored.
    """
    flwr, alembic = logging.getLogger("flwr"), logging.getLogger("alembic")
    saved = (flwr.level, flwr.propagate, alembic.level)
    once = _OnceWithReason()
    flwr.setLevel(logging.INFO)
    flwr.propagate = False
    flwr.addFilter(once)
    alembic.setLevel(logging.WARNING)
    warnings_context = warnings.catch_warnings()
    warnings_context.__enter__()
    warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning)

    def restore() -> None:
        warnings_context.__exit__(None, None, None)
        flwr.setLevel(saved[0])
        flwr.propagate = saved[1]
        flwr.removeFilter(once)
        alembic.setLevel(saved[2])

    return restore


def _terminate_as_interrupt() -> Callable[[], None]:
    """Turn SIGTERM into KeyboardInterrupt while Ray runs, so ``finally`` stops Ray's processes too."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
