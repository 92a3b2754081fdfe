"""The device profile in the hello reply (bounded on the server), the memory budget a device trains within
(``no-budget`` instead of being killed), and the server's counting of ``no-budget`` answers (never a rejection)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import clients.app as client_app
from clients import cli as client_cli
from fedpetah.adapters import adapter_config
from fedpetah.config import BackboneConfig, PruningConfig, RouterConfig, TrainConfig
from fedpetah.device.client import ClientRuntime, TrainSettings, simulated_data
from fedpetah.device.local import BackboneCache
from fedpetah.device.profile import MemoryWatch
from fedpetah.experiment import ExperimentConfig, StrategyConfig
from fedpetah.serving.continual import ContinualServer
from fedpetah.serving.fleet import Fleet
from fedpetah.serving.round import ClientReply
from fedpetah.tasks import ImageSet, PartitionConfig, TaskStreamConfig
from fedpetah.wire.profile import DeviceProfile
from fedpetah.wire.protocol import (
    HELLO,
    HelloReply,
    HelloRequest,
    ProtocolError,
    Status,
    TrainReply,
    TrainRequest,
    specs,
)
from fedpetah.wire.reasons import Reason
from flower_glue.records import from_recorddict, records_of, to_recorddict
from server import status as status_cli


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> ContinualServer:
    """A 2-client server of a tiny random backbone with a rank-2 LoRA adapter (3 local steps of batch 8)."""
    root = tmp_path_factory.mktemp("profile")
    config = ExperimentConfig(
        clients=2, rounds_per_task=2, evaluate_every_round=False, output_dir=str(root),
        backbone=BackboneConfig(name="test_efficientvit", img_size=32, weights="random"),
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("lora", rank=2),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=1), partition=PartitionConfig(name="iid"),
        train=TrainConfig(epochs=1, batch_size=8, max_steps=3, loss="cross_entropy"),
        strategy=StrategyConfig(fraction=1.0, min_clients=1), router=RouterConfig(dim=2))
    return ContinualServer(config, root / "run", cache_dir)


def _request(server: ContinualServer, **change: Any) -> TrainRequest:
    """Client 0's first train request, through the wire (as a device decodes it)."""
    plan = next(server.schedule())
    request = server.train_request(plan, 0, server.global_state(plan.task), with_artifact=True)
    return TrainRequest.decode(dataclasses.replace(request, stats=None, **change).encode())


def _runtime(tmp_path: Path, server: ContinualServer, budget_mb: float | None = None) -> ClientRuntime:
    """A device runtime whose cache holds the server's backbone."""
    cache = BackboneCache(tmp_path / "cache")
    cache.install(server.digest, *server.artifact_payload)
    return ClientRuntime(cache, 0, memory_budget_mb=budget_mb)


# ---------------------------------------------------------------------------------------------- the profile


def test_the_profile_travels_in_a_hello_reply_when_the_server_asks(tmp_path: Path, server: ContinualServer) -> None:
    # Arrange: a device with a 150 MB budget that holds the backbone, one that does not
    runtime = _runtime(tmp_path, server, budget_mb=150.0)
    fresh = ClientRuntime(BackboneCache(tmp_path / "empty"), memory_budget_mb=150.0)
    asked = HelloRequest.decode(HelloRequest(server.digest, profile=True).encode())

    # Act
    reply = HelloReply.decode(from_recorddict(to_recorddict(runtime.hello(asked).encode())))
    before_backbone = HelloReply.decode(fresh.hello(asked).encode())
    not_asked = runtime.hello(HelloRequest.decode(HelloRequest(server.digest).encode()))

    # Assert: the budget set, this process's cores, the cache's free disk, a measured warm step; no step time
    # before the backbone is cached; no profile for a server that does not ask (nor from an old device)
    assert asked.profile and reply.profile is not None
    assert reply.profile.memory_budget_mb == 150.0 and reply.profile.cores == len(os.sched_getaffinity(0))
    assert 0 < reply.profile.free_disk_mb < 2**30 and 0 < reply.profile.step_time_s < 60
    assert before_backbone.profile is not None and before_backbone.profile.step_time_s == 0.0
    assert not_asked.profile is None and "profile" not in not_asked.encode().configs
    assert HelloReply.decode(not_asked.encode()).profile is None


def test_the_default_budget_is_what_the_system_can_give_out(tmp_path: Path) -> None:
    meminfo = Path("/proc/meminfo").read_text()
    available = int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable:")).split()[1])
    profile = ClientRuntime(BackboneCache(tmp_path)).hello(HelloRequest("0" * 64, profile=True)).profile
    assert profile is not None
    assert profile.memory_budget_mb == pytest.approx(available / 1024, rel=0.2)


