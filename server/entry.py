"""``fedpetah-server``'s console script: without the ``server`` extra it exits with a one-line install hint.

A device installs only the base dependencies (``pip install fedpetah``), and those install this script too.
"""

from __future__ import annotations

import importlib.util
import sys

SERVER_EXTRA_MODULES = ("hydra", "omegaconf", "ray", "sklearn", "mlxtend", "matplotlib")
"""What the ``server`` extra (pyproject.toml) installs that the server imports: Hydra's config composition, Ray
under ``flwr[simulation]``, scikit-learn, mlxtend's data sets and matplotlib's plots."""

HINT = "fedpetah-server: needs the server extra ({missing} missing): pip install 'fedpetah[server]'"


def missing_modules() -> list[str]:
    return [name for name in SERVER_EXTRA_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["task"]:  # the catalogue needs neither the server extra nor torch
        from server.tasks_cli import main as task

        return task(args[1:])
    if args[:1] == ["status"]:  # reads the state dir only: works on a device-less, extra-less machine too
        from server.status import main as status

        return status(args[1:])
    missing = missing_modules()
    if missing:
        print(HINT.format(missing=", ".join(missing)), file=sys.stderr)
        return 1
    from server.cli import main as serve

    return serve(argv)


if __name__ == "__main__":
    raise SystemExit(main())
