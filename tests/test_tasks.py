"""Task streams, batches() and partitioners on the real offline MNIST sample, digits and generated PNGs."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fedpetah.tasks import (
    PartitionConfig,
    TaskStreamConfig,
    batches,
    build_stream,
    partition,
)
from fedpetah.tasks.data import ImageSet
from fedpetah.tasks.streams import mnist_sample


def _keys(images: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in images}


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        if len(part):
            p = np.bincount(labels[part]) / len(part)
            p = p[p > 0]
            entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


# ---------------------------------------------------------------- streams on the MNIST sample and digits


def test_split_mnist_tasks_are_balanced_disjoint_digit_pairs() -> None:
    images, labels = mnist_sample()
    assert images.shape == (5000, 1, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    tasks = build_stream(TaskStreamConfig())
    assert [t.name for t in tasks] == ["mnist_0_1", "mnist_2_3", "mnist_4_5", "mnist_6_7", "mnist_8_9"]
    for t, task in enumerate(tasks):
        assert task.index == t and task.classes == [str(2 * t), str(2 * t + 1)] and task.num_classes == 2
        assert task.train.images.shape == (800, 1, 28, 28) and task.train.images.dtype == torch.uint8
        assert task.train.labels.dtype == torch.int64
        assert torch.bincount(task.train.labels).tolist() == [400, 400]
        assert torch.bincount(task.test.labels).tolist() == [100, 100]
        train_keys, test_keys = _keys(task.train.images), _keys(task.test.images)
        assert not train_keys & test_keys
        digit_keys = _keys(torch.from_numpy(images[np.isin(labels, [2 * t, 2 * t + 1])]))
        assert train_keys | test_keys == digit_keys
        first_digit = _keys(torch.from_numpy(images[labels == 2 * t]))
        assert _keys(task.train.images[task.train.labels == 0]) <= first_digit


def test_streams_are_deterministic_per_seed() -> None:
    a, b = build_stream(TaskStreamConfig(seed=3)), build_stream(TaskStreamConfig(seed=3))
    c = build_stream(TaskStreamConfig(seed=4))
    assert torch.equal(a[2].train.images, b[2].train.images) and torch.equal(a[2].test.labels, b[2].test.labels)
    assert not torch.equal(a[2].test.images, c[2].test.images)
    p, q = (
        build_stream(TaskStreamConfig(name="permuted_mnist", seed=3, num_tasks=2)),
        build_stream(TaskStreamConfig(name="permuted_mnist", seed=3, num_tasks=3)),
    )
    assert torch.equal(p[1].train.images, q[1].train.images)


def test_rotated_mnist_rotates_all_ten_digits_by_task() -> None:
    tasks = build_stream(TaskStreamConfig(name="rotated_mnist", num_tasks=3))
    assert [t.name for t in tasks] == ["mnist_rot0", "mnist_rot45", "mnist_rot90"]
    base = tasks[0]
    assert base.num_classes == 10 and torch.bincount(base.train.labels).tolist() == [400] * 10
    for task in tasks:
        assert torch.equal(task.train.labels, base.train.labels)
    assert _keys(base.train.images) <= _keys(torch.tensor(mnist_sample()[0]))
    assert torch.equal(tasks[2].train.images, torch.rot90(base.train.images, 1, (2, 3)))
    assert not torch.equal(tasks[1].train.images, base.train.images)


def test_permuted_mnist_permutes_pixels_except_task_zero() -> None:
    tasks = build_stream(TaskStreamConfig(name="permuted_mnist"))
    assert len(tasks) == 5 and tasks[0].name == "mnist_perm0"
    rotated0 = build_stream(TaskStreamConfig(name="rotated_mnist", num_tasks=1))[0]
    assert torch.equal(tasks[0].test.images, rotated0.test.images)
    flat0, flat1 = tasks[0].train.images.flatten(1), tasks[1].train.images.flatten(1)
    assert torch.equal(flat0.sort(1).values, flat1.sort(1).values)
    order = torch.from_numpy(np.random.default_rng((0, 1, 1)).permutation(784))
    assert torch.equal(flat1, flat0[:, order]) and not torch.equal(flat1, flat0)


def test_digits_stream_and_task_counts() -> None:
    tasks = build_stream(TaskStreamConfig(name="digits"))
    assert [t.name for t in tasks][:2] == ["digits_0_1", "digits_2_3"] and len(tasks) == 5
    assert tasks[0].train.images.shape[1:] == (1, 8, 8) and int(tasks[0].train.images.max()) == 255
    assert len(tasks[0].train) + len(tasks[0].test) == 178 + 182
    assert [t.classes for t in build_stream(TaskStreamConfig(name="digits", classes_per_task=5))] == [
        ["0", "1", "2", "3", "4"],
        ["5", "6", "7", "8", "9"],
    ]
    assert len(build_stream(TaskStreamConfig(name="digits", num_tasks=2))) == 2
    with pytest.raises(ValueError, match="at most 5 task"):
        build_stream(TaskStreamConfig(name="digits", num_tasks=6))


def test_stream_config_validation_and_structured_config() -> None:
    with pytest.raises(KeyError, match="split_mnist"):
        TaskStreamConfig(name="split_cifar")
    with pytest.raises(ValueError, match="test_fraction"):
        TaskStreamConfig(test_fraction=1.0)
    with pytest.raises(ValueError, match="root"):
        TaskStreamConfig(name="folder")
    with pytest.raises(ValueError, match="dataset"):
        TaskStreamConfig(name="torchvision", root="/nonexistent")
    with pytest.raises(KeyError, match="iid"):
        PartitionConfig(name="shards")
    with pytest.raises(ValueError, match="alpha"):
        PartitionConfig(alpha=0.0)
    schema = OmegaConf.structured(TaskStreamConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"num_tasks": 3, "root": None}))
    assert OmegaConf.to_object(merged) == TaskStreamConfig(num_tasks=3)
    with pytest.raises(Exception, match="num_taks"):
        OmegaConf.merge(schema, OmegaConf.create({"num_taks": 3}))


# ---------------------------------------------------------------- ImageSet and batches()


def test_image_set_subset_and_validation() -> None:
    data = ImageSet(torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1), torch.arange(5))
    assert data.subset([4, 0]).labels.tolist() == [4, 0]
    assert data.subset(np.array([1, 2])).images.flatten().tolist() == [1, 2]
    assert data.subset(torch.tensor([3])).labels.tolist() == [3]
    assert len(data.subset([])) == 0 and len(data.subset(np.empty(0, dtype=np.int64))) == 0
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_batches_resize_replicate_and_keep_last_partial_batch() -> None:
    task = build_stream(TaskStreamConfig(name="digits", num_tasks=1))[0]
    data = task.test.subset(range(10))
    out = list(batches(data, img_size=32, in_chans=3, batch_size=4))
    assert [len(y) for _, y in out] == [4, 4, 2]
    x, y = out[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    assert torch.equal(x[:, 0], x[:, 2]) and torch.equal(torch.cat([b for _, b in out]), data.labels)
    ((native, _),) = batches(data, img_size=8, in_chans=1, batch_size=10)
    assert torch.equal(native, data.images.float() / 255)
    white = ImageSet(torch.full((2, 3, 7, 5), 255, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    ((gray, _),) = batches(white, img_size=16, in_chans=1, batch_size=8)
    assert gray.shape == (2, 1, 16, 16) and torch.allclose(gray, torch.ones_like(gray))


def test_batches_shuffle_is_a_seeded_permutation() -> None:
    data = ImageSet(torch.zeros(9, 1, 2, 2, dtype=torch.uint8), torch.arange(9))

    def order(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [int(v) for _, y in batches(data, 2, 1, 4, shuffle=True, generator=generator) for v in y]

    assert order(1) == order(1) and sorted(order(1)) == list(range(9))
    assert order(1) != order(2) and order(1) != list(range(9))
    assert list(batches(data.subset([]), 2, 1, 4)) == []


# ---------------------------------------------------------------- partitioners


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity"])
def test_partitions_cover_every_index_once_and_are_seeded(name: str) -> None:
    labels = mnist_sample()[1]
    parts = partition(labels, 10, PartitionConfig(name=name, alpha=0.3), seed=7)
    assert len(parts) == 10 and all(p.dtype == np.int64 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    again = partition(labels, 10, PartitionConfig(name=name, alpha=0.3), seed=7)
    other = partition(labels, 10, PartitionConfig(name=name, alpha=0.3), seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other, strict=True))


def test_label_skew_grows_as_dirichlet_alpha_shrinks() -> None:
    labels = mnist_sample()[1]
    iid = partition(labels, 10, PartitionConfig(name="iid"), seed=0)
    assert {len(p) for p in iid} == {500}
    iid_entropy = _mean_label_entropy(labels, iid)
    near_uniform = _mean_label_entropy(labels, partition(labels, 10, PartitionConfig(alpha=100.0), seed=0))
    skewed = _mean_label_entropy(labels, partition(labels, 10, PartitionConfig(alpha=0.1), seed=0))
    assert iid_entropy > 0.99 * np.log(10) and near_uniform > 0.98 * np.log(10)
    assert skewed < 0.6 * np.log(10)


def test_quantity_skew_and_min_per_client() -> None:
    labels = mnist_sample()[1][:1000]
    sizes = [len(p) for p in partition(labels, 50, PartitionConfig(name="quantity", alpha=0.1), seed=0)]
    assert min(sizes) == 0 and max(sizes) > 100
    floored = partition(labels, 50, PartitionConfig(name="quantity", alpha=0.1, min_per_client=10), seed=0)
    assert min(len(p) for p in floored) >= 10 and sum(len(p) for p in floored) == 1000
    assert min(len(p) for p in partition(labels, 50, PartitionConfig(alpha=0.05), seed=0)) == 0
    resampled = partition(mnist_sample()[1], 10, PartitionConfig(alpha=0.1, min_per_client=50), seed=0)
    assert min(len(p) for p in resampled) >= 50
    empty = partition(np.empty(0, dtype=np.int64), 3, PartitionConfig(), seed=0)
    assert [len(p) for p in empty] == [0, 0, 0]
    with pytest.raises(ValueError, match="cannot give"):
        partition(labels, 10, PartitionConfig(name="iid", min_per_client=101), seed=0)
    with pytest.raises(ValueError, match="raise alpha"):
        partition(labels, 50, PartitionConfig(alpha=0.01, min_per_client=19), seed=0)


# ---------------------------------------------------------------- folder and torchvision streams


def _write(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12), fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


def _folder(root: Path) -> None:
    for i in range(3):
        _write(root / "b_shapes" / "circle" / f"{i}.png", (10, 20, 30))
        _write(root / "b_shapes" / "square" / f"{i}.jpg", (200, 200, 200), fmt="JPEG")
        _write(root / "a_colors" / "red" / f"{i}.png", (255, 0, 0), size=(9, 30))
        _write(root / "a_colors" / "blue" / f"{i}.PNG", (0, 0, 255))
    (root / "a_colors" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "a_colors" / "red" / "notes.txt").write_text("ignored: not an image suffix")
    (root / ".cache" / "x").mkdir(parents=True)


def test_folder_stream_loads_sorted_tasks_and_counts_corrupt_files(tmp_path: Path) -> None:
    _folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        tasks = build_stream(TaskStreamConfig(name="folder", root=str(tmp_path), store_size=16, test_fraction=0.34))
    assert [t.name for t in tasks] == ["a_colors", "b_shapes"]
    colors, shapes = tasks
    assert colors.classes == ["blue", "red"] and shapes.classes == ["circle", "square"]
    assert colors.skipped == ["a_colors/red/broken.png"] and shapes.skipped == []
    assert colors.train.images.shape[1:] == (3, 16, 16) and len(colors.train) + len(colors.test) == 6
    assert torch.bincount(colors.test.labels).tolist() == [1, 1]
    red = torch.cat([colors.train.images[colors.train.labels == 1], colors.test.images[colors.test.labels == 1]])
    assert red[:, 0].min() == 255 and red[:, 2].max() == 0
    with pytest.warns(UserWarning, match="broken.png"):
        gray = build_stream(TaskStreamConfig(name="folder", root=str(tmp_path), channels=1, num_tasks=1, store_size=8))
    assert len(gray) == 1 and gray[0].train.images.shape[1:] == (1, 8, 8)


def test_folder_stream_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_stream(TaskStreamConfig(name="folder", root=str(tmp_path / "missing")))
    _folder(tmp_path)
    (tmp_path / "a_colors" / "red" / "broken.png").unlink()
    with pytest.raises(ValueError, match="only 2 task"):
        build_stream(TaskStreamConfig(name="folder", root=str(tmp_path), num_tasks=3))
    (tmp_path / "b_shapes" / "triangle").mkdir()
    with pytest.raises(ValueError, match="triangle has no readable image"):
        build_stream(TaskStreamConfig(name="folder", root=str(tmp_path)))
    (tmp_path / "b_shapes" / "triangle").rmdir()
    for path in (tmp_path / "b_shapes" / "square").iterdir():
        path.unlink()
    (tmp_path / "b_shapes" / "square").rmdir()
    with pytest.raises(ValueError, match="at least 2 class"):
        build_stream(TaskStreamConfig(name="folder", root=str(tmp_path)))


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX (MNIST) file format: magic 0x08 (uint8) + rank, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_stream_reads_local_mnist_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("network access"))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, per_class in (("train", 3), ("t10k", 1)):
        labels = np.repeat(np.arange(10), per_class)
        _write_idx(
            raw / f"{prefix}-images-idx3-ubyte",
            np.broadcast_to(labels[:, None, None] * 20, (len(labels), 28, 28)),
        )
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    tasks = build_stream(TaskStreamConfig(name="torchvision", root=str(tmp_path), dataset="MNIST", num_tasks=4))
    assert [t.name for t in tasks] == ["mnist_0_1", "mnist_2_3", "mnist_4_5", "mnist_6_7"]
    assert tasks[1].classes == ["2 - two", "3 - three"] and tasks[1].train.images.shape == (6, 1, 28, 28)
    assert tasks[1].train.labels.tolist() == [0, 0, 0, 1, 1, 1] and tasks[1].test.labels.tolist() == [0, 1]
    assert tasks[1].train.images[:, 0, 0, 0].tolist() == [40, 40, 40, 60, 60, 60]


def test_torchvision_without_data_or_download_fails_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the torchvision stream tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(FileNotFoundError, match="tasks.download=true"):
        build_stream(TaskStreamConfig(name="torchvision", root=str(tmp_path), dataset="mnist"))
    with pytest.raises(ValueError, match="cifar10"):
        build_stream(TaskStreamConfig(name="torchvision", root=str(tmp_path), dataset="imagenet"))
