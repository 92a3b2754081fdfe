"""Hostile router statistics: huge but finite values are counted rejections, a poisoned bank refuses to load and
names its recovery, and the recovery (dropping a task's statistics) lets the run go on; a client's statistics
weigh no more than the round's count cap lets its update weigh."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.aggregation import BoundedAggregation, BoundsConfig, aggregator_config, build_aggregator
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank, BankError
from fedpetah.config import BackboneConfig, PruningConfig, RouterConfig, TrainConfig
from fedpetah.experiment import ExperimentConfig, StrategyConfig
from fedpetah.routing.features import data_stats
from fedpetah.routing.router import fit_router
from fedpetah.routing.stats import MAX_FEATURE_NORM, FeatureStats, StatsError, class_stats
from fedpetah.serving.collect import CLIENTS_KEY, StatsCollector, drop_stats
from fedpetah.serving.continual import ClientReply, ContinualServer
from fedpetah.tasks import Task, TaskStreamConfig, build_stream
from fedpetah.wire.protocol import Status, TrainReply
from fedpetah.wire.reasons import Reason
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
    backbone = tiny_backbone()
    bank, collector = _setup(backbone, task)
    honest = _honest(backbone, task, collector, range(0, 100))
    hostile = _hostile(_honest(backbone, task, collector, range(100, 200)), change)
    replies = [_through_flower(HONEST, honest, collector), _through_flower(HOSTILE, hostile, collector)]
    with_stats = [(r.client, r.stats) for r in replies if r.stats is not None]
    assert len(with_stats) == 2  # the protocol's checks (shapes, finite, counts) let both through
    # the library entries of what ContinualServer.complete_round does with them (check_stats, collect_stats)
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
    backbone = tiny_backbone()
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
    backbone = tiny_backbone()
    _nan_bank(backbone, task, tmp_path)
    with pytest.raises(BankError, match=r"task 0.*NaN or infinite.*--resume --drop-stats 0"):
        AdapterBank.load(tmp_path)
    assert drop_stats(tmp_path, [0]) == [0]
    bank = AdapterBank.load(tmp_path)
    assert bank[0].stats == {} and bank.metadata[CLIENTS_KEY].get("0") is None
    assert bank.metadata["run"] == {"completed_rounds": 1}  # the rest of the bank is untouched
    collector = StatsCollector(bank, backbone)
    assert collector.wanted(0, HONEST) == (16, 0, 4)  # its clients are asked again (the bank's router: dim 16)
    assert collector.evaluate(adapter_config("head"), [task], 0) == {}  # until then: no task-free evaluation
    with pytest.raises(BankError, match="task 5 is not in the bank"):
        drop_stats(tmp_path, [5])


def test_fedpetah_server_resume_drops_a_tasks_statistics_before_it_starts_anything(
        tiny_backbone: Callable[..., Backbone], task: Task, tmp_path: Path) -> None:
    backbone = tiny_backbone()
    run_dir = tmp_path / "run"
    _nan_bank(backbone, task, run_dir / "bank")
    state = ["--state-dir", str(tmp_path / "state"), "--run-dir", str(run_dir), "--insecure", "--host", "127.0.0.1"]
    assert server_cli.main([*state, "--drop-stats", "0", "clients=1"]) == server_cli.EXIT_RUN_DIR  # needs --resume
    assert server_cli.main([*state, "--resume", "--drop-stats", "3", "clients=1"]) == server_cli.EXIT_RUN_DIR
    with pytest.raises(BankError, match=r"task 0.*NaN or infinite"):  # neither refusal dropped anything
        AdapterBank.load(run_dir / "bank")
    with socket.socket() as busy:  # the SuperLink's port is taken: serve stops right after the drop
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert server_cli.main([*state, "--port", port, "--resume", "--drop-stats", "0", "clients=1"]) == \
            server_cli.EXIT_SUPERLINK
    assert AdapterBank.load(run_dir / "bank")[0].stats == {}
    assert json.loads((run_dir / "bank" / "bank.json").read_text())["metadata"]["run"] == {"completed_rounds": 1}


# a client's statistics count no more than its update: the round's weight cap --------------------------------

LIAR = 9
CLIENTS = {1: (5, (0.0, 0.0)), 2: (10, (1.0, 1.0)), LIAR: (10_000, (100.0, 100.0))}
"""client: (examples per class, class 0's centre); class 1 is 4 to the right. The liar claims 1000x client 2's
count (20,000 against 10 and 20) with features far from the honest ones."""


def _client_features(client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) float64 features and (N,) labels of ``client``: small integer offsets around its class centres."""
    per_class, (x, y) = CLIENTS[client]
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0], [3.0, 1.0]], dtype=torch.float64)
    rows = torch.arange(per_class) % len(offsets)
    features = torch.cat([torch.tensor([x, y], dtype=torch.float64) + offsets[rows],
                          torch.tensor([x + 4, y], dtype=torch.float64) + offsets[rows]])
    return features, torch.arange(2).repeat_interleave(per_class)


