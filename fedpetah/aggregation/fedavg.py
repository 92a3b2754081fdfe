"""Weighted FedAvg (McMahan et al. 2017): the example-weighted mean of the clients' adapter states."""

from __future__ import annotations

from fedpetah.aggregation.base import AGGREGATORS, Aggregate, Aggregator, AggregatorConfig, weighted_mean
from fedpetah.aggregation.validate import StateDict


@AGGREGATORS.register("fedavg")
class FedAvg(Aggregator[AggregatorConfig]):
    """``new = sum_i n_i * update_i / sum_i n_i``; a server-optimizer state passes through unchanged.

    With ``strategy.bounds.clip_norm`` set it is the clipped FedAvg of DP-style training (without noise).
    With LoRA and a frozen, shared ``A`` (FFA-LoRA) it is exact: the mean of ``B_i A`` is ``mean(B_i) A``.
    """

    def aggregate(
        self, current: StateDict, updates: list[StateDict], weights: list[float], opt_state: StateDict
    ) -> Aggregate:
        return Aggregate(weighted_mean(updates, weights, like=current), dict(opt_state))
