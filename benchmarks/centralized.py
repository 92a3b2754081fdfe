"""Centralized sanity check: every adapter trained on a task stream without federation, pruned and not.

Run: ``.venv/bin/python benchmarks/centralized.py [--stream rotated_mnist --out centralized_rotated]``
(writes benchmarks/results/<out>.{json,md}). The backbone is the one the server ships, built through
fedpetah.serving.pipeline (warm-up, pruning and recovery are cached; a fresh build's wall and CPU seconds and the load
average are recorded beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedpetah.adapters import ADAPTERS, adapter_config, build_adapter
from fedpetah.artifact import load_artifact
from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig, WarmupConfig
from fedpetah.experiment import ExperimentConfig
from fedpetah.serving.pipeline import prepare_artifact
from fedpetah.tasks import TaskStreamConfig, build_stream
from fedpetah.train import evaluate, train_adapter

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="efficientvit_b0")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--adapters", nargs="*", default=None, help="default: every registered adapter")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.0, 0.5])
    parser.add_argument("--stream", default="split_mnist", help="task stream (split_mnist, rotated_mnist, ...)")
    parser.add_argument("--warmup-dataset", default=None, help="proxy data set of the warm-up (default: config's)")
    parser.add_argument("--tasks", type=int, default=5, help="evaluate the first N tasks of the stream")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--first-task-only", nargs="*", default=[], help="adapters evaluated on task 0 only")
    parser.add_argument("--out", default="centralized")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tasks = build_stream(TaskStreamConfig(name=args.stream))[: args.tasks]
    backbone_cfg = BackboneConfig(name=args.backbone, img_size=args.img_size)
    if args.warmup_dataset:
        # a fresh WarmupConfig: the data set's own epochs and lr (replace() would keep the default's)
        backbone_cfg = replace(backbone_cfg, warmup=WarmupConfig(dataset=args.warmup_dataset))
    prepared = []
    train_cfg = TrainConfig(epochs=args.epochs, lr=5e-3, batch_size=32, loss="cross_entropy")
    rows = []
    for ratio in args.ratios:
        experiment = ExperimentConfig(backbone=backbone_cfg, pruning=PruningConfig(ratio=ratio))
        start, cpu = time.perf_counter(), time.process_time()
        pruned = load_artifact(prepare_artifact(experiment))  # what the server ships (cached)
        prepared.append({
            "pruning_ratio": ratio,
            "seconds": round(time.perf_counter() - start, 1),  # near 0 when cached
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "pretraining": pruned.pretraining,
        })
        print(json.dumps(prepared[-1]), flush=True)
        for name in args.adapters or ADAPTERS.names():
            accuracies, start = [], time.perf_counter()
            lr = 1e-3 if name == "full" else train_cfg.lr
            for task in tasks[:1] if name in args.first_task_only else tasks:
                adapter = build_adapter(adapter_config(name), pruned, task.num_classes)
                cfg = TrainConfig(epochs=args.epochs, lr=lr, batch_size=32, loss="cross_entropy", seed=task.index)
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
    meta = {"stream": args.stream, "backbone": args.backbone, "img_size": args.img_size, "epochs": args.epochs,
            "torch_threads": torch.get_num_threads(), "prepared": prepared, "rows": rows}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(meta, indent=2))
    command = " ".join(sys.argv[1:])
    lines = [
        f"# Centralized {args.stream} ({args.backbone}, {args.img_size} px, {args.epochs} epochs per task)",
        "",
        f"Warm-up: {backbone_cfg.warmup.dataset}; `python benchmarks/centralized.py "
        f"{command}`",
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
