"""The real ServerApp loop against hostile clients: every malformed reply is a counted rejection, never a crash,
and never changes what the honest clients' round computes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from grids import InProcessGrid, answer_honestly

from fedpetah.adapters import adapter_config
from fedpetah.bank import AdapterBank
from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig, WarmupConfig
from fedpetah.experiment import ExperimentConfig, StrategyConfig
from fedpetah.tasks import PartitionConfig, TaskStreamConfig
from fedpetah.wire.evaluation import EVALUATE, EvaluateReply
from fedpetah.wire.protocol import (
    HELLO,
    NO_PARTITION,
    HelloReply,
    HelloRequest,
    Records,
    Status,
    TrainReply,
    TrainRequest,
)
from fedpetah.wire.reasons import Reason
from flower_glue.records import records_of, to_recorddict
from server.app import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_app_identity")]
HONEST = (0, 1)  # partition ids of the honest simulated clients (node ids 100, 101)
Answer = Callable[[Message], "Message | None"]


class ScriptedGrid(InProcessGrid):
    """Flower's Grid interface answered in this process (a stand-in for the transport only): honest nodes run the
    real ClientApp handlers; every other node answers with what its script returns (None: stays silent until
    ``delay_s`` has passed, then answers honestly-shaped garbage late)."""

    def __init__(self, honest: dict[int, Context], scripts: dict[int, Answer], delay_s: float = 0.0) -> None:
        self.honest, self.scripts, self.delay_s = honest, scripts, delay_s
        self.outbox: list[tuple[float, Message]] = []

    def get_node_ids(self) -> Iterable[int]:
        return [*self.honest, *self.scripts]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            ids.append(self.stamp(message))
            node = message.metadata.dst_node_id
            if node in self.honest:
                self.outbox.append((0.0, answer_honestly(message, self.honest[node])))
            else:
                answer = self.scripts[node](message)
                if answer is None:
                    self.outbox.append((time.monotonic() + self.delay_s, _late(message)))
                else:
                    self.outbox.append((0.0, answer))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted, now = set(message_ids), time.monotonic()
        ready = [m for t, m in self.outbox if t <= now and m.metadata.reply_to_message_id in wanted]
        self.outbox = [(t, m) for t, m in self.outbox if m not in ready]
        return ready


def _late(message: Message) -> Message:
    return Message(to_recorddict(TrainReply(Status.NO_DATA, "late").encode()), reply_to=message)




def _config(clients: int, rounds: int) -> ExperimentConfig:
    return ExperimentConfig(
        clients=clients, rounds_per_task=rounds, reply_timeout_s=1.0,
        backbone=BackboneConfig(name="efficientvit_b0", img_size=32, warmup=WarmupConfig(epochs=2)),
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("lora", rank=2),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=1), partition=PartitionConfig(name="iid"),
        train=TrainConfig(epochs=1, batch_size=16, max_steps=2, loss="cross_entropy"),
        strategy=StrategyConfig(fraction=1.0, min_clients=1))


def _contexts(cache: Path) -> dict[int, Context]:
    return {100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p, "cache-dir": str(cache)},
                             state=RecordDict(), run_config={}) for p in HONEST}


def _hello_as_device(message: Message) -> Message:
    """A device that claims 10 training images of each class of every task it is asked about."""
    tasks = HelloRequest.decode(records_of(message)).tasks
    holdings = {t.index: np.full((t.num_classes, 2), [10, 0], np.int64) for t in tasks}
    return Message(to_recorddict(HelloReply(NO_PARTITION, True, holdings).encode()), reply_to=message)


def _valid_reply(message: Message) -> Records:
    """A well-formed ok reply to ``message`` (the global state sent back, 10 examples claimed)."""
    request = TrainRequest.decode(records_of(message))
    stats = None
    if request.stats is not None:  # the router statistics asked for: 10 all-zero feature vectors of class 0
        dim, classes = request.stats[0], request.task.num_classes  # dim < the width of the router features
        stats = {"count": np.array([10] + [0] * (classes - 1), np.int64), "sum": np.zeros((classes, dim)),
                 "within": np.zeros(dim * (dim + 1) // 2, np.float32)}
    return TrainReply(Status.OK, "", {k: v.copy() for k, v in request.state.items()}, 10, {}, stats).encode()


def _hostile(changes: list[str], malform: Callable[[Records, str], Records]) -> Answer:
    """A node that answers hello as a device, then round after round with the next malformed reply."""
    queue = iter(changes)

    def answer(message: Message) -> Message | None:
        if message.metadata.message_type == HELLO:
            return _hello_as_device(message)
        if message.metadata.message_type == EVALUATE:  # no held-out images: nothing to count
            return Message(to_recorddict(EvaluateReply(Status.OK, "", kept=True).encode()), reply_to=message)
        change = next(queue)
        if change == "error-reply":
            return Message(Error(code=0, reason="boom"), reply_to=message)
        if change == "node-unavailable":  # what Flower writes for a node that died before it answered
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=message)
        if change == "silent":
            return None
        if change == "garbage-array":
            content = to_recorddict(_valid_reply(message))
            array = next(iter(content.array_records["adapter"].values()))
            array.__dict__["data"] = b"\x93NUMPY garbage" * 3
            return Message(content, reply_to=message)
        return Message(to_recorddict(malform(_valid_reply(message), change)), reply_to=message)

    return answer


CHANGES = ["no-status", "status-unknown", "no-metrics", "metrics-as-config", "count=nan", "count=inf",
           "count=neg", "count=zero", "count=float", "count=huge", "loss-nan", "too-many-metrics", "no-adapter",
           "missing-key", "extra-key", "shape", "dtype", "non-finite", "error-reply", "garbage-array",
           "node-unavailable"]


def test_hostile_replies_are_counted_and_change_nothing(tmp_path: Path, cache_dir: Path,
                                                         malform: Callable[[Records, str], Records]) -> None:
    hostile_nodes, rounds = 4, 6
    scripts = [CHANGES[i::hostile_nodes] + ["silent"] * rounds for i in range(hostile_nodes)]
    scripts[0][2] = "silent"  # one reply that misses its deadline: counted as a timeout, then as late
    grid = ScriptedGrid(_contexts(tmp_path / "cache"),
                        {200 + i: _hostile(s, malform) for i, s in enumerate(scripts)}, delay_s=1.5)
    config = _config(clients=len(HONEST) + hostile_nodes, rounds=rounds)
    summary = run(grid, config, tmp_path / "attacked", cache_dir)
    assert summary["average_accuracy"] > 0.5

    rows = [json.loads(line) for line in (tmp_path / "attacked" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == rounds and all(r["num_clients"] == len(HONEST) for r in rows)
    reasons: dict[str, int] = {}
    for row in rows:
        assert row["num_rejected"] == sum(row["rejections"].values())
        for reason, count in row["rejections"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    assert sum(reasons.values()) == hostile_nodes * rounds  # every hostile reply, a silent one as a timeout
    expected = {"count", "keys", "shape", "dtype", "metrics", "malformed", "status", "non_finite", "timeout",
                "client_error", "unavailable"}
    assert expected <= set(reasons) <= {reason.value for reason in Reason}  # one vocabulary, spelled as scripts read it
    assert sum(r["extra"]["late_replies"] for r in rows) >= 1

    # The honest clients alone, with the other nodes answering "no data": the bank must be identical.
    quiet = ScriptedGrid(_contexts(tmp_path / "cache"), {200 + i: _no_data for i in range(hostile_nodes)})
    run(quiet, config, tmp_path / "clean", cache_dir)
    attacked, clean = AdapterBank.load(tmp_path / "attacked" / "bank"), AdapterBank.load(tmp_path / "clean" / "bank")
    for key, value in clean[0].state.items():
        torch.testing.assert_close(attacked[0].state[key], value, rtol=0, atol=0)
        assert bool(np.isfinite(value.numpy()).all())


def _no_data(message: Message) -> Message:
    if message.metadata.message_type == HELLO:
        return _hello_as_device(message)
    if message.metadata.message_type == EVALUATE:
        return Message(to_recorddict(EvaluateReply(Status.OK, "", kept=True).encode()), reply_to=message)
    return Message(to_recorddict(TrainReply(Status.NO_DATA, "none here").encode()), reply_to=message)
