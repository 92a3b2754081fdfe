"""Federated simulation benchmark: wall time, Flower/Ray overhead, bytes, accuracy, peak memory of the tree.

Each case runs ``simulations/run.py`` with Hydra overrides in a fresh process; the peak resident memory of
that process and all its children (the Ray workers) is sampled every 0.5 s.

    .venv/bin/python benchmarks/simulation.py                 # the cases below
    .venv/bin/python benchmarks/simulation.py --case default  # one case

Writes benchmarks/results/simulation.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

CASES: dict[str, list[str]] = {
    "default": [],
    "full": ["adapter=full", "train.lr=0.0005"],
    "synqt": ["adapter=synqt"],
    "rounds_5": ["rounds_per_task=5"],
    "rotated_lora": ["tasks=rotated_mnist"],
    "rotated_synqt": ["tasks=rotated_mnist", "adapter=synqt"],
    "clients_200": ["clients=200", "rounds_per_task=1", "strategy.fraction=0.05"],
    "clients_1000": ["clients=1000", "rounds_per_task=1", "strategy.fraction=0.01"],
    # scale: 100 clients a round (of those holding the task's images) among 1,000 and 10,000
    "scale_1000": ["clients=1000", "tasks.num_tasks=1", "rounds_per_task=3", "strategy.fraction=0.001",
                   "strategy.min_clients=100"],
    "scale_10000": ["clients=10000", "tasks.num_tasks=1", "rounds_per_task=3", "strategy.fraction=0.001",
                    "strategy.min_clients=100"],
}
SCALE = ("scale_1000", "scale_10000")  # the pair the page compares (issue 20: memory may grow at most 20%)


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_case(name: str, overrides: list[str]) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedpetah-bench-{name}-"))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    command = [sys.executable, str(ROOT / "simulations" / "run.py"), *overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    handle, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(handle))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{child.stderr.read()[-3000:] if child.stderr else ''}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round_up = [r["bytes_up"] / max(r["num_clients"], 1) for r in rounds]
    return {
        "case": name,
        "overrides": overrides,
        "wall_seconds": round(wall, 1),
        "rounds": len(rounds),
        "round_seconds_mean": round(sum(r["round_time_s"] for r in rounds) / len(rounds), 2),
        "round_seconds": [round(r["round_time_s"], 1) for r in rounds],
        "clients_per_round": [r["extra"]["sampled"] for r in rounds],
        "outside_rounds_seconds": round(wall - sum(r["round_time_s"] for r in rounds), 1),  # start, greeting, eval
        "overhead_seconds_mean": round(sum(r["extra"]["overhead_s"] for r in rounds) / len(rounds), 2),
        "average_accuracy": summary["average_accuracy"],
        "forgetting": summary["forgetting"],
        "backward_transfer": summary["backward_transfer"],
        "accuracy_matrix": summary["accuracy_matrix"],
        "upload_bytes_per_client_update": round(sum(per_round_up) / len(per_round_up)),
        "bytes_up_total": summary["bytes_up_total"],
        "bytes_down_total": summary["bytes_down_total"],
        "bytes_backbone_total": summary["bytes_backbone_total"],
        "trainable_params": summary["trainable_params"],
        "peak_rss_mb_process_tree": round(peak / 2**20),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, check=False).stdout.strip(),
        "run_dir": str(run_dir),
    }


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # forgetting needs two tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all cases")
    parser.add_argument("--render", action="store_true", help="only write the .md page from the .json")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "simulation.json"
    results = {r["case"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
    for name in [] if args.render else args.case or list(CASES):
        results[name] = run_case(name, CASES[name])
        print(json.dumps(results[name]), flush=True)
        path.write_text(json.dumps(list(results.values()), indent=2))
    lines = [
        "# Federated simulation (Flower simulation engine, Ray, 2-core CPU)",
        "",
        "Command: `python benchmarks/simulation.py` (every case; `--case NAME` for one, `--render` to rewrite this "
        "page): `simulations/run.py` with the overrides shown, sampling the memory of the whole process tree (Ray "
        "workers included) every 0.5 s, on this project's shared 2-core x86_64 machine. Each row was measured at "
        "its commit, with the recipe of that time; the current default run is in [quickstart.md](quickstart.md). "
        "Overhead is a round's wall time minus its slowest client's compute.",
        "",
        "| case | overrides | wall s | rounds | s/round | overhead s/round | avg acc | forgetting "
        "| upload B/client/round | peak RSS MB (tree) | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['case']} | {' '.join(r['overrides']) or '(defaults)'} | {r['wall_seconds']} | {r['rounds']} "
            f"| {r['round_seconds_mean']} | {r['overhead_seconds_mean']} | {100 * r['average_accuracy']:.1f}% "
            f"| {_figure(r['forgetting'])} | {r['upload_bytes_per_client_update']:,} "
            f"| {r['peak_rss_mb_process_tree']:,} | {r.get('commit', '')} |"
        )
    if all(name in results for name in SCALE):
        small, large = (results[name] for name in SCALE)
        lines += ["", f"Scale: {large['case']} against {small['case']} (100 clients a round): peak memory of the "
                  f"process tree x{large['peak_rss_mb_process_tree'] / small['peak_rss_mb_process_tree']:.2f}, "
                  f"s/round x{large['round_seconds_mean'] / small['round_seconds_mean']:.2f}, time outside rounds "
                  f"(Ray start, greeting every node, evaluation) {small['outside_rounds_seconds']} s vs "
                  f"{large['outside_rounds_seconds']} s."]
    (RESULTS / "simulation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