def _client_stats(client: int) -> dict[str, torch.Tensor]:
    return class_stats(*_client_features(client), num_classes=2).tensors()


def _weighted(weights: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class counts, class means and packed within-class scatter of every client's features, each example of
    ``client`` counted ``weights[client]`` times: what the statistics should hold, from the features."""
    parts = [(*_client_features(c), w) for c, w in weights.items()]
    x = torch.cat([f for f, _, _ in parts])
    y = torch.cat([labels for _, labels, _ in parts])
    w = torch.cat([torch.full((len(labels),), w, dtype=torch.float64) for _, labels, w in parts])
    counts = torch.stack([w[y == c].sum() for c in range(2)])
    means = torch.stack([(w[y == c, None] * x[y == c]).sum(0) / counts[c] for c in range(2)])
    centred = x - means[y]
    within = (w[:, None] * centred).T @ centred
    rows, cols = torch.triu_indices(2, 2)
    return counts, means, within[rows, cols]


def _round_cap(counts: list[int]) -> tuple[float, float]:
    """The default bounded aggregation's count cap for a round with ``counts``, and its largest weight share."""
    current = {"w": torch.zeros(2)}
    updates: list[dict[str, torch.Tensor] | None] = [{"w": torch.ones(2)} for _ in counts]
    result = BoundedAggregation(build_aggregator(aggregator_config("fedavg")), BoundsConfig())(
        current, updates, counts)
    return result.metrics["weight_cap"], result.metrics["max_weight_share"]


def _dim2_collector(backbone: Backbone) -> tuple[AdapterBank, StatsCollector]:
    bank = AdapterBank()
    bank.add_task(0, "head", 2, build_adapter(adapter_config("head"), backbone, 2).state(), [0, 1])
    return bank, StatsCollector(bank, backbone, RouterConfig(dim=2))


def test_a_client_claiming_1000x_the_count_weighs_in_the_statistics_no_more_than_in_the_update(
        tiny_backbone: Callable[..., Backbone]) -> None:
    backbone = tiny_backbone()
    counts = {c: 2 * n for c, (n, _) in CLIENTS.items()}
    cap, share = _round_cap(list(counts.values()))
    assert cap == 3 * 20  # weight_cap 3 x the median count
    replies = [(c, _client_stats(c)) for c in CLIENTS]
    # without a cap (the code before): the liar's features are the class means
    bank, collector = _dim2_collector(backbone)
    assert collector.collect(0, replies) == {}
    _, liar_means, _ = _weighted({LIAR: 1.0})
    unbounded = bank[0].stats["sum"] / bank[0].stats["count"][:, None]
    assert float((unbounded - liar_means).norm(dim=1).max()) < 0.5
    # with the round's cap: the weighted statistics with the liar's examples counted cap / 20,000 each
    bank, collector = _dim2_collector(backbone)
    assert collector.collect(0, replies, cap=cap) == {}
    stored = bank[0].stats
    counts_w, means_w, within_w = _weighted({1: 1.0, 2: 1.0, LIAR: cap / counts[LIAR]})
    assert stored["count"].dtype == torch.float64
    torch.testing.assert_close(stored["count"], counts_w, rtol=1e-15, atol=0)
    torch.testing.assert_close(stored["sum"] / stored["count"][:, None], means_w, rtol=1e-13, atol=0)
    torch.testing.assert_close(stored["within"].double(), within_w, rtol=2e-7, atol=0)  # float32 in the bank
    liar_share = cap / float(stored["count"].sum())
    assert liar_share == pytest.approx(share, rel=1e-14) and share == pytest.approx(60 / 90)


def test_a_cap_no_client_exceeds_leaves_the_statistics_bit_for_bit(tiny_backbone: Callable[..., Backbone]) -> None:
    backbone = tiny_backbone()
    replies = [(c, _client_stats(c)) for c in (1, 2)]
    stored = []
    for cap in (math.inf, 20.0):  # client 2 counts exactly 20: at the cap, not over it
        bank, collector = _dim2_collector(backbone)
        assert collector.collect(0, replies, cap=cap) == {}
        stored.append(bank[0].stats)
    assert stored[1]["count"].dtype == torch.int64
    assert all(torch.equal(stored[0][k], stored[1][k]) for k in stored[0])


def test_weighted_statistics_are_exact_and_their_float_counts_come_only_from_a_bank() -> None:
    stats = class_stats(*_client_features(1), num_classes=2)
    weighted = stats.scaled(0.25).tensors()
    with pytest.raises(StatsError, match="'count': expected torch.int64"):
        FeatureStats.from_tensors(weighted, 2, 2)  # never from a client
    read = FeatureStats.from_tensors(weighted, 2, 2, legacy_ok=True)
    assert torch.equal(read.count, 0.25 * stats.count.double()) and torch.equal(read.sum, 0.25 * stats.sum)
    original = stats.tensors()["within"].double()  # the within-class scatter scales by the weight, no more
    torch.testing.assert_close(weighted["within"].double(), 0.25 * original, rtol=1e-7, atol=0)
    torch.testing.assert_close(read.scatter, 0.25 * stats.scatter, rtol=1e-7, atol=1e-7 * float(original.max()))
    for count in (math.nan, -0.5, 1e8):
        bad = dict(weighted, count=weighted["count"].clone())
        bad["count"][0] = count
        with pytest.raises(StatsError, match="counts must be in"):
            FeatureStats.from_tensors(bad, 2, 2, legacy_ok=True)
    with pytest.raises(StatsError, match="weight must be in"):
        stats.scaled(1.5)


def _capped_server(tmp_path: Path, cache_dir: Path, aggregator: str = "fedavg") -> ContinualServer:
    config = ExperimentConfig(
        clients=3, rounds_per_task=2, output_dir=str(tmp_path), evaluate_every_round=False,
        backbone=BackboneConfig(name="test_efficientvit", img_size=32, weights="random"),
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("head"),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=1),
        train=TrainConfig(epochs=1, batch_size=32, max_steps=1, loss="cross_entropy"),
        strategy=StrategyConfig(aggregator=aggregator_config(aggregator)), router=RouterConfig(dim=2))
    return ContinualServer(config, tmp_path / "run", cache_dir)


