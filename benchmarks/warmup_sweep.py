"""Warm-up recipe loop: one candidate's held-out accuracy and CPU seconds, then a quick transfer check.

Run: ``.venv/bin/python benchmarks/warmup_sweep.py --tag NAME [--dataset glyphs --img-size 32 --epochs 14 --lr 5e-3
--rotation 45 --augmentation mild]`` (appends a JSON line to benchmarks/results/warmup_sweep.jsonl).
One torch thread. The candidate warms up a random efficientvit_b0 (no pruning, no recovery), then LoRA (the
default adapter) trains for one epoch on rotated_mnist tasks 1 and 3 (45 and 135 degrees) at 64 px and is
evaluated on their test sets. ``--load FILE`` skips the warm-up and probes cached weights (the digits warm-up).
A ranking aid only: one seed, one epoch, on a shared machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.backbone import build_backbone
from fedpetah.backbone.augment import Augmentation
from fedpetah.backbone.proxy import GLYPH_AUGMENTATION, load_proxy
from fedpetah.backbone.warmup import pretrain
from fedpetah.config import BackboneConfig, TrainConfig, WarmupConfig
from fedpetah.tasks import TaskStreamConfig, build_stream
from fedpetah.train import evaluate, train_adapter

RESULTS = Path(__file__).parent / "results"
AUGMENTATIONS = {"mild": GLYPH_AUGMENTATION, "full": Augmentation()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--dataset", default="glyphs")
    parser.add_argument("--classes", type=int, default=0, help="keep the first N classes (0: all)")
    parser.add_argument("--img-size", type=int, default=32, help="side the warm-up trains at")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rotation", type=float, default=45.0)
    parser.add_argument("--angle-weight", type=float, default=0.5)
    parser.add_argument("--augmentation", choices=sorted(AUGMENTATIONS), default="mild")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights (the sweep's rows: 0)")
    parser.add_argument("--load", default=None, help="probe these cached warm-up weights instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the random initial weights
    backbone = build_backbone(BackboneConfig(weights="random"))
    row: dict[str, object] = {"tag": args.tag, "args": vars(args)}
    if args.load:
        backbone.module.load_state_dict(load_file(args.load))
    else:
        proxy = load_proxy(args.dataset)
        if args.classes:
            keep = proxy.labels < args.classes
            proxy = replace(proxy, images=proxy.images[keep], labels=proxy.labels[keep], classes=args.classes)
        proxy = replace(proxy, augmentation=AUGMENTATIONS[args.augmentation])
        config = WarmupConfig(dataset=args.dataset, epochs=args.epochs, lr=args.lr, rotation=args.rotation,
                              angle_weight=args.angle_weight)
        backbone.module.requires_grad_(True)
        info = pretrain(backbone, config, proxy, img_size=args.img_size)
        row.update({k: info.get(k) for k in ("steps", "test_accuracy", "test_angle_accuracy", "cpu_seconds")})
    tasks = build_stream(TaskStreamConfig(name="rotated_mnist"))
    start = time.process_time()
    lora = []
    for t in (1, 3):
        adapter = build_adapter(adapter_config("lora"), backbone, tasks[t].num_classes)
        recipe = TrainConfig(epochs=1, lr=5e-3, batch_size=32, loss="cross_entropy", seed=t)
        train_adapter(adapter, tasks[t].train, recipe)
        lora.append(round(evaluate(adapter.model, tasks[t].test, 64, backbone.in_chans).accuracy, 4))
    row.update(lora_tasks_1_3=lora, lora_cpu_seconds=round(time.process_time() - start, 1),
               load_average=[round(v, 2) for v in os.getloadavg()])
    print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "warmup_sweep.jsonl").open("a") as out:
        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
