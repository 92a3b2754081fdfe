"""Server side of task-free routing: whom to ask for statistics, validate and sum them into the bank, evaluate."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from fedpetah.adapters import AdapterConfig
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank, BankError
from fedpetah.config import ROUTER_KEY, RouterConfig
from fedpetah.routing.features import FrozenFeatures, feature_width
from fedpetah.routing.predict import build_predictor, evaluate_task_free
from fedpetah.routing.router import check_size, fit_router
from fedpetah.routing.stats import FeatureStats, StatsError, aggregate_stats
from fedpetah.tasks import Task
from fedpetah.wire.protocol import ArraySpec, stats_specs

log = logging.getLogger(__name__)

CLIENTS_KEY = "router_clients"
"""Bank metadata key of a :class:`RouterRecord`'s clients (its config is under :data:`fedpetah.config.ROUTER_KEY`)."""


@dataclass
class RouterRecord:
    """What a bank records about the task-free router: the config its statistics were taken with (None: none
    recorded) and, per task, the clients counted already (each is asked once per task, across resumes)."""

    config: RouterConfig | None = None
    clients: dict[int, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Its keys of the bank's metadata: ``router`` (when a config is recorded) and ``router_clients``."""
        config = {} if self.config is None else {ROUTER_KEY: asdict(self.config)}
        return {**config, CLIENTS_KEY: {str(task): list(c) for task, c in self.clients.items()}}

    @classmethod
    def from_json(cls, metadata: Mapping[str, Any]) -> RouterRecord:
        """The record in a bank's metadata; a config from before the grid features reads as the pooled router
        (:meth:`RouterConfig.from_record`)."""
        recorded = metadata.get(ROUTER_KEY)
        config = RouterConfig.from_record(recorded) if isinstance(recorded, dict) else None
        clients = metadata.get(CLIENTS_KEY, {})
        return cls(config, {int(task): [int(c) for c in counted] for task, counted in clients.items()})


class StatsCollector:
    """Asks each client once per task for its statistics and sums the valid ones into the bank entry.

    The router config and the clients counted per task live in the bank's metadata, so they are committed
    with the round (and survive a resume); a resumed bank keeps the config it started with.
    """

    def __init__(self, bank: AdapterBank, backbone: Backbone, config: RouterConfig | None = None) -> None:
        self.bank = bank
        self.backbone = backbone
        self.record = RouterRecord.from_json(bank.metadata)
        self.record.config = self.config = self.record.config or config or RouterConfig()
        bank.metadata.update(self.record.to_json())
        features = feature_width(backbone, self.config.grid)
        check_size(features, self.config)  # what every client would be asked to build
        self.width = self.config.width(features)
        for task in bank.tasks():  # a resumed bank: statistics that would fail every later collect or evaluate
            try:
                self._stored(task)
            except StatsError as error:
                raise BankError(f"task {task}'s router statistics in the bank are invalid ({error}); drop them "
                                f"and continue with `fedpetah-server --resume --drop-stats {task}`") from None

    def _stored(self, task: int) -> FeatureStats | None:
        """Task ``task``'s statistics in the bank, validated (None when it has none)."""
        entry = self.bank[task]
        if not entry.stats:
            return None
        return FeatureStats.from_tensors(entry.stats, entry.num_classes, self.width, legacy_ok=True)

    def counted(self, task: int) -> list[int]:
        return list(self.record.clients.get(task, []))

    def wanted(self, task: int, client: int) -> tuple[int, int, int] | None:
        """``(dim, seed, grid)`` for a train request when ``client`` has not contributed to ``task`` yet."""
        return None if client in self.counted(task) else (self.config.dim, self.config.seed, self.config.grid)

    def specs(self, num_classes: int) -> dict[str, ArraySpec]:
        return stats_specs(num_classes, self.width)

    def check(self, task: int, replies: Sequence[tuple[int, Mapping[str, torch.Tensor]]]) -> dict[int, str]:
        """``{client: reason}`` for each ``(client, statistics)`` that fails validation or comes twice."""
        return self.validate(task, replies)[1]

    def validate(self, task: int, replies: Sequence[tuple[int, Mapping[str, torch.Tensor]]]
                 ) -> tuple[list[tuple[int, FeatureStats]], dict[int, str]]:
        """The valid ``(client, statistics)`` decoded, in the given order, and ``{client: reason}`` for the rest."""
        entry, seen = self.bank[task], set(self.counted(task))
        valid: list[tuple[int, FeatureStats]] = []
        rejected: dict[int, str] = {}
        for client, tensors in replies:
            if client in seen:
                rejected[client] = "statistics sent twice for this task"
                continue
            try:
                valid.append((client, FeatureStats.from_tensors(tensors, entry.num_classes, self.width)))
                seen.add(client)
            except StatsError as error:
                rejected[client] = str(error)
        return valid, rejected

    def collect(self, task: int, replies: Sequence[tuple[int, Mapping[str, torch.Tensor]]],
                cap: float = math.inf) -> dict[int, str]:
        """Add the valid ``(client, statistics)`` (in the given, fixed order) to the task's statistics in the
        bank; returns ``{client: reason}`` for the rejected ones (see :meth:`check`).

        ``cap``: the round's count cap (``weight_cap`` of :class:`~fedpetah.aggregation.BoundedAggregation`),
        so statistics count no more than the client's update does: statistics of ``n > cap`` examples are
        summed with weight ``cap / n`` per example (:meth:`FeatureStats.scaled`; the bank's counts turn
        float64), others exactly as they came."""
        _check_cap(cap)
        valid, rejected = self.validate(task, replies)
        return {**rejected, **self.add(task, valid, cap)}

    def add(self, task: int, valid: Sequence[tuple[int, FeatureStats]], cap: float = math.inf) -> dict[int, str]:
        """Add statistics that passed :meth:`validate` to the task's in the bank, as :meth:`collect` does;
        returns ``{client: reason}`` for all of them when their sum with the bank's is invalid (nothing added)."""
        _check_cap(cap)
        if not valid:
            return {}
        stored = self._stored(task)
        weighted = [_capped(s, cap) for _, s in valid]
        parts = weighted if stored is None else [stored, *weighted]  # earlier first
        summed = aggregate_stats(parts).tensors()
        try:  # the sum, as the bank would store it, must be valid statistics itself
            FeatureStats.from_tensors(summed, self.bank[task].num_classes, self.width, legacy_ok=True)
        except StatsError as error:
            reason = f"the sum with this round's statistics is invalid: {error}"
            return {c: reason for c, _ in valid}
        self.bank.set_stats(task, summed)
        self.record.clients[task] = sorted({*self.counted(task), *(c for c, _ in valid)})
        self.bank.metadata.update(self.record.to_json())
        return {}

    def fit(self, tasks: Sequence[int]) -> tuple[FrozenFeatures, nn.Linear] | None:
        """The router fitted on ``tasks``' statistics in the bank (:func:`fit_router`, on statistics validated
        as every use of them is) and the features it reads, on a copy of the backbone (an evaluation may move
        it to another device); None, logged, while one of them has no statistics or they do not fit."""
        missing = [t for t in tasks if t not in self.bank or not self.bank[t].stats]
        if not tasks or missing:
            log.warning("no router for tasks %s: tasks %s have no router statistics", list(tasks), missing)
            return None
        try:
            stats = [self._stored(t) for t in tasks]
            layer = fit_router([s for s in stats if s is not None], feature_width(self.backbone, self.config.grid),
                               self.config)
        except StatsError as error:
            log.error("no router for tasks %s: %s", list(tasks), error)
            return None
        backbone = self.backbone
        return FrozenFeatures(copy.deepcopy(backbone.module), backbone.mean, backbone.std, self.config.grid), layer

    def evaluate(self, adapter: AdapterConfig, tasks: Sequence[Task], upto: int) -> dict[str, float]:
        """Task-free accuracy on tasks 0..upto among every class learned so far, as round-record extras:
        ``task_free_<j>`` per task, ``task_free_all`` over all their test images, ``task_free_routing``,
        ``task_free_s_per_image``; empty (with a warning) while a task has no statistics."""
        learned = list(range(upto + 1))
        missing = [t for t in learned if t not in self.bank or not self.bank[t].stats]
        if missing:
            log.warning("no task-free evaluation after task %d: tasks %s have no router statistics", upto, missing)
            return {}
        try:
            stats = {t: FeatureStats.from_tensors(self.bank[t].stats, self.bank[t].num_classes, self.width,
                                                legacy_ok=True)
                     for t in learned}
            predictor = build_predictor(self.backbone, adapter, self.bank, stats, learned, self.config)
        except StatsError as error:  # the run goes on; the task-free row stays empty
            log.error("no task-free evaluation after task %d: %s", upto, error)
            return {}
        result = evaluate_task_free(predictor, tasks[: upto + 1])
        out: dict[str, Any] = {f"task_free_{j}": a for j, a in enumerate(result.per_task)}
        return {**out, "task_free_all": result.accuracy, "task_free_routing": result.routing_accuracy,
                "task_free_s_per_image": result.seconds_per_image}


def _check_cap(cap: float) -> None:
    if not cap > 0:
        raise ValueError(f"a statistics count cap must be positive, got {cap}")


def _capped(stats: FeatureStats, cap: float) -> FeatureStats:
    """``stats`` weighted ``cap / n`` per example when they count ``n > cap`` examples; else ``stats`` itself."""
    count = float(stats.count.sum())
    return stats.scaled(cap / count) if count > cap else stats


def drop_stats(directory: str | os.PathLike[str], tasks: Collection[int]) -> list[int]:
    """Remove ``tasks``' router statistics (and who contributed them) from the bank in ``directory``, which then
    loads again (:meth:`AdapterBank.load` refuses non-finite statistics): its clients are asked again in the
    task's later rounds, if any; until every learned task has statistics, the task-free evaluation is skipped.
    Returns the tasks dropped."""
    bank = AdapterBank.load(directory, drop_stats=tasks)
    record = RouterRecord.from_json(bank.metadata)
    for task in tasks:
        if task not in bank:
            raise BankError(f"task {task} is not in the bank in {directory}; tasks: {bank.tasks()}")
        record.clients.pop(task, None)
    if CLIENTS_KEY in bank.metadata:  # the rest of the bank's metadata as it was
        bank.metadata[CLIENTS_KEY] = record.to_json()[CLIENTS_KEY]
    bank.save(directory)
    return sorted(tasks)
