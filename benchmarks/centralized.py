"""Centralized sanity check: every adapter trained on split_mnist without federation, pruned and not.

Run: ``.venv/bin/python benchmarks/centralized.py`` (writes benchmarks/results/centralized.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedpetah.adapters import ADAPTERS, adapter_config, build_adapter
from fedpetah.artifact import load_artifact
from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig
from fedpetah.experiment import ExperimentConfig
from fedpetah.prepare import prepare_artifact
from fedpetah.tasks import TaskStreamConfig, build_stream
from fedpetah.train import evaluate, train_adapter

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="efficientvit_b0")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--adapters", nargs="*", default=None, help="default: every registered adapter")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.0, 0.5])
    parser.add_argument("--tasks", type=int, default=5, help="evaluate the first N split_mnist tasks")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--first-task-only", nargs="*", default=[], help="adapters evaluated on task 0 only")
    parser.add_argument("--out", default="centralized")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tasks = build_stream(TaskStreamConfig(name="split_mnist"))[: args.tasks]
    train_cfg = TrainConfig(epochs=args.epochs, lr=5e-3, batch_size=32)
    rows = []
    for ratio in args.ratios:
        experiment = ExperimentConfig(backbone=BackboneConfig(name=args.backbone, img_size=args.img_size),
                                      pruning=PruningConfig(ratio=ratio))
        pruned = load_artifact(prepare_artifact(experiment))  # what the server ships (cached)
        for name in args.adapters or ADAPTERS.names():
            accuracies, start = [], time.perf_counter()
            lr = 1e-3 if name == "full" else train_cfg.lr
            for task in tasks[:1] if name in args.first_task_only else tasks:
                adapter = build_adapter(adapter_config(name), pruned, task.num_classes)
                cfg = TrainConfig(epochs=args.epochs, lr=lr, batch_size=32, seed=task.index)
                train_adapter(adapter, task.train, cfg)
                result = evaluate(adapter.model, task.test, pruned.img_size, pruned.in_chans)
                accuracies.append(result.accuracy)
            row = {
                "adapter": name,
                "pruning_ratio": ratio,
                "backbone_params": pruned.num_params(),
                "trainable_params": adapter.num_trainable(),
                "task_accuracy": [round(a, 4) for a in accuracies],
                "first_task_accuracy": round(accuracies[0], 4),
                "mean_accuracy": round(sum(accuracies) / len(accuracies), 4),
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    meta = {"backbone": args.backbone, "img_size": args.img_size, "epochs": args.epochs,
            "pretraining": pruned.pretraining, "rows": rows}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(meta, indent=2))
    lines = [
        f"# Centralized split_mnist ({args.backbone}, {args.img_size} px, {args.epochs} epochs per task)",
        "",
        "| adapter | pruning | backbone params | trainable | task 0 acc | mean acc (tasks) | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapter']} | {r['pruning_ratio']} | {r['backbone_params']:,} | {r['trainable_params']:,} "
            f"| {100 * r['first_task_accuracy']:.1f}% | {100 * r['mean_accuracy']:.1f}% | {r['seconds']} |"
        )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
