"""The aggregator interface: typed config, one pure call signature, the AGGREGATORS registry."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch

from fedpetah.aggregation.validate import StateDict, update_norm, validate_update
from fedpetah.registry import Registry, type_argument


@dataclass
class AggregatorConfig:
    """Base of every aggregator's config (YAML ``strategy.aggregator``); subclasses add the options.

    ``name`` is a registered aggregator whose config class is exactly this one (build it with
    :func:`~fedpetah.aggregation.aggregator_config`). Bounds on counts and update norms are not the
    aggregator's: see :class:`~fedpetah.aggregation.bounds.BoundsConfig`.
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in AGGREGATORS:
            raise ValueError(f"strategy.aggregator.name: unknown aggregator {self.name!r}; valid: "
                             f"{', '.join(AGGREGATORS.names())}")
        expected = AGGREGATORS.get(self.name).config_class
        if type(self) is not expected:
            raise ValueError(f"aggregator {self.name!r} takes {expected.__name__}, not {type(self).__name__}")


C = TypeVar("C", bound=AggregatorConfig)


@dataclass(frozen=True)
class Aggregate:
    """One aggregation's result: the new global state, the new server-optimizer state, scalar metrics."""

    state: StateDict
    opt_state: StateDict
    metrics: dict[str, float] = field(default_factory=dict)


class Aggregator(ABC, Generic[C]):
    """A pure function object: ``aggregator(current, updates, weights, opt_state) -> Aggregate``.

    ``current`` is the global adapter state the clients started from, ``updates`` their full adapter
    states after local training, ``weights`` their example counts. Inputs are never mutated; the new state
    has ``current``'s keys, shapes and dtypes. The call is a library entry: it checks every update
    (:func:`~fedpetah.aggregation.validate.validate_update`; an invalid one raises ``InvalidUpdate``), then
    combines them with :meth:`combine`, which a caller that validated them already (a
    :class:`~fedpetah.aggregation.bounds.BoundedAggregation` round) calls directly.

    A subclass names its config type once, as the type argument (``class FedAdam(FedOpt[FedAdamConfig])``):
    that sets ``config_class`` and types ``self.config``; ``@AGGREGATORS.register(name)`` sets ``name``.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AggregatorConfig]] = AggregatorConfig
    config: C

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.config_class = type_argument(cls, AggregatorConfig) or cls.config_class

    def __init__(self, config: C) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs {self.config_class.__name__}")
        self.config = config

    @torch.no_grad()
    def __call__(
        self,
        current: Mapping[str, torch.Tensor],
        updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        opt_state: Mapping[str, torch.Tensor] | None = None,
    ) -> Aggregate:
        _check_weights(updates, weights)
        for update in updates:
            validate_update(update, current)
        return self._combine(current, updates, weights, opt_state)

    @torch.no_grad()
    def combine(
        self,
        current: Mapping[str, torch.Tensor],
        updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        opt_state: Mapping[str, torch.Tensor] | None = None,
    ) -> Aggregate:
        """The aggregate of ``updates`` that match ``current`` key for key (shape, dtype, finite values), unchecked."""
        _check_weights(updates, weights)
        return self._combine(current, updates, weights, opt_state)

    def _combine(
        self,
        current: Mapping[str, torch.Tensor],
        updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        opt_state: Mapping[str, torch.Tensor] | None,
    ) -> Aggregate:
        total = float(sum(weights))
        normalized = [float(w) / total for w in weights]
        batch: list[StateDict] = [dict(u) for u in updates]
        result = self.aggregate(dict(current), batch, normalized, dict(opt_state or {}))
        metrics = {
            "num_updates": float(len(updates)),
            "step_norm": update_norm(result.state, current),
            **result.metrics,
        }
        return Aggregate(result.state, result.opt_state, metrics)

    @abstractmethod
    def aggregate(
        self, current: StateDict, updates: list[StateDict], weights: list[float], opt_state: StateDict
    ) -> Aggregate:
        """The algorithm proper: ``weights`` are normalized to sum to one; must not mutate its inputs."""


AGGREGATORS: Registry[type[Aggregator[Any]]] = Registry("aggregator")


def _check_weights(updates: Sequence[object], weights: Sequence[float]) -> None:
    if not updates:
        raise ValueError("aggregation needs at least one update")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float64 whatever the storage dtype, so averaging adds no rounding of its own."""
    return torch.promote_types(dtype, torch.float64)


def weighted_mean(updates: Sequence[StateDict], weights: Sequence[float], like: StateDict) -> StateDict:
    """Per tensor ``sum_i weights[i] * updates[i]``, in ``like``'s dtypes (weights already normalized)."""
    mean: StateDict = {}
    for key, ref in like.items():
        acc = torch.zeros(ref.shape, dtype=compute_dtype(ref.dtype), device=ref.device)
        for update, weight in zip(updates, weights, strict=True):
            acc.add_(update[key].to(acc.dtype), alpha=weight)
        mean[key] = acc.to(ref.dtype)
    return mean
