"""Federated against centralized learning quality: the default recipe on task streams x adapters, side by side.

Federated: the default experiment composed from ``configs/`` (plus your overrides), run under Flower's simulation
engine (``--engine flower``, as ``simulations/run.py`` does) or in one process (``--engine inprocess``: the same
ContinualServer, ClientRuntime and protocol messages without Flower/Ray; with one torch thread it gives the same
numbers, and it is what a recipe sweep can afford on 2 shared cores). Centralized: the same adapter on the same
pruned backbone trained on each task's whole training split for 2 epochs (AdamW, lr 5e-3, batch 32, as
``benchmarks/centralized.py``), evaluated on the same test split.

    .venv/bin/python benchmarks/quality.py                                    # 2 streams x 3 adapters
    .venv/bin/python benchmarks/quality.py --streams rotated_mnist --adapters lora
    .venv/bin/python benchmarks/quality.py --engine inprocess --no-centralized --label lr3 -- train.lr=0.003

Writes (and merges into) benchmarks/results/quality.json, quality.md and quality.png; every row records the load
average before and after it ran (the machine is shared: times are indicative only).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # simulations/ (the Flower engine) lives in the repository, not the wheel
RESULTS = ROOT / "benchmarks" / "results"
STREAMS, ADAPTERS = ("split_mnist", "rotated_mnist"), ("lora", "petah", "synqt")
CENTRAL_EPOCHS, CENTRAL_LR, CENTRAL_BATCH = 2, 5e-3, 32  # benchmarks/centralized.py's settings


def compose(overrides: list[str]) -> Any:
    """The experiment ``simulations/run.py`` would run with these Hydra overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fedpetah.experiment import register_configs, to_experiment

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return to_experiment(hydra_compose(config_name="config", overrides=overrides))


def federated_inprocess(config: Any, run_dir: Path) -> dict[str, Any]:
    """The ServerApp's loop without Flower: sample, encode/decode every request, train, aggregate, evaluate."""
    from fedpetah.device.client import ClientRuntime, simulated_data
    from fedpetah.device.local import BackboneCache, simulated_shard
    from fedpetah.serving.continual import ContinualServer
    from fedpetah.serving.round import ClientReply
    from fedpetah.wire.protocol import TrainReply, TrainRequest, specs

    torch.set_num_threads(config.simulation.torch_threads)
    server = ContinualServer(config, run_dir)
    cache = BackboneCache(run_dir / "client-cache")
    runtimes = {c: ClientRuntime(cache, c) for c in range(config.clients)}
    if config.fleet.name != "uniform":
        greet(server, runtimes)  # the server's assignment sees each simulated device's budget
    for plan in server.schedule():
        started = time.perf_counter()
        current = server.global_state(plan.task)
        expected_stats = server.router.specs(server.tasks[plan.task].num_classes)
        replies, bytes_down, bytes_up, bytes_stats = [], 0, 0, 0
        holders = [c for c in runtimes if len(simulated_shard(config.tasks, config.partition, config.clients, c,
                                                             plan.task, config.seed))]  # as the ServerApp samples
        for client in server.sample(holders, plan):
            request = server.train_request(plan, client, current, with_artifact=not cache.has(server.digest))
            sent = request.encode()
            answer = runtimes[client].train(TrainRequest.decode(sent), simulated_data(client)).encode()
            asked = expected_stats if request.stats is not None else None
            expected = specs({k: v.numpy() for k, v in server.reply_layout(client, current).items()})  # its variant's
            replies.append(ClientReply.of(client, TrainReply.decode(answer, expected, asked)))
            bytes_down += sent.array_bytes("adapter")  # counted as the ServerApp counts them
            bytes_up += answer.array_bytes("adapter") + answer.array_bytes("stats")
            bytes_stats += answer.array_bytes("stats")
        record = server.complete_round(plan, current, replies, bytes_down, bytes_up, started,
                                       extra={"bytes_stats_up": float(bytes_stats)})
        print(f"  round {plan.round}: task {plan.task} acc {[round(a, 3) for a in record.accuracy.values()]} "
              f"{time.perf_counter() - started:.1f}s", flush=True)
    return server.finish({"clients": config.clients})


SIMULATED_NODE = 1 << 40
"""Node id of simulated client ``c`` in the in-process engine: ``SIMULATED_NODE + c`` (a node id other than the
client id marks a simulated device in the server's ledger, as Flower's node ids do in its simulation)."""


