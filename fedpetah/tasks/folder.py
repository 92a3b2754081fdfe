"""The ``folder`` stream: users' own images laid out as root/<task>/<class>/*.png|jpg|jpeg."""

from __future__ import annotations

import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from fedpetah.tasks.data import Task, split_task
from fedpetah.tasks.names import MAX_NAME_BYTES as MAX_NAME_BYTES  # re-exported: devices and tests name them here
from fedpetah.tasks.names import UnsafeNameError as UnsafeNameError
from fedpetah.tasks.names import check_name
from fedpetah.tasks.streams import STREAMS, TaskStreamConfig

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# What PIL raises on unreadable, truncated or hostile files (SyntaxError: some broken PNG chunks).
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
READ_ERRORS = (*_READ_ERRORS, RuntimeError)
"""What reading one image file may raise (RuntimeError: a symbolic link loop, Python < 3.13): skip the file."""


def safe_path(root: Path, *names: object) -> Path:
    """``root/<names[0]>/<names[1]>/...`` for names that came from elsewhere, checked before any file is touched:
    each one plain folder name (no separator, ``..``, absolute path, NUL, control character; at most
    :data:`MAX_NAME_BYTES` bytes), and the resolved path (symlinks followed) inside ``root``.
    Raises :class:`UnsafeNameError`."""
    path = root
    for index, name in enumerate(names):
        path = path / check_name(name, "task" if index == 0 else "class")
    try:
        base, resolved = root.resolve(), path.resolve()
    except (OSError, RuntimeError) as err:  # a symbolic link loop
        raise UnsafeNameError(f"{path} does not resolve: {err}") from None
    if not resolved.is_relative_to(base):
        raise UnsafeNameError(f"{path} resolves to {resolved}, outside the data dir {base} (a symbolic link?): "
                              "keep the images inside the data dir, or point it at their real folder")
    return path


def image_files(directory: Path) -> list[Path]:
    """The image files of a class directory (by suffix), in sorted order."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


def regular_file(path: Path, base: Path) -> Path:
    """``path`` resolved (symbolic links followed), if that is a regular file inside the resolved ``base``:
    ``ValueError`` otherwise (a link out of the data dir, a FIFO or device whose read could block)."""
    real = path.resolve(strict=True)
    if not real.is_relative_to(base) or not stat.S_ISREG(real.stat().st_mode):
        raise ValueError(f"{path} is not a regular file inside {base}")
    return real


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-directories in sorted (stable, locale-independent) order."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image(path: Path | BinaryIO, channels: int, size: int) -> np.ndarray:
    """One image (a file, or its bytes in a binary stream) converted to L or RGB and resized (bilinear) to
    size x size, as uint8 (C, size, size)."""
    with Image.open(path) as image:
        image.load()
        converted = image.convert("L" if channels == 1 else "RGB")
        pixels = np.asarray(converted.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def load_class(directory: Path, channels: int, size: int, root: Path) -> tuple[list[np.ndarray], list[str]]:
    """Readable images of one class directory and the root-relative paths of the skipped ones.

    Each file is read through its resolved path, and only if that is a regular file inside ``root``: a symbolic
    link that leads out of the data dir (or to a FIFO or device, whose read could block) is skipped like an
    unreadable image. A class with no readable image raises ``ValueError``.
    """
    images, skipped = [], []
    base = root.resolve()
    files = image_files(directory)
    for path in files:
        try:
            images.append(load_image(regular_file(path, base), channels, size))
        except READ_ERRORS:
            skipped.append(str(path.relative_to(root)))
    if not images:
        raise ValueError(
            f"class directory {directory} has no readable image "
            f"({len(files)} file(s) with suffix {'/'.join(sorted(IMAGE_SUFFIXES))})"
        )
    return images, skipped


def load_task(index: int, directory: Path, config: TaskStreamConfig, root: Path) -> Task:
    """One task directory: its sorted class sub-directories become labels 0..k-1."""
    class_dirs = _subdirs(directory)
    if len(class_dirs) < 2:
        raise ValueError(f"task directory {directory} needs at least 2 class sub-directories, found {len(class_dirs)}")
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        loaded, bad = load_class(class_dir, config.channels, config.store_size, root)
        images += loaded
        labels += [label] * len(loaded)
        skipped += bad
    rng = np.random.default_rng((config.seed, 0, index))
    task = split_task(
        index,
        directory.name,
        [d.name for d in class_dirs],
        np.stack(images),
        np.asarray(labels, dtype=np.int64),
        config.test_fraction,
        rng,
    )
    task.skipped = skipped
    if skipped:
        warnings.warn(
            f"task {directory.name!r}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}",
            stacklevel=2,
        )
    return task


@STREAMS.register("folder")
def folder(config: TaskStreamConfig) -> list[Task]:
    """Tasks from ``config.root``: task and class directories in sorted order, hidden ones ignored.

    Images are converted to ``config.channels`` and stored at ``config.store_size`` (uint8) to bound
    memory; unreadable files are skipped, warned about and listed in ``Task.skipped``. A missing
    root, a task with fewer than 2 classes, or a class without a readable image raises.
    """
    if config.root is None:
        raise ValueError("tasks.name=folder needs tasks.root=PATH")
    root = Path(config.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"tasks.root {root} is not a directory")
    task_dirs = _subdirs(root)
    if not task_dirs:
        raise ValueError(f"tasks.root {root} has no task sub-directories (expected root/<task>/<class>/*.png)")
    count = len(task_dirs) if config.num_tasks is None else config.num_tasks
    if count > len(task_dirs):
        raise ValueError(f"tasks.num_tasks={count} but {root} holds only {len(task_dirs)} task directories")
    return [load_task(t, directory, config, root) for t, directory in enumerate(task_dirs[:count])]
