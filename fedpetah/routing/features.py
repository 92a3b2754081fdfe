"""What the router reads from the frozen backbone (:class:`FrozenFeatures`), and what one client computes for
one task: the statistics of its images' projected features (:func:`data_stats`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedpetah.backbone import Backbone
from fedpetah.config import RouterConfig
from fedpetah.routing.router import check_size, projection
from fedpetah.routing.stats import FeatureStats, class_stats
from fedpetah.tasks import ImageSet, batches


class FrozenFeatures(nn.Module):
    """``backbone(normalize(x))`` for ``x`` in [0, 1]: the pooled features a head reads; :meth:`routed` adds
    what the router reads: with ``grid > 0`` every stage's output average-pooled to at most ``grid x grid``
    cells and concatenated (stage by stage, channel-major), else the pooled features themselves."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float], grid: int = 0) -> None:
        super().__init__()
        if grid < 0:
            raise ValueError(f"grid must be >= 0, got {grid}")
        if grid and not hasattr(backbone, "forward_intermediates"):
            raise ValueError(f"router.grid={grid} needs a timm backbone with forward_intermediates; "
                             f"{type(backbone).__name__} has none (set router.grid=0)")
        self.backbone = backbone
        self.grid = grid
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.backbone((x - self.mean) / self.std)
        return features

    def routed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled features, router features)`` from one backbone pass."""
        if not self.grid:
            pooled = self(x)
            return pooled, pooled
        final, stages = self.backbone.forward_intermediates((x - self.mean) / self.std)  # type: ignore[operator]
        pooled = self.backbone.forward_head(final, pre_logits=True)  # type: ignore[operator]
        return pooled, torch.cat([_cells(s, self.grid).flatten(1) for s in stages], dim=1)


def _cells(stage: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, min(grid, H), min(grid, W)) cell means. A plain average pool where the cells
    tile the map (it exports to ONNX with either torch exporter; an adaptive one only with torch.export)."""
    height, width = int(stage.shape[-2]), int(stage.shape[-1])
    rows, cols = min(grid, height), min(grid, width)
    if height % rows == 0 and width % cols == 0:
        return F.avg_pool2d(stage, (height // rows, width // cols))
    return F.adaptive_avg_pool2d(stage, (rows, cols))


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode without gradients, its training flag restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def feature_width(backbone: Backbone, grid: int = 0) -> int:
    """Width of the features the router reads (before projection): one forward pass of zeros."""
    module = FrozenFeatures(backbone.module, backbone.mean, backbone.std, grid)
    with _evaluating(backbone.module):
        zeros = torch.zeros(1, backbone.in_chans, backbone.img_size, backbone.img_size)
        return int(module.routed(zeros)[1].shape[1])


def frozen_features(backbone: Backbone, data: ImageSet, batch_size: int = 256, grid: int = 0) -> torch.Tensor:
    """(N, D) float32 features the router reads (``grid``: see :class:`FrozenFeatures`) for every image."""
    module = FrozenFeatures(backbone.module, backbone.mean, backbone.std, grid)
    with _evaluating(backbone.module):
        parts = [module.routed(x)[1] for x, _ in batches(data, backbone.img_size, backbone.in_chans, batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def data_stats(backbone: Backbone, data: ImageSet, num_classes: int, config: RouterConfig | None = None,
               batch_size: int = 32) -> FeatureStats:
    """What one client computes for one task: the statistics of its local images' projected frozen features
    (a ValueError before any image is read when ``config`` is too large for this backbone, :func:`check_size`).

    Streamed ``batch_size`` images at a time and summed in float64, so its memory is one inference batch's (a
    device passes its training batch size: the memory model's measure of training covers it), whatever the
    number of images."""
    config = config or RouterConfig()
    width = feature_width(backbone, config.grid)
    check_size(width, config)
    matrix = projection(width, config)
    module = FrozenFeatures(backbone.module, backbone.mean, backbone.std, config.grid)
    total = FeatureStats.zeros(num_classes, config.width(width))
    with _evaluating(backbone.module):
        for x, y in batches(data, backbone.img_size, backbone.in_chans, batch_size):
            features = module.routed(x)[1].detach().to(torch.float64)
            total = total + class_stats(features if matrix is None else features @ matrix, y, num_classes)
    return total