def _round_replies(server: ContinualServer, states: dict[int, float]) -> list[ClientReply]:
    """Each client's ok reply: the global adapter with every entry set to / moved by ``states[client]``
    (a float32-sized value is set), its statistics and the count they hold."""
    current = server.global_state(0)
    replies = []
    for client, value in states.items():
        state = {k: torch.full_like(v, value) if abs(value) > 1e30 else v + value for k, v in current.items()}
        stats = _client_stats(client)
        replies.append(ClientReply(client=client, state=state, num_examples=int(stats["count"].sum()),
                                   stats=stats))
    return replies


def test_complete_round_weighs_a_liars_statistics_with_the_rounds_cap(tmp_path: Path, cache_dir: Path) -> None:
    server = _capped_server(tmp_path, cache_dir)
    plan = next(server.schedule())
    replies = _round_replies(server, {c: 0.01 for c in CLIENTS})
    record = server.complete_round(plan, server.global_state(0), replies, 0, 0, time.perf_counter())
    server.log.close()
    cap = record.extra["agg_weight_cap"]
    assert cap == 60.0 and record.extra["agg_num_weight_capped"] == 1.0 and record.num_rejected == 0
    resumed = AdapterBank.load(server.bank_dir)  # float64 counts: saved, loaded and validated
    collector = StatsCollector(resumed, server.backbone)
    assert collector.counted(0) == sorted(CLIENTS)
    stored = resumed[0].stats
    _, means_w, _ = _weighted({1: 1.0, 2: 1.0, LIAR: cap / replies[-1].num_examples})
    torch.testing.assert_close(stored["sum"] / stored["count"][:, None], means_w, rtol=1e-13, atol=0)
    liar_share = cap / float(stored["count"].sum())
    assert liar_share == pytest.approx(record.extra["agg_max_weight_share"], rel=1e-14)
    result = collector.evaluate(server.config.adapter, list(server.tasks), 0)  # the router fits on them
    assert math.isfinite(result["task_free_all"])


