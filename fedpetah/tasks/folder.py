"""The ``folder`` stream: users' own images laid out as root/<task>/<class>/*.png|jpg|jpeg."""

from __future__ import annotations

import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from fedpetah.tasks.data import Task, split_task
from fedpetah.tasks.streams import STREAMS, TaskStreamConfig

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
MAX_NAME_BYTES = 255  # NAME_MAX of Linux file systems
# What PIL raises on unreadable, truncated or hostile files (SyntaxError: some broken PNG chunks).
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnsafeNameError(ValueError):
    """A task or class name from elsewhere (a server) that is not one plain folder name inside the data dir."""


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise UnsafeNameError(f"{what} name must be a string, got {type(name).__name__}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafeNameError(f"{what} name {name!r:.80} is not valid UTF-8") from None
    if not 0 < size <= MAX_NAME_BYTES:
        raise UnsafeNameError(f"{what} name of {size} bytes: a folder name has 1 to {MAX_NAME_BYTES} bytes")
    if name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafeNameError(f"{what} name {name!r:.80} is not a plain folder name (no '.', '..', path "
                              "separator, NUL or control character)")
    return name


def safe_path(root: Path, *names: object) -> Path:
    """``root/<names[0]>/<names[1]>/...`` for names that came from elsewhere, checked before any file is touched:
    each one plain folder name (no separator, ``..``, absolute path, NUL, control character; at most
    :data:`MAX_NAME_BYTES` bytes), and the resolved path (symlinks followed) inside ``root``.
    Raises :class:`UnsafeNameError`."""
    path = root
    for index, name in enumerate(names):
        path = path / _check_name(name, "task" if index == 0 else "class")
    try:
        base, resolved = root.resolve(), path.resolve()
    except (OSError, RuntimeError) as err:  # a symbolic link loop
        raise UnsafeNameError(f"{path} does not resolve: {err}") from None
    if not resolved.is_relative_to(base):
        raise UnsafeNameError(f"{path} resolves to {resolved}, outside the data dir {base} (a symbolic link?): "
                              "keep the images inside the data dir, or point it at their real folder")
    return path


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-directories in sorted (stable, locale-independent) order."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image(path: Path, channels: int, size: int) -> np.ndarray:
    """One image converted to L or RGB and resized (bilinear) to size x size, as uint8 (C, size, size)."""
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
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    for path in files:
        try:
            real = path.resolve(strict=True)
            if not real.is_relative_to(base) or not stat.S_ISREG(real.stat().st_mode):
                raise ValueError(f"{path} is not a regular file inside {base}")
            images.append(load_image(real, channels, size))
        except (*_READ_ERRORS, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
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
