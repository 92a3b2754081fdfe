"""Imported at start-up by a tests/loopback.py device's Python processes only (this folder leads their PYTHONPATH):
their TCP connections to the server's address leave from the device's own loopback address, as if each device were
a host of its own. ``FEDPETAH_LOOPBACK_SOURCE`` is ``SOURCE HOST PORT``; other connections are left alone.

Flower's SuperNode (httpx over httpcore, which opens sockets with ``socket.create_connection``) has no option for a
source address, and without one the kernel sends every device's connections from 127.0.0.1."""

from __future__ import annotations

import os
import socket
from typing import Any

_SPEC = os.environ.get("FEDPETAH_LOOPBACK_SOURCE", "").split()
if len(_SPEC) == 3:
    _SOURCE, _SERVER = (_SPEC[0], 0), (_SPEC[1], int(_SPEC[2]))
    _create_connection = socket.create_connection

    def _from_source(address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                     source_address: tuple[str, int] | None = None, **kwargs: Any) -> socket.socket:
        if source_address is None and (str(address[0]), int(address[1])) == _SERVER:
            source_address = _SOURCE
        return _create_connection(address, timeout, source_address, **kwargs)

    socket.create_connection = _from_source  # type: ignore[assignment]
