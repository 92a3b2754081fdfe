"""Checks and bounds on client updates: validate (reject with a reason), filter a batch, clip a norm.

:func:`validate_update` is the one check of an update of unknown origin (every library entry calls it). An
:class:`Update` decoded from a reply had its keys, shapes, dtypes and count checked by the protocol decode
against what was sent, so the server's round checks only its values (:func:`check_values`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fedpetah.wire.reasons import Reason

StateDict = dict[str, torch.Tensor]


class InvalidUpdate(ValueError):
    """An update that must not be aggregated, and why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[InvalidUpdate], tuple[Reason, str]]:
        return type(self), (self.reason, self.detail)  # survives being re-raised across processes


@dataclass(frozen=True)
class Rejection:
    """One rejected update: its index in the batch, the reason, a detail."""

    index: int
    reason: Reason
    detail: str


@dataclass(frozen=True)
class Update:
    """A client's update as a decoded reply holds it: ``state`` has the keys, shapes and dtypes of the state the
    client was sent and ``count`` is a positive whole number (:class:`~fedpetah.wire.protocol.TrainReply` checked
    both). Its values are not checked yet (:func:`check_values`)."""

    state: Mapping[str, torch.Tensor]
    count: int


class Filtered(NamedTuple):
    """The accepted updates with their weights (batch order kept) and the rejections."""

    updates: list[StateDict]
    weights: list[float]
    rejected: list[Rejection]


def _listed(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


@torch.no_grad()
def update_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of ``update - reference`` over all tensors, computed in float64."""
    total = 0.0
    for key, ref in reference.items():
        diff = update[key].to(torch.float64) - ref.to(torch.float64)
        total += float(diff.square().sum())
    return math.sqrt(total)


def check_count(count: object) -> int:
    """A claimed example count as an int; anything but a positive whole number raises ``InvalidUpdate``."""
    if isinstance(count, bool) or not isinstance(count, numbers.Real):
        raise InvalidUpdate(Reason.WEIGHT, f"the example count must be a number, got {type(count).__name__}")
    value = float(count)
    if not math.isfinite(value) or value <= 0:
        raise InvalidUpdate(Reason.WEIGHT, f"the example count must be finite and positive, got {count}")
    if not value.is_integer():
        raise InvalidUpdate(Reason.WEIGHT, f"the example count must be a whole number, got {count}")
    return int(value)


@torch.no_grad()
def validate_update(
    update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], max_norm: float | None = None
) -> None:
    """Raise :class:`InvalidUpdate` unless ``update`` matches ``reference`` tensor for tensor.

    Keys equal, shapes equal, dtypes equal and floating point, every value finite, and, when ``max_norm``
    is set, the L2 norm of ``update - reference`` at most ``max_norm``.
    """
    if not isinstance(update, Mapping) or not all(isinstance(v, torch.Tensor) for v in update.values()):
        raise InvalidUpdate(Reason.TYPE, "an update must map names to tensors")
    missing = sorted(set(reference) - set(update))
    if missing:
        raise InvalidUpdate(Reason.MISSING_KEYS, _listed(missing))
    unexpected = sorted(set(update) - set(reference))
    if unexpected:
        raise InvalidUpdate(Reason.UNEXPECTED_KEYS, _listed(unexpected))
    for key, ref in reference.items():
        value = update[key]
        if value.shape != ref.shape:
            raise InvalidUpdate(Reason.SHAPE, f"{key}: {tuple(value.shape)} != {tuple(ref.shape)}")
        if value.dtype != ref.dtype or not value.dtype.is_floating_point:
            raise InvalidUpdate(Reason.DTYPE, f"{key}: {value.dtype}, expected floating {ref.dtype}")
        _check_finite(key, value)
    if max_norm is not None:
        check_norm(update, reference, max_norm)


def _check_finite(key: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise InvalidUpdate(Reason.NON_FINITE, f"{key} holds NaN or infinite values")


@torch.no_grad()
def check_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
               max_norm: float | None = None) -> float:
    """The norm of ``update - reference`` (:func:`update_norm`); ``InvalidUpdate`` (``norm``) above ``max_norm``."""
    norm = update_norm(update, reference)
    if max_norm is not None and norm > max_norm:
        raise InvalidUpdate(Reason.NORM, f"update norm {norm:.4g} exceeds {max_norm:.4g}")
    return norm


@torch.no_grad()
def check_values(update: Update, reference: Mapping[str, torch.Tensor], max_norm: float | None = None) -> float:
    """The checks of :func:`validate_update` that a decoded update still needs, in the same order: every value
    finite, and the norm of its delta (returned) at most ``max_norm``."""
    for key in reference:
        _check_finite(key, update.state[key])
    return check_norm(update.state, reference, max_norm)


def filter_updates(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    reference: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
) -> Filtered:
    """Split a batch into valid updates (with their weights) and rejections; nothing is averaged here.

    A weight (a client's example count) must pass :func:`check_count`, else the reason is ``weight``.
    """
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    accepted: list[StateDict] = []
    kept_weights: list[float] = []
    rejected: list[Rejection] = []
    for index, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        try:
            count = check_count(weight)
            validate_update(update, reference, max_norm)
        except InvalidUpdate as error:
            rejected.append(Rejection(index, error.reason, error.detail))
            continue
        accepted.append(dict(update))
        kept_weights.append(float(count))
    return Filtered(accepted, kept_weights, rejected)


@torch.no_grad()
def clip_update(
    update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[StateDict, float]:
    """Scale ``update - reference`` down to L2 norm ``max_norm``; returns the new update and the scale.

    An update already within the bound comes back as a shallow copy with scale 1.0.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = update_norm(update, reference)
    if norm <= max_norm:
        return dict(update), 1.0
    scale = max_norm / norm
    clipped = {
        key: (ref.to(torch.float64) + scale * (update[key].to(torch.float64) - ref.to(torch.float64))).to(ref.dtype)
        for key, ref in reference.items()
    }
    return clipped, scale
