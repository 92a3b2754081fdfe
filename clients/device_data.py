"""A device's own images: ``DIR/<task>/<class>/*.png|jpg``, read for the classes the server names.

Each file is either a training image or a held-out one, by the hash of its content
(:func:`fedpetah.device.holdout.held_out`): one read of the file decides and decodes it, training never sees a
held-out image, and adding images leaves the split of the others unchanged.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpetah.device.holdout import held_out
from fedpetah.tasks import ImageSet
from fedpetah.tasks.folder import READ_ERRORS, image_files, load_image, regular_file, safe_path

log = logging.getLogger("fedpetah.client")

STORE_SIZE, CHANNELS = 64, 3
"""How a device stores its images (``fedpetah.tasks.TaskStreamConfig``'s folder defaults); training, evaluation
and ``fedpetah-client predict`` read them alike, then resize them to the backbone's input."""
MAX_HASHED = 1_000_000  # remembered file hashes (about 150 B each) before the memory is cleared
FileKey = tuple[str, int, int]  # (resolved path, size, mtime_ns)


@dataclass
class Split:
    """One task's images on this device: training and held-out, labelled in the server's class order."""

    train: ImageSet | None
    holdout: ImageSet | None
    skipped: int


_LOADED: dict[tuple[str, str, tuple[str, ...], int, int], Split] = {}
_HASHED: dict[FileKey, bool] = {}  # whether the file of that path, size and mtime is held out
_UNREADABLE: set[FileKey] = set()  # files a read found undecodable (a hello does not count them)


def data_dir(value: str) -> Path:
    """The node config's ``data-dir`` value as an existing directory."""
    if not value:
        raise ValueError("this node has no data-dir in its node config (fedpetah-client --data DIR)")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data dir {path} does not exist")
    return path


def _read(path: Path, base: Path) -> tuple[FileKey, bytes]:
    """The key and bytes of an image file, if it is a regular file inside ``base`` (the stat of the opened file)."""
    real = regular_file(path, base)
    with open(real, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        return (str(real), info.st_size, info.st_mtime_ns), handle.read()


def _remember(key: FileKey, data: bytes) -> bool:
    if len(_HASHED) >= MAX_HASHED:
        _HASHED.clear()
        _UNREADABLE.clear()
    _HASHED[key] = held = held_out(data)
    return held


def _class_dirs(root: Path, task_name: str, classes: list[str]) -> tuple[Path, list[Path]] | None:
    """The task's and its classes' folders, names checked before any file is touched; None without the task."""
    task_dir = safe_path(root, task_name)  # the names come from the server: checked before any file is touched
    class_dirs = [safe_path(root, task_name, name) for name in classes]
    return (task_dir, class_dirs) if task_dir.is_dir() else None


def _image_set(images: list[np.ndarray], labels: list[int]) -> ImageSet | None:
    if not images:
        return None
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64))


def device_split(root: Path, task_name: str, classes: list[str], store_size: int = STORE_SIZE,
                 channels: int = CHANNELS) -> Split | None:
    """Every readable image of ``task_name``, split into training and held-out images (each file read once);
    None if the device has no folder for the task. Read once per process and kept.

    Classes the device lacks are simply absent (label skew is normal); unknown class folders are ignored
    with a warning; unreadable images are skipped and counted. A task or class name that is not a plain folder
    name inside the data dir raises :class:`fedpetah.tasks.folder.UnsafeNameError` (an error reply), before
    anything is read.
    """
    found = _class_dirs(root, task_name, classes)
    if found is None:
        return None
    task_dir, class_dirs = found
    key = (str(task_dir), task_name, tuple(classes), store_size, channels)
    if key in _LOADED:
        return _LOADED[key]
    extra = sorted(p.name for p in task_dir.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        log.warning("task %s: ignoring class folders the server does not know: %s", task_name, extra)
    parts: dict[bool, tuple[list[np.ndarray], list[int]]] = {False: ([], []), True: ([], [])}
    skipped, base = 0, root.resolve()
    for label, class_dir in enumerate(class_dirs):
        if not class_dir.is_dir():
            continue
        for path in image_files(class_dir):
            try:
                file_key, data = _read(path, base)
            except READ_ERRORS:
                skipped += 1
                continue
            try:
                image = load_image(io.BytesIO(data), channels, store_size)
            except READ_ERRORS:
                _UNREADABLE.add(file_key)
                skipped += 1
                continue
            images, labels = parts[_remember(file_key, data)]
            images.append(image)
            labels.append(label)
    if skipped:
        log.warning("task %s: skipped %d unreadable image(s)", task_name, skipped)
    split = Split(_image_set(*parts[False]), _image_set(*parts[True]), skipped)
    _LOADED[key] = split
    return split


def device_task_data(root: Path, task_name: str, classes: list[str], store_size: int = STORE_SIZE,
                     channels: int = CHANNELS) -> ImageSet | None:
    """The training images of ``task_name`` (never a held-out one), labelled by the server's class order; None if
    the device has none. See :func:`device_split`."""
    split = device_split(root, task_name, classes, store_size, channels)
    return None if split is None else split.train


def device_holdout_data(root: Path, task: str, classes: list[str], store_size: int = STORE_SIZE,
                        channels: int = CHANNELS) -> ImageSet | None:
    """The held-out images of ``task``, labelled by the server's class order; None if the device has none."""
    split = device_split(root, task, classes, store_size, channels)
    return None if split is None else split.holdout


def device_holdings(root: Path, task_name: str, classes: list[str]) -> np.ndarray | None:
    """(classes, 2) int64 [training, held-out] image files per class of ``task_name``; None without its folder.

    Counts files without decoding them: a file's hash is kept per (path, size, mtime), so a repeated hello reads
    only new or changed files. A file that turns out undecodable is counted until a read of the task skips it."""
    found = _class_dirs(root, task_name, classes)
    if found is None:
        return None
    counts = np.zeros((len(classes), 2), dtype=np.int64)
    base = root.resolve()
    for label, class_dir in enumerate(found[1]):
        if not class_dir.is_dir():
            continue
        for path in image_files(class_dir):
            try:
                real = regular_file(path, base)
                info = real.stat()
                key = (str(real), info.st_size, info.st_mtime_ns)
                held = _HASHED[key] if key in _HASHED else _remember(*_read(path, base))
            except READ_ERRORS:
                continue
            if key in _UNREADABLE:
                continue
            counts[label, int(held)] += 1
    return counts
