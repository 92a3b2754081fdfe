"""TaskModel: a frozen backbone's pooled features, input normalization and one task's linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def feature_dim(backbone: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """Width of the backbone's pooled output, measured by one forward pass (robust to pruning)."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, in_chans, img_size, img_size))
    backbone.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"backbone must return pooled features (N, C), got shape {tuple(out.shape)}")
    return int(out.shape[1])


class TaskModel(nn.Module):
    """``head(backbone(normalize(x)))``; normalization statistics stay frozen during training.

    The backbone's batch-norm layers are always in eval mode: their running statistics are
    part of the shipped backbone, not of any adapter, so training never changes them.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        img_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a task needs at least 2 classes, got {num_classes}")
        self.backbone = backbone
        self.img_size = img_size
        self.head = nn.Linear(feature_dim(backbone, img_size, len(mean)), num_classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    mean: torch.Tensor
    std: torch.Tensor

    def features(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.backbone((x - self.mean) / self.std)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
        return self
