"""Mixed-rank LoRA: the rank views of a task's full adapter, and aggregators (hetlora, flexlora) across ranks.

The bank keeps each task's full adapter at rank R (``adapter.rank``, peft alpha ``A``). A device trains a
*variant* of it (the vocabulary of issue 19):

- ``lora-r`` (1 <= r <= R), the rank-r *view* (:func:`rank_view`): the first r rows of every ``lora_A`` and the
  first r columns of every ``lora_B``, every other tensor whole. Its peft config is ``rank=r`` and
  ``alpha=A*r/R`` (:func:`view_config_alpha`), so the scaling ``alpha/rank = A/R`` is the full adapter's and the
  view's delta ``(A/R) B[:, :r] A[:r]`` is exactly the truncation of the full delta ``(A/R) B A`` to its first r
  components. That constant scaling also factors out of every average below.
- ``head`` (rank 0), :func:`head_view`: the tensors of no LoRA layer (the head, ...); the LoRA layers stay frozen.

An update comes back as a :class:`RankedUpdate`: the variant's state, its rank, its count. A caller hands a
round's updates to a :class:`MixedRankAggregator`'s :meth:`~MixedRankAggregator.mixed` (validates each update
against ``variant_view(current, rank)``, raising ``InvalidUpdate``) or :meth:`~MixedRankAggregator.combine_mixed`
(already validated, e.g. with :func:`validate_ranked`); the result is the full rank-R state. The plain
``aggregator(current, updates, weights)`` call treats every update as rank R, so a uniform fleet behaves as the
single-rank limit named in each aggregator's docstring.

Views assume one LoRA rank across layers (:func:`full_rank`), and a trainable A (with FFA-LoRA's frozen A, B
alone travels: use fedavg). With DoRA, a magnitude vector travels with every LoRA view, is averaged over the
updates of rank >= 1, and a view's delta is no longer an exact truncation (the magnitude normalises by the
full direction's norm).
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from fedpetah.aggregation.base import (
    AGGREGATORS,
    Aggregate,
    Aggregator,
    AggregatorConfig,
    _check_weights,
    weighted_mean,
)
from fedpetah.aggregation.lora_product import (
    LoraProductConfig,
    lora_pairs,
    refactorized_pairs,
)
from fedpetah.aggregation.validate import InvalidUpdate, StateDict, update_norm, validate_update
from fedpetah.wire.reasons import Reason

HEAD_RANK = 0
"""The rank of the ``head`` variant: its update carries no LoRA tensor."""

_LORA_LAYER = re.compile(r"\.lora_[A-Za-z_]+\.")  # a tensor of a peft LoRA layer (factors, DoRA magnitudes)

M = TypeVar("M", bound=AggregatorConfig)


@dataclass(frozen=True)
class RankedUpdate:
    """One device's update of a task: ``state`` is the variant's trained state (:func:`variant_view`'s keys and
    shapes at ``rank``), ``rank`` the variant's (0 for ``head``, r for ``lora-r``), ``count`` its weight (the
    example count, after any capping)."""

    state: Mapping[str, torch.Tensor]
    rank: int
    count: float


def variant_name(rank: int) -> str:
    """``head`` for rank 0, else ``lora-<rank>``: the variant vocabulary of issue 19."""
    return "head" if rank == HEAD_RANK else f"lora-{rank}"


def variant_rank(name: str) -> int:
    """The rank of variant ``name`` (``head`` -> 0, ``lora-r`` -> r); any other name raises ``ValueError``."""
    match = re.fullmatch(r"lora-([1-9][0-9]*)", name)
    if name == "head":
        return HEAD_RANK
    if match is None:
        raise ValueError(f"{name!r} is not a mixed-rank variant: expected 'head' or 'lora-<rank>'")
    return int(match[1])


def lora_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The LoRA rank of each adapted module (peft ``X.lora_A.<adapter>.weight`` -> ``X``): A's first dimension.
    A factor without its partner, or a B that does not pair with its A (``(out, r[, 1, 1])``), raises."""
    ranks: dict[str, int] = {}
    for key_a, key_b in lora_pairs(state):
        a, b = state[key_a], state[key_b]
        module = key_a.rsplit(".lora_A.", 1)[0]
        if a.dim() < 2 or b.dim() < 2 or b.shape[1] != a.shape[0] or any(d != 1 for d in b.shape[2:]):
            raise ValueError(f"{key_b}: shape {tuple(b.shape)} does not pair with {key_a}'s {tuple(a.shape)}")
        if module in ranks:
            raise ValueError(f"{module} carries more than one LoRA adapter")
        ranks[module] = a.shape[0]
    return ranks


