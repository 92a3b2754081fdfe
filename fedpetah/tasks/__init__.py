"""Continual task streams (registry STREAMS) and seeded client partitioners (registry PARTITIONERS).

Streams: split_mnist (offline default), rotated_mnist, permuted_mnist, digits, folder, torchvision.
Flower Datasets sources belong to the Flower edges (server/, clients/): fedpetah never imports flwr.
"""

from fedpetah.tasks import folder, online  # noqa: F401  (register the folder and torchvision streams)
from fedpetah.tasks.data import ImageSet, Task, batches, stratified_split
from fedpetah.tasks.partition import PARTITIONERS, PartitionConfig, partition
from fedpetah.tasks.streams import STREAMS, TaskStreamConfig, build_stream, load_stream

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
