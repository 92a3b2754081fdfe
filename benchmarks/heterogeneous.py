"""A mixed fleet (issue 19 item 7): budget-aware mixed-rank adapters against the two ways of ignoring the mix.

    .venv/bin/python benchmarks/heterogeneous.py                              # both streams, 3 cases, seed 0
    .venv/bin/python benchmarks/heterogeneous.py --streams rotated_mnist --cases mixed smallest --seeds 0 1
    .venv/bin/python benchmarks/heterogeneous.py --smoke --results /tmp/hetero  # tiny settings, end to end

Every case runs ``fleet=mixed``: three tiers of simulated devices (20% / 50% / 30% of the clients) whose memory
budgets the server sizes from the measured memory model of the run's backbone, resolution and batch size (small:
the head variant fits, middle: LoRA at a low rank, large: every variant). Cases:

- ``mixed``: ``assignment=budget`` (with ``strategy=hetlora``): each sampled device trains the richest variant of
  the run's LoRA adapter that fits its budget, and the mixed ranks are aggregated;
- ``smallest``: everyone trains the smallest tier's variant, ``adapter=head`` (the head variant of a LoRA run
  trains the head on a LoRA that stays at zero, i.e. the head adapter);
- ``fits_default``: ``assignment=strict``: only the devices that fit today's default adapter (LoRA rank 4) train;
  the others sit out, with their data.

Each run uses the in-process engine of ``benchmarks/quality.py`` (the ServerApp's ContinualServer, ClientRuntime
and protocol messages without Flower/Ray; it greets each simulated device as the ServerApp does, so the server
sees each device's budget). Per row: average task-aware and task-free accuracy, bytes up per round, wall seconds
per round, and from summary.json the participation, variants and peak memory per tier and
``over_budget_devices``. The target (issue 19): mixed beats both baselines on average accuracy, by at least 2
points over ``smallest`` on rotated_mnist, with every device contributing and nobody over budget.

Writes (and merges into) ``<results>/heterogeneous.json`` and ``heterogeneous.md`` (default benchmarks/results),
with the load average beside every row.
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
import quality  # noqa: E402  (benchmarks/quality.py: compose, the in-process engine)

STREAMS = ("rotated_mnist", "split_mnist")
CASES = {"mixed": ["fleet=mixed", "assignment=budget"],
         "smallest": ["fleet=mixed", "adapter=head"],
         "fits_default": ["fleet=mixed", "assignment=strict"]}
SMOKE = ["tasks.num_tasks=2", "rounds_per_task=2", "clients=10"]
MARGIN_STREAM, MARGIN_POINTS = "rotated_mnist", 2.0  # mixed must beat `smallest` by this much on this stream
COMMAND = ".venv/bin/python benchmarks/heterogeneous.py"


def run(overrides: list[str]) -> dict[str, Any]:
    """One federated run; what the table reports of it."""
    config = quality.compose(overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="fedpetah-hetero-"))
    try:
        started = time.perf_counter()
        summary = quality.federated_inprocess(config, run_dir)
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rounds = max(1, len(rows))
        return {"average_accuracy": summary["average_accuracy"], "task_accuracy": summary["accuracy_matrix"][-1],
                "task_free_accuracy": summary.get("task_free_accuracy"), "rounds": len(rows),
                "bytes_up_per_round": summary["bytes_up_total"] / rounds,
                "adapter_bytes_up_per_round": sum(r["bytes_up"] - r["extra"].get("bytes_stats_up", 0) for r in rows)
                / rounds,
                "seconds_per_round": statistics.mean(r["round_time_s"] for r in rows) if rows else None,
                "clients": config.clients, "adapter": config.adapter.name,
                "rank": getattr(config.adapter, "rank", None), "assignment": config.assignment.name,
                "aggregator": config.strategy.aggregator.name,
                "fleet_tiers": summary.get("fleet_tiers"), "over_budget_devices": summary.get("over_budget_devices"),
                "variants_used": summary.get("variants_used"), "seconds": round(seconds, 1)}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=list(STREAMS))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides added to every case")
    parser.add_argument("--smoke", action="store_true", help=f"tiny settings: {' '.join(SMOKE)} (label 'smoke')")
    parser.add_argument("--label", default=None, help="names rows run with --extra/--smoke (default: 'default', "
                                                      "'smoke' with --smoke)")
    parser.add_argument("--results", type=Path, default=quality.RESULTS, help="folder of the json and md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    extra = [*(SMOKE if args.smoke else []), *args.extra]
    label = args.label or ("smoke" if args.smoke else "default")
    results: dict[str, Any] = {"rows": {}}
    for stream in args.streams:
        for seed in args.seeds:
            for case in args.cases:
                load = os.getloadavg()[0]
                every = [f"tasks={stream}", *CASES[case], *extra, f"seed={seed}"]
                print(f"{stream} {case} seed {seed} [{label}]: {' '.join(every)}", flush=True)
                row = {"stream": stream, "case": case, "seed": seed, "label": label, "overrides": every,
                       "command": " ".join([COMMAND, *sys.argv[1:]]), **run(every)}
                row["load"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                results["rows"][f"{stream}/{case}/{seed}/{label}"] = row
                print(json.dumps(row), flush=True)
                save(results, args.results)


def save(results: dict[str, Any], folder: Path) -> None:
    """Merge ``results`` into the results file under a lock (runs side by side add rows, never clobber)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "heterogeneous.json"
    with open(folder / ".heterogeneous.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        merged["rows"].update(results["rows"])
        results["rows"].update(merged["rows"])
        path.write_text(json.dumps(merged, indent=1))
        (folder / "heterogeneous.md").write_text(render(merged))


def contributing(row: dict[str, Any]) -> bool | None:
    """Whether every device of the fleet trained at least once (None: the summary has no tiers)."""
    tiers = row.get("fleet_tiers")
    if not tiers:
        return None
    return all(t.get("participated", 0) >= t.get("devices", 0) for t in tiers.values())


def target(rows: dict[str, dict[str, Any]], stream: str) -> list[str]:
    """Whether a mixed row meets issue 19's target against the baselines of the same stream, seed and label:
    the reasons it misses it (by how much), or none."""
    mixed = rows["mixed"]
    missed = []
    for case, needed in (("smallest", MARGIN_POINTS if stream == MARGIN_STREAM else 0.0), ("fits_default", 0.0)):
        if case not in rows:
            missed.append(f"no {case} row")
            continue
        gain = 100 * (mixed["average_accuracy"] - rows[case]["average_accuracy"])
        if not (gain >= needed if needed else gain > 0):
            missed.append(f"{gain:+.1f} points over {case} (needs {f'>= {needed:g}' if needed else '> 0'})")
    if contributing(mixed) is not True:
        tiers = mixed.get("fleet_tiers") or {}
        idle = {n: t.get("devices", 0) - t.get("participated", 0) for n, t in tiers.items()}
        missed.append("devices never trained: " + (", ".join(f"{n} {k}" for n, k in idle.items() if k) or
                                                    "no fleet_tiers in the summary"))
    if mixed.get("over_budget_devices") != 0:
        missed.append(f"over_budget_devices {mixed.get('over_budget_devices')}")
    return missed


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _tiers(row: dict[str, Any], key: str) -> str:
    tiers = row.get("fleet_tiers") or {}
    if not tiers:
        return "-"
    if key == "participated":
        return ", ".join(f"{n} {t.get('participated', 0)}/{t.get('devices', 0)}" for n, t in tiers.items())
    if key == "variants":
        return "; ".join(f"{n}: " + (" ".join(f"{v} x{k}" for v, k in (t.get("variants") or {}).items()) or "none")
                         for n, t in tiers.items())
    return ", ".join(f"{n} {_num(t.get('peak_memory_mb'))} / {_num(t.get('budget_mb'))}" for n, t in tiers.items())


def render(results: dict[str, Any]) -> str:
    rows = sorted(results["rows"].values(), key=lambda r: (r["label"], r["stream"], r["seed"], list(CASES).index(
        r["case"]) if r["case"] in CASES else len(CASES)))
    lines = ["# Mixed fleets: budget-aware mixed ranks against the two ways of ignoring the mix (issue 19)", "",
             f"Command: `{COMMAND}` (see its docstring; each row's own command and overrides are in "
             "heterogeneous.json). Every case runs `fleet=mixed`: simulated devices in three tiers, 20% / 50% / 30% "
             "of the clients, whose memory budgets come from the measured memory model (small: the head variant "
             "fits, middle: LoRA at a low rank, large: every variant). `mixed`: `assignment=budget` (hetlora), each "
             "device trains the richest variant that fits its budget; `smallest`: everyone trains the smallest "
             "tier's variant (`adapter=head`); `fits_default`: `assignment=strict`, only the devices that fit "
             "today's default adapter (LoRA rank 4) train, the rest sit out. In-process engine (the ServerApp's "
             "server, clients and messages without Flower). Accuracy: average over tasks after the last; bytes up: "
             "the adapter updates and router statistics the devices sent per round (in brackets: the adapters "
             "alone); s / round: the mean round wall time; participation: devices of a tier that trained at least "
             "once / the tier's devices; variants: trainings per variant; peak / budget: the tier's largest "
             "training peak above the resting footprint, and its budget (MB). "
             "Load: the 1-minute load average before - after the row (2 shared cores: times are indicative).", "",
             "| label | stream | seed | case | task-aware | task-free | bytes up / round (adapters) | s / round "
             "| participation | variants | peak / budget MB | over budget | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['stream']} | {r['seed']} | {r['case']} | {_pct(r['average_accuracy'])} "
                     f"| {_pct(r.get('task_free_accuracy'))} | {r['bytes_up_per_round'] / 1024:.0f} KiB "
                     f"({r['adapter_bytes_up_per_round'] / 1024:.0f} KiB) "
                     f"| {_num(r['seconds_per_round'])} | {_tiers(r, 'participated')} | {_tiers(r, 'variants')} "
                     f"| {_tiers(r, 'peak')} | {r.get('over_budget_devices', '-')} "
                     f"| {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    lines += ["", f"## Target: `mixed` beats both baselines on average accuracy, by >= {MARGIN_POINTS:g} points over "
              f"`smallest` on {MARGIN_STREAM}, every device contributing, nobody over budget "
              "(`over_budget_devices` 0)", "",
              "Computed from the rows above, per (label, stream, seed). A device contributes when it trained at "
              "least once (the tier's participation); in a short run the sampling alone can leave a device out.",
              "",
              "| label | stream | seed | mixed - smallest (points) | mixed - fits_default (points) "
              "| every device contributing | over budget | target |",
              "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["stream"], r["seed"]), {})[r["case"]] = r
    for (label, stream, seed), cases in groups.items():
        if "mixed" not in cases:
            continue
        mixed = cases["mixed"]
        gains = [f"{100 * (mixed['average_accuracy'] - cases[c]['average_accuracy']):+.1f}" if c in cases else "-"
                 for c in ("smallest", "fits_default")]
        every = {True: "yes", False: "no", None: "-"}[contributing(mixed)]
        missed = target(cases, stream)
        lines.append(f"| {label} | {stream} | {seed} | {gains[0]} | {gains[1]} | {every} "
                     f"| {mixed.get('over_budget_devices', '-')} | "
                     f"{'met' if not missed else 'missed: ' + '; '.join(missed)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
