"""The ``torchvision`` stream: class-incremental tasks from a torchvision data set under ``root``.

Downloading happens only with ``download=True``; otherwise missing files fail with a clear error and
no network access. Flower Datasets (Hugging Face) sources are loaded in the Flower edges (server/,
clients/), not here, because fedpetah never imports flwr: they hand ImageSets to this package.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from fedpetah.tasks.data import Task, class_incremental, to_image_set
from fedpetah.tasks.streams import STREAMS, TaskStreamConfig

# tasks.dataset (lower-case) -> torchvision.datasets class name; torchvision is imported on first use.
TORCHVISION_DATASETS = {
    "mnist": "MNIST",
    "fashionmnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


def _arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) images and int64 labels straight from the data set's tensors (no PIL)."""
    images = np.asarray(dataset.data, dtype=np.uint8)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.asarray(dataset.targets, dtype=np.int64)


def load_split(config: TaskStreamConfig, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One official split of ``config.dataset`` as arrays plus the class names."""
    key = (config.dataset or "").lower()
    if key not in TORCHVISION_DATASETS:
        raise ValueError(f"tasks.dataset must be one of {', '.join(TORCHVISION_DATASETS)}, got {config.dataset!r}")
    dataset_class = getattr(importlib.import_module("torchvision.datasets"), TORCHVISION_DATASETS[key])
    try:
        dataset = dataset_class(root=config.root, train=train, download=config.download)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"torchvision {config.dataset} not found under tasks.root={config.root} ({error}); "
            "place the files there or set tasks.download=true on a machine with network access"
        ) from error
    return (*_arrays(dataset), [str(c) for c in dataset.classes])


@STREAMS.register("torchvision")
def torchvision_stream(config: TaskStreamConfig) -> list[Task]:
    """Consecutive groups of ``classes_per_task`` classes; the official train/test splits are kept."""
    train_x, train_y, classes = load_split(config, train=True)
    test_x, test_y, _ = load_split(config, train=False)
    prefix = (config.dataset or "").lower()
    train_groups = class_incremental(train_x, train_y, classes, prefix, config.classes_per_task, config.num_tasks)
    test_groups = class_incremental(test_x, test_y, classes, prefix, config.classes_per_task, config.num_tasks)
    return [
        Task(t, name, names, to_image_set(x, y), to_image_set(tx, ty))
        for t, ((name, names, x, y), (_, _, tx, ty)) in enumerate(zip(train_groups, test_groups, strict=True))
    ]
