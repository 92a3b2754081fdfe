"""Atomic file writes: a temp file beside the target, fsync, ``os.replace``, fsync of the folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".tmp-"
"""Prefix of the temp files (a folder's leftovers after a kill can be recognised and deleted)."""


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where folders cannot be opened)."""
    try:
        folder = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: no directory handles; the rename is still atomic
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` by ``data`` in one step: a reader, or a process killed at any moment, sees either the old
    file or the new one, never half of it. The new file gets exactly ``mode`` (no umask), whatever the old had."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)  # created 0600, owner only
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)
