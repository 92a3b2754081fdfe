"""The images a client evaluates on and never trains on, and what it counts on them.

On a device a file is held out when the hash of its content says so (:func:`held_out`): the split of the files
already there never changes when images are added. A simulated client's held-out images are its seeded IID
share of the task's test split, so the clients together hold exactly that split.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from fedpetah.device.local import simulated_shard
from fedpetah.routing.predict import TaskFreePredictor
from fedpetah.tasks import ImageSet, PartitionConfig, TaskStreamConfig, batches, load_stream, partition
from fedpetah.wire.protocol import TaskInfo

HOLDOUT_FRACTION = 0.2
"""The share of a device's images (by content hash) that it holds out for evaluation."""
HOLDOUT_TAG = 0x686F6C64  # "hold": keeps the holdout's seed apart from the training partition's


def held_out(data: bytes) -> bool:
    """Whether an image file of content ``data`` is held out: the first 8 bytes of its SHA-256 as a fraction of
    2**64 fall below :data:`HOLDOUT_FRACTION`."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64 < HOLDOUT_FRACTION


def holdout_seed(seed: int, task_index: int) -> int:
    """The seed of task ``task_index``'s test-split partition in a run seeded ``seed`` (below 2**62)."""
    words = np.random.SeedSequence([seed % 2**64, task_index % 2**64, HOLDOUT_TAG]).generate_state(2, np.uint32)
    return (int(words[0]) << 30) ^ int(words[1])


def _stream_task(stream: TaskStreamConfig, task: TaskInfo) -> int | None:
    """The stream position of catalogue task ``task`` when the stream holds it with the same classes."""
    tasks = load_stream(stream)
    if not 0 <= task.index < len(tasks) or tuple(tasks[task.index].classes) != task.classes:
        return None
    return task.index


def simulated_holdout(stream: TaskStreamConfig, clients: int, client: int, task: TaskInfo, seed: int
                      ) -> ImageSet | None:
    """Simulated client ``client``'s share (IID over ``clients``, seeded) of ``task``'s test split; None when the
    stream has no such task."""
    if not 0 <= client < clients:
        raise IndexError(f"client {client} is outside 0..{clients - 1}")
    index = _stream_task(stream, task)
    if index is None:
        return None
    test = load_stream(stream)[index].test
    parts = partition(test.labels.numpy(), clients, PartitionConfig(name="iid"), holdout_seed(seed, index))
    return test.subset(parts[client])


def simulated_holdings(stream: TaskStreamConfig, split: PartitionConfig, clients: int, client: int, task: TaskInfo,
                       seed: int) -> np.ndarray | None:
    """(classes, 2) int64 [training images, held-out images] per class of simulated client ``client``."""
    held = simulated_holdout(stream, clients, client, task, seed)
    if held is None:
        return None
    train = simulated_shard(stream, split, clients, client, task.index, seed)
    size = task.num_classes
    return np.stack([np.bincount(train.labels.numpy(), minlength=size),
                     np.bincount(held.labels.numpy(), minlength=size)], axis=1).astype(np.int64)


@torch.no_grad()
def evaluate_holdout(predictor: TaskFreePredictor, position: int, task: TaskInfo, data: ImageSet,
                     batch_size: int, deadline: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the snapshot's task ``position`` (in model order) on held-out ``data`` labelled in ``task``'s
    class order: (classes, 3) int64 [images, task-aware correct, task-free correct] per class, and the task-aware
    (classes, classes) [true, predicted] table. One forward pass per batch: task-aware is the argmax of task
    ``position``'s task-aware scores (its expert's logits, plus ``task_aware_mix`` times the router's rows of its
    classes: :meth:`TaskFreeModel.outputs`), task-free the whole model's, right when the predicted class NAME is
    the true one. ``deadline``
    (``time.monotonic()``): ``TimeoutError`` past it."""
    size = task.num_classes
    counts = np.zeros((size, 3), dtype=np.int64)
    table = np.zeros((size, size), dtype=np.int64)
    model = predictor.model.eval()
    names = np.asarray(predictor.class_names, dtype=object)
    truth = np.asarray(task.classes, dtype=object)
    for x, y in batches(data, predictor.img_size, predictor.in_chans, batch_size):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"evaluating task {task.name!r} ran past its time bound")
        scores, task_aware = model.outputs(x)
        labels = y.numpy()
        aware = task_aware[position].argmax(1).numpy()
        free = names[scores.argmax(1).numpy()] == truth[labels]
        np.add.at(counts[:, 0], labels, 1)
        np.add.at(counts[:, 1], labels, (aware == labels).astype(np.int64))
        np.add.at(counts[:, 2], labels, free.astype(np.int64))
        np.add.at(table, (labels, aware), 1)
    return counts, table
