"""Task-free against task-aware accuracy on split_mnist and rotated_mnist, and what routing costs.

Each task's adapter is trained centrally on the backbone the server ships (or read from a finished run's
bank with ``--run-dir``); the router's statistics are the sum of every simulated client's statistics
(50 Dirichlet(0.5) shards, summed in client order: what the server aggregates when every client reports
once). Task-aware accuracy picks each task's adapter by its id; task-free accuracy predicts among every
class learned so far with no id.

Each ``--routers`` entry is a router to measure, as comma-separated ``RouterConfig`` overrides
(``grid=0,dim=256,joint=0,shrinkage=0`` is the router before stage grids; ``default`` the defaults).

Run: ``.venv/bin/python benchmarks/task_free.py`` (writes benchmarks/results/task_free.{json,md}).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.artifact import load_artifact
from fedpetah.bank import AdapterBank
from fedpetah.config import RouterConfig, TrainConfig
from fedpetah.routing.features import data_stats
from fedpetah.routing.predict import build_predictor, evaluate_task_free
from fedpetah.routing.stats import FeatureStats, aggregate_stats
from fedpetah.serving.pipeline import prepare_artifact
from fedpetah.tasks import PartitionConfig, TaskStreamConfig, batches, build_stream, partition
from fedpetah.train import evaluate, train_adapter
from server.bundle import compose_experiment

RESULTS = Path(__file__).parent / "results"


def federated_stats(backbone: Any, task: Any, clients: int, seed: int, router: RouterConfig) -> FeatureStats:
    shards = partition(task.train.labels.numpy(), clients, PartitionConfig(), seed + task.index)
    parts = [data_stats(backbone, task.train.subset(s), task.num_classes, router) for s in shards if len(s)]
    # through the wire form, as the server receives them (the within-class scatter travels as float32)
    return aggregate_stats(FeatureStats.from_tensors(p.tensors(), p.num_classes, p.dim) for p in parts)


def per_image_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median over ``repeats`` of one batch-1 forward pass."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def router_config(spec: str) -> RouterConfig:
    """``"grid=4,dim=512"`` -> RouterConfig with those fields (``default``: the defaults)."""
    if spec == "default":
        return RouterConfig()
    fields = {f.name: f.type for f in dataclasses.fields(RouterConfig)}
    values: dict[str, Any] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--routers {spec!r}: unknown field {key!r}; known: {sorted(fields)}")
        values[key] = value if key == "prior" else (float(value) if "." in value or key in ("shrinkage", "joint")
                                                   else int(value))
    return RouterConfig(**values)


def run_stream(stream: str, args: argparse.Namespace) -> dict[str, Any]:
    experiment = compose_experiment([])  # the default run's settings: the pruned backbone the server ships
    backbone = load_artifact(prepare_artifact(experiment))
    tasks = build_stream(TaskStreamConfig(name=stream))
    adapter = adapter_config(args.adapter)
    start, cpu = time.perf_counter(), time.process_time()
    bank = AdapterBank()
    aware = []
    for task in tasks:
        trained = build_adapter(adapter, backbone, task.num_classes)
        recipe = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=32, loss="cross_entropy", seed=task.index)
        train_adapter(trained, task.train, recipe)
        aware.append(evaluate(trained.model, task.test, backbone.img_size, backbone.in_chans).accuracy)
        bank.add_task(task.index, args.adapter, task.num_classes, trained.state(), task.classes,
                      {"task_name": task.name})
    train_s = time.perf_counter() - start
    out: dict[str, Any] = {"stream": stream, "adapter": args.adapter, "epochs": args.epochs,
                           "task_aware_per_task": aware, "task_aware_accuracy": sum(aware) / len(aware),
                           "train_seconds": round(train_s, 1),
                           "train_cpu_seconds": round(time.process_time() - cpu, 1), "routers": []}
    for spec in args.routers:
        router = router_config(spec)
        stats = {t.index: federated_stats(backbone, t, args.clients, experiment.seed, router) for t in tasks}
        matrix, routing = [], []
        for learned in range(len(tasks) - 1 if args.final_only else 0, len(tasks)):
            predictor = build_predictor(backbone, adapter, bank, stats, list(range(learned + 1)), router)
            result = evaluate_task_free(predictor, tasks[: learned + 1])
            matrix.append(result.per_task)
            routing.append(result.routing)
        x = next(batches(tasks[0].test, backbone.img_size, backbone.in_chans, 1))[0]
        aware_model = build_adapter(adapter, backbone, tasks[0].num_classes).merge()
        timings: dict[str, list[float]] = {"task_free": [], "task_aware": [], "load": []}
        for _ in range(args.timing_rounds):  # interleaved, so load changes hit both alike
            timings["task_free"].append(per_image_seconds(predictor.model, x, 5))
            timings["task_aware"].append(per_image_seconds(aware_model, x, 5))
            timings["load"].append(os.getloadavg()[0])
        free_s, aware_s = (sorted(v)[len(v) // 2] for v in (timings["task_free"], timings["task_aware"]))
        row = {
            "router": dataclasses.asdict(router),
            "router_dim": stats[0].dim,
            "task_free_matrix": matrix,
            "task_free_accuracy": sum(matrix[-1]) / len(matrix[-1]),
            "routing_matrix": routing,
            "routing_accuracy": sum(routing[-1]) / len(routing[-1]),
            "stats_bytes_per_client_task": stats[0].nbytes(),
            "batch1_seconds_task_free": free_s,
            "batch1_seconds_task_aware": aware_s,
            "task_free_over_task_aware_time": free_s / aware_s,
            "load_average": timings["load"],
        }
        row["gap_points"] = 100 * (out["task_aware_accuracy"] - row["task_free_accuracy"])
        print(json.dumps({"stream": stream, **{k: v for k, v in row.items() if "matrix" not in k}}), flush=True)
        out["routers"].append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", nargs="*", default=["split_mnist", "rotated_mnist"])
    parser.add_argument("--adapter", default="lora")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--routers", nargs="*", default=["default", "dim=512", "grid=0,dim=256,joint=0,shrinkage=0"],
                        help="routers to measure: comma-separated RouterConfig overrides, or 'default'")
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--final-only", action="store_true", help="evaluate task-free only after the last task")
    parser.add_argument("--out", default="task_free")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for spec in args.routers:
        router_config(spec)  # fail before training
    rows = [run_stream(stream, args) for stream in args.streams]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = [
        f"# Task-free vs task-aware ({args.adapter}, {args.epochs} epochs per task, central training, "
        f"router statistics summed over {args.clients} Dirichlet(0.5) clients)",
        "",
        "| stream | router (grid, dim, joint, shrinkage) | task-aware avg | task-free avg | gap (points) "
        "| router picks the task | stats B per client-task | batch-1 s task-free / task-aware (x) | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for q in r["routers"]:
            lines.append(
                f"| {r['stream']} | {q['router']['grid']}, {q['router_dim']}, {q['router']['joint']:g}, "
                f"{q['router']['shrinkage']:g} | {100 * r['task_aware_accuracy']:.1f}% "
                f"| {100 * q['task_free_accuracy']:.1f}% | {q['gap_points']:.1f} | {100 * q['routing_accuracy']:.1f}% "
                f"| {q['stats_bytes_per_client_task']:,} | {q['batch1_seconds_task_free']:.4f} / "
                f"{q['batch1_seconds_task_aware']:.4f} ({q['task_free_over_task_aware_time']:.1f}x) "
                f"| {min(q['load_average']):.1f}-{max(q['load_average']):.1f} |"
            )
    lines += ["", "Task-free accuracy matrix (row: after learning task i; %):", ""]
    for r in rows:
        for q in r["routers"]:
            lines.append(f"- {r['stream']}, grid {q['router']['grid']}, dim {q['router_dim']}, "
                         f"joint {q['router']['joint']:g}: " + "; ".join(
                " ".join(f"{100 * v:.1f}" for v in row) for row in q["task_free_matrix"]))
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
