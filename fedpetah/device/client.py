"""What a client does with each request, whatever carries it (in-process ClientApp, simulation, device worker)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpetah.adapters import ADAPTERS, AdapterConfig
from fedpetah.artifact import ArtifactError
from fedpetah.config import FleetConfig, RouterConfig, TrainConfig
from fedpetah.device.holdout import evaluate_holdout, simulated_holdings, simulated_holdout
from fedpetah.device.keep import BANK_MAX_BYTES, Snapshot, SnapshotError, check_tasks, commit, open_snapshot, stage
from fedpetah.device.local import BackboneCache, simulated_shard, train_task
from fedpetah.device.profile import MemoryBudgetExceeded, MemoryWatch, budget_mb, measure_profile
from fedpetah.routing.export import ExportError
from fedpetah.routing.features import data_stats
from fedpetah.tasks import ImageSet, PartitionConfig, TaskStreamConfig
from fedpetah.wire.evaluation import MAX_CONFUSION_CLASSES, EvaluateReply, EvaluateRequest
from fedpetah.wire.flatconfig import build_dataclass
from fedpetah.wire.protocol import (
    NO_PARTITION,
    HelloReply,
    HelloRequest,
    Status,
    TaskInfo,
    TrainReply,
    TrainRequest,
)

log = logging.getLogger("fedpetah.client")

DataSource = Callable[["TrainSettings"], "ImageSet | None"]
"""Where a client's training images for a request come from: its simulated shard, or a device's own folder."""
HoldoutSource = Callable[["EvaluateSettings", TaskInfo], "ImageSet | None"]
"""A client's held-out images of a learned task, labelled in its class order (None: it holds none)."""
HoldingsSource = Callable[[HelloRequest, TaskInfo], "np.ndarray | None"]
"""A client's (classes, 2) int64 [training, held-out] images per class of a catalogue task (None: none)."""
MAX_EVALUATE_SECONDS = 240.0
"""The longest an evaluation may run (below the ClientApp's wait for the device worker, 300 s)."""


@dataclass(frozen=True)
class TrainSettings:
    """A train request with its config sections rebuilt into (validated) dataclasses."""

    request: TrainRequest
    adapter: AdapterConfig
    train: TrainConfig
    tasks: TaskStreamConfig
    partition: PartitionConfig

    @classmethod
    def of(cls, request: TrainRequest) -> TrainSettings:
        """Typed sections; a section the client cannot build raises ``ValueError``/``TypeError``/``KeyError``."""
        sections = request.sections
        adapter_class = ADAPTERS.get(str(sections["adapter"].get("name"))).config_class
        return cls(request, build_dataclass(adapter_class, sections["adapter"]),
                   build_dataclass(TrainConfig, sections["train"]),
                   build_dataclass(TaskStreamConfig, sections["tasks"]),
                   build_dataclass(PartitionConfig, sections["partition"]))


@dataclass(frozen=True)
class EvaluateSettings:
    """An evaluation request with the config sections a client needs rebuilt into (validated) dataclasses."""

    request: EvaluateRequest
    train: TrainConfig
    tasks: TaskStreamConfig
    partition: PartitionConfig

    @classmethod
    def of(cls, request: EvaluateRequest) -> EvaluateSettings:
        sections = request.sections
        return cls(request, build_dataclass(TrainConfig, sections["train"]),
                   build_dataclass(TaskStreamConfig, sections["tasks"]),
                   build_dataclass(PartitionConfig, sections["partition"]))


@dataclass(frozen=True)
class Sources:
    """Where a client's images come from: training data, held-out data, and the counts of both a hello reports."""

    train: DataSource
    holdout: HoldoutSource = field(default=lambda settings, task: None)
    holdings: HoldingsSource = field(default=lambda request, task: None)


def simulated_sources(partition: int) -> Sources:
    """Simulated client ``partition``: its training shard, its share of each task's test split as its holdout,
    and their class counts (in a hello that carries the run's sections, seed and clients)."""

    def holdout(settings: EvaluateSettings, task: TaskInfo) -> ImageSet | None:
        request = settings.request
        return simulated_holdout(settings.tasks, request.clients, partition, task, request.seed)

    def holdings(request: HelloRequest, task: TaskInfo) -> np.ndarray | None:
        if request.clients < 1 or "tasks" not in request.sections or "partition" not in request.sections:
            return None  # an older server: it sends no stream config with its hello
        stream = build_dataclass(TaskStreamConfig, request.sections["tasks"])
        split = build_dataclass(PartitionConfig, request.sections["partition"])
        return simulated_holdings(stream, split, request.clients, partition, task, request.seed)

    return Sources(simulated_data(partition), holdout, holdings)


