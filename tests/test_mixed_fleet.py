"""A mixed fleet through the ServerApp in one process: simulated partitions of three memory tiers run the real
ClientApp handlers, each trains the richest variant its tier's budget fits, and nobody goes over its budget; a
device that answers no-budget is counted, never rejected, and offered a poorer variant next time."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from grids import AnsweringGrid, answer_honestly

from fedpetah.adapters import adapter_config
from fedpetah.aggregation import aggregator_config
from fedpetah.assignment import AssignmentConfig
from fedpetah.bank import AdapterBank
from fedpetah.config import BackboneConfig, FleetConfig, PruningConfig, TrainConfig, WarmupConfig
from fedpetah.experiment import ExperimentConfig, StrategyConfig
from fedpetah.tasks import PartitionConfig, TaskStreamConfig
from fedpetah.wire.evaluation import EVALUATE, EvaluateReply
from fedpetah.wire.profile import DeviceProfile
from fedpetah.wire.protocol import HELLO, NO_PARTITION, HelloReply, HelloRequest, Status, TrainReply, TrainRequest
from flower_glue.records import records_of, to_recorddict
from server.app import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_app_identity")]
CLIENTS = 10
GREEDY = 300  # the node id of a device that reports a large budget but cannot train LoRA




class FleetGrid(AnsweringGrid):
    """Simulated partitions answered by the real ClientApp handlers, and one scripted device."""

    def __init__(self, honest: dict[int, Context], greedy: bool) -> None:
        self.honest, self.greedy = honest, greedy
        self.outbox: list[Message] = []
        self.asked: list[str] = []  # the variants the greedy device was asked to train, in order

    def get_node_ids(self) -> Iterable[int]:
        return [*self.honest, *([GREEDY] if self.greedy else [])]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            ids.append(self.stamp(message))
            node = message.metadata.dst_node_id
            answer = answer_honestly(message, self.honest[node]) if node in self.honest else self.script(message)
            self.outbox.append(answer)
        return ids

    def script(self, message: Message) -> Message:
        if message.metadata.message_type == HELLO:
            tasks = HelloRequest.decode(records_of(message)).tasks
            holdings = {t.index: np.full((t.num_classes, 2), [10, 0], np.int64) for t in tasks}
            profile = DeviceProfile(memory_budget_mb=1e6, cores=4, free_disk_mb=1e4)
            return Message(to_recorddict(HelloReply(NO_PARTITION, True, holdings, profile).encode()), reply_to=message)
        if message.metadata.message_type == EVALUATE:  # it holds no held-out images
            return Message(to_recorddict(EvaluateReply(Status.NO_DATA).encode()), reply_to=message)
        request = TrainRequest.decode(records_of(message))
        adapter = request.sections["adapter"]
        variant = "head" if adapter.get("train_lora") is False else f"lora-{adapter['rank']}"
        self.asked.append(variant)
        status = Status.NO_DATA if variant == "head" else Status.NO_BUDGET  # it holds no images in truth
        return Message(to_recorddict(TrainReply(status, "this device cannot train this variant").encode()),
                       reply_to=message)


def _config(clients: int, rounds: int, fleet: str = "mixed") -> ExperimentConfig:
    return ExperimentConfig(
        clients=clients, rounds_per_task=rounds, reply_timeout_s=30.0,
        backbone=BackboneConfig(name="efficientvit_b0", img_size=32, warmup=WarmupConfig(epochs=2)),
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("lora", rank=2),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=1), partition=PartitionConfig(name="iid"),
        train=TrainConfig(epochs=1, batch_size=16, max_steps=2, loss="cross_entropy"),
        strategy=StrategyConfig(aggregator=aggregator_config("hetlora"), fraction=1.0, min_clients=1),
        assignment=AssignmentConfig("budget", margin=0.5),
        fleet=FleetConfig(fleet, sized_for=("head", "lora-1", "lora-2")))


def _contexts(cache: Path, clients: int) -> dict[int, Context]:
    return {100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p, "cache-dir": str(cache)},
                             state=RecordDict(), run_config={}) for p in range(clients)}


def test_every_tier_trains_what_fits_and_nobody_goes_over_budget(tmp_path: Path, cache_dir: Path) -> None:
    config = _config(CLIENTS, rounds=2)
    summary = run(FleetGrid(_contexts(tmp_path / "cache", CLIENTS), greedy=False), config, tmp_path / "run",
                  cache_dir)
    tiers = summary["fleet_tiers"]
    assert {n: t["devices"] for n, t in tiers.items()} == {"small": 2, "middle": 5, "large": 3}
    assert summary["over_budget_devices"] == 0
    assert all(t["participated"] == t["devices"] and t["over_budget_devices"] == 0 for t in tiers.values())
    assert set(tiers["small"]["variants"]) == {"head"}  # its budget fits the head alone
    assert all(v.startswith("lora-") for n in ("middle", "large") for v in tiers[n]["variants"])
    assert tiers["large"]["variants"] == {"lora-2": 2 * 3}  # every round, its richest variant
    assert tiers["small"]["budget_mb"] < tiers["middle"]["budget_mb"] <= tiers["large"]["budget_mb"]
    for tier in tiers.values():
        assert tier["peak_memory_mb"] is not None and 0 < tier["peak_memory_mb"] <= tier["budget_mb"]
    assert summary["variants_used"]["head"] == 2 * 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["num_clients"] == CLIENTS and r["extra"]["variant_head"] == 2 for r in rows)
    assert summary["task_free_accuracy"] is not None and summary["average_accuracy"] > 0.5
    bank = AdapterBank.load(tmp_path / "run" / "bank")
    lora_a = [v for k, v in bank[0].state.items() if ".lora_A." in k]
    assert lora_a and all(v.shape[0] == 2 for v in lora_a)  # the bank keeps the full rank-2 adapter


def test_a_device_out_of_memory_is_counted_and_offered_poorer_variants(tmp_path: Path, cache_dir: Path) -> None:
    config = _config(3, rounds=4, fleet="uniform")  # the honest devices: all the memory there is
    grid = FleetGrid(_contexts(tmp_path / "cache", 2), greedy=True)
    run(grid, config, tmp_path / "run", cache_dir)
    assert grid.asked == ["lora-2", "lora-1", "head", "head"]  # each no-budget: the next poorer variant
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["extra"]["status_no_budget"] for r in rows] == [1, 1, 0, 0]
    assert all(r["num_rejected"] == 0 for r in rows)  # never an attack
    ledger = json.loads((tmp_path / "run" / "bank" / "bank.json").read_text())["metadata"]["fleet"]
    greedy = next(d for d in ledger if d["node"] == GREEDY)
    assert greedy["no_budget"] == 2 and greedy["rejections"] == {}