HOSTILE: dict[str, dict[str, Any]] = {
    "budget-nan": {"memory-budget-mb": math.nan},
    "budget-inf": {"memory-budget-mb": math.inf},
    "budget-negative": {"memory-budget-mb": -1.0},
    "budget-above-16-TiB": {"memory-budget-mb": 16 * 2**20 + 1.0},
    "budget-string": {"memory-budget-mb": "150"},
    "budget-bool": {"memory-budget-mb": True},
    "cores-zero": {"cores": 0},
    "cores-too-many": {"cores": 4097},
    "cores-fraction": {"cores": 2.5},
    "cores-bool": {"cores": True},
    "disk-negative": {"free-disk-mb": -5.0},
    "disk-huge": {"free-disk-mb": 1e300},
    "step-over-an-hour": {"step-time-s": 3601.0},
    "step-negative": {"step-time-s": -0.1},
    "missing-key": {"step-time-s": None},
    "too-many-keys": {f"k{i}": 0 for i in range(20)},
}


@pytest.mark.parametrize("change", sorted(HOSTILE))
def test_a_hostile_profile_is_refused_with_the_profile_reason(change: str) -> None:
    # Arrange: a valid hello reply, then its profile record changed as a hostile device would
    records = HelloReply(-1, True, profile=DeviceProfile(150.0, 4, 1000.0, 0.2)).encode()
    HelloReply.decode(records)  # valid as sent
    record = records.configs["profile"]
    for key, value in HOSTILE[change].items():
        if value is None:
            del record[key]
        else:
            record[key] = value

    # Act / Assert
    with pytest.raises(ProtocolError) as raised:
        HelloReply.decode(records)
    assert raised.value.reason is Reason.PROFILE


def test_a_device_cannot_build_a_profile_out_of_bounds() -> None:
    with pytest.raises(ValueError, match="cores=0 is outside"):
        DeviceProfile(150.0, 0, 1000.0)


# ---------------------------------------------------------------------------------------------- the budget


def test_memory_need_round_trips_and_a_hostile_one_is_malformed(server: ContinualServer) -> None:
    assert _request(server, memory_need_mb=212.5).memory_need_mb == 212.5
    assert _request(server).memory_need_mb is None
    for bad in (math.nan, -1.0, math.inf, "212", True):
        records = _request(server).encode()
        records.configs["config"]["memory-need-mb"] = bad
        with pytest.raises(ProtocolError) as raised:
            TrainRequest.decode(records)
        assert raised.value.reason is Reason.MALFORMED


def test_a_request_that_needs_more_than_the_budget_is_answered_no_budget_without_training(
        tmp_path: Path, server: ContinualServer) -> None:
    # Arrange: a device with a 150 MB budget asked for work that needs 212 MB; a data source that notes its reads
    runtime = _runtime(tmp_path, server, budget_mb=150.0)
    read: list[int] = []

    def data(settings: TrainSettings) -> ImageSet | None:
        read.append(1)
        return simulated_data(0)(settings)

    # Act
    reply = runtime.train(_request(server, memory_need_mb=212.0), data)
    decoded = TrainReply.decode(reply.encode(), specs(_request(server).state))

    # Assert: no-budget at once (no data read, nothing trained), with the figures and where the budget came from
    assert decoded.status is Status.NO_BUDGET and decoded.state is None and read == []
    assert decoded.reason == ("this device cannot train this variant: it needs 212 MB, the budget is 150 MB "
                              "(--memory-budget-mb)")


def test_training_that_grows_past_the_budget_stops_at_the_next_step(tmp_path: Path, server: ContinualServer) -> None:
    # Arrange: a budget of 1 MB above the resting footprint, no stated need: only the guard can stop it
    runtime = _runtime(tmp_path, server, budget_mb=1.0)
    request = _request(server, sections={**_request(server).sections,
                                         "train": {**_request(server).sections["train"], "batch_size": 64}})

    # Act
    reply = runtime.train(request, simulated_data(0))

    # Assert: stopped after its first step (of 3), answered no-budget with the peak it measured
    assert reply.status is Status.NO_BUDGET, reply.reason
    assert reply.reason.startswith("training stopped after 1 step(s): it took ")
    assert reply.reason.endswith("the budget is 1.0 MB (--memory-budget-mb)")


def test_a_generous_budget_trains_as_without_one_and_reports_its_peak(tmp_path: Path,
                                                                     server: ContinualServer) -> None:
    # Arrange
    request = _request(server, memory_need_mb=20.0)
    generous = _runtime(tmp_path / "a", server, budget_mb=64_000.0)
    default = _runtime(tmp_path / "b", server)

    # Act
    replies = [TrainReply.decode(r.train(request, simulated_data(0)).encode(), specs(request.state))
               for r in (generous, default)]

    # Assert: the same trained state, and the peak above rest reaches the server as a metric
    assert all(r.status is Status.OK for r in replies), [r.reason for r in replies]
    assert replies[0].state is not None and replies[1].state is not None
    for key, value in replies[0].state.items():
        np.testing.assert_array_equal(value, replies[1].state[key])
    assert all(0 <= r.metrics["peak-memory-above-rest-mb"] < 1024 for r in replies)


