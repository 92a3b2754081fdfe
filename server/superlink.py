"""``python -m server.superlink ARGS``: Flower's ``flower-superlink ARGS`` with a longer SQLite busy timeout.

Flower 1.42 opens its state database (``superlink.db``) with ``busy_timeout=5000``: a request that waits more than
5 s for SQLite's single write lock fails with HTTP 500 ``(sqlite3.OperationalError) database is locked``. With 25
light devices on a loaded 2-core machine (benchmarks/fleet.py) a device's ``push-messages`` and the ServerApp's
``acquire-task`` waited longer than that while other writes held the lock, and the device's reply was lost (Flower's
SuperNode does not push it again). Waiting longer costs a slow answer instead of a lost one, so the SuperLink that
fedpetah-server starts waits up to :data:`BUSY_TIMEOUT_MS`.
"""

from __future__ import annotations

import sys

from flwr.supercore import sql_mixin
from flwr.superlink.cli import flower_superlink

BUSY_TIMEOUT_MS = 60_000


def busy_timeout(pragmas: tuple[tuple[str, str], ...], milliseconds: int) -> tuple[tuple[str, str], ...]:
    """Flower's SQLite pragmas with ``busy_timeout`` set to ``milliseconds`` (a ValueError if Flower no longer
    sets one there: then this module needs a look)."""
    if not any(name == "busy_timeout" for name, _ in pragmas):
        raise ValueError("Flower's SQLite pragmas hold no busy_timeout: update server/superlink.py")
    return tuple((name, str(milliseconds) if name == "busy_timeout" else value) for name, value in pragmas)


def main(argv: list[str]) -> None:
    sql_mixin.SQLITE_PRAGMAS = busy_timeout(sql_mixin.SQLITE_PRAGMAS, BUSY_TIMEOUT_MS)  # type: ignore[assignment,attr-defined]
    sys.argv = ["flower-superlink", *argv]
    flower_superlink()


if __name__ == "__main__":
    main(sys.argv[1:])
