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

A mixed round (``ranks`` given: each update is the view of the task's adapter at its variant's rank, see
:mod:`fedpetah.aggregation.hetero`) checks each update against the view of ``current`` at its rank, takes the
median norm among the updates of the same rank (a head's delta is no outlier for being shorter than a LoRA's),
and combines them with the :class:`~fedpetah.aggregation.hetero.MixedRankAggregator` configured.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpetah.aggregation.base import Aggregate, Aggregator
from fedpetah.aggregation.hetero import MixedRankAggregator, RankedUpdate, variant_view
from fedpetah.aggregation.validate import (
    InvalidUpdate,
    Rejection,
    StateDict,
    Update,
    check_count,
    check_norm,
    check_values,
    clip_update,
    validate_update,
)
from fedpetah.wire.reasons import Reason


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


@dataclass(frozen=True)
class Candidate:
    """An update still in the round: its index in the batch, its state, its count and the norm of its delta."""

    index: int
    state: Mapping[str, torch.Tensor]
    count: int
    norm: float
    rank: int | None = None  # a mixed round's variant rank (None: the task's full adapter)
    reference: Mapping[str, torch.Tensor] | None = None  # the view of ``current`` it is a delta from (mixed rounds)


class BoundedAggregation:
    """``bounded(current, updates, counts, opt_state, task_size) -> RoundResult``; pure, inputs untouched.

    The round runs as steps that a subclass can override, in the style of Flower's strategies:
    :meth:`validate` (:meth:`validate_decoded` for updates decoded from replies) -> :meth:`reject_outliers`
    -> :meth:`clip` -> :meth:`cap_weights` -> :meth:`aggregate`.
    """

    def __init__(self, aggregator: Aggregator[Any], bounds: BoundsConfig) -> None:
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
        """The library entry: updates and counts of any origin, each checked by :meth:`validate`."""
        if len(updates) != len(counts):
            raise ValueError(f"{len(updates)} updates but {len(counts)} counts")
        return self.run(current, *self.validate(current, updates, counts), opt_state, task_size)

    @torch.no_grad()
    def decoded(self, current: Mapping[str, torch.Tensor], updates: Sequence[Update],
                opt_state: Mapping[str, torch.Tensor] | None = None, task_size: int | None = None,
                ranks: Sequence[int] | None = None) -> RoundResult:
        """The server's entry: updates decoded from replies to ``current`` (keys, shapes, dtypes and counts
        checked by the decode), of which :meth:`validate_decoded` checks only the values. ``ranks``: a mixed
        round's variant rank of each update, decoded against the view of ``current`` at that rank."""
        if ranks is not None and not isinstance(self.aggregator, MixedRankAggregator):
            raise ValueError(f"a round of mixed variants needs a mixed-rank aggregator, not {self.aggregator.name!r}")
        return self.run(current, *self.validate_decoded(current, updates, ranks), opt_state, task_size)

    def validate(self, current: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor] | None],
                 counts: Sequence[object]) -> tuple[list[Candidate], list[Rejection]]:
        """Each count checked by :func:`check_count` and each update by :func:`validate_update` and the absolute
        norm bound: kept, or rejected with the reason."""
        kept: list[Candidate] = []
        rejected: list[Rejection] = []
        for index, (update, count) in enumerate(zip(updates, counts, strict=True)):
            try:
                if update is None:
                    raise InvalidUpdate(Reason.TYPE, "no update")
                number = check_count(count)
                validate_update(update, current)
                kept.append(Candidate(index, update, number, check_norm(update, current, self.bounds.max_norm)))
            except InvalidUpdate as error:
                rejected.append(Rejection(index, error.reason, error.detail))
        return kept, rejected

    def validate_decoded(self, current: Mapping[str, torch.Tensor], updates: Sequence[Update],
                         ranks: Sequence[int] | None = None) -> tuple[list[Candidate], list[Rejection]]:
        """Each decoded update's values checked by :func:`check_values` (finite, within the absolute norm bound),
        against the view of ``current`` at its rank in a mixed round: kept, or rejected with the reason."""
        kept: list[Candidate] = []
        rejected: list[Rejection] = []
        for index, update in enumerate(updates):
            rank = None if ranks is None else ranks[index]
            reference = current if rank is None else variant_view(current, rank)
            try:
                kept.append(Candidate(index, update.state, update.count,
                                      check_values(update, reference, self.bounds.max_norm), rank,
                                      None if rank is None else reference))
            except InvalidUpdate as error:
                rejected.append(Rejection(index, error.reason, error.detail))
        return kept, rejected

    def run(self, current: Mapping[str, torch.Tensor], kept: list[Candidate], rejected: list[Rejection],
            opt_state: Mapping[str, torch.Tensor] | None, task_size: int | None) -> RoundResult:
        """The steps after validation: reject outliers, clip, cap weights, aggregate (a non-finite aggregate of
        finite updates, e.g. squares of float32 deltas near 3e38 in a FedOpt second moment, is not kept: it
        would freeze or break the task's adapter for good)."""
        median = statistics.median([c.norm for c in kept]) if kept else math.nan
        metrics: dict[str, float] = {"num_valid": float(len(kept)), "median_norm": median}
        groups: dict[int | None, list[Candidate]] = {}
        for candidate in kept:  # one group (rank None) unless the round is mixed
            groups.setdefault(candidate.rank, []).append(candidate)
        kept, outliers = [], []
        batch: list[StateDict] = []
        clips: list[float] = []
        clipped_count = 0
        for group in groups.values():
            group_median = statistics.median([c.norm for c in group])
            group, out = self.reject_outliers(group, group_median)
            outliers += out
            if group:
                clipped, clip = self.clip(current, group, group_median)
                kept, batch, clips = [*kept, *group], [*batch, *clipped], [*clips, clip]
                clipped_count += sum(c.norm > clip for c in group)
        metrics["num_norm_rejected"] = float(len(outliers))
        rejected = sorted([*rejected, *outliers], key=lambda r: r.index)
        if not kept:
            return RoundResult(None, rejected, metrics)
        order = sorted(range(len(kept)), key=lambda i: kept[i].index)  # the batch's order: reproducible sums
        kept, batch = [kept[i] for i in order], [batch[i] for i in order]
        clip = min(clips)
        weights, cap = self.cap_weights(kept, task_size)
        if kept[0].rank is not None:
            assert isinstance(self.aggregator, MixedRankAggregator)
            ranked = [RankedUpdate(state, c.rank or 0, w) for state, c, w in zip(batch, kept, weights, strict=True)]
            result = self.aggregator.combine_mixed(current, ranked, opt_state)
        else:
            result = self.aggregate(current, batch, weights, opt_state)
        if not all(bool(torch.isfinite(v).all()) for v in (*result.state.values(), *result.opt_state.values())):
            return RoundResult(None, rejected, metrics | {"non_finite_aggregate": 1.0})
        metrics |= result.metrics | {
            "num_clipped": float(clipped_count),
            "clip_bound": clip,
            "num_weight_capped": float(sum(float(c.count) > cap for c in kept)),
            "weight_cap": cap,
            "max_weight_share": max(weights) / sum(weights),
        }
        return RoundResult(result, rejected, metrics)

    def reject_outliers(self, kept: list[Candidate], median: float) -> tuple[list[Candidate], list[Rejection]]:
        """The updates within ``reject_multiple`` times the round's ``median`` delta norm, and the rest rejected."""
        multiple = self.bounds.reject_multiple
        if multiple is None or not median > 0:
            return kept, []
        limit = multiple * median
        outliers = [Rejection(c.index, Reason.NORM_OUTLIER,
                              f"update norm {c.norm:.4g} > {multiple:g} x the round's median {median:.4g}")
                    for c in kept if c.norm > limit]
        return [c for c in kept if c.norm <= limit], outliers

    def clip(self, current: Mapping[str, torch.Tensor], kept: list[Candidate], median: float
             ) -> tuple[list[StateDict], float]:
        """The updates with every delta longer than the clip bound scaled down to it, and that bound
        (``clip_norm``, and ``clip_multiple`` times the round's ``median`` delta norm)."""
        bounds = self.bounds
        clip = bounds.clip_norm if bounds.clip_norm is not None else math.inf
        if bounds.clip_multiple is not None and median > 0:
            clip = min(clip, bounds.clip_multiple * median)
        return [clip_update(c.state, current if c.reference is None else c.reference, clip)[0] if c.norm > clip
                else dict(c.state) for c in kept], clip

    def cap_weights(self, kept: list[Candidate], task_size: int | None) -> tuple[list[float], float]:
        """Each count capped at ``weight_cap`` times the kept updates' median count and at the task's size; the
        weights and the cap."""
        cap = math.inf
        if self.bounds.weight_cap is not None:
            cap = self.bounds.weight_cap * statistics.median([float(c.count) for c in kept])
        if self.bounds.task_size_cap and task_size is not None and task_size > 0:
            cap = min(cap, float(task_size))
        return [min(float(c.count), cap) for c in kept], cap

    def aggregate(self, current: Mapping[str, torch.Tensor], batch: list[StateDict], weights: list[float],
                  opt_state: Mapping[str, torch.Tensor] | None) -> Aggregate:
        """The configured aggregator's result over the validated, clipped updates (not validated again)."""
        return self.aggregator.combine(current, batch, weights, opt_state)
