"""Server-side continual schedule: sampling, validation, per-task aggregation, bank, evaluation, logs.

Transport-free: the Flower ServerApp (server/app.py) only turns these calls into messages and back.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpetah.adapters import build_adapter
from fedpetah.aggregation import BoundedAggregation, RoundResult, StateDict, build_aggregator
from fedpetah.artifact import MANIFEST, WEIGHTS, artifact_digest, artifact_size, load_artifact
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank, BankError, TaskRecord
from fedpetah.experiment import ExperimentConfig
from fedpetah.routing.model import TaskAwareModel
from fedpetah.routing.stats import FeatureStats
from fedpetah.serving.collect import StatsCollector
from fedpetah.serving.fleet import FLEET_KEY, Fleet
from fedpetah.serving.metrics import RoundRecord, RunLog, plot_run, read_rounds, summarize
from fedpetah.serving.pipeline import prepare_artifact
from fedpetah.serving.round import ClientReply, RoundOutcome, RoundTraffic, rejections
from fedpetah.serving.variants import VariantPlanner, fleet_summary, noted
from fedpetah.tasks import Task, build_stream, load_stream
from fedpetah.train import evaluate
from fedpetah.wire.protocol import SENT_SECTIONS, Status, TaskInfo, TrainRequest, client_seed

log = logging.getLogger(__name__)


@dataclass
class RoundPlan:
    round: int  # 1-based over the whole run
    task: int
    round_in_task: int  # 1-based within the task


RUN_KEY = "run"
"""The bank metadata key of a run's :class:`RunRecord`."""


@dataclass
class RunRecord:
    """Progress that must survive a server restart: saved inside the bank's metadata (``run``), so one atomic
    write of ``bank.json`` commits the round's adapters and the progress together."""

    completed_rounds: int = 0
    installed: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_backbone: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: object) -> RunRecord:
        """The record a bank holds; BankError when it holds none or a malformed one."""
        if not isinstance(record, dict):
            raise BankError(f"the bank records no run progress ({RUN_KEY!r} is {type(record).__name__})")
        try:
            return cls(**record)
        except TypeError as error:
            raise BankError(f"the bank's {RUN_KEY!r} record is malformed: {error}") from None


LIVE_STREAMS = frozenset({"catalog"})
"""Streams whose tasks may grow while the server runs (read again by :meth:`ContinualServer.refresh_tasks`)."""

FederatedHook = Callable[["RoundPlan"], dict[str, Any]]
"""Called after a task's last round is aggregated: the federated evaluation's fields of the round's row."""


