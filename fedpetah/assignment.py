"""Which variant each sampled device trains (issue 19): the ``assignment`` policies, over a run's variants.

A *variant* is what one device trains for a task (docs/ARCHITECTURE.md, "Mixed fleets"): in a LoRA run of rank R,
``lora-r`` (the rank-r view of the task's rank-R adapter, for the measured ranks r < R, and R itself) and ``head``
(the rank-R model with its LoRA frozen: only the head trains, no backward through the backbone); in a synqt or
head run, that adapter alone. The memory model (:mod:`fedpetah.serving.memory_model`) says what each needs; a
policy picks from the poorest to the richest by a device's budget.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedpetah.adapters import AdapterConfig
from fedpetah.adapters.lora import DoraConfig, LoraConfig
from fedpetah.registry import Registry

LORA_RANKS = (1, 2, 4, 8, 16)
"""The LoRA ranks the memory model measures (``lora-r``)."""
HEAD = "head"


@dataclass
class AssignmentConfig:
    """Hydra group ``assignment``: ``name`` a registered policy (:data:`ASSIGNMENTS`); ``margin`` the safety margin
    of a budget, a fraction (0.2: a variant fits when 1.2 times its measured need is within the budget)."""

    name: str = "uniform"
    margin: float = 0.2

    def __post_init__(self) -> None:
        if self.name not in ASSIGNMENTS:
            raise ValueError(f"assignment.name must be one of {', '.join(ASSIGNMENTS.names())}, got {self.name!r}")
        if not (math.isfinite(self.margin) and 0 <= self.margin <= 10):
            raise ValueError(f"assignment.margin must be a fraction in [0, 10], got {self.margin}")


def run_variants(adapter: AdapterConfig) -> tuple[str, ...]:
    """The variants a run of ``adapter`` can serve, from the poorest to the richest (the last is the run's own
    adapter). Views of a LoRA adapter are exact truncations only for plain LoRA, so DoRA and FFA-LoRA runs (and
    every other adapter) serve their own adapter alone."""
    if isinstance(adapter, LoraConfig) and not isinstance(adapter, DoraConfig) and not adapter.freeze_a:
        return (HEAD, *(f"lora-{r}" for r in LORA_RANKS if r < adapter.rank), f"lora-{adapter.rank}")
    return (adapter.name,)


class AssignmentPolicy(ABC):
    """``policy.choose(budget_mb, needs, variants) -> variant or None`` (None: the device sits this task out).

    ``budget_mb`` is the device's (None: it reported none, an older device); ``needs`` the measured MB of each
    variant; ``variants`` the run's, poorest first (:func:`run_variants`)."""

    name: ClassVar[str]

    def __init__(self, config: AssignmentConfig) -> None:
        self.config = config

    @property
    def needs_memory_model(self) -> bool:
        return True

    def fits(self, variant: str, budget_mb: float | None, needs: Mapping[str, float]) -> bool:
        """Whether ``variant`` with the margin fits ``budget_mb`` (a device without a budget: yes)."""
        return budget_mb is None or needs[variant] * (1 + self.config.margin) <= budget_mb

    @abstractmethod
    def choose(self, budget_mb: float | None, needs: Mapping[str, float], variants: Sequence[str]) -> str | None:
        """The variant a device with ``budget_mb`` trains."""

    def after_refusal(self, variants: Sequence[str], refused: str) -> Sequence[str]:
        """What to offer a device that answered no-budget to ``refused``: the same again by default (its memory
        may be free next time)."""
        return variants


ASSIGNMENTS: Registry[type[AssignmentPolicy]] = Registry("assignment policy")


@ASSIGNMENTS.register("uniform")
class Uniform(AssignmentPolicy):
    """Every device trains the run's adapter, whatever its budget (fedpetah's behaviour before mixed fleets)."""

    @property
    def needs_memory_model(self) -> bool:
        return False

    def choose(self, budget_mb: float | None, needs: Mapping[str, float], variants: Sequence[str]) -> str | None:
        return variants[-1]


@ASSIGNMENTS.register("budget")
class Budget(AssignmentPolicy):
    """The richest variant that fits the device's budget with the margin; None when even the poorest does not."""

    def choose(self, budget_mb: float | None, needs: Mapping[str, float], variants: Sequence[str]) -> str | None:
        fitting = [v for v in variants if self.fits(v, budget_mb, needs)]
        return fitting[-1] if fitting else None

    def after_refusal(self, variants: Sequence[str], refused: str) -> Sequence[str]:
        """Only the variants poorer than the one refused."""
        return variants[: variants.index(refused)] if refused in variants else ()


@ASSIGNMENTS.register("strict")
class Strict(AssignmentPolicy):
    """The run's adapter where it fits; devices it does not fit sit out (the baseline that leaves them out)."""

    def choose(self, budget_mb: float | None, needs: Mapping[str, float], variants: Sequence[str]) -> str | None:
        return variants[-1] if self.fits(variants[-1], budget_mb, needs) else None

    def after_refusal(self, variants: Sequence[str], refused: str) -> Sequence[str]:
        """Nothing: the run's adapter does not fit it, so it sits out."""
        return ()


def build_policy(config: AssignmentConfig) -> AssignmentPolicy:
    return ASSIGNMENTS.get(config.name)(config)
