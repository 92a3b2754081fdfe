"""The Gaussian router: a seeded random projection of the router features and the LDA layer solved from every
task's statistics (:func:`fit_router`)."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict

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
    gets the lowest score possible, so it is never predicted. With ``config.head`` ``ccvr`` the layer is then
    re-fitted on virtual features (:class:`~fedpetah.config.RouterConfig`).

    The last few fits are remembered by the SHA-256 of their inputs (a round's evaluations fit the same
    statistics more than once), and each call returns its own copy.
    """
    config = config or RouterConfig()
    key = _fit_key(stats, features, config)
    if key not in _FITTED:
        _FITTED[key] = _solve(stats, features, config)
        while len(_FITTED) > FITS_REMEMBERED:
            _FITTED.popitem(last=False)
    _FITTED.move_to_end(key)
    return copy.deepcopy(_FITTED[key])


CCVR_RIDGE = 1e-2
"""Weight of ``||W - W_lda||^2`` (times the features' mean variance) in CCVR's re-fit: with fewer virtual features
per class than dimensions they are separable, and cross-entropy alone would grow the layer without bound along a
direction the draws happen to allow, so the re-fit would depend on the last bits of the statistics."""
FITS_REMEMBERED = 4
"""How many fitted routers :func:`fit_router` remembers (a few MB each at most)."""
_FITTED: OrderedDict[str, nn.Linear] = OrderedDict()


def _fit_key(stats: Sequence[FeatureStats], features: int, config: RouterConfig) -> str:
    digest = hashlib.sha256(json.dumps([features, asdict(config)], sort_keys=True).encode())
    for part in stats:
        for tensor in (part.count, part.sum, part.scatter):
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _solve(stats: Sequence[FeatureStats], features: int, config: RouterConfig) -> nn.Linear:
    """:func:`fit_router`'s solution, computed."""
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
    if config.head == "ccvr":
        weight, bias = _calibrated(weight, bias, stats, means, seen, torch.log(prior.clamp(min=1e-300)), shrunk,
                                   config)
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


def _task_factor(stats: FeatureStats, shrinkage: float) -> torch.Tensor | None:
    """A (D, D) float64 factor ``L`` with ``L L^T`` the task's within-class covariance shrunk as the router's
    pooled one is; None when the task has too few examples to estimate it (one per class or fewer)."""
    counts = stats.count.to(torch.float64)
    seen = counts > 0
    spare = float(counts.sum()) - int(seen.sum())
    if spare < 1:
        return None
    within = (stats.scatter - _class_scatter(counts, stats.sum)) / spare
    within = (within + within.T) / 2
    scale = float(within.diagonal().mean().clamp(min=1e-12))
    eye = torch.eye(stats.dim, dtype=torch.float64)
    shrunk = (1 - shrinkage) * within + (shrinkage + 1e-9) * scale * eye
    factor, info = torch.linalg.cholesky_ex(shrunk)
    return factor if int(info) == 0 and bool(torch.isfinite(factor).all()) else None


def _class_scatter(counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """(D, D) ``sum_c s_c s_c^T / n_c`` over the classes with examples."""
    seen = counts > 0
    return (sums[seen] / counts[seen][:, None]).T @ sums[seen]


def _calibrated(weight: torch.Tensor, bias: torch.Tensor, stats: Sequence[FeatureStats], means: torch.Tensor,
                seen: torch.Tensor, log_prior: torch.Tensor, pooled: torch.Tensor, config: RouterConfig
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The LDA layer ``(weight, bias)`` (K, D) re-fitted on virtual features, CCVR's calibration (see
    :class:`~fedpetah.config.RouterConfig`): ``config.ccvr_samples`` draws per class with examples from
    ``N(mean_k, Sigma_t)``, ``Sigma_t`` the within-class covariance of class k's task (the LDA's ``pooled`` one
    when a task has too few examples for its own), then at most ``config.ccvr_steps`` L-BFGS iterations of
    cross-entropy over every class with examples, plus the log prior, started from the LDA solution. Seeded by
    ``config.seed``; classes without examples keep their rows. The re-fit minimises cross-entropy plus
    :data:`CCVR_RIDGE` times the pooled variance times ``||W - W_lda||^2 / 2``."""
    generator = torch.Generator().manual_seed(config.seed)
    draws: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    start = 0
    for task in stats:
        factor = _task_factor(task, config.shrinkage)
        if factor is None:
            factor = torch.linalg.cholesky((pooled + pooled.T) / 2)
        for c in range(task.num_classes):
            k = start + c
            if not bool(seen[k]):
                continue
            noise = torch.randn(config.ccvr_samples, task.dim, generator=generator, dtype=torch.float64)
            draws.append(means[k] + noise @ factor.T)
            labels.append(torch.full((config.ccvr_samples,), len(labels), dtype=torch.int64))
        start += task.num_classes
    rows = torch.nonzero(seen).flatten()
    x = torch.cat(draws).to(torch.float32)
    y = torch.cat(labels)
    w = weight[rows].to(torch.float32).clone().requires_grad_(True)
    b = (bias[rows] - log_prior[rows]).to(torch.float32).clone().requires_grad_(True)
    prior = log_prior[rows].to(torch.float32)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=config.ccvr_steps, line_search_fn="strong_wolfe")

    start_w = w.detach().clone()
    strength = CCVR_RIDGE * float(pooled.diagonal().mean()) / 2  # in units of the features' variance

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + strength * (w - start_w).square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.clone(), bias.clone()
    weight[rows] = w.detach().to(torch.float64)
    bias[rows] = b.detach().to(torch.float64) + prior.to(torch.float64)
    return weight, bias

