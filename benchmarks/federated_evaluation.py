"""Federated against server-side evaluation: the default experiment on split_mnist and rotated_mnist, where each
simulated client's holdout is its share of the test split (the same test images, spread over the clients).

    python benchmarks/federated_evaluation.py [--streams split_mnist rotated_mnist] [override ...]

Runs ``simulations/run.py`` once per stream (one after the other: the machine has 2 cores) and writes
benchmarks/results/federated_evaluation.{json,md}: average and task-free accuracy both ways, the devices and images
behind the federated figures, wall time and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_stream(stream: str, overrides: list[str], root: Path) -> dict[str, object]:
    run_dir = root / stream
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    command = [sys.executable, str(REPO / "simulations" / "run.py"), f"tasks={stream}", f"hydra.run.dir={run_dir}",
               *overrides]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    keys = ("average_accuracy", "federated_average_accuracy", "task_free_accuracy", "federated_task_free_accuracy",
            "federated_devices", "federated_images", "accuracy_matrix", "federated_accuracy_matrix")
    return {"stream": stream, "command": " ".join(["python simulations/run.py", f"tasks={stream}", *overrides]),
            "seconds": round(time.perf_counter() - started, 1), "load": [load_before, os.getloadavg()[0]],
            **{k: summary.get(k) for k in keys}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=["split_mnist", "rotated_mnist"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedeval-") as tmp:
        rows = [run_stream(stream, args.overrides, Path(tmp)) for stream in args.streams]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "federated_evaluation.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Federated against server-side evaluation", "",
             "Command: `python benchmarks/federated_evaluation.py` (the default experiment per stream; each simulated "
             "client's holdout is its seeded IID share of the test split, so the devices together hold the "
             "server's test images). Both figures come from the same run's `summary.json`.", "",
             "| stream | average: server | average: federated | task-free: server | task-free: federated | "
             "devices / images | wall | load |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        def pct(key: str, row: dict[str, object] = row) -> str:
            value = row.get(key)
            return f"{100 * value:.2f}%" if isinstance(value, float) else "-"

        load = row["load"]
        assert isinstance(load, list)
        lines.append(f"| {row['stream']} | {pct('average_accuracy')} | {pct('federated_average_accuracy')} | "
                     f"{pct('task_free_accuracy')} | {pct('federated_task_free_accuracy')} | "
                     f"{row['federated_devices']} / {row['federated_images']} | {row['seconds']} s | "
                     f"{load[0]:.2f}-{load[1]:.2f} |")
    (RESULTS / "federated_evaluation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
