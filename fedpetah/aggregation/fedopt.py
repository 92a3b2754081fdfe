"""Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAdagrad/Adam/Yogi.

With the pseudo-gradient ``d = sum_i w_i x_i - x`` (the weighted mean of the updates minus the current
global state), the server keeps ``m = beta1 m + (1 - beta1) d`` and a second moment ``v`` updated per
method, then steps ``x + eta * m / (sqrt(v) + tau)``. ``m`` starts at 0 and ``v`` at ``tau**2`` as in the
paper (no bias correction). The state travels as tensors ``m/<name>``, ``v/<name>`` and ``step`` so the
adapter bank stores it in safetensors with the adapter.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import TypeVar

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
class FedAdagradConfig(AggregatorConfig):
    """Server learning rate ``eta``, first-moment decay ``beta1``, adaptivity ``tau``."""

    eta: float = 1e-2
    beta1: float = 0.0
    tau: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"strategy.aggregator.eta must be positive, got {self.eta}")
        if not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"strategy.aggregator.beta1 must be in [0, 1), got {self.beta1}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"strategy.aggregator.tau must be positive, got {self.tau}")


@dataclass
class FedAdamConfig(FedAdagradConfig):
    """Adds the second-moment decay ``beta2``."""

    beta1: float = 0.9
    beta2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"strategy.aggregator.beta2 must be in [0, 1), got {self.beta2}")


@dataclass
class FedYogiConfig(FedAdamConfig):
    """FedYogi's options are FedAdam's."""


F = TypeVar("F", bound=FedAdagradConfig)


class FedOpt(Aggregator[F]):
    """Shared FedOpt step; subclasses define the second-moment update."""

    @abstractmethod
    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """The new second moment from the old one and the squared pseudo-gradient."""

    def aggregate(
        self, current: StateDict, updates: list[StateDict], weights: list[float], opt_state: StateDict
    ) -> Aggregate:
        config = self.config
        expected = {f"{kind}/{key}" for key in current for kind in ("m", "v")} | {"step"}
        if opt_state and set(opt_state) != expected:
            raise ValueError(
                f"{self.name}: optimizer state does not match the adapter "
                f"({len(set(opt_state) ^ expected)} keys differ); start it empty for a new task"
            )
        mean = weighted_mean(updates, weights, like=current)
        new_state: StateDict = {}
        new_opt: StateDict = {}
        pseudo_grad_sq = 0.0
        for key, x in current.items():
            dtype = compute_dtype(x.dtype)
            d = mean[key].to(dtype) - x.to(dtype)
            pseudo_grad_sq += float(d.square().sum())
            if opt_state:
                m, v = opt_state[f"m/{key}"].to(dtype), opt_state[f"v/{key}"].to(dtype)
            else:
                m, v = torch.zeros_like(d), torch.full_like(d, config.tau**2)
            m = config.beta1 * m + (1.0 - config.beta1) * d
            v = self.second_moment(v, d.square())
            new_state[key] = (x.to(dtype) + config.eta * m / (v.sqrt() + config.tau)).to(x.dtype)
            new_opt[f"m/{key}"] = m.to(torch.float32)
            new_opt[f"v/{key}"] = v.to(torch.float32)
        step = int(opt_state["step"].item()) + 1 if opt_state else 1
        new_opt["step"] = torch.tensor(step, dtype=torch.int64)
        return Aggregate(new_state, new_opt, {"pseudo_grad_norm": math.sqrt(pseudo_grad_sq)})


@AGGREGATORS.register("fedadagrad")
class FedAdagrad(FedOpt[FedAdagradConfig]):
    """``v = v + d**2``."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


@AGGREGATORS.register("fedadam")
class FedAdam(FedOpt[FedAdamConfig]):
    """``v = beta2 v + (1 - beta2) d**2``."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        beta2 = self.config.beta2
        return beta2 * v + (1.0 - beta2) * d2


@AGGREGATORS.register("fedyogi")
class FedYogi(FedOpt[FedYogiConfig]):
    """``v = v - (1 - beta2) d**2 sign(v - d**2)``: like Adam, but ``v`` grows or shrinks additively."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        beta2 = self.config.beta2
        return v - (1.0 - beta2) * d2 * torch.sign(v - d2)
