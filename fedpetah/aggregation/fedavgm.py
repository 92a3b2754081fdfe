"""FedAvgM, server momentum (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", arXiv:1909.06335).

With the pseudo-gradient ``d = sum_i w_i x_i - x`` (the weighted mean of the updates minus the current
global state), the server keeps the momentum buffer ``m = momentum * m + d`` (``m`` starts at 0) and steps
``x + server_lr * m``. It damps the round-to-round swings of the mean that label skew and sparse sampling
cause. The buffer travels as tensors ``m/<name>`` in the task's optimizer state, so the adapter bank stores
it with the adapter, as it does FedAdam's moments. ``momentum=0, server_lr=1`` is FedAvg exactly.
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
    weighted_mean,
)
from fedpetah.aggregation.validate import StateDict


@dataclass
class FedAvgMConfig(AggregatorConfig):
    """Server learning rate ``server_lr`` and momentum ``momentum`` (the paper's ``beta``; 0.9 is its best
    setting at server learning rate 1 under strong skew)."""

    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"strategy.aggregator.server_lr must be positive, got {self.server_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"strategy.aggregator.momentum must be in [0, 1), got {self.momentum}")


@AGGREGATORS.register("fedavgm")
class FedAvgM(Aggregator[FedAvgMConfig]):
    """``m = momentum * m + d``, ``new = x + server_lr * m``, with ``d`` the weighted mean minus ``x``.

    The step is computed as ``mean + (server_lr - 1) d + server_lr * momentum * m_old`` (the same value), so
    ``momentum=0, server_lr=1`` returns FedAvg's mean bit for bit. The buffer is kept in the adapter tensor's
    dtype promoted to at least float32.
    """

    def aggregate(
        self, current: StateDict, updates: list[StateDict], weights: list[float], opt_state: StateDict
    ) -> Aggregate:
        lr, beta = self.config.server_lr, self.config.momentum
        _check_buffer(self.name, current, opt_state)
        mean = weighted_mean(updates, weights, like=current)
        new_state: StateDict = {}
        new_opt: StateDict = {}
        pseudo_grad_sq = momentum_sq = 0.0
        for key, x in current.items():
            dtype = compute_dtype(x.dtype)
            avg = mean[key].to(dtype)
            d = avg - x.to(dtype)
            old = opt_state[f"m/{key}"].to(dtype) if opt_state else torch.zeros_like(d)
            m = beta * old + d
            new_state[key] = (avg + (lr - 1.0) * d + (lr * beta) * old).to(x.dtype)
            new_opt[f"m/{key}"] = m.to(torch.promote_types(x.dtype, torch.float32))
            pseudo_grad_sq += float(d.square().sum())
            momentum_sq += float(m.square().sum())
        return Aggregate(new_state, new_opt, {"pseudo_grad_norm": math.sqrt(pseudo_grad_sq),
                                              "momentum_norm": math.sqrt(momentum_sq)})


def _check_buffer(name: str, current: StateDict, opt_state: StateDict) -> None:
    """An empty buffer (a new task), or one ``m/<key>`` of ``current``'s shape per adapter tensor."""
    if not opt_state:
        return
    expected = {f"m/{key}": x.shape for key, x in current.items()}
    if set(opt_state) != set(expected) or any(opt_state[k].shape != s for k, s in expected.items()):
        raise ValueError(f"{name}: optimizer state does not match the adapter ({len(set(opt_state) ^ set(expected))} "
                         "keys differ, or shapes); start it empty for a new task")