def full_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The one LoRA rank R of ``state`` (0 without LoRA pairs); layers of different ranks raise ``ValueError``."""
    ranks = sorted(set(lora_ranks(state).values()))
    if len(ranks) > 1:
        raise ValueError(f"rank views need one LoRA rank across layers, got ranks {ranks}")
    return ranks[0] if ranks else 0


def rank_view(full_state: Mapping[str, torch.Tensor], rank: int) -> StateDict:
    """HetLoRA's truncation: the first ``rank`` rows of every ``lora_A`` and columns of every ``lora_B`` (contiguous
    copies); every other tensor is ``full_state``'s own. ``rank`` must be in 1..R."""
    top = full_rank(full_state)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ValueError(f"a rank view needs a rank in 1..{top} (the adapter's LoRA rank), got {rank!r}")
    view = dict(full_state)
    for key_a, key_b in lora_pairs(full_state):
        view[key_a] = full_state[key_a][:rank].clone()
        view[key_b] = full_state[key_b][:, :rank].clone()
    return view


def head_view(full_state: Mapping[str, torch.Tensor]) -> StateDict:
    """The tensors of no LoRA layer: what the ``head`` variant trains and sends back."""
    return {key: value for key, value in full_state.items() if not _LORA_LAYER.search(key)}


def variant_view(full_state: Mapping[str, torch.Tensor], rank: int) -> StateDict:
    """:func:`head_view` for rank 0, else :func:`rank_view`: what a device of that rank receives and returns."""
    return head_view(full_state) if rank == HEAD_RANK else rank_view(full_state, rank)


def view_config_alpha(alpha: float, rank: int, full_rank: int) -> float:
    """The peft ``lora_alpha`` of the rank-``rank`` view of an adapter of rank ``full_rank`` and alpha ``alpha``.

    ``alpha * rank / full_rank`` keeps peft's scaling ``alpha / rank`` at the full adapter's, so the view's delta
    ``(alpha / full_rank) B[:, :rank] A[:rank]`` is exactly the truncation of the full delta; with the view's own
    ``alpha`` kept, a rank-1 view of a rank-8 adapter would scale its one component 8 times up.
    """
    if not 1 <= rank <= full_rank:
        raise ValueError(f"a view's rank must be in 1..{full_rank}, got {rank}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be positive, got {alpha}")
    return alpha * rank / full_rank


def validate_ranked(
    update: RankedUpdate, current: Mapping[str, torch.Tensor], top: int | None = None
) -> StateDict:
    """Raise :class:`InvalidUpdate` unless ``update.state`` matches ``variant_view(current, update.rank)`` tensor
    for tensor (:func:`validate_update`: keys, shapes, dtypes, finite values); returns that view, the reference of
    the update's delta (norms, clipping). ``top``: ``current``'s :func:`full_rank`, when the caller has it."""
    top = full_rank(current) if top is None else top
    rank = update.rank
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise InvalidUpdate(Reason.TYPE, f"a variant rank must be an int, got {rank!r}")
    if not 0 <= rank <= top:
        raise InvalidUpdate(Reason.SHAPE, f"rank {rank} cannot be served: the adapter's LoRA rank is {top}, "
                                          f"so ranks 0 (head) to {top}")
    view = variant_view(current, rank)
    try:
        validate_update(update.state, view)
    except InvalidUpdate as error:
        raise InvalidUpdate(error.reason, f"{variant_name(rank)} update: {error.detail}") from None
    return view


