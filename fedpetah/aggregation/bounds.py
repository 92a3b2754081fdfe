"""One bounded aggregation round: validate, bound counts and update norms against the round, then aggregate.

A client's example count is a claim and its update may be anything, so before the aggregator runs:

1. Every update is validated (keys, shapes, dtypes, finite values, an optional absolute norm bound) and
   every count checked: a count must be a positive whole number (not a bool, NaN, inf, negative or 3.5).
   Failures become rejections with a reason; they are never averaged in.
2. Norm outliers: with ``m`` the median norm of the round's valid update deltas, a delta longer than
   ``reject_multiple * m`` is rejected (reason ``norm_outlier``) and one longer than ``clip_multiple * m``
   is scaled down to that length (clipped). While fewer than half of a round's updates are hostile, ``m``
   is the length of an honest update, so no client moves the aggregate further than a few honest steps.
3. Count caps: each count is capped at ``weight_cap`` times the median count of the kept updates and,
   when the server knows it, at the task's training-set size (no client holds more than the whole task).

Then the configured aggregator combines the kept, clipped updates with the capped counts as weights.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedpetah.aggregation.base import Aggregate, Aggregator
from fedpetah.aggregation.validate import (
    InvalidUpdate,
    Rejection,
    StateDict,
    check_count,
    clip_update,
    update_norm,
    validate_update,
)


@dataclass
class BoundsConfig:
    """The per-round bounds (YAML ``strategy.bounds``); ``null`` turns one off.

    ``weight_cap``: a count counts at most this many times the round's median count.
    ``clip_multiple`` / ``reject_multiple``: a delta longer than that many times the round's median delta
    norm is clipped to it / rejected. ``clip_norm`` / ``max_norm``: absolute bounds on the delta norm
    (clip / reject; a fixed clip is the clipped FedAvg of DP-style training, without noise). ``task_size_cap``: cap
    counts at the task's training-set size when the server knows it (simulation: always right; on devices
    only when they hold the same data set as the server's copy).
    """

    weight_cap: float | None = 3.0
    clip_multiple: float | None = 2.0
    reject_multiple: float | None = 10.0
    clip_norm: float | None = None
    max_norm: float | None = None
    task_size_cap: bool = True

    def __post_init__(self) -> None:
        for name in ("weight_cap", "clip_multiple", "reject_multiple"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 1.0):
                raise ValueError(f"strategy.bounds.{name} must be >= 1 or null, got {value}")
        for name in ("clip_norm", "max_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"strategy.bounds.{name} must be positive or null, got {value}")
        if (self.clip_multiple is not None and self.reject_multiple is not None
                and self.reject_multiple < self.clip_multiple):
            raise ValueError(
                f"strategy.bounds.reject_multiple ({self.reject_multiple}) must be >= clip_multiple "
                f"({self.clip_multiple}): an update is clipped before it is far enough out to be rejected"
            )

    @classmethod
    def off(cls) -> BoundsConfig:
        """No relative bound at all (plain validation only): the unbounded baseline."""
        return cls(weight_cap=None, clip_multiple=None, reject_multiple=None, task_size_cap=False)


@dataclass(frozen=True)
class RoundResult:
    """The round's aggregate (``None`` when nothing was accepted), the rejections by batch index, metrics."""

    aggregate: Aggregate | None
    rejected: list[Rejection]
    metrics: dict[str, float] = field(default_factory=dict)


class BoundedAggregation:
    """``bounded(current, updates, counts, opt_state, task_size) -> RoundResult``; pure, inputs untouched."""

    def __init__(self, aggregator: Aggregator, bounds: BoundsConfig) -> None:
        self.aggregator = aggregator
        self.bounds = bounds

    @torch.no_grad()
    def __call__(
        self,
        current: Mapping[str, torch.Tensor],
        updates: Sequence[Mapping[str, torch.Tensor] | None],
        counts: Sequence[object],
        opt_state: Mapping[str, torch.Tensor] | None = None,
        task_size: int | None = None,
    ) -> RoundResult:
        if len(updates) != len(counts):
            raise ValueError(f"{len(updates)} updates but {len(counts)} counts")
        bounds = self.bounds
        rejected: list[Rejection] = []
        kept: list[tuple[int, Mapping[str, torch.Tensor], int, float]] = []  # index, update, count, norm
        for index, (update, count) in enumerate(zip(updates, counts, strict=True)):
            try:
                if update is None:
                    raise InvalidUpdate("type", "no update")
                number = check_count(count)
                validate_update(update, current, bounds.max_norm)
            except InvalidUpdate as error:
                rejected.append(Rejection(index, error.reason, error.detail))
                continue
            kept.append((index, update, number, update_norm(update, current)))
        metrics: dict[str, float] = {"num_valid": float(len(kept))}
        median_norm = statistics.median([norm for *_, norm in kept]) if kept else math.nan
        metrics["median_norm"] = median_norm
        if bounds.reject_multiple is not None and median_norm > 0:
            limit = bounds.reject_multiple * median_norm
            for index, _, _, norm in kept:
                if norm > limit:
                    rejected.append(Rejection(index, "norm_outlier",
                                              f"update norm {norm:.4g} > {bounds.reject_multiple:g} x the "
                                              f"round's median {median_norm:.4g}"))
            kept = [entry for entry in kept if entry[3] <= limit]
        metrics["num_norm_rejected"] = float(sum(r.reason == "norm_outlier" for r in rejected))
        rejected.sort(key=lambda r: r.index)
        if not kept:
            return RoundResult(None, rejected, metrics)
        clip = bounds.clip_norm if bounds.clip_norm is not None else math.inf
        if bounds.clip_multiple is not None and median_norm > 0:
            clip = min(clip, bounds.clip_multiple * median_norm)
        batch: list[StateDict] = []
        clipped = 0
        for _, update, _, norm in kept:
            if norm > clip:
                update, _ = clip_update(update, current, clip)
                clipped += 1
            batch.append(dict(update))
        cap = math.inf
        if bounds.weight_cap is not None:
            cap = bounds.weight_cap * statistics.median([float(count) for _, _, count, _ in kept])
        if bounds.task_size_cap and task_size is not None and task_size > 0:
            cap = min(cap, float(task_size))
        weights = [min(float(count), cap) for _, _, count, _ in kept]
        result = self.aggregator(current, batch, weights, opt_state)
        if not all(bool(torch.isfinite(v).all()) for v in (*result.state.values(), *result.opt_state.values())):
            # finite inputs, non-finite sums (e.g. squares of float32 deltas near 3e38 in a FedOpt second
            # moment): installing it would freeze or break the task's adapter for good, so the round keeps none
            return RoundResult(None, rejected, metrics | {"non_finite_aggregate": 1.0})
        metrics |= result.metrics | {
            "num_clipped": float(clipped),
            "clip_bound": clip,
            "num_weight_capped": float(sum(float(count) > cap for _, _, count, _ in kept)),
            "weight_cap": cap,
            "max_weight_share": max(weights) / sum(weights),
        }
        return RoundResult(result, rejected, metrics)
