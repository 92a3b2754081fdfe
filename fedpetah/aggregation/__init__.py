"""Server-side aggregation of per-task adapter updates: validation and a registry of pure aggregators."""

from __future__ import annotations

from typing import Any

from fedpetah.aggregation import fedavg, fedavgm, fedopt, hetero, lora_product, robust  # noqa: F401  (register aggregators)
from fedpetah.aggregation.base import AGGREGATORS, Aggregate, Aggregator, AggregatorConfig, weighted_mean
from fedpetah.aggregation.bounds import BoundedAggregation, BoundsConfig, RoundResult
from fedpetah.aggregation.hetero import (
    MixedRankAggregator,
    RankedUpdate,
    full_rank,
    head_view,
    lora_ranks,
    rank_view,
    validate_ranked,
    variant_name,
    variant_rank,
    variant_view,
    view_config_alpha,
)
from fedpetah.aggregation.validate import (
    Filtered,
    InvalidUpdate,
    Rejection,
    StateDict,
    Update,
    check_count,
    check_values,
    clip_update,
    filter_updates,
    update_norm,
    validate_update,
)


def aggregator_config(name: str, **fields: Any) -> AggregatorConfig:
    """The typed config of aggregator ``name``; unknown fields raise ``TypeError``."""
    return AGGREGATORS.get(name).config_class(name=name, **fields)


def build_aggregator(config: AggregatorConfig) -> Aggregator[Any]:
    """The aggregator ``config.name`` configured by ``config``."""
    return AGGREGATORS.get(config.name)(config)


__all__ = [
    "AGGREGATORS",
    "Aggregate",
    "Aggregator",
    "AggregatorConfig",
    "BoundedAggregation",
    "BoundsConfig",
    "Filtered",
    "InvalidUpdate",
    "MixedRankAggregator",
    "RankedUpdate",
    "Rejection",
    "RoundResult",
    "StateDict",
    "Update",
    "aggregator_config",
    "build_aggregator",
    "check_count",
    "check_values",
    "clip_update",
    "filter_updates",
    "full_rank",
    "head_view",
    "lora_ranks",
    "rank_view",
    "update_norm",
    "validate_ranked",
    "validate_update",
    "variant_name",
    "variant_rank",
    "variant_view",
    "view_config_alpha",
    "weighted_mean",
]
