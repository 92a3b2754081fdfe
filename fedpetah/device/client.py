"""What a client does with each request, whatever carries it (in-process ClientApp, simulation, device worker)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedpetah.adapters import ADAPTERS, AdapterConfig
from fedpetah.artifact import ArtifactError
from fedpetah.config import RouterConfig, TrainConfig
from fedpetah.device.local import BackboneCache, simulated_shard, train_task
from fedpetah.routing.features import data_stats
from fedpetah.tasks import ImageSet, PartitionConfig, TaskStreamConfig
from fedpetah.wire.flatconfig import build_dataclass
from fedpetah.wire.protocol import NO_PARTITION, HelloReply, HelloRequest, Status, TrainReply, TrainRequest

log = logging.getLogger("fedpetah.client")

DataSource = Callable[["TrainSettings"], "ImageSet | None"]
"""Where a client's training images for a request come from: its simulated shard, or a device's own folder."""


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


def simulated_data(partition: int) -> DataSource:
    """The data source of simulated client ``partition``: its seeded share of the task's training split."""

    def load(settings: TrainSettings) -> ImageSet | None:
        request = settings.request
        return simulated_shard(settings.tasks, settings.partition, request.clients, partition, request.task.index,
                               request.seed)

    return load


class ClientRuntime:
    """A client's state across messages: its verified backbone cache and its partition id (simulation)."""

    def __init__(self, cache: BackboneCache, partition: int = NO_PARTITION) -> None:
        self.cache = cache
        self.partition = partition

    def hello(self, request: HelloRequest) -> HelloReply:
        return HelloReply(self.partition, self.cache.has(request.digest))

    def train(self, request: TrainRequest, data: DataSource) -> TrainReply:
        """Install the attached backbone if any, then train; every failure becomes a reply, never an exception."""
        try:
            if request.artifact is not None:
                self.cache.install(request.digest, *request.artifact)
            settings = TrainSettings.of(request)
            images = data(settings)
            if images is None or len(images) == 0:
                return TrainReply(Status.NO_DATA, f"no training data for task {request.task.name!r}")
            backbone = self.cache.get(request.digest)
            state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in request.state.items()}
            trained, metrics = train_task(backbone, settings.adapter, request.task.num_classes, state, images,
                                          settings.train)
            stats = None
            if request.stats is not None:  # the task-free router's statistics of this client's data
                dim, seed, grid = request.stats
                router = RouterConfig(dim=dim, seed=seed, grid=grid)
                found = data_stats(backbone, images, request.task.num_classes, router)
                stats = {k: v.numpy() for k, v in found.tensors().items()}
        except ArtifactError as error:
            return TrainReply(Status.NEEDS_BACKBONE, str(error))
        except (ValueError, TypeError, KeyError, OSError, RuntimeError) as error:
            log.warning("train request failed: %s", error)
            return TrainReply(Status.ERROR, f"{type(error).__name__}: {error}")
        metrics["backbone-load-seconds"] = self.cache.last_load_seconds
        count = int(metrics.pop("num-examples"))
        return TrainReply(Status.OK, "", {k: v.detach().cpu().contiguous().numpy() for k, v in trained.items()},
                          count, {k: float(v) for k, v in metrics.items()}, stats)

