"""Sufficient statistics of a task's frozen features (:class:`FeatureStats`): validated when untrusted, summed
exactly across clients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedpetah.wire.protocol import STATS_KEYS

MAX_STATS_COUNT = 10_000_000
"""Default bound on one class's example count in a client's statistics (a larger one is rejected)."""
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
