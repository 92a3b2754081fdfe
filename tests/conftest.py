"""Shared fixtures: offline environment, tiny random backbones, a temporary cache."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedpetah.backbone import Backbone, build_backbone  # noqa: E402
from fedpetah.config import BackboneConfig  # noqa: E402
from fedpetah.wire.protocol import Records  # noqa: E402

_BACKBONES: dict[tuple[str, int], Backbone] = {}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the tests' tiny models gain nothing from a second, which only spins on a shared machine
    (measured: a LoRA training step 0.15 s on one thread, 0.7 s on two with the other core busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fedpetah-cache")
    os.environ["FEDPETAH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone() -> Callable[..., Backbone]:
    """``tiny_backbone(name, img_size)``: a random-weight backbone, built once per session; by default the tiny
    test hybrid ``test_efficientvit`` (fedpetah/backbone/tiny.py), for tests that need a hybrid but no real family."""

    def make(name: str = "test_efficientvit", img_size: int = 32) -> Backbone:
        key = (name, img_size)
        if key not in _BACKBONES:
            _BACKBONES[key] = build_backbone(BackboneConfig(name=name, img_size=img_size, weights="random"))
        return _BACKBONES[key]

    return make


@pytest.fixture(scope="session")
def malform() -> Callable[[Records, str], Records]:
    """``malform(records, change)``: a valid ok train reply broken as a hostile client would (see ``_malform``)."""
    return _malform


def _malform(records: Records, change: str) -> Records:
    """``records`` (a valid ok train reply) broken in the way ``change`` names, as a hostile client would."""
    metrics, arrays = records.metrics["metrics"], records.arrays["adapter"]
    if change == "no-status":
        del records.configs["status"]
    elif change == "status-unknown":
        records.configs["status"]["status"] = "great"
    elif change == "status-number":
        records.configs["status"]["status"] = 1
    elif change == "no-metrics":
        del records.metrics["metrics"]
    elif change == "metrics-as-config":
        records.configs["metrics"] = {"num-examples": "10"}
        del records.metrics["metrics"]
    elif change.startswith("count="):
        metrics["num-examples"] = {"nan": math.nan, "inf": math.inf, "neg": -5, "zero": 0, "bool": True,
                                   "float": 10.0, "huge": 10**12, "list": [1, 2]}[change[6:]]
    elif change == "loss-nan":
        metrics["train-loss"] = math.nan
    elif change == "loss-list":
        metrics["train-loss"] = [0.1, 0.2]
    elif change == "too-many-metrics":
        metrics.update({f"m{i}": 1.0 for i in range(40)})
    elif change == "no-adapter":
        del records.arrays["adapter"]
    elif change == "missing-key":
        del arrays[sorted(arrays)[-1]]
    elif change == "non-finite":
        key = sorted(arrays)[0]
        arrays[key] = np.full_like(arrays[key], np.nan)
    elif change == "extra-key":
        arrays["backbone.evil"] = np.zeros(1, np.float32)
    elif change == "shape":
        key = sorted(arrays)[0]
        arrays[key] = np.zeros((*arrays[key].shape, 2), np.float32)
    elif change == "dtype":
        key = sorted(arrays)[0]
        arrays[key] = arrays[key].astype(np.float64)
    elif change == "object-dtype":
        key = sorted(arrays)[0]
        arrays[key] = np.full(arrays[key].shape, "a")
    else:
        raise AssertionError(change)
    return records


@pytest.fixture
def server_app_identity() -> Iterator[None]:
    """What Flower's runtime sets in a ServerApp process before the app creates messages (for tests that run the
    ServerApp in this process), restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
