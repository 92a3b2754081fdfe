"""Exact LoRA aggregation: average the clients' products ``B_i A_i``, then re-factorise to rank r by SVD.

Averaging ``A`` and ``B`` separately (FedAvg) gives ``mean(B) mean(A)``, not the mean of the weight deltas
``mean(B_i A_i)`` that the clients learned. Here, per LoRA pair (peft names ``X.lora_A.<adapter>.weight``
and ``X.lora_B.<adapter>.weight``; Linear ``A (r, in)``, ``B (out, r)``; Conv2d ``A (r, in, k, k)``,
``B (out, r, 1, 1)``) the weighted mean ``P = sum_i w_i B_i A_i`` is computed exactly and truncated to
rank r by SVD, ``P ~ U_r S_r V_r^T``, with the singular values split symmetrically:
``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``. The relative Frobenius residual of the truncation is
reported. Every other tensor (head, DoRA magnitudes, biases) is FedAvg'd. peft's ``alpha / r`` scaling is
the same for every client, so it factors out of the average.

A direction whose singular value is (nearly) zero would leave both a row of ``A`` and a column of ``B``
at zero, and such a direction never trains again. It is re-seeded as LoRA initialises: ``B``'s column
zero (the product is unchanged), ``A``'s row a unit direction orthogonal to the kept ones, scaled to the
clients' typical row norm of ``A``.

With a frozen, shared ``A`` (FFA-LoRA) use ``fedavg``: it is already exact there and keeps ``A`` fixed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedpetah.aggregation.base import (
    AGGREGATORS,
    Aggregate,
    Aggregator,
    AggregatorConfig,
    weighted_mean,
)
from fedpetah.aggregation.validate import StateDict

_LORA_A = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
_LORA_B = re.compile(r"^(?P<module>.+)\.lora_B\.(?P<adapter>[^.]+)\.weight$")


@dataclass
class LoraProductConfig(AggregatorConfig):
    """``dead_rtol``: singular values at most ``dead_rtol`` times the largest count as zero."""

    dead_rtol: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dead_rtol < 1.0:
            raise ValueError(f"strategy.aggregator.dead_rtol must be in [0, 1), got {self.dead_rtol}")


def lora_pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """The ``(lora_A key, lora_B key)`` pairs among ``keys``; an unpaired A or B raises ``ValueError``."""
    names = set(keys)
    pairs = []
    for key in sorted(names):
        match = _LORA_A.match(key)
        if match:
            partner = f"{match['module']}.lora_B.{match['adapter']}.weight"
            if partner not in names:
                raise ValueError(f"LoRA factor {key} has no matching {partner}")
            pairs.append((key, partner))
    paired_b = {b for _, b in pairs}
    orphans = sorted(k for k in names if _LORA_B.match(k) and k not in paired_b)
    if orphans:
        raise ValueError(f"LoRA factor {orphans[0]} has no matching lora_A (a frozen A, as in FFA-LoRA, needs fedavg)")
    return pairs


def product_svd(b_cat: torch.Tensor, a_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of ``b_cat @ a_cat`` (``(out, k) @ (k, n)``) without forming the product when
    ``k`` is the smaller side: QR both factors, then the SVD of the small ``k x k`` core."""
    k = b_cat.shape[1]
    if k >= min(b_cat.shape[0], a_cat.shape[1]):
        u, s, vh = torch.linalg.svd(b_cat @ a_cat, full_matrices=False)
        return u, s, vh
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vh @ q_a.T


