"""``fedpetah-server status --state-dir DIR [--json]``: what the server is doing, while it runs and after.

Reads ``<run-dir>/status.json`` (rewritten by the ServerApp whenever it starts a round or waits) and the bank's
commit point; never talks to the server, so it works on a stopped one too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fedpetah.serving.status import read_status

EXIT_NO_STATUS = 2
LISTED_DEVICES = 50  # a fleet of hundreds (or a simulation of thousands) is summed up above its table


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedpetah-server status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=Path("fedpetah-state"))
    parser.add_argument("--run-dir", type=Path, help="the run dir (default STATE/run)")
    parser.add_argument("--json", action="store_true", help="print the status document as JSON")
    parser.add_argument("--devices", type=int, default=LISTED_DEVICES, metavar="N",
                        help=f"list the N devices seen last (default {LISTED_DEVICES}; 0: every device)")
    return parser.parse_args(argv)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(stamp: object) -> str:
    if not isinstance(stamp, int | float):
        return "never"
    seconds = max(0.0, time.time() - float(stamp))
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h ago"


def _percent(value: object) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"


def render(status: dict[str, Any], listed: int = LISTED_DEVICES) -> str:
    """The status document as a few plain tables: the fleet summed up, then the ``listed`` devices seen last
    (connected ones first; 0: every device)."""
    running = _alive(status.get("pid")) and status.get("state") != "finished"
    state = status.get("state") if running or status.get("state") == "finished" else \
        f"stopped while {status.get('state')} (continue with --resume)"
    lines = [f"server: {state}, updated {_ago(status.get('updated'))}; bank version {status.get('bank_version')} "
             f"({status.get('completed_rounds')} rounds committed)"]
    if running and status.get("waiting_for"):
        lines.append(f"waiting for: {status['waiting_for']}")
    lines.append("")
    lines.append(f"{'task':<4} {'name':<24} {'state':<9} {'rounds':>7} {'devices':>8} {'images':>8} "
                 f"{'held out':>9} {'federated':>10}")
    for task in status.get("tasks", []):
        lines.append(f"{task['index']:<4} {task['name'][:24]:<24} {task['state']:<9} "
                     f"{task['rounds']:>3}/{task['rounds_total']:<3} {task['devices_with_data']:>8} "
                     f"{task['images']:>8} {task['held_out']:>9} {_percent(task.get('federated_accuracy')):>10}")
    if status.get("federated_task_free_accuracy") is not None:
        lines.append(f"task-free (federated): {_percent(status['federated_task_free_accuracy'])}")
    devices = status.get("devices", [])
    rejections: Counter[str] = Counter()
    for device in devices:
        rejections.update(device.get("rejections", {}))
    connected = sum(bool(d.get("connected")) for d in devices) if running else 0
    lines.append("")
    lines.append(f"devices: {len(devices)} known, {connected} connected; rounds trained "
                 f"{sum(d.get('rounds_trained', 0) for d in devices)}; rejections "
                 f"{', '.join(f'{r} {n}' for r, n in sorted(rejections.items())) or 'none'}")
    shown = sorted(devices, key=lambda d: (not d.get("connected"), -float(d.get("last_seen") or 0), d["client"]))
    shown = shown[:listed] if listed > 0 else shown
    lines.append(f"{'device':<22} {'connected':<16} {'rounds':>6} {'kept':>5}  images per task; rejections")
    for device in shown:
        seen = "yes" if device.get("connected") and running else _ago(device.get("last_seen"))
        images = " ".join(f"{t}:{n}" for t, n in sorted(device.get("images", {}).items())) or "-"
        rejected = ", ".join(f"{r} {n}" for r, n in sorted(device.get("rejections", {}).items())) or "none"
        kept = device.get("kept_version", -1)
        profile = device.get("profile") or {}
        budget = f"; budget {profile['memory_budget_mb']:.0f} MB" if "memory_budget_mb" in profile else ""
        no_budget = f", no-budget {device['no_budget']}" if device.get("no_budget") else ""
        lines.append(f"{device['client']!s:<22} {seen:<16} {device.get('rounds_trained', 0):>6} "
                     f"{kept if kept >= 0 else '-'!s:>5}  {images}; {rejected}{budget}{no_budget}")
    if len(shown) < len(devices):
        lines.append(f"... and {len(devices) - len(shown)} more devices (--devices 0 lists all, --json prints all)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    state = args.state_dir.expanduser().resolve()
    run_dir = (args.run_dir or state / "run").expanduser().resolve()
    try:
        status = read_status(run_dir)
    except (OSError, ValueError) as error:
        print(f"fedpetah-server status: error: {error}", file=sys.stderr)
        return EXIT_NO_STATUS
    if status is None:
        print(f"fedpetah-server status: no status in {run_dir}: the server has not started a run there",
              file=sys.stderr)
        return EXIT_NO_STATUS
    status["running"] = _alive(status.get("pid")) and status.get("state") != "finished"
    print(json.dumps(status, indent=1) if args.json else render(status, args.devices))
    return 0
