"""Learning quality in the cross-device regime: many clients, few per round, extreme label skew (issue 18).

    .venv/bin/python benchmarks/cross_device.py                         # both streams, both regimes, seeds 0 1
    .venv/bin/python benchmarks/cross_device.py --streams rotated_mnist --regimes cross --seeds 0 \\
        --method mix=router.task_aware_mix=1.0

Per (stream, regime, method, seed): the default recipe plus the regime's and the method's overrides, run with the
in-process engine of ``benchmarks/quality.py`` (the ServerApp's ContinualServer, ClientRuntime and protocol
messages without Flower/Ray: the same numbers on 2 shared cores at a fraction of the time), and reports federated
task-aware and task-free accuracy, rounds to reach 90% of each task's final accuracy, and bytes up per round.
Centralized (the same adapter on the same pruned backbone, each task's data pooled; ``quality.centralized``) is
run once per stream. Regimes: ``cross`` = clients=200, partition.alpha=0.1, strategy.fraction=0.05;
``cross_alpha05`` = the same at Dirichlet 0.5 (the reference); ``default`` = today's default regime (50 clients,
Dirichlet 0.5, 20% per round). Method ``baseline`` runs the default recipe as it is; rows labelled ``baseline``
before commit dc6c7f6 ran with ``router.task_aware_mix=0`` (then the default), as ``adapter_only`` rows do now.

Writes (and merges into) benchmarks/results/cross_device.json and cross_device.md, with the load average beside
every row.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quality  # noqa: E402  (benchmarks/quality.py: compose, the in-process engine, centralized)

RESULTS = quality.RESULTS
REGIMES = {"cross": ["clients=200", "partition.alpha=0.1", "strategy.fraction=0.05"],
           "cross_alpha05": ["clients=200", "partition.alpha=0.5", "strategy.fraction=0.05"], "default": []}


def per_task_rounds(rows: list[dict[str, Any]], rounds_per_task: int) -> float | None:
    """Mean over tasks of the rounds a task needed to reach 90% of its accuracy at its last round."""
    needed = []
    for task in sorted({r["task"] for r in rows}):
        own = [r for r in rows if r["task"] == task and str(task) in r["accuracy"]]
        if not own:
            continue
        final = own[-1]["accuracy"][str(task)]
        reached = [r["extra"]["round_in_task"] for r in own if r["accuracy"][str(task)] >= 0.9 * final]
        needed.append(min(reached) if reached else rounds_per_task)
    return statistics.mean(needed) if needed else None


def run_federated(overrides: list[str]) -> dict[str, Any]:
    config = quality.compose(overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="fedpetah-cross-"))
    try:
        started = time.perf_counter()
        summary = quality.federated_inprocess(config, run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {"average_accuracy": summary["average_accuracy"], "task_accuracy": summary["accuracy_matrix"][-1],
                "task_free_accuracy": summary.get("task_free_accuracy"),
                "rounds_to_90": per_task_rounds(rows, config.rounds_per_task),
                "bytes_up_per_round": summary["bytes_up_total"] / max(1, len(rows)),
                "task_aware_mix": config.router.task_aware_mix, "router_head": config.router.head,
                "seconds": round(time.perf_counter() - started, 1)}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=list(quality.STREAMS))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--method", action="append", default=[],
                        help="LABEL=OVERRIDE[,OVERRIDE...] (repeatable); 'baseline' (no override) always runs")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-centralized", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    methods = {} if args.no_baseline else {"baseline": []}
    for item in args.method:
        label, _, overrides = item.partition("=")
        methods[label] = [o for o in overrides.split(",") if o]
    path = RESULTS / "cross_device.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "centralized": {}}
    for stream in args.streams:
        if not args.no_centralized and "with_router" not in results["centralized"].get(stream, {}):
            load = os.getloadavg()[0]
            started = time.perf_counter()
            central = quality.centralized(quality.compose([f"tasks={stream}"]), with_router=True)
            results["centralized"][stream] = {**central, "seconds": round(time.perf_counter() - started, 1),
                                              "load": [round(load, 2), round(os.getloadavg()[0], 2)]}
            save(results)
        for regime in args.regimes:
            for label, overrides in methods.items():
                for seed in args.seeds:
                    load = os.getloadavg()[0]
                    every = [f"tasks={stream}", *REGIMES[regime], *overrides, f"seed={seed}"]
                    print(f"{stream} {regime} {label} seed {seed}: {' '.join(every)}", flush=True)
                    row = {"stream": stream, "regime": regime, "method": label, "seed": seed, "overrides": every,
                           **run_federated(every)}
                    row["load"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                    results["rows"][f"{stream}/{regime}/{label}/{seed}"] = row
                    print(json.dumps(row), flush=True)
                    save(results)


def _kib(value: float) -> str:
    return f"{value / 1024:.0f} KiB" if value else "not counted"  # rows measured before the engine counted bytes


def save(results: dict[str, Any]) -> None:
    """Merge ``results`` into the results file under a lock (runs side by side add rows, never clobber)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "cross_device.json"
    with open(RESULTS / ".cross_device.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "centralized": {}}
        for part in ("rows", "centralized"):
            merged[part].update(results[part])
            results[part].update(merged[part])
        path.write_text(json.dumps(merged, indent=1))
        render(merged)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _uses_stats(row: dict[str, Any]) -> bool:
    """Whether a row's recipe combined the adapter with the statistics classifier (the default since dc6c7f6;
    rows labelled ``baseline`` before it, and ``adapter_only`` rows, ran with router.task_aware_mix=0)."""
    if "task_aware_mix" in row:  # recorded since the centralized `+ stats` column
        return bool(row["task_aware_mix"] > 0)
    mixes = [o.split("=", 1)[1] for o in row["overrides"] if o.startswith("router.task_aware_mix=")]
    return float(mixes[-1]) > 0 if mixes else row["method"] != "baseline"


def render(results: dict[str, Any]) -> None:
    lines = ["# Cross-device learning quality", "",
             "Command: `.venv/bin/python benchmarks/cross_device.py` (see its docstring). `cross` = 200 clients, "
             "5% per round, Dirichlet 0.1 (`cross_alpha05`: 0.5); `default` = 50 clients, 20%, Dirichlet 0.5. "
             "`baseline` rows: the adapter alone (router.task_aware_mix=0, the default until commit dc6c7f6), as "
             "`adapter_only`; `mix1`: with the statistics classifier (the default since). Federated: in-process "
             "engine (the ServerApp's server, clients and messages without Flower). Centralized: the same adapter "
             "and pruned backbone, each task's data pooled, 2 epochs: `centralized` the adapter alone, `+ stats` "
             "combined with the statistics classifier of the pooled data as the default recipe does "
             "(router.task_aware_mix=1); `gap` is against the centralized figure of the same recipe (`+ stats` for "
             "rows that use the statistics classifier). Mean and spread (max - min) over seeds; the "
             "load average (before - after) of every run is in cross_device.json.", "",
             "| stream | regime | method | seeds | task-aware | spread | task-free | centralized | + stats "
             "| gap (points) | rounds to 90% | bytes up / round | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in results["rows"].values():
        groups.setdefault((row["stream"], row["regime"], row["method"]), []).append(row)
    for (stream, regime, method), rows in sorted(groups.items()):
        aware = [r["average_accuracy"] for r in rows]
        free = [r["task_free_accuracy"] for r in rows if r["task_free_accuracy"] is not None]
        alone = results["centralized"].get(stream, {}).get("average_accuracy")
        stats = results["centralized"].get(stream, {}).get("with_router", {}).get("average_accuracy")
        central = stats if _uses_stats(rows[0]) else alone
        gap = f"{100 * (central - statistics.mean(aware)):.1f}" if central is not None else "-"
        loads = [x for r in rows for x in r["load"]]
        lines.append(
            f"| {stream} | {regime} | {method} | {len(rows)} | {100 * statistics.mean(aware):.1f}% "
            f"| {100 * (max(aware) - min(aware)):.1f} | {100 * statistics.mean(free):.1f}% "
            f"| {_pct(alone)} | {_pct(stats)} | {gap} "
            f"| {statistics.mean(r['rounds_to_90'] for r in rows):.1f} "
            f"| {_kib(statistics.mean([r['bytes_up_per_round'] for r in rows if r['bytes_up_per_round']] or [0]))} "
            f"| {min(loads):.1f}-{max(loads):.1f} |" if free else
            f"| {stream} | {regime} | {method} | {len(rows)} | {100 * statistics.mean(aware):.1f}% | - | - | - | - "
            f"| {gap} "
            f"| - | - | {min(loads):.1f}-{max(loads):.1f} |")
    (RESULTS / "cross_device.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
