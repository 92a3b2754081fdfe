"""The operator's view of a running (or stopped) server: ``<run-dir>/status.json``, rewritten atomically by the
ServerApp whenever it starts a round or waits, and read by ``fedpetah-server status``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpetah.atomic import atomic_write_text

if TYPE_CHECKING:
    from fedpetah.serving.continual import ContinualServer

STATUS_FILE = "status.json"
STATUS_VERSION = 1


def task_states(server: ContinualServer, federated: dict[int, float]) -> list[dict[str, Any]]:
    """Per task: its state (``learned``, ``training``, ``pending``), rounds done, the devices and images that
    hold it, and its latest federated accuracy."""
    per_task, done = server.config.rounds_per_task, server.state.completed_rounds
    rows = []
    for task in server.tasks:
        rounds = max(0, min(per_task, done - task.index * per_task))
        holders = [d for d in server.fleet.devices.values() if d.images(task.index) > 0]
        rows.append({
            "index": task.index, "name": task.name, "classes": list(task.classes),
            "state": "learned" if rounds == per_task else "training" if rounds > 0 else "pending",
            "rounds": rounds, "rounds_total": per_task,
            "devices_with_data": len(holders), "devices_connected_with_data": sum(d.connected for d in holders),
            "images": sum(d.images(task.index) for d in holders),
            "held_out": sum(d.images(task.index, 1) for d in holders),
            "federated_accuracy": federated.get(task.index),
        })
    return rows


def build_status(server: ContinualServer, state: str, waiting_for: str | None,
                 federated: dict[int, float] | None = None, task_free: float | None = None) -> dict[str, Any]:
    """The status document (``state``: ``starting``, ``training``, ``waiting``, ``finished``)."""
    devices = []
    for device in sorted(server.fleet.devices.values(), key=lambda d: d.client):
        record = device.to_json()
        record["connected"] = device.connected
        record["images"] = {str(t): device.images(t) for t in device.holdings}
        record["held_out"] = {str(t): device.images(t, 1) for t in device.holdings}
        devices.append(record)
    return {
        "format_version": STATUS_VERSION,
        "updated": time.time(),
        "pid": os.getpid(),
        "state": state,
        "waiting_for": waiting_for,
        "live": server.live,
        "bank_version": server.state.completed_rounds,
        "completed_rounds": server.state.completed_rounds,
        "min_devices": server.config.min_devices,
        "tasks": task_states(server, federated or {}),
        "federated_task_free_accuracy": task_free,
        "devices": devices,
        "bytes_up": server.state.bytes_up,
        "bytes_down": server.state.bytes_down,
    }


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(status, indent=1, allow_nan=False, default=str))


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The last status a server wrote in ``run_dir`` (None when it wrote none); ValueError when unreadable."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    status = json.loads(path.read_text())
    if not isinstance(status, dict) or status.get("format_version") != STATUS_VERSION:
        raise ValueError(f"{path} is not a fedpetah status file of version {STATUS_VERSION}")
    return status
