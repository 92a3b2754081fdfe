"""Mixed fleets on the server (issue 19): which variant each sampled device trains, what it is sent and what its
reply must look like, and what the fleet did (per tier in simulation).

The bank keeps each task's full adapter; a device of variant ``lora-r`` receives the rank-r view of it and sends
that view back, a ``head`` device receives the full adapter and sends the head alone
(:mod:`fedpetah.aggregation.hetero`). The policy (:mod:`fedpetah.assignment`) chooses from each device's reported
budget and the measured memory model (:mod:`fedpetah.serving.memory_model`), measured once per artifact.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedpetah.aggregation import StateDict
from fedpetah.aggregation.hetero import head_view, rank_view, variant_rank
from fedpetah.assignment import HEAD, build_policy, run_variants
from fedpetah.experiment import ExperimentConfig
from fedpetah.serving.fleet import Fleet
from fedpetah.serving.memory_model import VARIANTS, memory_model, variant_config
from fedpetah.serving.round import ClientReply
from fedpetah.wire.protocol import Status

log = logging.getLogger(__name__)


class VariantPlanner:
    """The run's variants (poorest first, the last the run's own adapter), the assignment policy and the needs."""

    def __init__(self, config: ExperimentConfig, artifact_dir: Path, num_classes: int = 10) -> None:
        self.config = config
        self.artifact_dir = artifact_dir
        self.num_classes = num_classes
        self.variants = run_variants(config.adapter)
        self.policy = build_policy(config.assignment)
        self.refused: dict[int, str] = {}  # client -> the variant it answered no-budget to (see after_refusal)
        self._needs: dict[str, float] | None = None
        self.told: set[int] = set()  # clients logged as unable to train

    @property
    def full(self) -> str:
        return self.variants[-1]

    @property
    def active(self) -> bool:
        """Whether devices' budgets matter: a policy that reads them, or a simulated fleet with budgets."""
        return self.policy.needs_memory_model or self.config.fleet.name != "uniform"

    def needs(self) -> dict[str, float]:
        """MB each variant needs (the run's and the fleet's tiers'), measured once per artifact and batch size."""
        if self._needs is None:
            wanted = [v for v in VARIANTS if v in {*self.variants, *self.config.fleet.sized_for}]
            model = memory_model(self.artifact_dir, self.config.train.batch_size, self.num_classes,
                                 adapter=self.config.adapter, variants=wanted, device=self.config.train.device)
            self._needs = {v: model.need_mb(v) for v in wanted}
            log.info("memory model (MB above the resting footprint, batch %d): %s", self.config.train.batch_size,
                     ", ".join(f"{v} {mb:.1f}" for v, mb in self._needs.items()))
        return self._needs

    def size_fleet(self) -> None:
        """Fill a mixed simulated fleet's tier budgets: tier i fits ``sized_for[i]``, and every poorer variant, with
        the assignment margin (the ranks' needs differ by less than the measurement's noise, so a tier sized for
        lora-16 must not miss lora-4 for measuring 0.1 MB more)."""
        fleet = self.config.fleet
        if fleet.name == "uniform" or fleet.budgets_mb:
            return
        needs = self.needs()
        unknown = [v for v in fleet.sized_for if v not in needs]
        if unknown:
            raise ValueError(f"fleet.sized_for names {unknown}, which the memory model does not measure "
                             f"(variants: {', '.join(VARIANTS)})")
        ordered = [v for v in VARIANTS if v in needs]  # poorest first: a tier fits every variant up to its own
        envelope = {v: max(needs[u] for u in ordered[: ordered.index(v) + 1]) for v in ordered}
        budgets = tuple(envelope[v] * (1 + self.config.assignment.margin) for v in fleet.sized_for)  # not rounded:
        # a budget rounded down by a thousandth would no longer fit the variant it is sized for
        self.config.fleet = dataclasses.replace(fleet, budgets_mb=budgets)
        log.info("simulated fleet: %s", ", ".join(f"{n} ({s:.0%}) {b:.1f} MB, sized for {v}" for n, s, b, v in zip(
            fleet.names, fleet.shares, budgets, fleet.sized_for, strict=True)))

    def assign(self, clients: list[int], fleet: Fleet) -> dict[int, str | None]:
        """Each client's variant this round from its reported budget (None: nothing fits, it sits out)."""
        if not self.active:
            return dict.fromkeys(clients, self.full)
        needs = self.needs()
        out: dict[int, str | None] = {}
        for client in clients:
            record = fleet.devices.get(client)
            budget = None if record is None or record.profile is None else record.profile.memory_budget_mb
            offered = self.variants
            if client in self.refused:  # it could not train that one (budget: poorer ones; strict: it sits out)
                offered = tuple(self.policy.after_refusal(offered, self.refused[client]))
            out[client] = self.policy.choose(budget, needs, offered) if offered else None
            if out[client] is None and client not in self.told:
                self.told.add(client)
                smallest = min(needs[v] for v in self.variants) * (1 + self.config.assignment.margin)
                held = "unknown" if budget is None else f"{budget:.0f} MB"
                if any(self.policy.fits(v, budget, needs) for v in offered):
                    log.info("device %s sits out (assignment=%s; its budget is %s)", client, self.policy.name, held)
                else:
                    log.warning("device %s cannot train: the smallest variant needs %.0f MB with the margin, its "
                                "budget is %s%s", client, smallest, held,
                                f", and it refused {self.refused[client]}" if client in self.refused else "")
        return out

    def adapter_section(self, variant: str) -> dict[str, Any]:
        return asdict(variant_config(self.config.adapter, variant)) if variant != self.full else asdict(
            self.config.adapter)

    def sent(self, variant: str, current: StateDict) -> StateDict:
        """What a device of ``variant`` is sent of the task's full adapter."""
        return current if variant in (self.full, HEAD) else rank_view(current, variant_rank(variant))

    def expected(self, variant: str, current: StateDict) -> StateDict:
        """The layout its reply must have: the sent view, the head alone for ``head``."""
        return head_view(current) if variant == HEAD and variant != self.full else self.sent(variant, current)

    def ranks(self, variants: list[str]) -> list[int] | None:
        """The rank of each update of a round of these variants; None when each is the run's own adapter."""
        if all(v == self.full for v in variants):
            return None
        return [variant_rank(v) for v in variants]

    def need_mb(self, variant: str) -> float | None:
        return self.needs().get(variant) if self.active else None


