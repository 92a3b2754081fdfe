"""Accuracy cost of slimming attention: centralized adapters on a backbone pruned with and without it.

Run: ``.venv/bin/python benchmarks/pruning_accuracy.py`` (writes benchmarks/results/pruning_accuracy.{json,md}).
Both variants start from the same warm-up backbone and go through the server's sequence (prune on the
proxy calibration batches, recover on the proxy data, pack, load the artifact back); then one adapter
per task is trained centrally (as benchmarks/centralized.py does) and evaluated on the task's test set.
``whole`` keeps the family's attention modules whole (the pruning before head slimming: no heads cut,
attention widths and the residual stream around them kept, no depth rule); ``slimmed`` is the family's
policy. Latency at one image is measured by benchmarks/pruning.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.artifact import load_artifact, pack_artifact
from fedpetah.backbone import Backbone, build_backbone
from fedpetah.backbone.warmup import digits_tensors, warmup_pretrain
from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig
from fedpetah.pruning import PrunePolicy, macs_and_params, policy_of, prune_backbone
from fedpetah.tasks import TaskStreamConfig, build_stream
from fedpetah.train import evaluate, train_adapter

RESULTS = Path(__file__).parent / "results"


def whole_attention(policy: PrunePolicy) -> PrunePolicy:
    """The family's policy with attention kept whole and no depth rule."""
    return replace(policy, head_layout=None, head_skip_reason="kept whole", prune_ports=False, depth_ratio=0.0)


def shipped(base: Backbone, config: BackboneConfig, pruning: PruningConfig, policy: PrunePolicy) -> Backbone:
    """Prune and recover as fedpetah.prepare does, then round-trip through the artifact."""
    images, _ = digits_tensors(base.img_size, base.in_chans)
    calibration = list(images[: 32 * pruning.calibration_batches].split(32))
    backbone = prune_backbone(base, pruning, calibration=calibration, policy=policy)
    if pruning.recovery_epochs:
        warmup_pretrain(backbone, replace(config.warmup, epochs=pruning.recovery_epochs))
    with tempfile.TemporaryDirectory() as directory:
        pack_artifact(backbone, Path(directory) / "artifact")
        return load_artifact(Path(directory) / "artifact")


def accuracy(backbone: Backbone, stream: str, adapter_name: str, epochs: int) -> list[float]:
    accuracies = []
    for task in build_stream(TaskStreamConfig(name=stream)):
        adapter = build_adapter(adapter_config(adapter_name), backbone, task.num_classes)
        train_adapter(adapter, task.train, TrainConfig(epochs=epochs, lr=5e-3, batch_size=32, seed=task.index))
        accuracies.append(evaluate(adapter.model, task.test, backbone.img_size, backbone.in_chans).accuracy)
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="efficientvit_b0")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--streams", nargs="*", default=["split_mnist", "rotated_mnist"])
    parser.add_argument("--adapters", nargs="*", default=["lora"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=["whole", "slimmed"], choices=["whole", "slimmed"])
    parser.add_argument("--out", default="pruning_accuracy")
    args = parser.parse_args()
    config = BackboneConfig(name=args.backbone, img_size=args.img_size)
    base = build_backbone(config)
    policy = policy_of(base.family)
    rows: list[dict[str, Any]] = []
    load_before = round(os.getloadavg()[0], 1)
    for variant in args.variants:
        chosen = whole_attention(policy) if variant == "whole" else policy
        backbone = shipped(base, config, PruningConfig(ratio=args.ratio), chosen)
        macs, params = macs_and_params(backbone)
        blocks = [s["module"] for s in backbone.pruning_history if s["op"] == "remove_block"]
        for stream in args.streams:
            for adapter_name in args.adapters:
                start = time.perf_counter()
                accs = accuracy(backbone, stream, adapter_name, args.epochs)
                row = {
                    "variant": variant, "stream": stream, "adapter": adapter_name, "params": params,
                    "mmacs": round(macs / 1e6, 2), "removed_blocks": blocks,
                    "task_accuracy": [round(a, 4) for a in accs], "mean_accuracy": round(sum(accs) / len(accs), 4),
                    "seconds": round(time.perf_counter() - start, 1), "load": round(os.getloadavg()[0], 1),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    meta = {
        "command": "python benchmarks/pruning_accuracy.py " + " ".join(sys.argv[1:]),
        "backbone": args.backbone, "img_size": args.img_size, "ratio": args.ratio, "epochs": args.epochs,
        "pretraining": base.pretraining, "load_before": load_before,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, meta))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Accuracy after pruning {meta['backbone']} at {meta['ratio']} ({meta['img_size']} px)",
        "",
        f"`{meta['command']}`; load average {meta['load_before']} at the start. Centralized, one adapter per task, "
        f"{meta['epochs']} epochs per task, on the warm-up backbone pruned, recovered and loaded back from its "
        "artifact. `whole`: attention kept whole (no heads cut, no depth rule); `slimmed`: the family's policy.",
        "",
        "| variant | stream | adapter | params | MMACs | blocks removed | mean acc | per task | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tasks = " ".join(f"{100 * a:.1f}" for a in r["task_accuracy"])
        lines.append(
            f"| {r['variant']} | {r['stream']} | {r['adapter']} | {r['params']:,} | {r['mmacs']} | "
            f"{len(r['removed_blocks'])} | {100 * r['mean_accuracy']:.1f}% | {tasks} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
