"""Continual task streams (registry STREAMS) and seeded client partitioners (registry PARTITIONERS).

Streams: split_mnist (offline default), rotated_mnist, permuted_mnist, digits, folder, torchvision, catalog.
Flower Datasets sources belong to the Flower edges (server/, clients/): fedpetah never imports flwr.

The names below load on first use (PEP 562), every stream registered with them, so that the torch-free modules
``fedpetah.tasks.names`` and ``fedpetah.tasks.catalog`` import without torch (``fedpetah-server task`` starts in
a fraction of a second). Import the names from here, not from ``fedpetah.tasks.streams``, which alone registers
only its own streams.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedpetah.tasks.data import ImageSet, Task, batches, stratified_split
    from fedpetah.tasks.partition import PARTITIONERS, PartitionConfig, partition
    from fedpetah.tasks.streams import STREAMS, TaskStreamConfig, build_stream, load_stream

_HOMES = {
    "ImageSet": "data", "Task": "data", "batches": "data", "stratified_split": "data",
    "PARTITIONERS": "partition", "PartitionConfig": "partition", "partition": "partition",
    "STREAMS": "streams", "TaskStreamConfig": "streams", "build_stream": "streams", "load_stream": "streams",
}
"""Each exported name and its module under fedpetah.tasks."""


def _load() -> None:
    """Import the torch side, register the folder, torchvision and catalog streams, and bind every name here."""
    from fedpetah.tasks import catalog, folder, online  # noqa: F401  (folder and online register themselves)
    from fedpetah.tasks.streams import STREAMS

    if "catalog" not in STREAMS:
        STREAMS.add("catalog", catalog.catalog_stream)
    for name, home in _HOMES.items():
        globals()[name] = getattr(importlib.import_module(f"fedpetah.tasks.{home}"), name)


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name not in _HOMES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        _load()
        return globals()[name]


__all__ = [
    "PARTITIONERS",
    "STREAMS",
    "ImageSet",
    "PartitionConfig",
    "Task",
    "TaskStreamConfig",
    "batches",
    "build_stream",
    "load_stream",
    "partition",
    "stratified_split",
]
