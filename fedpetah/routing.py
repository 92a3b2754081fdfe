"""Task-free prediction across the adapter bank: federated class statistics of frozen features -> Gaussian router.

Every client summarises its local data of a task as sufficient statistics of the frozen backbone's features
(:class:`FeatureStats`: per class a count and a sum, plus one sum of outer products); sums and counts add up
exactly across clients. The router reads every stage's output average-pooled to a small spatial grid
(``RouterConfig.grid``; 0: the final pooled features), randomly projected to ``RouterConfig.dim``. The server
turns the statistics of every learned task into a shared-covariance Gaussian classifier (LDA with shrinkage)
over all learned ``(task, class)`` pairs: a single linear layer on those features (:func:`fit_router`).
:class:`TaskFreeModel` combines it with each task's adapter:
``score(t, c) = (1 - a) log p(t | x) + a log p(t, c | x) + log softmax(adapter_t(x))_c`` with ``a`` =
``RouterConfig.joint`` and ``p(t | x)`` the router's posterior summed over the classes of task ``t``. Neither
the router nor the adapters ever see a task id at prediction time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedpetah.backbone import Backbone
from fedpetah.model import TaskModel
from fedpetah.tasks import ImageSet, batches
from fedpetah.wire.protocol import MAX_STATS_DIM, MAX_STATS_GRID, STATS_KEYS

MAX_STATS_COUNT = 10_000_000
"""Default bound on one class's example count in a client's statistics (a larger one is rejected)."""
MAX_PROJECTION_BYTES = 64 * 2**20
"""Bound on the float64 (router features x dim) projection a client or the server builds (the default router on
efficientvit_b0: 2,304 x 512, 9 MB; mobilevit_xxs 15 MB); statistics are at most :data:`MAX_STATS_DIM` wide."""
MAX_FEATURE_NORM = 1e6
"""Default bound on the length of one example's router features, which statistics are checked against: class
sums at most ``count * MAX_FEATURE_NORM`` long, entries of the within-class scatter and the trace of the raw
scatter at most ``count * MAX_FEATURE_NORM**2``. Measured on digits and random images (inputs in [0, 1],
normalised, random-weight backbones, 32-64 px, grid 0 and 4, projected to 512): 1.9 to 152 (mobilevitv2_200 at
grid 4), so an honest device is 6,000x inside it; and with ``count`` <= 10**7 every derived float64 sum, and the
float32 within-class scatter, stay far from overflow (1e19 per client against 3.4e38)."""


class StatsError(ValueError):
    """Statistics that do not fit what the server expects (keys, shapes, dtypes, values)."""


LEGACY_STATS_KEYS = ("count", "sum", "scatter")
"""The tensor form of statistics in banks written before the packed within-class scatter (read, never written)."""


def _between(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """(D, D) float64 ``sum_c s_c s_c^T / n_c`` over the classes with examples: the scatter of the class means."""
    seen = count > 0
    sums = total[seen]
    return (sums / count[seen].to(torch.float64)[:, None]).T @ sums


def _unpacked(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric (D, D) float64 matrix of a packed upper triangle (the inverse of the packing in
    :meth:`FeatureStats.tensors`)."""
    rows, cols = torch.triu_indices(dim, dim)
    square = torch.zeros(dim, dim, dtype=torch.float64)
    square[rows, cols] = packed.to(torch.float64)
    square[cols, rows] = packed.to(torch.float64)
    return square


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of one task's frozen features.

    ``count`` (C,) int64 examples per class, ``sum`` (C, D) float64 sum of features per class,
    ``scatter`` (D, D) float64 sum of ``x x^T`` over every example of the task. ``count`` is float64 in a
    bank's statistics that hold a down-weighted contribution (:meth:`scaled`). Their tensor form (:meth:`tensors`,
    what a client sends and the bank stores) replaces ``scatter`` by ``within``, the within-class scatter
    ``scatter - sum_c s_c s_c^T / n_c`` as a float32 packed upper triangle: a quarter of the bytes, and rounding
    relative to the spread around the class means (what the router uses) rather than to the raw second moment.
    """

    count: torch.Tensor
    sum: torch.Tensor
    scatter: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.count.shape[0])

    @property
    def dim(self) -> int:
        return int(self.sum.shape[1])

    @classmethod
    def zeros(cls, num_classes: int, dim: int) -> FeatureStats:
        return cls(
            torch.zeros(num_classes, dtype=torch.int64),
            torch.zeros(num_classes, dim, dtype=torch.float64),
            torch.zeros(dim, dim, dtype=torch.float64),
        )

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if (self.num_classes, self.dim) != (other.num_classes, other.dim):
            raise StatsError(f"cannot add statistics of shape {(self.num_classes, self.dim)} and "
                             f"{(other.num_classes, other.dim)}")
        return FeatureStats(self.count + other.count, self.sum + other.sum, self.scatter + other.scatter)

    def scaled(self, weight: float) -> FeatureStats:
        """These statistics counted with ``weight`` in (0, 1] per example: counts (float64), sums and the raw
        scatter times ``weight``. Exactly a weighted contribution: class means unchanged, and the within-class
        scatter :meth:`tensors` derives, ``weight * scatter - between(weight * count, weight * sum)``, is
        ``weight`` times this one's (the between-class scatter ``sum_c s_c s_c^T / n_c`` scales by
        ``weight**2 / weight``)."""
        if not 0.0 < weight <= 1.0:
            raise StatsError(f"a statistics weight must be in (0, 1], got {weight}")
        return FeatureStats(self.count.to(torch.float64) * weight, self.sum * weight, self.scatter * weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"count", "sum", "within"}`` (:data:`STATS_KEYS`), CPU and contiguous: what a client sends."""
        within = self.scatter - _between(self.count, self.sum)
        rows, cols = torch.triu_indices(self.dim, self.dim)
        packed = within[rows, cols]
        diagonal = rows == cols
        packed[diagonal] = packed[diagonal].clamp(min=0)  # >= 0 exactly; float64 cancellation may leave -1e-17
        tensors = {"count": self.count, "sum": self.sum, "within": packed.to(torch.float32)}
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], num_classes: int, dim: int, max_count: int = MAX_STATS_COUNT,
        legacy_ok: bool = False, max_norm: float = MAX_FEATURE_NORM,
    ) -> FeatureStats:
        """Validate untrusted statistics: exact keys, shapes and dtypes, finite values, counts in
        ``0..max_count``, a within-class scatter with a non-negative diagonal, and magnitudes that features no
        longer than ``max_norm`` can give (see :data:`MAX_FEATURE_NORM`; the bounds add up, so a sum of valid
        statistics is valid). Raises :class:`StatsError`. With ``legacy_ok`` (a bank's statistics, never a
        client's) the legacy form is read as well (:data:`LEGACY_STATS_KEYS`, the raw float64 scatter), and
        float64 counts (a sum holding a down-weighted contribution, :meth:`scaled`)."""
        legacy = legacy_ok and set(tensors) == set(LEGACY_STATS_KEYS)
        if set(tensors) != set(STATS_KEYS) and not legacy:
            raise StatsError(f"statistics need exactly the keys {list(STATS_KEYS)}, got {sorted(tensors)[:8]}")
        expected = {
            "count": ((num_classes,), torch.int64),
            "sum": ((num_classes, dim), torch.float64),
            **({"scatter": ((dim, dim), torch.float64)} if legacy else
               {"within": ((dim * (dim + 1) // 2,), torch.float32)}),
        }
        for key, (shape, dtype) in expected.items():
            value = tensors[key]
            dtypes = (dtype, torch.float64) if key == "count" and legacy_ok else (dtype,)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype not in dtypes:
                got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value)
                raise StatsError(f"statistics {key!r}: expected {dtype} {shape}, got {got}")
        count, total = tensors["count"], tensors["sum"]
        if not bool(torch.isfinite(count).all()) or float(count.min()) < 0 or float(count.max()) > max_count:
            raise StatsError(f"statistics counts must be in 0..{max_count}, got {count.tolist()[:10]}")
        second = tensors["scatter" if legacy else "within"]
        if not bool(torch.isfinite(total).all()) or not bool(torch.isfinite(second).all()):
            raise StatsError("statistics hold NaN or infinite values")
        if bool((total.abs().sum(1)[count == 0] > 0).any()):
            raise StatsError("statistics hold a feature sum for a class with no examples")
        if legacy and float((second - second.T).abs().max()) > 1e-6 * float(second.abs().max()) + 1e-12:
            raise StatsError("statistics scatter is not symmetric")
        square = second.clone() if legacy else _unpacked(second, dim)  # raw (legacy) or within-class scatter
        if bool((square.diagonal() < 0).any()):
            raise StatsError("statistics scatter has a negative diagonal")
        _check_magnitudes(count, total, square, legacy, max_norm)
        scatter = square if legacy else square + _between(count, total)
        if not bool(torch.isfinite(scatter).all()):
            raise StatsError("the scatter derived from these statistics is not finite")
        return cls(count.clone(), total.clone(), scatter)


def _check_magnitudes(count: torch.Tensor, total: torch.Tensor, square: torch.Tensor, raw: bool,
                      max_norm: float) -> None:
    """StatsError unless ``n`` features no longer than ``max_norm`` can give these statistics: each class sum
    at most ``n_c * max_norm`` long, the raw scatter's trace (the sum of squared lengths) and every entry of
    the within-class (or ``raw``) scatter at most ``n * max_norm**2``. Checked in this order, so the between-class
    scatter is computed only from sums that cannot overflow it."""
    slack = 1.0 + 1e-6  # float32 rounding of the packed within-class scatter
    counts = count.to(torch.float64)
    lengths = total.norm(dim=1)
    if bool((lengths > counts * max_norm * slack).any()):
        worst = int((lengths / counts.clamp(min=1)).argmax())
        raise StatsError(f"statistics class {worst}'s feature sum is {float(lengths[worst]):.3g} long for "
                         f"{int(count[worst])} examples: features longer than {max_norm:g}")
    limit = float(counts.sum()) * max_norm**2 * slack
    seen = count > 0
    trace = float(square.diagonal().sum())
    if not raw:
        trace += float(((lengths[seen] ** 2) / counts[seen]).sum())
    if not trace <= limit or not float(square.abs().max()) <= limit:
        raise StatsError(f"statistics scatter too large for {int(count.sum())} features no longer than "
                         f"{max_norm:g} (trace {trace:.3g})")


def aggregate_stats(parts: Iterable[FeatureStats]) -> FeatureStats:
    """Sum statistics in the order given (float64 sums of a fixed order are reproducible bit for bit)."""
    iterator = iter(parts)
    try:
        result = next(iterator)
    except StopIteration:
        raise StatsError("no statistics to aggregate") from None
    for part in iterator:
        result = result + part
    return result


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
        return self.backbone((x - self.mean) / self.std)

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


def class_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> FeatureStats:
    """Statistics of (N, D) features with labels in ``0..num_classes-1``, accumulated in float64."""
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise StatsError(f"features (N, D) and labels (N,) expected, got {tuple(features.shape)}, "
                         f"{tuple(labels.shape)}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise StatsError(f"labels outside 0..{num_classes - 1}")
    x = features.detach().to(torch.float64)
    y = labels.to(torch.int64)
    total = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    return FeatureStats(torch.bincount(y, minlength=num_classes), total, x.T @ x)


def data_stats(backbone: Backbone, data: ImageSet, num_classes: int, config: RouterConfig | None = None
               ) -> FeatureStats:
    """What one client computes for one task: the statistics of its local images' projected frozen features
    (a ValueError before any image is read when ``config`` is too large for this backbone, :func:`check_size`)."""
    config = config or RouterConfig()
    check_size(feature_width(backbone, config.grid), config)
    return class_stats(project(frozen_features(backbone, data, grid=config.grid), config), data.labels, num_classes)


ROUTER_KEY = "router"
"""Bank metadata key of the :class:`RouterConfig` the clients' statistics were taken with."""


@dataclass
class RouterConfig:
    """How the task-free router is built (``router.*`` in the experiment config); ``dim``, ``seed`` and ``grid``
    fix what clients compute and send. Not frozen, so Hydra can override its fields.

    ``grid``: features the router reads: every backbone stage's output average-pooled to at most
    ``grid x grid`` cells, concatenated (0: the final pooled features only); ``dim``: width they are
    randomly projected to before statistics are taken (0: no projection; the packed within-class
    scatter costs ``2 * dim * (dim + 1)`` bytes); ``seed``: the projection's seed; ``shrinkage``: weight of
    the scaled identity in the pooled covariance (0: plain LDA, 1: nearest mean); ``prior``: ``uniform``
    over (task, class) pairs or ``counts`` (the classes' share of the data); ``joint``: weight ``a`` of the
    router's own class posterior in the scores,
    ``(1 - a) log p(t | x) + a log p(t, c | x) + log softmax(adapter_t)_c`` (0: the task only).
    """

    dim: int = 512
    seed: int = 0
    shrinkage: float = 0.01
    prior: str = "uniform"
    grid: int = 4
    joint: float = 1.0

    def __post_init__(self) -> None:
        if self.dim < 0 or self.seed < 0:
            raise ValueError(f"router.dim and router.seed must be >= 0, got {self.dim}, {self.seed}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"router.shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.prior not in ("uniform", "counts"):
            raise ValueError(f"router.prior must be 'uniform' or 'counts', got {self.prior!r}")
        if not 0 <= self.grid <= MAX_STATS_GRID:
            raise ValueError(f"router.grid must be in 0..{MAX_STATS_GRID} (0: final pooled features), "
                             f"got {self.grid}")
        if not 0.0 <= self.joint <= 1.0:
            raise ValueError(f"router.joint must be in [0, 1], got {self.joint}")

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RouterConfig:
        """The config recorded in a bank's metadata. A record without ``grid`` comes from before the grid
        features: its statistics are of the final pooled features, scored by the task marginal only."""
        legacy = {"grid": 0, "joint": 0.0} if "grid" not in record else {}
        return cls(**{**legacy, **record})  # type: ignore[arg-type]

    def width(self, features: int) -> int:
        """Width of the statistics for router features of width ``features``."""
        return features if self.dim == 0 or self.dim >= features else self.dim


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


def joint_scores(router_scores: torch.Tensor, expert_logits: Sequence[torch.Tensor], joint: float = 0.0
                 ) -> torch.Tensor:
    """``(1 - joint) log p(t | x) + joint log p(t, c | x) + log softmax(expert_t)_c``: (N, K) scores over every
    (task, class) pair (log-probabilities when ``joint`` is 0).

    ``router_scores`` are (N, K) task-major; expert ``t`` gives (N, C_t) and ``sum C_t == K``.
    """
    widths = [int(e.shape[1]) for e in expert_logits]
    if sum(widths) != router_scores.shape[1]:
        raise ValueError(f"router scores {router_scores.shape[1]} classes, experts {widths}")
    log_joint = torch.log_softmax(router_scores, dim=1)
    parts, start = [], 0
    for logits, width in zip(expert_logits, widths, strict=True):
        own = log_joint[:, start : start + width]
        log_task = torch.logsumexp(own, dim=1, keepdim=True)
        router = log_task if joint == 0.0 else (1.0 - joint) * log_task + joint * own
        parts.append(router + torch.log_softmax(logits, dim=1))
        start += width
    return torch.cat(parts, dim=1)


def shares_frozen_backbone(expert: nn.Module, backbone: nn.Module) -> bool:
    """True for a plain :class:`TaskModel` whose backbone tensors equal the frozen backbone's (a head adapter)."""
    if type(expert) is not TaskModel:
        return False
    mine, frozen = expert.backbone.state_dict(), backbone.state_dict()
    return mine.keys() == frozen.keys() and all(
        mine[k].shape == frozen[k].shape and torch.equal(mine[k], frozen[k]) for k in mine
    )


class TaskFreeModel(nn.Module):
    """One model for every learned task: images in [0, 1] -> (N, K) scores over every learned class.

    ``experts[t]`` is task ``t``'s inference model (merged where the adapter allows); an expert that is a
    plain head on the frozen backbone reuses the router's backbone pass instead of running the backbone again.
    ``joint``: see :func:`joint_scores`.
    """

    def __init__(self, features: FrozenFeatures, router: nn.Linear, experts: Sequence[nn.Module],
                 widths: Sequence[int], shared: Sequence[bool] | None = None, joint: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= joint <= 1.0:
            raise ValueError(f"joint must be in [0, 1], got {joint}")
        self.joint = float(joint)
        if len(experts) != len(widths) or sum(widths) != router.out_features:
            raise ValueError(f"{len(experts)} experts with widths {list(widths)} for {router.out_features} scores")
        self.features = features
        self.router = router
        self.widths = [int(w) for w in widths]
        if shared is None:
            shared = [shares_frozen_backbone(e, features.backbone) for e in experts]
        if len(shared) != len(experts) or any(s and not isinstance(e, TaskModel) for e, s in zip(experts, shared,
                                                                                                    strict=True)):
            raise ValueError("shared: one flag per expert, True only for a TaskModel on the frozen backbone")
        self.shared = [bool(s) for s in shared]
        self.experts = nn.ModuleList(
            [e.head if shared else e for e, shared in zip(experts, self.shared, strict=True)]  # type: ignore[misc]
        )
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, routed = self.features.routed(x)
        logits = [expert(pooled) if shared else expert(x)
                  for expert, shared in zip(self.experts, self.shared, strict=True)]
        return joint_scores(self.router(routed), logits, self.joint)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) the task the router alone picks for each image."""
        scores = torch.log_softmax(self.router(self.features.routed(x)[1]), dim=1)
        per_task = torch.stack([s.logsumexp(1) for s in scores.split(self.widths, dim=1)], dim=1)
        return per_task.argmax(1)


@torch.no_grad()
def predict_indices(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N,) index of the best-scoring learned class for float32 images (N, C, H, W) in [0, 1]."""
    model.eval()
    out = [model(chunk).argmax(1) for chunk in images.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
