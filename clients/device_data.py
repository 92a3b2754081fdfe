"""A device's own images: ``DIR/<task>/<class>/*.png|jpg``, read for the classes the server names."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedpetah.tasks import ImageSet
from fedpetah.tasks.folder import load_class, safe_path

log = logging.getLogger("fedpetah.client")

_LOADED: dict[tuple[str, str, tuple[str, ...]], tuple[ImageSet, int]] = {}


def data_dir(value: str) -> Path:
    """The node config's ``data-dir`` value as an existing directory."""
    if not value:
        raise ValueError("this node has no data-dir in its node config (fedpetah-client --data DIR)")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data dir {path} does not exist")
    return path


def device_task_data(root: Path, task_name: str, classes: list[str], store_size: int = 64,
                     channels: int = 3) -> ImageSet | None:
    """Every readable image of ``task_name`` labelled by the server's class order; None if the device has none.

    Classes the device lacks are simply absent (label skew is normal); unknown class folders are ignored
    with a warning; unreadable images are skipped and counted. A task or class name that is not a plain folder
    name inside the data dir raises :class:`fedpetah.tasks.folder.UnsafeNameError` (an error reply), before
    anything is read.
    """
    task_dir = safe_path(root, task_name)  # the names come from the server: checked before any file is touched
    class_dirs = [safe_path(root, task_name, name) for name in classes]
    if not task_dir.is_dir():
        return None
    key = (str(task_dir), task_name, tuple(classes))
    if key in _LOADED:
        return _LOADED[key][0]
    extra = sorted(p.name for p in task_dir.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        log.warning("task %s: ignoring class folders the server does not know: %s", task_name, extra)
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped = 0
    for label, class_dir in enumerate(class_dirs):
        if not class_dir.is_dir():
            continue
        try:
            loaded, bad = load_class(class_dir, channels, store_size, root)
        except ValueError as err:
            log.warning("task %s: %s", task_name, err)
            continue
        images += loaded
        labels += [label] * len(loaded)
        skipped += len(bad)
    if skipped:
        log.warning("task %s: skipped %d unreadable image(s)", task_name, skipped)
    if not images:
        return None
    data = ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64))
    _LOADED[key] = (data, skipped)
    return data