def greet(server: Any, runtimes: dict[int, Any]) -> None:
    """Say hello to every simulated client as the ServerApp does (``server/app.py`` ``Federation.hello``): the run's
    sections, seed and clients, asking for the device profile, and record each decoded reply (holdings, profile
    with the memory budget) in the server's ledger."""
    from fedpetah.device.client import simulated_sources
    from fedpetah.wire.protocol import SENT_SECTIONS, HelloReply, HelloRequest, TaskInfo

    config = server.config  # its fleet's budgets are sized at the server's start
    tasks = tuple(TaskInfo(t.index, t.name, tuple(t.classes)) for t in server.tasks)
    sections = {name: asdict(getattr(config, name)) for name in SENT_SECTIONS}
    sent = HelloRequest(server.digest, tasks, config.seed, config.clients, sections, profile=True).encode()
    for client, runtime in runtimes.items():
        answer = runtime.hello(HelloRequest.decode(sent), simulated_sources(client).holdings).encode()
        hello = HelloReply.decode(answer, tasks)
        server.fleet.greeted(hello.partition, SIMULATED_NODE + client, hello.has_backbone, hello.holdings,
                             len(tasks), hello.profile)


def federated(config: Any, engine: str) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="fedpetah-quality-"))
    try:
        if engine == "flower":
            from simulations.engine import simulate  # the repository root is on sys.path (above)

            return simulate(config, run_dir)
        return federated_inprocess(config, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def centralized(config: Any, with_router: bool = False) -> dict[str, Any]:
    """Each task's adapter trained on the task's whole training split (``benchmarks/centralized.py``'s path).

    ``with_router``: also ``with_router``, the same adapters' task-aware accuracy combined with the statistics
    classifier as the federated runs use it (``config.router``: its ``task_aware_mix`` and ``head``), fitted on the
    statistics of every task's whole training split, i.e. the same recipe with the data pooled."""
    from fedpetah.adapters import build_adapter
    from fedpetah.artifact import load_artifact
    from fedpetah.config import TrainConfig
    from fedpetah.routing.features import FrozenFeatures, data_stats, feature_width
    from fedpetah.routing.model import TaskAwareModel
    from fedpetah.routing.router import fit_router
    from fedpetah.serving.pipeline import prepare_artifact
    from fedpetah.tasks import load_stream
    from fedpetah.train import evaluate, train_adapter

    backbone = load_artifact(prepare_artifact(config))
    accuracies, models, tasks = [], [], load_stream(config.tasks)
    for task in tasks:
        adapter = build_adapter(config.adapter, backbone, task.num_classes)
        recipe = TrainConfig(epochs=CENTRAL_EPOCHS, lr=CENTRAL_LR, batch_size=CENTRAL_BATCH, loss="cross_entropy",
                             seed=task.index)
        train_adapter(adapter, task.train, recipe)
        models.append(adapter.model)
        accuracies.append(evaluate(adapter.model, task.test, backbone.img_size, backbone.in_chans).accuracy)
    out = {"task_accuracy": accuracies, "average_accuracy": sum(accuracies) / len(accuracies)}
    if with_router:
        router = config.router
        stats = [data_stats(backbone, task.train, task.num_classes, router) for task in tasks]
        layer = fit_router(stats, feature_width(backbone, router.grid), router)
        features = FrozenFeatures(backbone.module, backbone.mean, backbone.std, router.grid)
        combined, start = [], 0
        for task, model in zip(tasks, models, strict=True):
            aware = TaskAwareModel(model, features, layer, start, task.num_classes, router.task_aware_mix)
            combined.append(evaluate(aware, task.test, backbone.img_size, backbone.in_chans).accuracy)
            start += task.num_classes
        out["with_router"] = {"task_accuracy": combined, "average_accuracy": sum(combined) / len(combined),
                              "task_aware_mix": router.task_aware_mix, "head": router.head}
    return out


def run_case(stream: str, adapter: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides = [f"tasks={stream}", f"adapter={adapter}", *args.overrides]
    config = compose(overrides)
    row: dict[str, Any] = {"stream": stream, "adapter": adapter, "label": args.label, "engine": args.engine,
                           "overrides": args.overrides, "load_before": [round(x, 1) for x in os.getloadavg()],
                           "recipe": {"rounds_per_task": config.rounds_per_task, "train": asdict(config.train),
                                      "strategy": asdict(config.strategy), "clients": config.clients}}
    if not args.no_federated:
        start = time.perf_counter()
        summary = federated(config, args.engine)
        row["federated"] = {"average_accuracy": summary["average_accuracy"],
                            "task_accuracy": summary["accuracy_matrix"][-1],
                            "seconds": round(time.perf_counter() - start, 1)}
    if not args.no_centralized:
        start = time.perf_counter()
        row["centralized"] = {**centralized(config), "seconds": round(time.perf_counter() - start, 1)}
    if "federated" in row and "centralized" in row:
        row["gap_points"] = round(100 * (row["centralized"]["average_accuracy"]
                                         - row["federated"]["average_accuracy"]), 1)
    row["load_after"] = [round(x, 1) for x in os.getloadavg()]
    return row


def write(results: dict[str, dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(list(results.values()), indent=2))
    lines = ["# Federated vs centralized (same adapter, same pruned backbone)", "",
             f"Centralized: each task's whole training split, {CENTRAL_EPOCHS} epochs, AdamW lr {CENTRAL_LR}, "
             f"batch {CENTRAL_BATCH}. Federated: the default recipe plus the overrides shown. "
             "Load average (1, 5, 15 min) before each row: the machine is shared, seconds are indicative only.", "",
             "| stream | adapter | label | engine | recipe (rounds/task x local epochs, loss, fraction, aggregator) "
             "| overrides | federated | centralized | gap (points) | fed s | central s | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        fed, cen = r.get("federated", {}), r.get("centralized", {})
        lines.append(f"| {r['stream']} | {r['adapter']} | {r['label']} | {r['engine']} | {_recipe(r)} "
                     f"| {' '.join(r['overrides']) or '(defaults)'} | {_pct(fed)} | {_pct(cen)} "
                     f"| {r.get('gap_points', '')} | {fed.get('seconds', '')} | {cen.get('seconds', '')} "
                     f"| {r['load_before']} |")
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    plot(results)


def _recipe(row: dict[str, Any]) -> str:
    """The effective federated recipe of a row (its overrides are relative to the default of their day)."""
    recipe = row["recipe"]
    train, strategy = recipe["train"], recipe["strategy"]
    tasks = next((o.split("=", 1)[1] for o in row["overrides"] if o.startswith("tasks.num_tasks=")), None)
    return (f"{recipe['rounds_per_task']} x {train['epochs']}, {train.get('loss', 'cross_entropy')}, "
            f"{strategy['fraction']}, {strategy['aggregator']['name']}" + (f"; {tasks} tasks" if tasks else ""))


def _pct(part: dict[str, Any]) -> str:
    return f"{100 * part['average_accuracy']:.1f}%" if part else "not run"


def plot(results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.values() if "federated" in r or "centralized" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    x = range(len(rows))
    for offset, key in ((-0.2, "federated"), (0.2, "centralized")):
        ax.bar([i + offset for i in x], [100 * r.get(key, {}).get("average_accuracy", 0) for r in rows], 0.4,
               label=key)
    ax.set_xticks(list(x), [f"{r['stream']}\n{r['adapter']} {r['label']}" for r in rows], fontsize=7)
    ax.set_ylabel("average accuracy over tasks (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=list(STREAMS))
    parser.add_argument("--adapters", nargs="+", default=list(ADAPTERS))
    parser.add_argument("--engine", choices=("flower", "inprocess"), default="flower")
    parser.add_argument("--label", default="default", help="names the recipe variant in the results")
    parser.add_argument("--no-federated", action="store_true")
    parser.add_argument("--no-centralized", action="store_true")
    parser.add_argument("--render", action="store_true", help="only rewrite quality.md/png from quality.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the federated recipe (after --)")
    args = parser.parse_args()
    if args.render:
        write({_key(r): r for r in json.loads((RESULTS / "quality.json").read_text())})
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    path = RESULTS / "quality.json"
    for stream in args.streams:
        for adapter in args.adapters:
            row = run_case(stream, adapter, args)
            RESULTS.mkdir(parents=True, exist_ok=True)
            with open(RESULTS / ".quality.lock", "w") as lock:  # runs side by side merge, not clobber
                fcntl.flock(lock, fcntl.LOCK_EX)
                results = {_key(r): r for r in json.loads(path.read_text())} if path.is_file() else {}
                previous = results.get(_key(row), {})
                for part in ("federated", "centralized"):  # a partial re-run keeps the other half
                    if part not in row and part in previous:
                        row[part] = previous[part]
                if "federated" in row and "centralized" in row:
                    row["gap_points"] = round(100 * (row["centralized"]["average_accuracy"]
                                                     - row["federated"]["average_accuracy"]), 1)
                results[_key(row)] = row
                print(json.dumps(row), flush=True)
                write(results)


def _key(row: dict[str, Any]) -> str:
    return f"{row['stream']}/{row['adapter']}/{row['label']}/{row['engine']}"


if __name__ == "__main__":
    main()
