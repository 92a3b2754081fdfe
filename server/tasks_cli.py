"""``fedpetah-server task add|list``: declare tasks in the server's catalogue ``<state-dir>/tasks.yaml``.

    fedpetah-server task add flowers --classes daisy,rose,tulip --state-dir /srv/fedpetah
    fedpetah-server task list --state-dir /srv/fedpetah

Safe while the server runs (it picks a new task up at its next poll). Needs neither torch nor the server extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpetah.tasks.catalog import CatalogError, add_task, catalog_path, read_catalog

EXIT_CATALOG = 2  # argparse's exit code for a bad command line too


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedpetah-server task", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="append a task to the catalogue (created if missing)")
    add.add_argument("name", help="the task's name: a plain folder name, as on the devices (<data>/<task>/<class>/)")
    add.add_argument("--classes", required=True,
                     help="its class names, comma-separated (at least 2), e.g. daisy,rose,tulip")
    listing = commands.add_parser("list", help="print the catalogue: one task a line (index, name, classes as JSON)")
    for sub in (add, listing):
        sub.add_argument("--state-dir", type=Path, default=Path("fedpetah-state"),
                         help="the server's state dir (its catalogue is STATE_DIR/tasks.yaml)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = catalog_path(args.state_dir)
    try:
        if args.command == "add":
            classes = [c.strip() for c in args.classes.split(",")]
            tasks = add_task(path, args.name, classes)
            print(f"added task {len(tasks) - 1} {args.name!r} with {len(classes)} classes to {path} "
                  f"({len(tasks)} task(s)); a running server picks it up at its next poll")
        else:
            tasks = read_catalog(path)
            for index, task in enumerate(tasks):
                print(f"{index}\t{task.name}\t{json.dumps(list(task.classes), ensure_ascii=False)}")
            if not tasks:
                print(f"{path} declares no task", file=sys.stderr)
    except CatalogError as error:
        print(f"fedpetah-server task: error: {error}", file=sys.stderr)
        return EXIT_CATALOG
    return 0