class ContinualServer:
    """Owns the run: backbone artifact, task stream (test splits where the server has them), adapter bank, the
    device ledger and metrics.

    A live stream (``tasks=catalog``) holds no images on the server: its tasks are names and classes, read again
    by :meth:`refresh_tasks`; its accuracies come from the devices (``federated``, set by the transport)."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, cache_dir: Path | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir = prepare_artifact(config, cache_dir)
        self.digest = artifact_digest(self.artifact_dir)
        self.backbone: Backbone = load_artifact(self.artifact_dir, expected_digest=self.digest)
        live = config.tasks.name in LIVE_STREAMS  # read afresh: load_stream keeps what it read once per process
        self.tasks: tuple[Task, ...] = tuple(build_stream(config.tasks)) if live else load_stream(config.tasks)
        self.aggregate = BoundedAggregation(build_aggregator(config.strategy.aggregator), config.strategy.bounds)
        self.bank_dir = self.run_dir / "bank"
        resuming = config.resume and (self.bank_dir / "bank.json").is_file()
        self.bank = AdapterBank.load(self.bank_dir) if resuming else AdapterBank()
        self.bank.check_backbone(self.digest)  # a resumed bank's adapters must fit this backbone
        self.state = RunRecord.from_json(self.bank.metadata.get(RUN_KEY)) if resuming else RunRecord()
        self.check_learned(self.tasks)  # a resumed bank's tasks must be this stream's first ones, unchanged
        self.fleet = Fleet.from_json(self.bank.metadata.get(FLEET_KEY)) if resuming else Fleet()
        self.router = StatsCollector(self.bank, self.backbone, self.config.router)
        self.planner = VariantPlanner(config, self.artifact_dir)
        self.planner.size_fleet()  # a simulated mixed fleet's budgets, from the memory model (measured once)
        self.round_variants: dict[int, str] = {}  # the sampled clients' variants in the current round
        self.federated: FederatedHook | None = None
        self.log = RunLog(self.run_dir, committed_rounds=self.state.completed_rounds)  # drops uncommitted rows

    @property
    def live(self) -> bool:
        """Whether tasks may still be added while the server runs."""
        return self.config.tasks.name in LIVE_STREAMS

    def check_learned(self, tasks: tuple[Task, ...]) -> None:
        """BankError naming the first bank task that ``tasks`` drop, rename or give other classes (a stream may
        only grow at its end)."""
        for index in self.bank.tasks():
            entry = self.bank[index]
            learned = (entry.record.task_name, list(entry.class_names))
            if index >= len(tasks):
                raise BankError(f"the bank holds task {index} {learned[0]!r} but the task list has only "
                                f"{len(tasks)} task(s): tasks may be appended, never removed")
            now = (tasks[index].name, list(tasks[index].classes))
            if (learned[0] is not None and learned[0] != now[0]) or (learned[1] and learned[1] != now[1]):
                raise BankError(f"task {index} was learned as {learned[0]!r} with classes {learned[1]}, the task list "
                                f"now says {now[0]!r} with {now[1]}: a learned task cannot change")

    def refresh_tasks(self) -> list[Task]:
        """Read a live stream's task list again; returns the tasks appended since the last read. A list that
        fails to read or changes a learned task is logged and ignored (the tasks stay as they were)."""
        if not self.live:
            return []
        try:
            tasks = tuple(build_stream(self.config.tasks))
            self.check_learned(tasks)
        except (ValueError, OSError, RuntimeError, BankError) as error:
            log.error("the task list is unusable, keeping the %d task(s) read before: %s", len(self.tasks), error)
            return []
        if [(t.name, t.classes) for t in tasks[: len(self.tasks)]] != [(t.name, t.classes) for t in self.tasks]:
            log.error("the task list changed a task that is not learned yet; only appending is allowed: ignored")
            return []
        added = list(tasks[len(self.tasks):])
        self.tasks = tasks
        return added

    @property
    def stopped(self) -> bool:
        """Whether ``stop_after`` rounds are complete (this invocation ends; the run stays resumable)."""
        return self.config.stop_after is not None and self.state.completed_rounds >= self.config.stop_after

    def next_plan(self) -> RoundPlan | None:
        """The next round to run (None: every known task is trained, or ``stop_after`` is reached)."""
        return next(self.schedule(), None)

    @property
    def artifact_bytes(self) -> int:
        """What a device downloads (weights and manifest), not what else the folder holds (memory.json)."""
        return artifact_size(self.artifact_dir)

    def schedule(self) -> Iterator[RoundPlan]:
        """Every (task, round) of the run not completed yet, in order."""
        per_task = self.config.rounds_per_task
        end = len(self.tasks) * per_task
        if self.config.stop_after is not None:
            end = min(end, self.config.stop_after)
        for index in range(self.state.completed_rounds, end):
            yield RoundPlan(round=index + 1, task=index // per_task, round_in_task=index % per_task + 1)

    def trainable(self, clients: list[int]) -> list[int]:
        """The clients whose budget fits a variant the assignment policy would give them (all, by default)."""
        assigned = self.planner.assign(clients, self.fleet)
        return [c for c in clients if assigned[c] is not None]

    def sample(self, clients: list[int], plan: RoundPlan) -> list[int]:
        """A seeded sample of client ids (partition ids in simulation) for this round."""
        if not clients:
            raise RuntimeError("no clients are connected")
        assigned = self.planner.assign(clients, self.fleet)
        able = [c for c in clients if assigned[c] is not None]
        if not able:
            smallest = min(self.planner.needs().values())
            raise RuntimeError(f"none of the {len(clients)} devices can train: the smallest variant needs "
                               f"{smallest:.0f} MB with the margin {self.config.assignment.margin:g} "
                               "above a device's resting footprint")
        clients = able
        strategy = self.config.strategy
        k = min(len(clients), max(strategy.min_clients, math.ceil(strategy.fraction * len(clients))))
        rng = np.random.default_rng([self.config.seed, plan.round])
        ordered = sorted(clients)  # pick positions: Flower node ids are uint64 and numpy may cast them to float
        sampled = sorted(ordered[int(i)] for i in rng.choice(len(ordered), size=k, replace=False))
        self.round_variants = {c: assigned[c] or self.planner.full for c in sampled}
        return sampled

    def global_state(self, task: int) -> StateDict:
        """The task's current global adapter; a seeded fresh one when the task starts."""
        if task not in self.bank:
            t = self.tasks[task]
            with torch.random.fork_rng(devices=[]):  # adapters without an init_seed draw from torch's RNG
                torch.manual_seed(self.config.seed + 1000 * task)
                adapter = build_adapter(self.config.adapter, self.backbone, t.num_classes)
            self.bank.add_task(task, self.config.adapter.name, t.num_classes, adapter.state(), list(t.classes),
                               TaskRecord(t.name, self.digest).to_json())
        return self.bank[task].state

    def task_info(self, task: int) -> dict[str, Any]:
        t = self.tasks[task]
        return {"task": task, "task-name": t.name, "classes": list(t.classes), "num-classes": t.num_classes}

    def train_request(self, plan: RoundPlan, client: int, current: StateDict, with_artifact: bool) -> TrainRequest:
        """What ``client`` is asked in ``plan``'s round: its own training seed, the task, the global adapter
        state, and the backbone artifact when the client does not hold it yet."""
        config, task = self.config, self.tasks[plan.task]
        variant = self.round_variants.get(client, self.planner.full)
        sections = {name: asdict(getattr(config, name)) for name in SENT_SECTIONS}
        sections["train"]["seed"] = client_seed(config.seed, plan.round, client)
        sections["adapter"] = self.planner.adapter_section(variant)
        sent = self.planner.sent(variant, current)
        return TrainRequest(digest=self.digest, round=plan.round, seed=config.seed, clients=config.clients,
                            task=TaskInfo(plan.task, task.name, tuple(task.classes)), sections=sections,
                            state={k: v.detach().cpu().contiguous().numpy() for k, v in sent.items()},
                            artifact=self.artifact_payload if with_artifact else None,
                            stats=self.router.wanted(plan.task, client),
                            memory_need_mb=self.planner.need_mb(variant))

    def reply_layout(self, client: int, current: StateDict) -> StateDict:
        """The tensors ``client``'s reply must hold this round: its variant's view of ``current``."""
        return self.planner.expected(self.round_variants.get(client, self.planner.full), current)

    @cached_property
    def artifact_payload(self) -> tuple[bytes, bytes]:
        """The backbone's weights and manifest bytes as they travel to a client (read once per run)."""
        return (self.artifact_dir / WEIGHTS).read_bytes(), (self.artifact_dir / MANIFEST).read_bytes()

    def complete_round(self, plan: RoundPlan, current: StateDict, replies: list[ClientReply],
                       bytes_down: int, bytes_up: int, started: float,
                       bytes_backbone: int = 0, extra: dict[str, float] | None = None) -> RoundRecord:
        """Run the round's steps on the replies and return its row: :meth:`check_stats`, :meth:`aggregate_round`,
        :meth:`collect_stats`, :meth:`evaluate_round`, :meth:`record_round`, :meth:`commit` (a subclass may
        override any of them).

        ``replies`` come in a fixed order (by client id), so the same replies always give the same sums.
        """
        valid_stats, bad_stats = self.check_stats(plan, replies)
        trained = [r for r in replies if r.status is Status.OK and r.client not in bad_stats]
        result = self.aggregate_round(plan, current, trained)
        refused = {trained[r.index].client for r in result.rejected}  # a rejected update's statistics go too
        if result.aggregate is not None:  # none kept (e.g. a non-finite aggregate): asked again next round
            bad_stats.update(self.collect_stats(plan, [(c, s) for c, s in valid_stats if c not in refused],
                                                result.metrics["weight_cap"]))
            self.bank.update(plan.task, result.aggregate.state, plan.round, result.aggregate.opt_state)
        outcome = RoundOutcome(replies, trained, [r for r in trained if r.client not in refused], result,
                               rejections(replies, trained, result, bad_stats))
        accuracies, task_free = self.evaluate_round(plan)
        if self.federated is not None and plan.round_in_task == self.config.rounds_per_task:
            task_free = {**task_free, **self.federated(plan)}  # the devices' evaluation of every learned task
        traffic = RoundTraffic(bytes_down, bytes_up, bytes_backbone, started, extra or {})
        record = self.record_round(plan, outcome, accuracies, task_free, traffic)
        for reply in replies:
            variant = self.round_variants.get(reply.client, self.planner.full)
            noted(self.fleet, reply, variant)
            if reply.status is Status.NO_BUDGET:
                self.planner.refused[reply.client] = variant  # offered a poorer variant from the next round
        self.fleet.count_round([r.client for r in outcome.aggregated],
                               [(r.client, str(r.reason)) for r in outcome.rejected],
                               [r.client for r in replies if r.status is Status.NO_BUDGET])
        self.commit(plan, traffic)
        return record

    def check_stats(self, plan: RoundPlan, replies: list[ClientReply]
                    ) -> tuple[list[tuple[int, FeatureStats]], dict[int, str]]:
        """The router statistics of the ok replies, decoded once: the valid ones and ``{client: reason}`` for the
        rest (whose updates are not aggregated either)."""
        with_stats = [(r.client, r.stats) for r in replies if r.status is Status.OK and r.stats is not None]
        return self.router.validate(plan.task, with_stats)

    def aggregate_round(self, plan: RoundPlan, current: StateDict, trained: list[ClientReply]) -> RoundResult:
        """The bounded aggregation of the trained replies' updates (checked at the decode, so only their values
        are checked here), from the task's optimizer state, counts capped at the task's size."""
        size = len(self.tasks[plan.task].train)  # 0: the server holds no images of the task (a live stream)
        variants = [self.round_variants.get(r.client, self.planner.full) for r in trained]
        return self.aggregate.decoded(current, [r.update for r in trained], self.bank[plan.task].opt_state,
                                      task_size=size or None, ranks=self.planner.ranks(variants))

    def collect_stats(self, plan: RoundPlan, valid: list[tuple[int, FeatureStats]], cap: float) -> dict[int, str]:
        """Add the aggregated clients' statistics to the task's in the bank, weighted like their updates (a client
        counts at most the round's count ``cap``, in the adapter and in the router); returns the rejected ones."""
        return self.router.add(plan.task, valid, cap=cap)

    def evaluate_round(self, plan: RoundPlan) -> tuple[list[float], dict[str, float]]:
        """The seen tasks' accuracies (every round when configured, else after a task's last round) and, after a
        task's last round, the task-free accuracies."""
        last_of_task = plan.round_in_task == self.config.rounds_per_task
        held = len(self.tasks[plan.task].test) > 0  # a live stream's server holds no test images
        accuracies = self.evaluate_seen(plan.task) if held and (self.config.evaluate_every_round or last_of_task) \
            else []
        task_free = self.router.evaluate(self.config.adapter, self.tasks, plan.task) if held and last_of_task else {}
        return accuracies, task_free

    def record_round(self, plan: RoundPlan, outcome: RoundOutcome, accuracies: list[float],
                     task_free: dict[str, float], traffic: RoundTraffic) -> RoundRecord:
        """The round's row (each rejection logged), appended to the run log and fsynced before :meth:`commit`."""
        ok, replies = outcome.aggregated, outcome.replies
        steps = [r.metrics["step-time-ms"] / 1000 for r in ok if "step-time-ms" in r.metrics]
        memory = [r.metrics["peak-memory-mb"] for r in ok if "peak-memory-mb" in r.metrics]
        compute = [r.metrics.get("train-seconds", 0.0) for r in ok]
        wall = time.perf_counter() - traffic.started
        record = RoundRecord(
            round=plan.round, task=plan.task, accuracy=dict(enumerate(accuracies)),
            bytes_up=traffic.bytes_up, bytes_down=traffic.bytes_down, num_clients=len(ok),
            num_rejected=len(outcome.rejected), round_time_s=wall,
            step_time_s=float(np.median(steps)) if steps else None, peak_memory_mb=max(memory) if memory else None,
            rejections=dict(Counter(str(r.reason) for r in outcome.rejected)),
            extra={
                **{f"status_{s.value.replace('-', '_')}": float(sum(r.status is s for r in replies))
                   for s in Status if s is not Status.OK},
                **traffic.extra,
                "round_in_task": float(plan.round_in_task),
                "sampled": float(len(replies)),
                "aggregated": float(outcome.result.aggregate is not None),
                "bytes_backbone": float(traffic.bytes_backbone),
                "train_loss": _weighted([r.metrics.get("train-loss", math.nan) for r in ok],
                                        [r.num_examples for r in ok]),
                "step_time_p95_s": float(np.percentile(steps, 95)) if steps else math.nan,
                "peak_memory_p50_mb": float(np.median(memory)) if memory else math.nan,
                "slowest_client_s": max(compute, default=0.0),
                **({f"variant_{v}": float(n) for v, n in Counter(
                    self.round_variants.get(r.client, self.planner.full) for r in ok).items()}
                   if self.planner.active else {}),
                "overhead_s": wall - max(compute, default=0.0),
                **task_free,
                **outcome.aggregation_metrics(),
            },
        )
        for rejection in outcome.rejected:
            log.warning("round %d: rejected client %s: %s %s", plan.round, rejection.client, rejection.reason,
                        rejection.detail)
        self.log.log(record)  # fsynced before the commit; a resume drops rows the bank never committed
        return record

    def commit(self, plan: RoundPlan, traffic: RoundTraffic) -> None:
        """Save the bank with the run's progress: one atomic write commits the round's adapters and progress."""
        self.state.completed_rounds = plan.round
        self.state.bytes_down += traffic.bytes_down
        self.state.bytes_up += traffic.bytes_up
        self.state.bytes_backbone += traffic.bytes_backbone
        self.bank.metadata[RUN_KEY] = self.state.to_json()
        self.bank.metadata[FLEET_KEY] = self.fleet.to_json()
        self.bank.save(self.bank_dir)

    def evaluate_seen(self, upto: int) -> list[float]:
        """Test accuracy of every task 0..upto with its own adapter from the bank (task-aware). With
        ``router.task_aware_mix`` > 0 each adapter's logits are combined with the rows of its classes in the router
        fitted on the learned tasks' statistics (:class:`TaskAwareModel`); while a learned task has no statistics,
        the adapters alone."""
        mix = self.router.config.task_aware_mix
        learned = [j for j in range(upto + 1) if j in self.bank]
        fitted = self.router.fit(learned) if mix > 0 and learned else None
        starts = dict(zip(learned, accumulate((self.bank[j].num_classes for j in learned), initial=0), strict=False))
        accuracies = []
        for j in range(upto + 1):
            if j not in self.bank:
                accuracies.append(math.nan)
                continue
            adapter = build_adapter(self.config.adapter, self.backbone, self.tasks[j].num_classes)
            adapter.load_state(self.bank[j].state)
            model: torch.nn.Module = adapter.model
            if fitted is not None:
                model = TaskAwareModel(adapter.model, *fitted, starts[j], self.bank[j].num_classes, mix)
            result = evaluate(model, self.tasks[j].test, self.backbone.img_size, self.backbone.in_chans,
                              device=self.config.train.device)
            accuracies.append(result.accuracy)
        return accuracies

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json and the plots; returns the summary."""
        classes = self.tasks[0].num_classes if self.tasks else 2
        trainable = build_adapter(self.config.adapter, self.backbone, classes).num_trainable()
        summary = {
            **summarize(read_rounds(self.run_dir), len(self.tasks)),
            "tasks": [t.name for t in self.tasks],
            "bytes_backbone_total": self.state.bytes_backbone,
            "backbone_artifact_bytes": self.artifact_bytes,
            "trainable_params": trainable,
            "backbone_params": self.backbone.num_params(),
            "backbone_pretraining": self.backbone.pretraining,
            "artifact_digest": self.digest,
            **fleet_summary(self.config, self.fleet),
            **(extra or {}),
        }
        self.log.write_summary(summary)
        self.log.close()
        plot_run(self.run_dir, len(self.tasks))
        return summary


def _weighted(values: list[float], weights: list[int]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else math.nan
