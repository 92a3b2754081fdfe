"""Flower ClientApp: hand each message to the device worker when there is one, else answer it in this process.

With ``worker-socket`` in the node config (``fedpetah-client`` sets it) or ``FEDPETAH_WORKER_SOCKET``, a message's
records go to the device worker (:mod:`clients.worker`) over its Unix socket and its reply comes back: this process
imports flwr, NumPy and the protocol only, never torch. A worker that is dead or hung yields an error reply within
``worker-connect-s`` + ``worker-timeout-s`` seconds. Without a worker (a stock ``flower-supernode``, the
simulation) the same :func:`clients.worker.answer` runs here; torch and the library are imported on the first
message that needs them and the runtime (backbone cache) is kept per process, so a simulation worker pays once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.worker import WorkerUnavailable, answer, call, error_reply
from fedpetah.wire.evaluation import EVALUATE, EvaluateReply
from fedpetah.wire.protocol import (
    ATTACK_ENV,
    HELLO,
    NO_PARTITION,
    TRAIN,
    HelloReply,
    ProtocolError,
    Records,
    Status,
    TrainReply,
    TrainRequest,
    specs,
)
from flower_glue.records import records_of, reply

if TYPE_CHECKING:
    from fedpetah.device.client import ClientRuntime, Sources

log = logging.getLogger("fedpetah.client")
app = ClientApp()
_RUNTIMES: dict[tuple[str, int], ClientRuntime] = {}
WORKER_TIMEOUT_S = 300.0  # the longest a worker may take for one request (training included)
WORKER_CONNECT_S = 60.0  # how long to wait for a worker that is starting (importing torch) or restarting


def _runtime(context: Context) -> ClientRuntime:
    """One runtime per cache dir and partition in this process (it survives across messages in a Ray worker)."""
    from fedpetah.backbone.build import default_cache_dir
    from fedpetah.device.client import ClientRuntime
    from fedpetah.device.keep import BANK_MAX_BYTES
    from fedpetah.device.local import CACHE_KEEP, CACHE_MAX_BYTES, BackboneCache

    config = context.node_config
    root = str(config.get("cache-dir", "") or _default_root(default_cache_dir()))
    key = (root, _partition(context))
    if key not in _RUNTIMES:
        keep, max_mb = int(config.get("cache-keep", CACHE_KEEP)), int(config.get("cache-max-mb", CACHE_MAX_BYTES >> 20))
        bank_mb = int(config.get("bank-max-mb", BANK_MAX_BYTES >> 20))
        budget = config.get("memory-budget-mb")
        _RUNTIMES[key] = ClientRuntime(BackboneCache(Path(root), keep, max_mb * 2**20), key[1], bank_mb * 2**20,
                                       None if budget is None else float(budget))
    return _RUNTIMES[key]


def _default_root(cache: Path) -> Path:
    return cache / "backbones"


def install_backbone(digest: str, weights: bytes, manifest: bytes) -> str:
    """Verify and keep the backbone artifact where this process's clients look for it without a ``cache-dir``
    (the simulation engine runs this once on each node of a Ray cluster); returns that directory."""
    from fedpetah.backbone.build import default_cache_dir
    from fedpetah.device.local import BackboneCache

    cache = BackboneCache(_default_root(default_cache_dir()))
    cache.install(digest, weights, manifest)
    return str(cache.root)


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", NO_PARTITION))


def _set_threads() -> None:
    import torch

    threads = int(os.environ.get("FEDPETAH_TORCH_THREADS", "0"))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _sources(context: Context) -> Sources:
    partition = _partition(context)
    if partition != NO_PARTITION:
        from fedpetah.device.client import simulated_sources

        return simulated_sources(partition)
    from clients.device_data import data_dir
    from clients.worker import device_sources
    from fedpetah.device.client import Sources

    value = str(context.node_config.get("data-dir", ""))  # a missing dir fails the request only (a hello: no counts)
    return Sources(lambda settings: device_sources(data_dir(value)).train(settings),
                   lambda settings, task: device_sources(data_dir(value)).holdout(settings, task),
                   lambda request, task: device_sources(data_dir(value)).holdings(request, task))


def _seconds(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else default


def handle(kind: str, records: Records, context: Context) -> Records:
    """The reply to a request: from the device worker if one is configured, else computed in this process."""
    config = dict(context.node_config)
    path = str(config.get("worker-socket", "") or os.environ.get("FEDPETAH_WORKER_SOCKET", ""))
    if not path:
        if kind in (TRAIN, EVALUATE):
            _set_threads()
        return answer(_runtime(context), _sources(context), kind, records)
    try:
        return call(path, kind, records, _seconds(config, "worker-timeout-s", WORKER_TIMEOUT_S),
                    _seconds(config, "worker-connect-s", WORKER_CONNECT_S))
    except WorkerUnavailable as error:
        log.error("%s", error)
        if kind == HELLO:  # take part anyway: the server sends the backbone with the first request
            return HelloReply(NO_PARTITION, False).encode()
        return error_reply(kind, f"device worker unavailable: {error}")


@app.query(HELLO.removeprefix("query."))
def hello(message: Message, context: Context) -> Message:
    """Who we are (partition id, or -1 on a device) and whether the backbone is cached here."""
    return reply(handle(HELLO, records_of(message), context), message)


@app.query(EVALUATE.removeprefix("query."))
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the learned tasks' snapshot on this client's held-out images (counts only) and/or keep it."""
    try:
        records = records_of(message)
    except ProtocolError as error:
        log.warning("refusing a malformed evaluate request: %s", error)
        return reply(EvaluateReply(Status.ERROR, f"malformed request: {error}").encode(), message)
    return reply(handle(EVALUATE, records, context), message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the task's adapter from the global state on this client's data; reply with the state only."""
    try:
        records = records_of(message)
    except ProtocolError as error:
        log.warning("refusing a malformed train request: %s", error)
        return reply(TrainReply(Status.ERROR, f"malformed request: {error}").encode(), message)
    answered = handle(TRAIN, records, context)
    partition = _partition(context)
    if partition != NO_PARTITION and os.environ.get(ATTACK_ENV):  # simulation.attack: a byzantine partition
        answered = _attack(records, answered, partition)
    return reply(answered, message)


def _attack(request_records: Records, reply_records: Records, partition: int) -> Records:
    """The reply of simulated partition ``partition`` as the configured attack corrupts it (only in simulation)."""
    from fedpetah.attacks import corrupt_reply, from_env

    request = TrainRequest.decode(request_records)
    try:
        answer = TrainReply.decode(reply_records, specs(request.state))
    except ProtocolError:
        return reply_records
    return corrupt_reply(answer, request, partition, from_env(os.environ)).encode()
