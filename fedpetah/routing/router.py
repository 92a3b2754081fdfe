"""The Gaussian router: a seeded random projection of the router features and the LDA layer solved from every
task's statistics (:func:`fit_router`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from fedpetah.config import RouterConfig
from fedpetah.routing.stats import FeatureStats, StatsError
from fedpetah.wire.protocol import MAX_STATS_DIM

MAX_PROJECTION_BYTES = 64 * 2**20
"""Bound on the float64 (router features x dim) projection a client or the server builds (the default router on
efficientvit_b0: 2,304 x 512, 9 MB; mobilevit_xxs 15 MB); statistics are at most :data:`MAX_STATS_DIM` wide."""


def check_size(features: int, config: RouterConfig) -> None:
    """ValueError when router features of width ``features`` under ``config`` need statistics wider than
    :data:`MAX_STATS_DIM` or a projection larger than :data:`MAX_PROJECTION_BYTES` (whoever asks for them)."""
    width = config.width(features)
    if width > MAX_STATS_DIM:
        raise ValueError(f"router statistics of width {width} (grid {config.grid}, dim {config.dim}) exceed "
                         f"{MAX_STATS_DIM}: set router.dim")
    if width != features and features * width * 8 > MAX_PROJECTION_BYTES:
        raise ValueError(f"a router projection of {features} x {width} ({features * width * 8 / 2**20:.0f} MiB, "
                         f"grid {config.grid}, dim {config.dim}) exceeds {MAX_PROJECTION_BYTES // 2**20} MiB: "
                         "lower router.grid or router.dim")


def projection(features: int, config: RouterConfig) -> torch.Tensor | None:
    """(D, dim) float64 random signs / sqrt(dim), or None when no projection applies; at most
    :data:`MAX_PROJECTION_BYTES` (:func:`check_size`), built a few MB of rows at a time.

    The signs come from splitmix64 of (seed, index): integer arithmetic, so a client and the server build
    the same matrix on any platform and library version.
    """
    check_size(features, config)
    width = config.width(features)
    if width == features:
        return None
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    signs = np.empty((features, width), dtype=np.float64)
    rows = max(1, 2**19 // width)  # 4 MB of uint64 per block
    for start in range(0, features, rows):
        stop = min(features, start + rows)
        with np.errstate(over="ignore"):
            z = np.arange(start * width, stop * width, dtype=np.uint64)
            z = z + np.uint64(config.seed) * np.uint64(0x9E3779B97F4A7C15)
            z = (z + np.uint64(0x9E3779B97F4A7C15)) & mask
            z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & mask
            z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & mask
            z = z ^ (z >> np.uint64(31))
        signs[start:stop] = np.where((z >> np.uint64(63)) == 1, 1.0, -1.0).reshape(stop - start, width)
    signs /= np.sqrt(width)
    return torch.from_numpy(signs)


def project(features: torch.Tensor, config: RouterConfig) -> torch.Tensor:
    """(N, D) features -> (N, width) float64 features in the router's statistics space."""
    matrix = projection(features.shape[1], config)
    x = features.detach().to(torch.float64)
    return x if matrix is None else x @ matrix


def fit_router(stats: Sequence[FeatureStats], features: int, config: RouterConfig | None = None) -> nn.Linear:
    """A linear layer on (N, ``features``) router features scoring every (task, class) pair, task-major.

    ``W = mu_k^T S^-1``, ``b = -mu_k^T S^-1 mu_k / 2 + log prior_k`` with ``S`` the pooled within-class
    covariance shrunk towards ``tr(S)/D * I`` (float64 maths, float32 layer). A class without examples
    gets the lowest score possible, so it is never predicted.
    """
    config = config or RouterConfig()
    if not stats:
        raise StatsError("the router needs the statistics of at least one task")
    dim = config.width(features)
    if any(s.dim != dim for s in stats):
        raise StatsError(f"statistics of width {[s.dim for s in stats]}, the router expects {dim}")
    counts = torch.cat([s.count for s in stats]).to(torch.float64)
    sums = torch.cat([s.sum for s in stats])
    seen = counts > 0
    total = float(counts.sum())
    if int(seen.sum()) < 1 or total <= int(seen.sum()):
        raise StatsError(f"too few examples to fit the router: {int(total)} over {int(seen.sum())} classes")
    means = torch.where(seen[:, None], sums / counts.clamp(min=1)[:, None], torch.zeros_like(sums))
    scatter = sum((s.scatter for s in stats), torch.zeros(dim, dim, dtype=torch.float64))
    within = (scatter - (means * counts[:, None]).T @ means) / (total - int(seen.sum()))
    within = (within + within.T) / 2
    if not bool(torch.isfinite(within).all()):
        raise StatsError("the pooled covariance of these statistics is not finite")
    scale = float(within.diagonal().mean().clamp(min=1e-12))
    shrunk = (1 - config.shrinkage) * within + config.shrinkage * scale * torch.eye(dim, dtype=torch.float64)
    shrunk += 1e-9 * scale * torch.eye(dim, dtype=torch.float64)  # keeps a rank-deficient S invertible
    weight = torch.linalg.solve(shrunk, means.T).T  # (K, D): mu_k^T S^-1
    prior = counts / total if config.prior == "counts" else seen.to(torch.float64) / float(seen.sum())
    bias = -0.5 * (weight * means).sum(1) + torch.log(prior.clamp(min=1e-300))
    bias = torch.where(seen, bias, torch.full_like(bias, torch.finfo(torch.float32).min / 4))
    matrix = projection(features, config)
    if matrix is not None:
        weight = weight @ matrix.T  # (K, D): the projection folded into the layer
    weight, bias = weight.to(torch.float32), bias.to(torch.float32)
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        raise StatsError("the router solved from these statistics is not finite")
    layer = nn.Linear(features, len(counts))
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer
