"""Hostile router statistics: huge but finite values are counted rejections, a poisoned bank refuses to load and
names its recovery, and the recovery (dropping a task's statistics) lets the run go on."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank, BankError
from fedpetah.collect import CLIENTS_KEY, StatsCollector, drop_stats
from fedpetah.continual import ClientReply
from fedpetah.protocol import Status, TrainReply
from fedpetah.routing import MAX_FEATURE_NORM, FeatureStats, RouterConfig, StatsError, data_stats, fit_router
from fedpetah.tasks import Task, TaskStreamConfig, build_stream
from flower_glue.records import from_recorddict, to_recorddict
from server import cli as server_cli

HONEST, HOSTILE = 3, 7
ADAPTER = {"w": np.zeros(2, np.float32)}


@pytest.fixture(scope="module")
def task() -> Task:
    return build_stream(TaskStreamConfig(name="digits", num_tasks=2))[0]


def _setup(backbone: Backbone, task: Task) -> tuple[AdapterBank, StatsCollector]:
    bank = AdapterBank()
    bank.add_task(0, "head", task.num_classes, build_adapter(adapter_config("head"), backbone, 2).state(),
                  list(task.classes))
    return bank, StatsCollector(bank, backbone, RouterConfig(dim=16))


def _honest(backbone: Backbone, task: Task, collector: StatsCollector, part: range) -> dict[str, np.ndarray]:
    stats = data_stats(backbone, task.train.subset(part), task.num_classes, collector.config)
    return {k: v.numpy() for k, v in stats.tensors().items()}


def _through_flower(client: int, stats: dict[str, np.ndarray], collector: StatsCollector) -> ClientReply:
    """``client``'s ok reply with ``stats`` as the server sees it: Flower records -> decode -> ClientReply."""
    count = int(stats["count"].sum())
    records = from_recorddict(to_recorddict(TrainReply(Status.OK, "", ADAPTER, count, {}, stats).encode()))
    decoded = TrainReply.decode(records, {"w": ((2,), "<f4")}, collector.specs(2))
    return ClientReply.of(client, decoded)


def _hostile(honest: dict[str, np.ndarray], change: str) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in honest.items()}
    if change == "sum=1e200":  # the review's attack: finite, and the between-class scatter overflows
        out["sum"][:] = 1e200
    elif change == "sum-beyond-norm":  # finite everywhere, but no honest feature is that long
        out["sum"][0, 0] = 2 * MAX_FEATURE_NORM * out["count"][0]
    elif change == "within=3e38":  # the largest float32: the summed scatter stays finite, its mean does not
        out["within"][:] = 3e38
    elif change == "within-off-diagonal":
        out["within"][1] = 1e30
    else:
        raise AssertionError(change)
    return out


@pytest.mark.parametrize("change", ["sum=1e200", "sum-beyond-norm", "within=3e38", "within-off-diagonal"])
def test_huge_but_finite_statistics_are_a_counted_rejection_and_the_run_goes_on(
        tiny_backbone: Callable[..., Backbone], task: Task, tmp_path: Path, change: str) -> None:
    backbone = tiny_backbone("efficientvit_b0", 32)
    bank, collector = _setup(backbone, task)
    honest = _honest(backbone, task, collector, range(0, 100))
    hostile = _hostile(_honest(backbone, task, collector, range(100, 200)), change)
    replies = [_through_flower(HONEST, honest, collector), _through_flower(HOSTILE, hostile, collector)]
    with_stats = [(r.client, r.stats) for r in replies if r.stats is not None]
    assert len(with_stats) == 2  # the protocol's checks (shapes, finite, counts) let both through
    # what ContinualServer.complete_round does with them
    bad = collector.check(0, with_stats)
    assert set(bad) == {HOSTILE}, bad
    assert collector.collect(0, [(c, s) for c, s in with_stats if c not in bad]) == {}
    bank.save(tmp_path)
    resumed = AdapterBank.load(tmp_path)
    assert all(bool(torch.isfinite(v).all()) for v in resumed[0].stats.values())
    assert StatsCollector(resumed, backbone).counted(0) == [HONEST]
    assert StatsCollector(resumed, backbone).wanted(0, HOSTILE) is not None  # asked again next round
    result = StatsCollector(resumed, backbone).evaluate(adapter_config("head"), [task], 0)
    assert math.isfinite(result["task_free_all"]) and 0.0 <= result["task_free_all"] <= 1.0


def test_honest_statistics_from_a_huge_count_are_still_accepted(
        tiny_backbone: Callable[..., Backbone], task: Task) -> None:
    """The bounds scale with the count: the statistics of every image of the task, stored and summed again."""
    backbone = tiny_backbone("efficientvit_b0", 32)
    bank, collector = _setup(backbone, task)
    whole = _honest(backbone, task, collector, range(len(task.train)))
    assert collector.collect(0, [(1, {k: torch.from_numpy(v) for k, v in whole.items()})]) == {}
    again = {k: torch.from_numpy(v) for k, v in whole.items()}
    assert collector.collect(0, [(2, again)]) == {}
    assert int(bank[0].stats["count"].sum()) == 2 * len(task.train)


def test_a_router_solved_from_non_finite_statistics_is_refused() -> None:
    count = torch.tensor([3, 4])
    scatter = torch.eye(2, dtype=torch.float64)
    scatter[0, 1] = scatter[1, 0] = math.inf  # built directly, around the validation
    stats = FeatureStats(count, torch.ones(2, 2, dtype=torch.float64), scatter)
    with pytest.raises(StatsError, match="covariance of these statistics is not finite"):
        fit_router([stats], 2, RouterConfig(dim=0, grid=0))
    sums = 1e20 * torch.diag(count.double())  # class means 1e20 apart: a finite float64 router, not in float32
    huge = FeatureStats(count, sums, torch.diag(count.double() * 1e40) + torch.eye(2, dtype=torch.float64))
    with pytest.raises(StatsError, match="router solved from these statistics is not finite"):
        fit_router([huge], 2, RouterConfig(dim=0, grid=0))


def _nan_bank(backbone: Backbone, task: Task, directory: Path) -> None:
    """The bank an attacked run left behind before the fix: task 0's statistics are NaN."""
    bank, collector = _setup(backbone, task)
    honest = {k: torch.from_numpy(v) for k, v in _honest(backbone, task, collector, range(0, 50)).items()}
    assert collector.collect(0, [(HONEST, honest)]) == {}
    poisoned = dict(bank[0].stats, within=torch.full_like(bank[0].stats["within"], math.nan))
    bank._entries[0] = dataclasses.replace(bank[0], stats=poisoned)  # around set_stats, which refuses it now
    bank.metadata["run"] = {"completed_rounds": 1}
    bank.save(directory)


def test_a_bank_with_non_finite_statistics_refuses_to_load_and_names_the_recovery(
        tiny_backbone: Callable[..., Backbone], task: Task, tmp_path: Path) -> None:
    backbone = tiny_backbone("efficientvit_b0", 32)
    _nan_bank(backbone, task, tmp_path)
    with pytest.raises(BankError, match=r"task 0.*NaN or infinite.*--resume --drop-stats 0"):
        AdapterBank.load(tmp_path)
    assert drop_stats(tmp_path, [0]) == [0]
    bank = AdapterBank.load(tmp_path)
    assert bank[0].stats == {} and bank.metadata[CLIENTS_KEY].get("0") is None
    assert bank.metadata["run"] == {"completed_rounds": 1}  # the rest of the bank is untouched
    collector = StatsCollector(bank, backbone)
    assert collector.wanted(0, HONEST) is not None  # its clients are asked again in the task's later rounds
    assert collector.evaluate(adapter_config("head"), [task], 0) == {}  # until then: no task-free evaluation
    with pytest.raises(BankError, match="task 5 is not in the bank"):
        drop_stats(tmp_path, [5])


def test_fedpetah_server_resume_drops_a_tasks_statistics_before_it_starts_anything(
        tiny_backbone: Callable[..., Backbone], task: Task, tmp_path: Path) -> None:
    backbone = tiny_backbone("efficientvit_b0", 32)
    run_dir = tmp_path / "run"
    _nan_bank(backbone, task, run_dir / "bank")
    state = ["--state-dir", str(tmp_path / "state"), "--run-dir", str(run_dir), "--insecure", "--host", "127.0.0.1"]
    assert server_cli.main([*state, "--drop-stats", "0", "clients=1"]) == server_cli.EXIT_RUN_DIR  # needs --resume
    assert server_cli.main([*state, "--resume", "--drop-stats", "3", "clients=1"]) == server_cli.EXIT_RUN_DIR
    with pytest.raises(BankError):
        AdapterBank.load(run_dir / "bank")
    with socket.socket() as busy:  # the SuperLink's port is taken: serve stops right after the drop
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert server_cli.main([*state, "--port", port, "--resume", "--drop-stats", "0", "clients=1"]) == \
            server_cli.EXIT_SUPERLINK
    assert AdapterBank.load(run_dir / "bank")[0].stats == {}
    assert json.loads((run_dir / "bank" / "bank.json").read_text())["metadata"]["run"] == {"completed_rounds": 1}