def test_a_round_that_keeps_no_update_collects_no_statistics(tmp_path: Path, cache_dir: Path) -> None:
    """The FedOpt second moment of two float32-sized updates overflows: the round keeps no aggregate, and its
    statistics are left for the clients to send again in the task's next round."""
    server = _capped_server(tmp_path, cache_dir, "fedadam")
    plan = next(server.schedule())
    replies = _round_replies(server, {1: 0.01, 2: 3e38, LIAR: 3e38})
    record = server.complete_round(plan, server.global_state(0), replies, 0, 0, time.perf_counter())
    server.log.close()
    assert record.extra["agg_non_finite_aggregate"] == 1.0 and record.extra["aggregated"] == 0.0
    assert server.bank[0].stats == {} and server.router.counted(0) == []
    assert server.router.wanted(0, 1) == (2, 0, 4)  # asked again (router dim 2, seed 0, grid 4)


def test_every_rejection_in_metrics_jsonl_is_counted_under_a_reason(tmp_path: Path, cache_dir: Path) -> None:
    """Rejections of every origin (a reply that did not come or did not decode, a non-finite update, an update
    far longer than the round's, invalid statistics) are counted in metrics.jsonl under a Reason's value."""
    server = _capped_server(tmp_path, cache_dir)
    plan = next(server.schedule())
    replies = _round_replies(server, {1: 0.01, 2: 0.01, LIAR: 10.0})  # the liar's delta: 1000x the others'
    current = server.global_state(0)
    replies += [ClientReply(20, {k: torch.full_like(v, math.nan) for k, v in current.items()}, 10),
                ClientReply(21, dict(current), 10, stats={"count": torch.ones(2, dtype=torch.int64)}),
                ClientReply.refused(22, Reason.TIMEOUT), ClientReply.refused(23, Reason.SHAPE, "adapter.w: (3,)")]
    server.complete_round(plan, current, replies, 0, 0, time.perf_counter())
    server.log.close()
    rows = [json.loads(line) for line in (server.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["rejections"] for row in rows] == [{"norm_outlier": 1, "non_finite": 1, "timeout": 1, "shape": 1,
                                                    "stats": 1}]
    assert set(rows[0]["rejections"]) <= {reason.value for reason in Reason}