def _share(weights: list[float], members: list[int]) -> list[float]:
    """The normalized weights of ``members``: the given weights themselves when every update is a member (so a
    uniform round computes exactly what the single-rank aggregator does), else renormalized over them."""
    if len(members) == len(weights):
        return list(weights)
    total = math.fsum(weights[i] for i in members)
    return [weights[i] / total for i in members]


class MixedRankAggregator(Aggregator[M]):
    """An aggregator of updates at mixed ranks: ``mixed(current, ranked_updates, opt_state) -> Aggregate``.

    :meth:`mixed` is the library entry (every update checked by :func:`validate_ranked`); :meth:`combine_mixed`
    the entry for updates validated already. Both return ``current``'s full rank-R layout. The plain call
    (``aggregate``) is the uniform case: every update at rank R. A subclass implements :meth:`aggregate_mixed`.
    """

    @torch.no_grad()
    def mixed(self, current: Mapping[str, torch.Tensor], updates: Sequence[RankedUpdate],
              opt_state: Mapping[str, torch.Tensor] | None = None) -> Aggregate:
        """Validate each update against the view of ``current`` at its rank, then :meth:`combine_mixed`."""
        _check_weights(updates, [u.count for u in updates])
        top = full_rank(current)
        for update in updates:
            validate_ranked(update, current, top)
        return self.combine_mixed(current, updates, opt_state)

    @torch.no_grad()
    def combine_mixed(self, current: Mapping[str, torch.Tensor], updates: Sequence[RankedUpdate],
                      opt_state: Mapping[str, torch.Tensor] | None = None) -> Aggregate:
        """The aggregate of updates that each match the view of ``current`` at their rank, unchecked."""
        counts = [u.count for u in updates]
        _check_weights(updates, counts)
        total = float(sum(counts))
        ranks = [u.rank for u in updates]
        result = self.aggregate_mixed(dict(current), [dict(u.state) for u in updates], ranks,
                                      [float(c) / total for c in counts], dict(opt_state or {}))
        metrics = {
            "num_updates": float(len(updates)),
            "step_norm": update_norm(result.state, current),
            "num_head_updates": float(ranks.count(HEAD_RANK)),
            **result.metrics,
        }
        return Aggregate(result.state, result.opt_state, metrics)

    def aggregate(
        self, current: StateDict, updates: list[StateDict], weights: list[float], opt_state: StateDict
    ) -> Aggregate:
        return self.aggregate_mixed(current, updates, [full_rank(current)] * len(updates), weights, opt_state)

    @abstractmethod
    def aggregate_mixed(self, current: StateDict, updates: list[StateDict], ranks: list[int],
                        weights: list[float], opt_state: StateDict) -> Aggregate:
        """The algorithm proper: ``updates[i]`` is the view of rank ``ranks[i]``; ``weights`` sum to one."""


def _shared_mean(current: StateDict, updates: list[StateDict], ranks: list[int], weights: list[float]
                 ) -> tuple[StateDict, list[int]]:
    """Every tensor of no LoRA factor: those of no LoRA layer averaged over every update, the other LoRA-layer
    tensors (DoRA magnitudes) over the updates of rank >= 1 (kept when there is none); and those updates' indices."""
    factors = {key for pair in lora_pairs(current) for key in pair}
    shared = head_view(current)
    state = weighted_mean(updates, weights, like=shared)
    trained = [i for i, rank in enumerate(ranks) if rank > HEAD_RANK]
    extras = {k: v for k, v in current.items() if k not in shared and k not in factors}
    if extras and trained:
        state |= weighted_mean([updates[i] for i in trained], _share(weights, trained), like=extras)
    else:
        state |= extras
    return state, trained


