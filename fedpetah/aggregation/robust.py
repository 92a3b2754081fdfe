"""Robust aggregation: coordinate-wise median and trimmed mean (Yin et al. 2018).

Both ignore the example-count weights on purpose: a client can claim any count, and a weighted median
would let one liar with a huge count decide every coordinate. Count caps and norm clipping, the other
defences, run before any aggregator (``fedpetah.aggregation.bounds``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedpetah.aggregation.base import (
    AGGREGATORS,
    Aggregate,
    Aggregator,
    AggregatorConfig,
    compute_dtype,
)
from fedpetah.aggregation.validate import StateDict


def _sorted_stack(updates: list[StateDict], key: str, like: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([u[key].to(compute_dtype(like.dtype)) for u in updates])
    return stacked.sort(dim=0).values


def coordinate_median(updates: list[StateDict], like: StateDict) -> StateDict:
    """Per coordinate, the median over clients (the mean of the two middle values for an even count)."""
    n = len(updates)
    out: StateDict = {}
    for key, ref in like.items():
        ordered = _sorted_stack(updates, key, ref)
        middle = ordered[(n - 1) // 2 : n // 2 + 1].mean(dim=0)
        out[key] = middle.to(ref.dtype)
    return out


def trimmed_mean(updates: list[StateDict], like: StateDict, trim: int) -> StateDict:
    """Per coordinate, the mean after dropping the ``trim`` smallest and ``trim`` largest client values."""
    n = len(updates)
    if trim < 0 or 2 * trim >= n:
        raise ValueError(f"cannot trim {trim} from each end of {n} updates")
    out: StateDict = {}
    for key, ref in like.items():
        ordered = _sorted_stack(updates, key, ref)
        out[key] = ordered[trim : n - trim].mean(dim=0).to(ref.dtype)
    return out


@AGGREGATORS.register("median")
class CoordinateMedian(Aggregator[AggregatorConfig]):
    """Coordinate-wise median: tolerates fewer than half of the clients being arbitrary."""

    def aggregate(
        self, current: StateDict, updates: list[StateDict], weights: list[float], opt_state: StateDict
    ) -> Aggregate:
        return Aggregate(coordinate_median(updates, like=current), dict(opt_state))


@dataclass
class TrimmedMeanConfig(AggregatorConfig):
    """``trim_ratio``: the fraction of clients cut from each end, rounded down (Flower's ``beta``)."""

    trim_ratio: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.trim_ratio < 0.5:
            raise ValueError(f"strategy.aggregator.trim_ratio must be in [0, 0.5), got {self.trim_ratio}")


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator[TrimmedMeanConfig]):
    """Coordinate-wise trimmed mean: ``floor(trim_ratio * n)`` values cut from each end."""

    def aggregate(
        self, current: StateDict, updates: list[StateDict], weights: list[float], opt_state: StateDict
    ) -> Aggregate:
        trim = math.floor(self.config.trim_ratio * len(updates))
        state = trimmed_mean(updates, like=current, trim=trim)
        return Aggregate(state, dict(opt_state), {"trimmed_per_side": float(trim)})