def fleet_summary(config: ExperimentConfig, fleet: Fleet) -> dict[str, Any]:
    """``variants_used`` ({variant: trainings}), ``over_budget_devices`` and, for a simulated mixed fleet,
    ``fleet_tiers``: per tier its devices, those that trained at least once, the variants they trained, the
    largest training peak they measured and how many went over their budget."""
    used: dict[str, int] = {}
    over = 0
    tiers: dict[str, dict[str, Any]] = {}
    names = config.fleet.names
    if config.fleet.name != "uniform":
        tiers = {n: {"devices": 0, "participated": 0, "variants": {}, "peak_memory_mb": None, "budget_mb": b,
                     "over_budget_devices": 0}
                 for n, b in zip(names, config.fleet.budgets_mb or (None,) * len(names), strict=True)}
        for partition in range(config.clients):
            tier = config.fleet.tier(config.seed, partition, config.clients)
            assert tier is not None
            tiers[names[tier]]["devices"] += 1
    for client, record in fleet.devices.items():
        for variant, n in record.variants.items():
            used[variant] = used.get(variant, 0) + n
        went_over = record.over_budget > 0
        over += went_over
        tier = config.fleet.tier(config.seed, client, config.clients) if (
            tiers and 0 <= client < config.clients) else None
        if tier is None:
            continue
        entry = tiers[names[tier]]
        entry["participated"] += bool(record.variants)
        for variant, n in record.variants.items():
            entry["variants"][variant] = entry["variants"].get(variant, 0) + n
        if record.peak_memory_mb is not None:
            entry["peak_memory_mb"] = max(entry["peak_memory_mb"] or 0.0, record.peak_memory_mb)
        entry["over_budget_devices"] += went_over
    return {"variants_used": used, "over_budget_devices": over, **({"fleet_tiers": tiers} if tiers else {})}


def noted(fleet: Fleet, reply: ClientReply, variant: str) -> None:
    """Record in the ledger what ``reply``'s client trained and the peak it measured above its resting footprint;
    a device over its budget (a reported peak above its reported budget, or training its own guard stopped) is
    counted in ``over_budget``."""
    record = fleet.devices.get(reply.client)
    if record is None:
        return
    if reply.status is Status.NO_BUDGET:
        record.over_budget += reply.detail.startswith("training stopped")  # crossed it, stopped at the next step
        return
    if reply.status is not Status.OK:
        return
    record.variants[variant] = record.variants.get(variant, 0) + 1
    peak = reply.metrics.get("peak-memory-above-rest-mb")
    if peak is not None:
        record.peak_memory_mb = max(record.peak_memory_mb or 0.0, float(peak))
        budget = None if record.profile is None else record.profile.memory_budget_mb
        record.over_budget += budget is not None and float(peak) > budget
