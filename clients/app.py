"""Flower ClientApp: hello, backbone install and per-task adapter training, translated to fedpetah calls."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.wire import (
    NO_PARTITION,
    parse_train_config,
    record_to_bytes,
    record_to_state,
    state_to_record,
)
from fedpetah.backbone.build import default_cache_dir
from fedpetah.local import BackboneCache, simulated_shard, train_task
from fedpetah.tasks import ImageSet

app = ClientApp()

_CACHES: dict[str, BackboneCache] = {}


def _cache(context: Context) -> BackboneCache:
    """One backbone cache per process (survives across messages in a simulation worker)."""
    root = str(context.node_config.get("cache-dir", "") or default_cache_dir() / "backbones")
    if root not in _CACHES:
        _CACHES[root] = BackboneCache(Path(root))
    return _CACHES[root]


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", NO_PARTITION))


def _set_threads() -> None:
    threads = int(os.environ.get("FEDPETAH_TORCH_THREADS", "0"))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    """Tell the server who we are: the simulation partition id (or -1) and whether the backbone is cached."""
    digest = str(message.content["config"]["digest"])
    reply = ConfigRecord({"partition-id": _partition(context), "has-backbone": _cache(context).has(digest)})
    return Message(RecordDict({"config": reply}), reply_to=message)


@app.query("install")
def install(message: Message, context: Context) -> Message:
    """Verify the backbone artifact's digests and store it under its digest."""
    content = message.content
    digest = str(content["config"]["digest"])
    written = _cache(context).install(digest, record_to_bytes(content["weights"]),
                                      record_to_bytes(content["manifest"]))
    return Message(RecordDict({"metrics": MetricRecord({"bytes-written": written})}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the task's adapter from the global state on this client's data; reply with the state only."""
    _set_threads()
    cfg = parse_train_config(message.content["config"])
    data = _local_data(cfg, context)
    if data is None or len(data) == 0:
        status = ConfigRecord({"status": "no-data", "reason": f"no training data for task {cfg['task-name']}"})
        return Message(RecordDict({"status": status, "metrics": MetricRecord({"num-examples": 0})}),
                       reply_to=message)
    cache = _cache(context)
    backbone = cache.get(str(cfg["digest"]))
    seed = int(cfg["seed"]) * 1_000_003 + int(cfg["round"]) * 10_007 + max(_partition(context), 0)
    state, metrics = train_task(backbone, cfg["adapter"], int(cfg["num-classes"]),
                                record_to_state(message.content["adapter"]), data, replace(cfg["train"], seed=seed))
    metrics["backbone-load-seconds"] = cache.last_load_seconds
    content = RecordDict({"adapter": state_to_record(state), "metrics": MetricRecord(metrics),
                          "status": ConfigRecord({"status": "ok", "reason": ""})})
    return Message(content, reply_to=message)


def _local_data(cfg: dict, context: Context) -> ImageSet | None:
    partition = _partition(context)
    if partition != NO_PARTITION:
        return simulated_shard(cfg["tasks"], cfg["partition"], int(cfg["clients"]), partition,
                               int(cfg["task"]), int(cfg["seed"]))
    from clients.device_data import device_task_data

    return device_task_data(context, str(cfg["task-name"]), list(cfg["classes"]))
