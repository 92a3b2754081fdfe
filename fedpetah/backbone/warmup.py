"""Offline pretraining on a proxy data set (warm-up, and recovery after pruning), cached by its settings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from fedpetah.atomic import atomic_write_bytes, atomic_write_text
from fedpetah.backbone.augment import augment
from fedpetah.backbone.base import Backbone
from fedpetah.backbone.config import WarmupConfig
from fedpetah.backbone.proxy import ProxySet, load_proxy
from fedpetah.model import TaskModel
from fedpetah.tasks.data import stratified_split

log = logging.getLogger(__name__)

WARMUP_FORMAT = 3
ANGLE_BINS = 8


def pretrain(
    backbone: Backbone, config: WarmupConfig, proxy: ProxySet, epochs: int | None = None, img_size: int | None = None
) -> dict[str, Any]:
    """Train the whole backbone (batch-norm statistics included) on ``proxy`` with temporary heads, at
    ``img_size`` (default: the backbone's).

    Returns what it did: data, epochs, held-out accuracy (a seeded 20% of the proxy images, distorted
    with a fixed generator), wall and CPU seconds and the load average. Seeded by ``config.seed`` alone.
    """
    epochs = config.epochs if epochs is None else epochs
    assert epochs is not None and config.lr is not None  # WarmupConfig fills both in
    size = backbone.img_size if img_size is None else img_size
    generator = torch.Generator().manual_seed(config.seed)
    train_idx, test_idx = (
        torch.from_numpy(i) for i in stratified_split(proxy.labels, 0.2, np.random.default_rng(config.seed))
    )
    with torch.random.fork_rng():  # seeded temporary heads, the caller's global RNG left as it was
        torch.manual_seed(config.seed)
        model = TaskModel(backbone.module, proxy.classes, size, backbone.mean, backbone.std)
        angle_head = nn.Linear(model.head.in_features, ANGLE_BINS)
    aug = proxy.augmentation if config.rotation is None else replace(proxy.augmentation, rotation=config.rotation)
    use_angle = config.angle_weight > 0 and aug.rotation > 0
    params = list(model.parameters()) + (list(angle_head.parameters()) if use_angle else [])
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.05)
    steps = epochs * (len(train_idx) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=max(1, steps))
    start, cpu_start = time.perf_counter(), time.process_time()
    nn.Module.train(model, True)  # real pretraining: batch-norm statistics do update here
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for batch in order.split(config.batch_size):
            if len(batch) < config.batch_size:
                continue  # equal batches keep the schedule's step count exact
            images, labels = proxy.tensors(batch)
            x, degrees = augment(images, aug, size, generator)
            features = model.features(x.expand(-1, backbone.in_chans, -1, -1))
            loss = F.cross_entropy(model.head(features), labels, label_smoothing=0.1)
            if use_angle:
                loss = loss + config.angle_weight * F.cross_entropy(angle_head(features), _angle_bins(degrees))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    held_out = torch.Generator().manual_seed(config.seed + 1)
    correct = angle_correct = 0
    with torch.no_grad():
        for batch in test_idx.split(256):
            images, labels = proxy.tensors(batch)
            x, degrees = augment(images, aug, size, held_out)
            features = model.features(x.expand(-1, backbone.in_chans, -1, -1))
            correct += int((model.head(features).argmax(1) == labels).sum())
            angle_correct += int((angle_head(features).argmax(1) == _angle_bins(degrees)).sum())
    backbone.module.eval().requires_grad_(False)
    info: dict[str, Any] = {
        "source": "warmup",
        "dataset": proxy.name,
        "classes": proxy.classes,
        "train_images": len(train_idx),
        "test_images": len(test_idx),
        "epochs": epochs,
        "steps": steps,
        "img_size": size,
        "lr": config.lr,
        "rotation": aug.rotation,
        "test_accuracy": round(correct / len(test_idx), 4),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
    }
    if use_angle:
        info["test_angle_accuracy"] = round(angle_correct / len(test_idx), 4)
    return info


def warm_up(backbone: Backbone, config: WarmupConfig, cache_dir: Path) -> dict[str, Any]:
    """Load the warm-up weights cached for these settings, or pretrain on the proxy and cache them."""
    proxy = load_proxy(config.dataset)
    key = warmup_key(backbone, config, proxy)
    stem = cache_dir / f"warmup-{backbone.model_name}-{backbone.img_size}px-{key}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.is_file() and meta.is_file():
        try:
            backbone.module.load_state_dict(load_file(str(weights)), strict=True)
            info: dict[str, Any] = json.loads(meta.read_text())
            return info
        except Exception as err:  # a corrupt cache entry is rebuilt, never trusted
            log.warning("discarding corrupt warm-up cache %s: %s", weights, err)
    log.info("warm-up pretraining %s at %d px on %s (cached)", backbone.model_name, backbone.img_size, proxy.name)
    info = pretrain(backbone, config, proxy, img_size=proxy.train_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights, save({k: v.contiguous() for k, v in backbone.module.state_dict().items()}))
    atomic_write_text(meta, json.dumps(info, indent=2))
    return info


def warmup_key(backbone: Backbone, config: WarmupConfig, proxy: ProxySet) -> str:
    """Content hash of everything that determines the warm-up weights."""
    payload = {
        "format": WARMUP_FORMAT,
        "name": backbone.model_name,
        "img_size": backbone.img_size,
        "in_chans": backbone.in_chans,
        "warmup": asdict(config),
        "timm": timm.__version__,
        "torch": torch.__version__,
        "proxy": proxy.versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _angle_bins(degrees: torch.Tensor) -> torch.Tensor:
    return torch.round(degrees / (360 / ANGLE_BINS)).long() % ANGLE_BINS
