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
from typing import Any

from fedpetah.attacks import to_env
from fedpetah.experiment import ExperimentConfig
from fedpetah.wire.protocol import ATTACK_ENV

REPO = Path(__file__).resolve().parent.parent


def simulate(config: ExperimentConfig, run_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """One whole federated continual experiment with ``config.clients`` simulated SuperNodes."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray keeps all traffic on 127.0.0.1
    os.environ["FEDPETAH_TORCH_THREADS"] = str(config.simulation.torch_threads)
    os.environ[ATTACK_ENV] = to_env(config.simulation.attack_config())  # read by the simulated ClientApp
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if cache_dir is not None:
        os.environ["FEDPETAH_CACHE"] = str(cache_dir)
    restore_console = _quiet_console()  # before importing Flower: alembic logs its plugins at import
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

    ray_tmp = tempfile.mkdtemp(prefix="fpray-", dir="/tmp" if sys.platform != "win32" else None)
    sim = config.simulation
    init_args: dict[str, Any] = {"_temp_dir": ray_tmp, "include_dashboard": False,
                                 "num_cpus": os.cpu_count() or 1, "log_to_driver": True}
    if sim.ray_memory_mb:
        init_args["object_store_memory"] = sim.ray_memory_mb * 2**20
    backend = {"init_args": init_args,
               "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client}}
    summary_path = run_dir / "summary.json"
    restore = _terminate_as_interrupt()
    try:
        run_simulation(server_app=make_server_app(config, run_dir, cache_dir), client_app=client_app,
                       num_supernodes=config.clients, backend_config=backend)
    finally:
        _shutdown_ray()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        restore()
        restore_console()
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without a summary in {run_dir}; see the log above")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


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
