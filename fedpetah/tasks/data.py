"""In-memory task data: ImageSet (uint8 images + labels), Task, seeded splits and resizing batches()."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, used only when 3-channel data meets a 1-channel backbone.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

Indices = Sequence[int] | np.ndarray | torch.Tensor


@dataclass
class ImageSet:
    """Images of one split of one task at native resolution (uint8, N x C x H x W, C in {1, 3})."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(
                f"ImageSet.images must be uint8 (N, C, H, W) with C in {{1, 3}}, "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(f"ImageSet.labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Indices) -> ImageSet:
        """A copy holding the examples at ``indices`` (any integer sequence, possibly empty)."""
        if isinstance(indices, torch.Tensor):
            idx = indices.to(torch.int64)
        else:
            idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        if idx.ndim != 1:
            raise ValueError(f"subset indices must be 1-D, got shape {tuple(idx.shape)}")
        return ImageSet(self.images[idx], self.labels[idx])


@dataclass
class Task:
    """One step of a stream: its own label space (``classes[label]``), train and test splits.

    ``skipped`` lists the source files that could not be read (folder stream); they are
    left out of both splits.
    """

    index: int
    name: str
    classes: list[str]
    train: ImageSet
    test: ImageSet
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 classes, got {self.classes}")
        if len(set(self.classes)) != self.num_classes:
            raise ValueError(f"task {self.name!r} has duplicate class names {self.classes}")
        for split, data in (("train", self.train), ("test", self.test)):
            if len(data) and not 0 <= int(data.labels.min()) <= int(data.labels.max()) < self.num_classes:
                raise ValueError(f"task {self.name!r}: {split} labels outside 0..{self.num_classes - 1}")
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(f"task {self.name!r}: train and test images differ in shape")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def batches(
    data: ImageSet,
    img_size: int,
    in_chans: int,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """float32 images in [0,1] resized (bilinear, antialias) to img_size x img_size, channels replicated
    (1 -> in_chans) and labels; deterministic for a given generator; last partial batch kept.

    Three-channel data meeting ``in_chans=1`` is converted to luma (BT.601).
    """
    if batch_size < 1 or img_size < 1:
        raise ValueError(f"batch_size and img_size must be positive, got {batch_size}, {img_size}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    for idx in order.split(batch_size) if len(order) else ():
        x = data.images[idx].float().div_(255.0)
        if x.shape[-2:] != (img_size, img_size):
            # Anti-aliasing only changes downsampling, and costs about 2x when upsampling.
            shrink = max(x.shape[-2:]) > img_size
            size = (img_size, img_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
            x = x.clamp_(0.0, 1.0)
        if x.shape[1] == 3 and in_chans == 1:
            x = (x * _LUMA).sum(1, keepdim=True)
        elif x.shape[1] == 1 and in_chans == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        yield x, data.labels[idx]


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) index arrays with ``test_fraction`` of every class in test.

    Every class keeps at least one example on each side, so it needs two or more examples.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        if len(members) < 2:
            raise ValueError(f"class {value} has {len(members)} example(s); a train/test split needs 2")
        n_test = min(max(1, round(len(members) * test_fraction)), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def class_incremental(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    prefix: str,
    classes_per_task: int,
    num_tasks: int | None,
) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """Group consecutive classes into tasks: (name, class names, images, labels remapped to 0..k-1).

    ``num_tasks=None`` takes as many whole tasks as the classes allow; leftover classes are unused.
    """
    available = len(class_names) // classes_per_task
    count = available if num_tasks is None else num_tasks
    if not 1 <= count <= available:
        raise ValueError(
            f"{len(class_names)} classes make at most {available} task(s) of {classes_per_task}, asked for {count}"
        )
    groups = []
    for t in range(count):
        members = list(range(t * classes_per_task, (t + 1) * classes_per_task))
        mask = np.isin(labels, members)
        remapped = np.searchsorted(np.asarray(members), labels[mask])
        name = f"{prefix}_{'_'.join(str(c) for c in members)}"
        groups.append((name, [class_names[c] for c in members], images[mask], remapped))
    return groups


def to_image_set(images: np.ndarray, labels: np.ndarray) -> ImageSet:
    """Wrap uint8 (N, C, H, W) and integer label arrays, copying them into torch tensors."""
    return ImageSet(torch.tensor(images, dtype=torch.uint8), torch.tensor(labels, dtype=torch.int64))


def split_task(
    index: int,
    name: str,
    classes: list[str],
    images: np.ndarray,
    labels: np.ndarray,
    test_fraction: float,
    rng: np.random.Generator,
) -> Task:
    """A Task from one pool of images, split with :func:`stratified_split`."""
    train, test = stratified_split(labels, test_fraction, rng)
    return Task(
        index,
        name,
        classes,
        to_image_set(images[train], labels[train]),
        to_image_set(images[test], labels[test]),
    )
