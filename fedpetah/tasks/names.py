"""What a task or class name may be: one plain folder name (a device stores a class's images under
``<data>/<task>/<class>/``), checked wherever a name comes from elsewhere. No torch."""

from __future__ import annotations

MAX_NAME_BYTES = 255  # NAME_MAX of Linux file systems


class UnsafeNameError(ValueError):
    """A task or class name from elsewhere (a server) that is not one plain folder name inside the data dir."""


def check_name(name: object, what: str) -> str:
    """``name`` if it is one plain folder name (a non-empty string of at most :data:`MAX_NAME_BYTES` UTF-8 bytes,
    not ``.`` or ``..``, without a path separator, NUL or control character); else :class:`UnsafeNameError`
    naming ``what`` (e.g. "task", "class")."""
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
