"""Flower ClientApp: decode each message with fedpetah.protocol, answer it with fedpetah.client, encode the reply.

Module-level imports stay light (flwr, NumPy, the protocol): torch and the library are imported on the first
message that needs them, and the runtime (backbone cache) is kept per process, so a simulation worker pays
for them once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpetah.protocol import HELLO, NO_PARTITION, HelloRequest, ProtocolError, Status, TrainReply, TrainRequest
from flower_glue.records import records_of, reply

if TYPE_CHECKING:
    from fedpetah.client import ClientRuntime, DataSource

log = logging.getLogger("fedpetah.client")
app = ClientApp()
_RUNTIMES: dict[tuple[str, int], ClientRuntime] = {}


def _runtime(context: Context) -> ClientRuntime:
    """One runtime per cache dir and partition in this process (it survives across messages in a Ray worker)."""
    from fedpetah.backbone.build import default_cache_dir
    from fedpetah.client import ClientRuntime
    from fedpetah.local import BackboneCache

    root = str(context.node_config.get("cache-dir", "") or default_cache_dir() / "backbones")
    key = (root, _partition(context))
    if key not in _RUNTIMES:
        _RUNTIMES[key] = ClientRuntime(BackboneCache(Path(root)), key[1])
    return _RUNTIMES[key]


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", NO_PARTITION))


def _set_threads() -> None:
    import torch

    threads = int(os.environ.get("FEDPETAH_TORCH_THREADS", "0"))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _data(context: Context) -> DataSource:
    partition = _partition(context)
    if partition != NO_PARTITION:
        from fedpetah.client import simulated_data

        return simulated_data(partition)
    from clients.device_data import device_task_data

    return lambda settings: device_task_data(context, settings.request.task.name, list(settings.request.task.classes))


@app.query(HELLO.removeprefix("query."))
def hello(message: Message, context: Context) -> Message:
    """Who we are (partition id, or -1 on a device) and whether the backbone is cached here."""
    request = HelloRequest.decode(records_of(message))
    return reply(_runtime(context).hello(request).encode(), message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the task's adapter from the global state on this client's data; reply with the state only."""
    try:
        request = TrainRequest.decode(records_of(message))
    except ProtocolError as error:
        log.warning("refusing a malformed train request: %s", error)
        return reply(TrainReply(Status.ERROR, f"malformed request: {error}").encode(), message)
    _set_threads()
    answer = _runtime(context).train(request, _data(context))
    partition = _partition(context)
    if partition != NO_PARTITION:  # a simulation may make this partition byzantine (simulation.attack)
        from fedpetah.attacks import corrupt_reply, from_env

        answer = corrupt_reply(answer, request, partition, from_env(os.environ))
    return reply(answer.encode(), message)