@AGGREGATORS.register("hetlora")
class HetLora(MixedRankAggregator[AggregatorConfig]):
    """HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
    EMNLP 2024): zero-pad every update to rank R and average.

    Component k of the rank dimension (row k of A, column k of B) is the weighted mean over the updates whose
    rank is above k, the ones that trained it, and keeps ``current``'s value when none did. (The paper's plain
    zero-padding averages the pads in too, which shrinks the higher components by the share of devices that did
    not train them; its sparsity-weighted variant is not implemented.) Every other tensor is the weighted mean
    over every update, ``head`` ones included. With every update at rank R it is ``fedavg``, bit for bit.
    """

    def aggregate_mixed(self, current: StateDict, updates: list[StateDict], ranks: list[int],
                        weights: list[float], opt_state: StateDict) -> Aggregate:
        state, _ = _shared_mean(current, updates, ranks, weights)
        pairs = lora_pairs(current)
        factors = {key: current[key] for pair in pairs for key in pair}
        state |= {key: ref.clone() for key, ref in factors.items()}
        top = full_rank(current)
        low = 0
        for high in sorted({r for r in ranks if r > HEAD_RANK}):
            # components low..high-1: trained by exactly the updates of rank >= high
            members = [i for i, rank in enumerate(ranks) if rank >= high]
            padded = [{key: _pad(updates[i][key], key, top) for key in factors} for i in members]
            mean = weighted_mean(padded, _share(weights, members), like=factors)
            for key in factors:
                dim = _rank_dim(key)
                state[key].narrow(dim, low, high - low).copy_(mean[key].narrow(dim, low, high - low))
            low = high
        metrics = {"lora_components_kept": float(top - low)} if pairs else {}
        return Aggregate({k: state[k] for k in current}, dict(opt_state), metrics)


def _rank_dim(key: str) -> int:
    """The rank dimension of a LoRA factor: A's rows, B's columns."""
    return 0 if ".lora_A." in key else 1


def _pad(tensor: torch.Tensor, key: str, top: int) -> torch.Tensor:
    """``tensor`` zero-padded along its rank dimension to ``top`` (itself when it is full rank already)."""
    dim = _rank_dim(key)
    rank = tensor.shape[dim]
    if rank == top:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = top
    padded = tensor.new_zeros(shape)
    padded.narrow(dim, 0, rank).copy_(tensor)
    return padded


@AGGREGATORS.register("flexlora")
class FlexLora(MixedRankAggregator[LoraProductConfig]):
    """FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
    Resources", NeurIPS 2024): the weighted mean of the full products ``B_i A_i``, each at its own rank (the
    constant scaling ``alpha / rank`` factors out), re-factorised to rank R by SVD with the singular values
    split symmetrically (:func:`~fedpetah.aggregation.lora_product.refactorized_pairs`).

    The mean is over the updates of rank >= 1 (``head`` updates contribute only to the tensors of no LoRA layer,
    which are the weighted mean over every update). Singular values come sorted, so a rank-r view of the result
    is the best rank-r approximation of the rank-R state: what FlexLoRA's per-client SVD would send. Its
    single-rank limit is ``lora_product``, bit for bit, not FedAvg of the factors. A round with no LoRA update
    keeps ``current``'s factors. When the ranks of a round sum to less than R, ``current``'s A rows join the
    stack with zero weight (the product is unchanged), so every re-seeded direction has a row to come from.
    """

    def aggregate_mixed(self, current: StateDict, updates: list[StateDict], ranks: list[int],
                        weights: list[float], opt_state: StateDict) -> Aggregate:
        if not lora_pairs(current):
            raise ValueError("flexlora: the adapter state has no lora_A/lora_B pairs; use fedavg")
        state, trained = _shared_mean(current, updates, ranks, weights)
        metrics: dict[str, float] = {}
        if not trained:
            state |= {key: current[key] for key in current if key not in state}
        else:
            stack = [updates[i] for i in trained]
            share = _share(weights, trained)
            if sum(ranks[i] for i in trained) < full_rank(current):
                stack, share = [*stack, current], [*share, 0.0]
            factors, metrics = refactorized_pairs(current, stack, share, self.config.dead_rtol)
            state |= factors
        return Aggregate({k: state[k] for k in current}, dict(opt_state), metrics)