def refactorize(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, a_row_norm: float, dead_rtol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """From the SVD of ``P``: rank-``rank`` factors ``B (out, rank)``, ``A (rank, n)`` with the live
    singular values split symmetrically, the number of re-seeded (dead) directions, and the relative
    Frobenius residual ``||P - B A|| / ||P||`` (0 for ``P = 0``)."""
    b = u.new_zeros(u.shape[0], rank)
    a = vh.new_zeros(rank, vh.shape[1])
    live = min(rank, int((s > dead_rtol * s[0]).sum()))
    root = s[:live].sqrt()
    b[:, :live] = u[:, :live] * root
    a[:live] = root[:, None] * vh[:live]
    spare = min(rank, vh.shape[0])
    a[live:spare] = a_row_norm * vh[live:spare]
    total = float(s.norm())
    residual = float(s[live:].norm()) / total if total > 0 else 0.0
    return b, a, rank - live, residual


def stacked_factors(
    updates: list[StateDict], weights: list[float], key_a: str, key_b: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``[w_1 B_1 ... w_N B_N]`` (out, sum r_i) and ``[A_1; ...; A_N]`` (sum r_i, in*k*k) in float64, whose
    product is ``sum_i w_i B_i A_i``; and the weighted RMS row norm of the clients' A. Each update may have its
    own rank ``r_i`` (its A's first dimension), which its B must pair with."""
    a_list: list[torch.Tensor] = []
    b_list: list[torch.Tensor] = []
    for update, weight in zip(updates, weights, strict=True):
        a, b = update[key_a], update[key_b]
        rank = a.shape[0]
        if b.dim() < 2 or b.shape[1] != rank or any(d != 1 for d in b.shape[2:]):
            raise ValueError(f"{key_b}: shape {tuple(b.shape)} does not pair with {tuple(a.shape)}")
        a_list.append(a.to(torch.float64).reshape(rank, -1))
        b_list.append(weight * b.to(torch.float64).reshape(-1, rank))
    row_norm = sum(w * float(a.square().sum(dim=1).mean().sqrt()) for a, w in zip(a_list, weights, strict=True))
    return torch.cat(b_list, dim=1), torch.cat(a_list, dim=0), row_norm


def refactorized_pairs(
    current: StateDict, updates: list[StateDict], weights: list[float], dead_rtol: float
) -> tuple[StateDict, dict[str, float]]:
    """Every LoRA pair of ``current`` as the rank-R SVD re-factorisation of ``sum_i w_i B_i A_i`` (R: the pair's
    rank in ``current``; each update at its own rank), in ``current``'s shapes and dtypes; and the metrics
    (pairs, residuals, re-seeded directions). ``current`` must hold at least one pair."""
    pairs = lora_pairs(current)
    state: StateDict = {}
    residuals: list[float] = []
    dead = 0
    for key_a, key_b in pairs:
        ref_a, ref_b = current[key_a], current[key_b]
        b_cat, a_cat, row_norm = stacked_factors(updates, weights, key_a, key_b)
        u, s, vh = product_svd(b_cat, a_cat)
        b, a, n_dead, residual = refactorize(u, s, vh, ref_a.shape[0], row_norm, dead_rtol)
        dead += n_dead
        residuals.append(residual)
        state[key_a] = a.reshape(ref_a.shape).to(ref_a.dtype)
        state[key_b] = b.reshape(ref_b.shape).to(ref_b.dtype)
    metrics = {
        "lora_pairs": float(len(pairs)),
        "lora_residual_max": max(residuals),
        "lora_residual_mean": math.fsum(residuals) / len(residuals),
        "lora_dead_directions": float(dead),
    }
    return state, metrics


@AGGREGATORS.register("lora_product")
class LoraProduct(Aggregator[LoraProductConfig]):
    """Product-exact LoRA aggregation with rank-r SVD re-factorisation; see the module docstring."""

    def aggregate(
        self, current: StateDict, updates: list[StateDict], weights: list[float], opt_state: StateDict
    ) -> Aggregate:
        pairs = lora_pairs(current)
        if not pairs:
            raise ValueError("lora_product: the adapter state has no lora_A/lora_B pairs; use fedavg")
        factor_keys = {k for pair in pairs for k in pair}
        others = {k: v for k, v in current.items() if k not in factor_keys}
        state = weighted_mean(updates, weights, like=others)
        factors, metrics = refactorized_pairs(current, updates, weights, self.config.dead_rtol)
        state |= factors
        return Aggregate({k: state[k] for k in current}, dict(opt_state), metrics)
