"""Robustness benchmark: attack x aggregator on the default simulation (split_mnist, 50 clients, LoRA).

Each case composes the default config with a few overrides and runs it through the simulation code path
(``simulations.engine.simulate``: the real ClientApp encoding and ServerApp decoding), in a fresh process.
A fifth of the partition ids (``simulation.attack_fraction``, chosen from the seed) send the attack's
corruption of their honest reply in every round they are sampled.

    .venv/bin/python benchmarks/robustness.py                       # the essential rows
    .venv/bin/python benchmarks/robustness.py --all                 # the whole table
    .venv/bin/python benchmarks/robustness.py --case mix/default    # one case

Writes benchmarks/results/robustness.json and .md (cases already there are kept unless re-run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

UNBOUNDED = ["strategy.bounds.weight_cap=null", "strategy.bounds.clip_multiple=null",
             "strategy.bounds.reject_multiple=null", "strategy.bounds.task_size_cap=false"]
AGGREGATIONS: dict[str, list[str]] = {
    "default": [],  # bounded fedavg
    "fedavg_unbounded": UNBOUNDED,  # the old default: validation only
    "median": ["strategy=median"],
    "trimmed_mean": ["strategy=trimmed_mean"],
}
SINGLE = ["non_finite", "huge_norm", "wrong_shape", "missing_key", "inflated_count", "nan_count", "inf_count",
          "negative_count", "noise"]
ESSENTIAL = ["none/default", "mix/default", "mix/fedavg_unbounded"]
ALL = [f"{attack}/{agg}" for attack in ("none", "mix") for agg in AGGREGATIONS] + [f"{a}/default" for a in SINGLE]


def overrides(case: str) -> list[str]:
    attack, aggregation = case.split("/")
    return [*AGGREGATIONS[aggregation], f"simulation.attack={attack}", "simulation.attack_fraction=0.2"]


def run_case(case: str) -> dict[str, Any]:
    """One case in a fresh process (Ray and the caches start clean); its summary and per-round totals."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedpetah-robust-{case.replace('/', '-')}-"))
    load_before = os.getloadavg()
    start = time.perf_counter()
    code = ("import sys; from pathlib import Path; from server.bundle import compose_experiment; "
            "from simulations.engine import simulate; "
            "simulate(compose_experiment(sys.argv[2:]), Path(sys.argv[1]))")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", code, str(run_dir), *overrides(case)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{child.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def total(key: str) -> int:
        return int(sum(r["extra"].get(key) or 0 for r in rounds))

    losses = [r["extra"].get("train_loss_max") for r in rounds]
    # a diverged client's NaN loss is refused at decode time (reason "metrics"), or shows in train_loss_max
    diverged = [v is None or not math.isfinite(v) or r.get("rejections", {}).get("metrics", 0) > 0
                for v, r in zip(losses, rounds, strict=True)]
    return {
        "case": case,
        "overrides": overrides(case),
        "average_accuracy": summary["average_accuracy"],
        "final_accuracies": summary["accuracy_matrix"][-1],
        "rounds": len(rounds),
        "rejected": sum(r["num_rejected"] for r in rounds),
        "rejected_by_reason": {k: sum(r.get("rejections", {}).get(k, 0) for r in rounds) for k in
                               sorted({k for r in rounds for k in r.get("rejections", {})})},
        "clipped": total("agg_num_clipped"),
        "weight_capped": total("agg_num_weight_capped"),
        "rounds_without_aggregate": sum(1 for r in rounds if not r["extra"].get("aggregated")),
        "train_loss_max": max((v for v in losses if v is not None), default=None),
        "nan_train_loss_rounds": sum(diverged),
        "wall_seconds": round(wall, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "run_dir": str(run_dir),
    }


def write_markdown(results: dict[str, dict[str, Any]]) -> None:
    clean = results.get("none/default")
    lines = [
        "# Robustness: a fifth of 50 clients byzantine (split_mnist, LoRA, the default recipe, seed 0)",
        "",
        "`python benchmarks/robustness.py` (the `simulate` code path; 2-core CPU shared with other jobs, so wall",
        "times are noisy: the load average is recorded beside each). `default` is bounded FedAvg (count cap 3x the",
        "round's median claim and the task size, clip at 2x / reject beyond 10x the round's median update norm);",
        "`fedavg_unbounded` is the previous default (validation only). Final average accuracy over the 5 tasks;",
        "rejected / clipped / capped are totals over the run's rounds; NaN-loss rounds count rounds where a",
        "client's reported training loss was not finite (honest training diverged).",
        "",
        "| attack | aggregation | final avg acc | vs clean default | rejected | clipped | counts capped "
        "| NaN-loss rounds | wall s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in [c for c in ALL if c in results] + [c for c in results if c not in ALL]:
        r = results[case]
        attack, aggregation = case.split("/")
        delta = (f"{100 * (r['average_accuracy'] - clean['average_accuracy']):+.1f}"
                 if clean and case != "none/default" else "")
        lines.append(
            f"| {attack} | {aggregation} | {100 * r['average_accuracy']:.1f}% | {delta} | {r['rejected']} "
            f"| {r['clipped']} | {r['weight_capped']} | {r['nan_train_loss_rounds']} | {r['wall_seconds']} "
            f"| {r['loadavg_before'][0]:.1f} |"
        )
    (RESULTS / "robustness.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=ALL, help="default: the essential rows")
    parser.add_argument("--all", action="store_true", help="every case of the table")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "robustness.json"
    results = {r["case"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
    for case in ALL if args.all else (args.case or ESSENTIAL):
        results[case] = run_case(case)
        print(json.dumps(results[case]), flush=True)
        path.write_text(json.dumps(list(results.values()), indent=2))
        write_markdown(results)


if __name__ == "__main__":
    main()