def test_memory_watch_sees_a_transient_peak_between_steps() -> None:
    # Act: 64 MB allocated and freed inside one "step", checked only afterwards
    with MemoryWatch(None) as watch:
        block = torch.ones(16 * 2**20)
        block.add_(1.0)
        del block
        watch.check()

    # Assert: the peak is seen although the memory was freed before the check
    assert 60 <= watch.peak_mb < 200


# ---------------------------------------------------------------------------------------------- the server


def test_the_server_counts_no_budget_per_device_and_never_rejects_it(tmp_path: Path, cache_dir: Path,
                                                                    server: ContinualServer) -> None:
    # Arrange: a fresh server; device 1 answers ok, device 2 no-budget; both greeted with their profiles
    fresh = ContinualServer(dataclasses.replace(server.config, output_dir=str(tmp_path)), tmp_path / "run", cache_dir)
    plan = next(fresh.schedule())
    current = fresh.global_state(plan.task)
    for client, budget in ((1, 4000.0), (2, 150.0)):
        fresh.fleet.greeted(client, client, True, {}, 1, DeviceProfile(budget, 4, 1000.0, 0.1))
    replies = [ClientReply(1, {k: v + 0.01 for k, v in current.items()}, 10),
               ClientReply.of(2, TrainReply(Status.NO_BUDGET, "this device cannot train this variant"))]

    # Act
    record = fresh.complete_round(plan, current, replies, 0, 0, time.perf_counter())
    fresh.log.close()
    saved = Fleet.from_json(Fleet(fresh.fleet.devices.values()).to_json())
    fresh.fleet.greeted(2, 2, True, {}, 1)  # a hello without a profile keeps the last one

    # Assert: counted as a status, not a rejection; the ledger keeps the count and the profile across a restart
    assert record.extra["status_no_budget"] == 1.0 and record.num_rejected == 0 and record.rejections == {}
    assert record.num_clients == 1
    device = saved.devices[2]
    assert device.no_budget == 1 and device.rejections == {} and device.rounds_trained == 0
    assert device.profile == DeviceProfile(150.0, 4, 1000.0, 0.1)
    assert saved.devices[1].no_budget == 0 and saved.devices[1].rounds_trained == 1
    assert fresh.fleet.devices[2].profile == DeviceProfile(150.0, 4, 1000.0, 0.1)
    text = status_cli.render({"devices": [{**device.to_json(), "connected": True}], "running": True})
    assert "budget 150 MB, no-budget 1" in text


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's task identity, which a Message built outside a running app needs (as in test_live)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_the_client_app_answers_a_hello_with_the_node_configs_budget(tmp_path: Path, server: ContinualServer,
                                                                    task_identity: None) -> None:
    # Arrange: the ClientApp in this process (no worker), its budget from the node config fedpetah-client writes
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(tmp_path), "cache-dir": str(tmp_path / "cache"),
                                   "memory-budget-mb": 150.0})
    message = Message(to_recorddict(HelloRequest(server.digest, profile=True).encode()), 1, HELLO)
    message.metadata.__dict__["_message_id"] = "m1"

    # Act: answered and decoded as the server does (the message's layout checked first)
    hello = HelloReply.decode(records_of(client_app.hello(message, context), HelloReply.layout()))

    # Assert
    assert hello.profile is not None and hello.profile.memory_budget_mb == 150.0


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("budget", ["0", "-5", "nan"])
def test_fedpetah_client_refuses_a_budget_that_is_not_positive(tmp_path: Path, budget: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = client_cli.main(["--server", "127.0.0.1:9", "--data", str(tmp_path), "--memory-budget-mb", budget])
    assert code == client_cli.EXIT_USAGE
    assert "--memory-budget-mb must be a positive number of MB" in capsys.readouterr().err


def test_fedpetah_client_hands_the_budget_to_the_worker(tmp_path: Path) -> None:
    args = client_cli.parse_args(["--server", "127.0.0.1:9", "--data", str(tmp_path), "--memory-budget-mb", "150"])
    command = client_cli.worker_command(args, tmp_path / "w.sock")
    assert command[command.index("--memory-budget-mb") + 1] == "150.0"
    node = client_cli.supernode_command(args, "127.0.0.1:9", tmp_path / "secret")
    assert "memory-budget-mb=150.0" in node[node.index("--node-config") + 1]
    assert "--memory-budget-mb" not in client_cli.worker_command(
        client_cli.parse_args(["--server", "127.0.0.1:9", "--data", str(tmp_path)]), tmp_path / "w.sock")