def simulated_data(partition: int) -> DataSource:
    """The data source of simulated client ``partition``: its seeded share of the task's training split."""

    def load(settings: TrainSettings) -> ImageSet | None:
        request = settings.request
        return simulated_shard(settings.tasks, settings.partition, request.clients, partition, request.task.index,
                               request.seed)

    return load


_OPENED: dict[tuple[str, str], Snapshot] = {}
"""The last snapshot this process rebuilt for an evaluation that keeps nothing, by (backbone, model.json digest)."""


class ClientRuntime:
    """A client's state across messages: its verified backbone cache, its partition id (simulation) and its
    memory budget for training above its resting footprint (None: what the system can give out, per request)."""

    def __init__(self, cache: BackboneCache, partition: int = NO_PARTITION,
                 bank_max_bytes: int = BANK_MAX_BYTES, memory_budget_mb: float | None = None) -> None:
        if memory_budget_mb is not None and not 0 < memory_budget_mb < float("inf"):
            raise ValueError(f"the memory budget must be a positive number of MB, not {memory_budget_mb}")
        self.cache = cache
        self.partition = partition
        self.bank_max_bytes = bank_max_bytes
        self.memory_budget_mb = memory_budget_mb

    def hello(self, request: HelloRequest, holdings: HoldingsSource | None = None) -> HelloReply:
        """Partition, whether the backbone is cached, and per catalogue task the images held (counts only); a
        task whose images cannot be counted is left out, never an error."""
        held: dict[int, np.ndarray] = {}
        for task in request.tasks:
            if holdings is None:
                break
            try:
                counts = holdings(request, task)
            except (ValueError, TypeError, KeyError, IndexError, OSError, RuntimeError) as error:
                log.warning("cannot count the images of task %r: %s", task.name, error)
                continue
            if counts is not None and counts.shape == (task.num_classes, 2) and int(counts.sum()) > 0:
                held[task.index] = counts.astype(np.int64)
        own = self.budget(request.sections, request.seed, request.clients)
        profile = measure_profile(self.cache, request.digest, own) if request.profile else None
        return HelloReply(self.partition, self.cache.has(request.digest), held, profile)

    def evaluate(self, request: EvaluateRequest, holdout: HoldoutSource) -> EvaluateReply:
        """Install the attached backbone if any; rebuild and verify the snapshot; keep it (``request.keep``);
        count its predictions on the held-out images of every learned task (``request.evaluate``). Every failure
        becomes an error reply, never an exception; a snapshot that cannot be kept is an error."""
        staging, kept = None, False
        try:
            if request.artifact is not None:
                self.cache.install(request.digest, *request.artifact)
            backbone = self.cache.get(request.digest)
            settings = EvaluateSettings.of(request)
            key = (request.digest, hashlib.sha256(request.manifest).hexdigest())  # model.json holds the tensors'
            opened = _OPENED.get(key) if not request.keep else None  # SHA-256: the key names the whole snapshot
            if opened is None:
                staging = stage(self.cache.root, request.model, request.manifest,
                                self.bank_max_bytes if request.keep else None)
                opened = open_snapshot(staging, backbone, request.digest)
            snapshot = opened
            check_tasks(snapshot, request.tasks)
            if request.keep:
                assert staging is not None  # a kept snapshot is always staged afresh
                commit(self.cache.root, staging)
                staging, kept = None, True
            else:  # simulated clients in one process evaluate the same snapshot: rebuilt once per process
                _OPENED.clear()
                _OPENED[key] = snapshot
            counts, confusion = {}, {}
            deadline = time.monotonic() + MAX_EVALUATE_SECONDS
            for position, task in enumerate(request.tasks if request.evaluate else ()):
                data = holdout(settings, task)
                if data is None or len(data) == 0:
                    continue
                counts[task.index], table = evaluate_holdout(snapshot.predictor, position, task, data,
                                                             settings.train.batch_size, deadline)
                if task.num_classes <= MAX_CONFUSION_CLASSES:
                    confusion[task.index] = table
        except ArtifactError as error:
            return EvaluateReply(Status.NEEDS_BACKBONE, str(error), kept=kept)
        except (SnapshotError, ExportError, ValueError, TypeError, KeyError, IndexError, OSError, RuntimeError,
                TimeoutError) as error:
            log.warning("evaluate request failed: %s", error)
            return EvaluateReply(Status.ERROR, f"{type(error).__name__}: {error}", kept=kept)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return EvaluateReply(Status.OK, "", counts, confusion, kept)

    def train(self, request: TrainRequest, data: DataSource) -> TrainReply:
        """Install the attached backbone if any, then train within the memory budget; every failure becomes a
        reply, never an exception: work the budget cannot hold (the request's ``memory_need_mb``, or training
        that grows past it, stopped at the next step) is a ``no-budget`` reply."""
        try:
            if request.artifact is not None:
                self.cache.install(request.digest, *request.artifact)
            settings = TrainSettings.of(request)
            own = self.budget(request.sections, request.seed, request.clients)
            budget, source = budget_mb(own), self._budget_source(own)
            if budget is not None and request.memory_need_mb is not None and request.memory_need_mb > budget:
                return TrainReply(Status.NO_BUDGET, f"this device cannot train this variant: it needs "
                                                    f"{request.memory_need_mb:.0f} MB, the budget is {budget:.0f} MB "
                                                    f"({source})")
            images = data(settings)
            if images is None or len(images) == 0:
                return TrainReply(Status.NO_DATA, f"no training data for task {request.task.name!r}")
            backbone = self.cache.get(request.digest)
            state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in request.state.items()}
            with MemoryWatch(budget_mb(own)) as watch:  # what is available now, data loaded
                trained, metrics = train_task(backbone, settings.adapter, request.task.num_classes, state, images,
                                              settings.train, watch.check)
                stats = None
                if request.stats is not None:  # the task-free router's statistics of this client's data
                    dim, seed, grid = request.stats
                    router = RouterConfig(dim=dim, seed=seed, grid=grid)
                    found = data_stats(backbone, images, request.task.num_classes, router, settings.train.batch_size)
                    stats = {k: v.numpy() for k, v in found.tensors().items()}
            watch.check(step=False)  # the statistics' peak too
        except MemoryBudgetExceeded as error:
            log.warning("train request over the memory budget: %s", error)
            return TrainReply(Status.NO_BUDGET, f"{error} ({self._budget_source(own)})")
        except ArtifactError as error:
            return TrainReply(Status.NEEDS_BACKBONE, str(error))
        except (ValueError, TypeError, KeyError, OSError, RuntimeError) as error:
            log.warning("train request failed: %s", error)
            return TrainReply(Status.ERROR, f"{type(error).__name__}: {error}")
        metrics["backbone-load-seconds"] = self.cache.last_load_seconds
        metrics["peak-memory-above-rest-mb"] = watch.peak_mb
        count = int(metrics.pop("num-examples"))
        return TrainReply(Status.OK, "", {k: v.detach().cpu().contiguous().numpy() for k, v in trained.items()},
                          count, {k: float(v) for k, v in metrics.items()}, stats)

    def budget(self, sections: dict[str, dict[str, object]], seed: int, clients: int) -> float | None:
        """This device's memory budget (None: MemAvailable): a simulated partition of a mixed fleet
        (``fleet=mixed``, the request's ``fleet`` section) has its tier's, every other device its own."""
        if self.partition == NO_PARTITION or "fleet" not in sections or clients < 1:
            return self.memory_budget_mb
        try:
            fleet = build_dataclass(FleetConfig, sections["fleet"])
            simulated = fleet.budget_mb(seed, self.partition, clients)
        except (ValueError, TypeError, KeyError) as error:
            log.warning("ignoring the simulated fleet of the request: %s", error)
            return self.memory_budget_mb
        return self.memory_budget_mb if simulated is None else simulated

    def _budget_source(self, budget: float | None) -> str:
        if budget is None:
            return "MemAvailable"
        return "--memory-budget-mb" if budget == self.memory_budget_mb else "the simulated fleet's tier"
