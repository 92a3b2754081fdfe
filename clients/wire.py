"""The message protocol between our ServerApp and ClientApp: names, and record <-> tensor conversion."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpetah.adapters import ADAPTERS, AdapterConfig
from fedpetah.config import TrainConfig
from fedpetah.flatconfig import build_dataclass, flatten, unflatten
from fedpetah.tasks import PartitionConfig, TaskStreamConfig

HELLO, INSTALL, TRAIN = "query.hello", "query.install", "train"
NO_PARTITION = -1


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def bytes_to_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8))})


def record_to_bytes(record: ArrayRecord) -> bytes:
    return record["bytes"].numpy().tobytes()


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of a record (what travels, not counting framing)."""
    return sum(len(v.data) for v in record.values())


def train_config_record(task: dict[str, Any], adapter: AdapterConfig, train: TrainConfig,
                        tasks: TaskStreamConfig, partition: PartitionConfig, **scalars: Any) -> ConfigRecord:
    flat = flatten({"adapter": asdict(adapter), "train": asdict(train), "tasks": asdict(tasks),
                    "partition": asdict(partition)})
    flat.update({k: v for k, v in task.items() if k != "classes"})
    flat["classes"] = json.dumps(task["classes"])
    flat.update(scalars)
    return ConfigRecord(flat)


def parse_train_config(record: ConfigRecord) -> dict[str, Any]:
    """Typed pieces of a train message's config (each validated by its dataclass)."""
    flat = dict(record)
    nested = unflatten({k: v for k, v in flat.items() if k.split(".")[0] in {"adapter", "train", "tasks", "partition"}})
    adapter = nested["adapter"]
    return {
        "adapter": build_dataclass(ADAPTERS.get(str(adapter["name"])).config_class, adapter),
        "train": build_dataclass(TrainConfig, nested["train"]),
        "tasks": build_dataclass(TaskStreamConfig, nested["tasks"]),
        "partition": build_dataclass(PartitionConfig, nested["partition"]),
        "classes": json.loads(str(flat["classes"])),
        **{k: v for k, v in flat.items() if "." not in k and k != "classes"},
    }
