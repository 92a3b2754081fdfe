"""Offline warm-up pretraining on scikit-learn's digits, a proxy disjoint from every task stream."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fedpetah.config import WarmupConfig
from fedpetah.model import TaskModel

if TYPE_CHECKING:
    from fedpetah.backbone.build import Backbone


def digits_tensors(img_size: int, in_chans: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as (N, C, S, S) floats in [0, 1] and labels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).expand(-1, in_chans, -1, -1).contiguous(), torch.tensor(digits.target)


def random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotation, scale and shift, so features do not memorise pixel positions."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * 0.5
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def random_stroke_contrast(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, a random soft threshold: from the blurry upscaled 8x8 digit to a crisp binary stroke.

    Upscaled 8x8 digits are blobs; pen strokes in real images (MNIST, photos of text) are thin and sharp.
    Without this, digits-pretrained features transferred poorly to MNIST (the default run sat at chance).
    """
    n = images.shape[0]
    sharpness = 1.0 + 19.0 * torch.rand(n, 1, 1, 1, generator=generator)
    threshold = 0.25 + 0.35 * torch.rand(n, 1, 1, 1, generator=generator)
    sharp = torch.sigmoid((images - threshold) * sharpness)
    low, high = sharp.amin((1, 2, 3), keepdim=True), sharp.amax((1, 2, 3), keepdim=True)
    return (sharp - low) / (high - low).clamp_min(1e-6)


def warmup_pretrain(backbone: Backbone, config: WarmupConfig) -> dict[str, Any]:
    """Train the whole backbone with a temporary 10-way head; report held-out accuracy."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = digits_tensors(backbone.img_size, backbone.in_chans)
    order = torch.randperm(len(labels), generator=generator)
    n_test = len(labels) // 5
    test_idx, train_idx = order[:n_test], order[n_test:]
    model = TaskModel(backbone.module, 10, backbone.img_size, backbone.mean, backbone.std)
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    steps = config.epochs * -(-len(train_idx) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    start = time.perf_counter()
    nn.Module.train(model, True)  # real pretraining: batch-norm statistics do update here
    for _ in range(config.epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for batch in perm.split(config.batch_size):
            if len(batch) < 2:
                continue
            x = random_affine(random_stroke_contrast(images[batch], generator), generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(images[b]) for b in test_idx.split(256)])
    accuracy = float((logits.argmax(1) == labels[test_idx]).float().mean())
    backbone.module.eval().requires_grad_(False)
    return {
        "source": "warmup",
        "dataset": config.dataset,
        "train_images": int(len(train_idx)),
        "test_images": int(n_test),
        "epochs": config.epochs,
        "test_accuracy": round(accuracy, 4),
        "seconds": round(time.perf_counter() - start, 1),
        "label_counts": np.bincount(labels.numpy()).tolist(),
    }
