"""Task-free routing: statistics add up, validation rejects bad ones, the router and the joint model predict."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch.nn.modules.batchnorm import _BatchNorm

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank
from fedpetah.config import RouterConfig, TrainConfig
from fedpetah.device.local import train_task
from fedpetah.routing.features import FrozenFeatures, data_stats, feature_width
from fedpetah.routing.model import joint_scores
from fedpetah.routing.predict import build_predictor, evaluate_task_free
from fedpetah.routing.router import fit_router, project, projection
from fedpetah.routing.stats import FeatureStats, StatsError, aggregate_stats, class_stats
from fedpetah.serving.collect import StatsCollector
from fedpetah.serving.metrics import RoundRecord, RunLog, plot_run, summarize
from fedpetah.tasks import Task, TaskStreamConfig, batches, build_stream
from fedpetah.wire.protocol import (
    STATS_REQUEST,
    ProtocolError,
    Records,
    Status,
    TaskInfo,
    TrainReply,
    TrainRequest,
    stats_specs,
)


def _clusters(seed: int, per_class: int = 200, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four Gaussian classes with a shared, correlated covariance; returns features, labels, means."""
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(4, dim, generator=g)
    mix = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    labels = torch.arange(4).repeat_interleave(per_class)
    x = means[labels] + torch.randn(len(labels), dim, generator=g) @ mix
    return x, labels, means


def test_statistics_of_shards_add_up_to_the_statistics_of_the_whole() -> None:
    x, y, _ = _clusters(0)
    whole = class_stats(x, y, 4)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    shards = [class_stats(x[i], y[i], 4) for i in order.split(97)]
    summed = aggregate_stats(shards)
    assert torch.equal(summed.count, torch.full((4,), 200))
    torch.testing.assert_close(summed.sum, whole.sum, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(summed.scatter, whole.scatter, rtol=1e-12, atol=1e-10)
    again = aggregate_stats(shards)  # same order: bit for bit
    assert torch.equal(again.sum, summed.sum) and torch.equal(again.scatter, summed.scatter)
    torch.testing.assert_close(whole.sum[2] / 200, x[y == 2].double().mean(0))


def test_router_agrees_with_scikit_learn_shrunk_lda() -> None:
    x, y, _ = _clusters(0)
    test_x, test_y, _ = _clusters(0, per_class=100)
    task_stats = [class_stats(x[y < 2], y[y < 2], 2), class_stats(x[y >= 2], y[y >= 2] - 2, 2)]
    router = fit_router(task_stats, 6, RouterConfig(shrinkage=0.2))
    ours = router(test_x).argmax(1)
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.2, priors=[0.25] * 4)
    theirs = torch.from_numpy(reference.fit(x.numpy(), y.numpy()).predict(test_x.numpy()))
    assert (ours == theirs).float().mean() >= 0.99
    assert (ours == test_y).float().mean() >= 0.9


def test_a_class_without_examples_is_never_predicted() -> None:
    x, y, _ = _clusters(2)
    keep = y != 3
    router = fit_router([class_stats(x[keep], y[keep], 4)], 6)
    assert int((router(x).argmax(1) == 3).sum()) == 0


def test_projected_router_is_one_linear_layer_on_the_full_features() -> None:
    x, y, _ = _clusters(4, dim=12)
    config = RouterConfig(dim=5, seed=3)
    matrix = projection(12, config)
    assert matrix is not None and matrix.shape == (12, 5)
    assert set(matrix.abs().unique().tolist()) == {1 / math.sqrt(5)}
    again = projection(12, config)
    assert again is not None and torch.equal(matrix, again)  # integer hashing: the same on every party
    other = projection(12, RouterConfig(dim=5, seed=4))
    assert other is not None and not torch.equal(matrix, other)
    assert projection(12, RouterConfig(dim=0)) is None and projection(12, RouterConfig(dim=12)) is None
    stats = [class_stats(project(x, config), y, 4)]
    full = fit_router(stats, 12, config)
    small = fit_router(stats, 5, RouterConfig(dim=0, shrinkage=config.shrinkage))
    torch.testing.assert_close(full(x), small(project(x, config).float()), rtol=1e-4, atol=1e-3)
    with pytest.raises(StatsError, match="the router expects 5"):
        fit_router([class_stats(x.double(), y, 4)], 12, config)


def _valid() -> dict[str, torch.Tensor]:
    x, y, _ = _clusters(3, per_class=10, dim=4)
    return class_stats(x, y, 4).tensors()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("within"), "exactly the keys"),
        (lambda t: t.update(scatter=t.pop("within")), "exactly the keys"),  # the legacy form only from a bank
        (lambda t: t.update(sum=t["sum"].float()), "expected torch.float64"),
        (lambda t: t.update(sum=t["sum"][:3]), r"\(4, 4\)"),
        (lambda t: t.update(within=t["within"].double()), "expected torch.float32"),
        (lambda t: t.update(within=t["within"][:-1]), r"\(10,\)"),
        (lambda t: t["sum"].__setitem__((0, 0), math.nan), "NaN"),
        (lambda t: t["within"].__setitem__(3, math.inf), "infinite"),
        (lambda t: t["count"].__setitem__(0, -1), "counts"),
        (lambda t: t["count"].__setitem__(0, 10**9), "counts"),
        (lambda t: t["within"].__setitem__(4, -1.0), "negative diagonal"),  # packed index 4 = (1, 1)
        (lambda t: t["count"].__setitem__(2, 0), "no examples"),
    ],
)
def test_untrusted_statistics_are_validated(change: Callable[[dict[str, torch.Tensor]], object], message: str) -> None:
    FeatureStats.from_tensors(_valid(), num_classes=4, dim=4)  # the unchanged ones pass
    bad = _valid()
    change(bad)
    with pytest.raises(StatsError, match=message):
        FeatureStats.from_tensors(bad, num_classes=4, dim=4)


def test_packed_within_class_scatter_round_trips_at_a_quarter_of_the_bytes() -> None:
    x, y, _ = _clusters(6, dim=6)
    x = x + 1e3  # a large common offset: a float32 raw second moment would lose the class spreads to it
    stats = class_stats(x, y, 4)
    tensors = stats.tensors()
    assert tensors["within"].shape == (21,) and tensors["within"].dtype == torch.float32
    again = FeatureStats.from_tensors(tensors, num_classes=4, dim=6)
    assert torch.equal(again.count, stats.count) and torch.equal(again.sum, stats.sum)
    centered = x.double() - (stats.sum / stats.count.double()[:, None])[y]
    within = centered.T @ centered
    rows, cols = torch.triu_indices(6, 6)
    torch.testing.assert_close(tensors["within"], within[rows, cols].float())
    torch.testing.assert_close(again.scatter - stats.scatter, torch.zeros(6, 6, dtype=torch.float64),
                               rtol=0, atol=1e-6 * float(within.abs().max()))
    torch.testing.assert_close(fit_router([again], 6)(x), fit_router([stats], 6)(x), rtol=1e-4, atol=1e-3)
    wide = class_stats(torch.randn(50, 1024), torch.arange(50) % 10, 10)
    legacy_bytes = sum(t.numel() * t.element_size() for t in (wide.count, wide.sum, wide.scatter))
    assert wide.nbytes() < 0.3 * legacy_bytes


def test_a_bank_with_the_legacy_raw_scatter_still_loads() -> None:
    stats = class_stats(*_clusters(7, dim=6)[:2], 4)
    legacy = {"count": stats.count, "sum": stats.sum, "scatter": stats.scatter}
    with pytest.raises(StatsError, match="exactly the keys"):
        FeatureStats.from_tensors(legacy, num_classes=4, dim=6)  # never from a client
    read = FeatureStats.from_tensors(legacy, num_classes=4, dim=6, legacy_ok=True)
    assert torch.equal(read.scatter, stats.scatter)
    asymmetric = dict(legacy, scatter=stats.scatter + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1))
    with pytest.raises(StatsError, match="symmetric"):
        FeatureStats.from_tensors(asymmetric, num_classes=4, dim=6, legacy_ok=True)


def test_joint_scores_are_log_probabilities_of_router_times_expert() -> None:
    router = torch.tensor([[0.0, math.log(3.0), math.log(4.0), 0.0]])  # p(task 0) = 4/9, p(task 1) = 5/9
    experts = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(4.0), 0.0]])]
    scores = joint_scores(router, experts).exp()
    torch.testing.assert_close(scores, torch.tensor([[2 / 9, 2 / 9, 4 / 9, 1 / 9]]))



def test_joint_weight_mixes_the_routers_class_posterior_into_the_scores() -> None:
    router = torch.tensor([[0.0, math.log(3.0), math.log(4.0), 0.0]])  # p(t, c): 1/9, 3/9, 4/9, 1/9
    experts = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(4.0), 0.0]])]
    full = joint_scores(router, experts, joint=1.0).exp()  # p(t, c) * p_t(c)
    torch.testing.assert_close(full, torch.tensor([[1 / 18, 3 / 18, 16 / 45, 1 / 45]]))
    half = joint_scores(router, experts, joint=0.5)
    torch.testing.assert_close(half, (joint_scores(router, experts) + joint_scores(router, experts, joint=1.0)) / 2)
    # the task marginal alone ties task 0's classes; the router's class posterior breaks the tie
    assert joint_scores(router, experts)[0, 0] == joint_scores(router, experts)[0, 1]
    assert int(full[0, :2].argmax()) == 1


def test_router_config_is_validated_and_old_records_keep_their_features() -> None:
    for bad, message in (({"grid": 17}, "router.grid"), ({"joint": 1.5}, "router.joint"), ({"dim": -1}, "router.dim")):
        with pytest.raises(ValueError, match=message):
            RouterConfig(**bad)  # type: ignore[arg-type]
    legacy = RouterConfig.from_record({"dim": 256, "seed": 0, "shrinkage": 0.0, "prior": "uniform"})
    assert (legacy.grid, legacy.joint, legacy.dim) == (0, 0.0, 256)  # statistics of the final pooled features
    assert RouterConfig.from_record(dataclasses.asdict(RouterConfig(grid=2))) == RouterConfig(grid=2)


def test_grid_features_pool_every_stage_and_average_back_to_its_mean(tiny_backbone: Callable[..., Backbone]) -> None:
    backbone = tiny_backbone()
    module = backbone.module.eval()
    x = torch.rand(2, 3, 32, 32)
    features = FrozenFeatures(module, backbone.mean, backbone.std, grid=2)
    with torch.no_grad():
        pooled, routed = features.routed(x)
        _, stages = module.forward_intermediates((x - features.mean) / features.std)  # type: ignore[operator]
        torch.testing.assert_close(pooled, module((x - features.mean) / features.std))
    cells = [min(2, s.shape[-2]) * min(2, s.shape[-1]) for s in stages]
    assert routed.shape == (2, sum(s.shape[1] * c for s, c in zip(stages, cells, strict=True)))
    assert feature_width(backbone, 2) == routed.shape[1] and feature_width(backbone, 0) == pooled.shape[1]
    start = 0
    for stage, c in zip(stages, cells, strict=True):  # each stage's cells average back to its global mean
        block = routed[:, start : start + stage.shape[1] * c].reshape(2, stage.shape[1], c)
        torch.testing.assert_close(block.mean(2), stage.mean((2, 3)), rtol=1e-5, atol=1e-6)
        start += stage.shape[1] * c
    assert torch.equal(FrozenFeatures(module, backbone.mean, backbone.std).routed(x)[1], pooled)  # grid 0


def _digits(num_tasks: int) -> list[Task]:
    return build_stream(TaskStreamConfig(name="digits", num_tasks=num_tasks))


def _calibrated(backbone: Backbone, task: Task) -> Backbone:
    """A copy whose batch-norm statistics come from one batch of real images: random weights with the
    stock running statistics give near-constant features; calibrated ones separate digits."""
    module = copy.deepcopy(backbone.module)
    for layer in module.modules():
        if isinstance(layer, _BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None
    x, _ = next(batches(task.train, backbone.img_size, backbone.in_chans, 128, True, torch.Generator().manual_seed(0)))
    mean, std = torch.tensor(backbone.mean).view(1, -1, 1, 1), torch.tensor(backbone.std).view(1, -1, 1, 1)
    with torch.no_grad():
        module.train()((x - mean) / std)
    return dataclasses.replace(backbone, module=module.eval())


@pytest.fixture(scope="module")
def two_tasks(tiny_backbone: Callable[..., Backbone]) -> tuple[Backbone, list[Task]]:
    tasks = _digits(2)
    return _calibrated(tiny_backbone(), tasks[0]), tasks


def _bank(backbone: Backbone, tasks: list[Task], name: str) -> AdapterBank:
    bank = AdapterBank()
    config = adapter_config(name)
    for task in tasks:
        initial = build_adapter(config, backbone, task.num_classes).state()
        state, _ = train_task(backbone, config, task.num_classes, initial, task.train,
                              TrainConfig(epochs=3, lr=0.01, batch_size=32, loss="cross_entropy"))
        bank.add_task(task.index, name, task.num_classes, state, task.classes, {"task_name": task.name})
    return bank


@pytest.fixture(scope="module")
def head_bank(two_tasks: tuple[Backbone, list[Task]]) -> AdapterBank:
    return _bank(*two_tasks, "head")


def test_task_free_model_routes_digits_without_task_ids(two_tasks: tuple[Backbone, list[Task]],
                                                        head_bank: AdapterBank) -> None:
    backbone, tasks = two_tasks
    bank = head_bank
    stats = {t.index: data_stats(backbone, t.train, t.num_classes) for t in tasks}
    predictor = build_predictor(backbone, adapter_config("head"), bank, stats)
    assert predictor.labels == ["digits_0_1/0", "digits_0_1/1", "digits_2_3/2", "digits_2_3/3"]
    assert all(predictor.model.shared)  # head experts reuse the router's backbone pass
    result = evaluate_task_free(predictor, tasks)
    assert result.routing_accuracy >= 0.7 and result.accuracy >= 0.6, result  # chance: 0.5 and 0.25
    # the scores are the router's (task, class) posterior times the expert's class posterior (router.joint=1)
    x = torch.rand(3, 3, 32, 32)
    model = predictor.model
    pooled, routed = model.features.routed(x)
    assert routed.shape[1] != pooled.shape[1] and model.joint == 1.0  # grid features, not the pooled ones
    torch.testing.assert_close(pooled, model.features(x))
    expected = joint_scores(model.router(routed), [e(pooled) for e in model.experts], joint=1.0)
    torch.testing.assert_close(model(x), expected)
    labels = predictor.predict(x)
    assert len(labels) == 3 and set(labels) <= set(predictor.labels)


def test_predictor_needs_statistics_of_every_task(two_tasks: tuple[Backbone, list[Task]],
                                                  head_bank: AdapterBank) -> None:
    backbone, tasks = two_tasks
    bank = head_bank
    stats = {0: data_stats(backbone, tasks[0].train, 2)}
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        build_predictor(backbone, adapter_config("head"), bank, stats)
    wrong = {0: stats[0], 1: FeatureStats.zeros(3, stats[0].dim)}
    with pytest.raises(ValueError, match="statistics for 3 classes"):
        build_predictor(backbone, adapter_config("head"), bank, wrong)
    assert np.isfinite(stats[0].scatter.numpy()).all()


def _stats_reply(examples: int = 40, **arrays: np.ndarray) -> Records:
    x, y, _ = _clusters(5, per_class=10, dim=4)
    stats = {k: v.numpy() for k, v in class_stats(x, y, 4).tensors().items()}
    stats.update(arrays)
    return TrainReply(Status.OK, "", {"w": np.zeros(2, np.float32)}, examples, {}, stats).encode()


def test_statistics_travel_with_the_train_reply_and_are_decoded_defensively() -> None:
    request = TrainRequest("a" * 64, 1, 0, 2, TaskInfo(0, "t", ("0", "1")),
                           {s: {} for s in ("adapter", "train", "tasks", "partition")}, {}, stats=(256, 7, 4))
    assert TrainRequest.decode(request.encode()).stats == (256, 7, 4)
    records = request.encode()
    records.configs["config"][f"{STATS_REQUEST}.grid"] = 99
    with pytest.raises(ProtocolError, match="grid=99"):
        TrainRequest.decode(records)
    # the section before grid existed ("stats") asks for nothing: such a client sends none and is rejected
    old = request.encode()
    old.configs["config"] = {k.replace(STATS_REQUEST, "stats"): v for k, v in old.configs["config"].items()}
    assert TrainRequest.decode(old).stats is None
    expected, specs = {"w": ((2,), "<f4")}, stats_specs(4, 4)
    reply = TrainReply.decode(_stats_reply(), expected, specs)
    assert reply.stats is not None and int(reply.stats["count"].sum()) == 40
    hostile = {
        "not asked for": (_stats_reply(), None),
        "missing": (TrainReply(Status.OK, "", {"w": np.zeros(2, np.float32)}, 40).encode(), specs),
        "shape": (_stats_reply(sum=np.zeros((4, 5))), specs),
        "dtype": (_stats_reply(count=np.full(4, 10, np.int32)), specs),
        "counts": (_stats_reply(examples=41), specs),
        "nan": (_stats_reply(within=np.full(10, np.nan, np.float32)), specs),
        "legacy": (_stats_reply(scatter=np.eye(4)), specs),
    }
    for name, (records, wanted) in hostile.items():
        with pytest.raises(ProtocolError) as error:
            TrainReply.decode(records, expected, wanted)
        assert error.value.reason == "stats", name


def test_a_statistics_request_is_bounded_by_the_memory_it_costs_a_device(
        tiny_backbone: Callable[..., Backbone]) -> None:
    def request(dim: int, grid: int) -> Records:
        return TrainRequest("a" * 64, 1, 0, 2, TaskInfo(0, "t", ("0", "1")),
                            {s: {} for s in ("adapter", "train", "tasks", "partition")}, {},
                            stats=(dim, 7, grid)).encode()

    with pytest.raises(ProtocolError, match=r"dim=4096 at grid=16") as error:  # GBs of projection on a device
        TrainRequest.decode(request(4096, 16))
    assert error.value.reason == "size"
    assert TrainRequest.decode(request(4096, 4)).stats == (4096, 7, 4)  # at the bound
    assert TrainRequest.decode(request(256, 16)).stats == (256, 7, 16)
    # the matrix itself, whoever builds it: 9,000 router features x 1,024 is 70 MiB, refused before it is built
    with pytest.raises(ValueError, match="exceeds 64 MiB"):
        projection(9000, RouterConfig(dim=1024))
    assert projection(8000, RouterConfig(dim=1024)).shape == (8000, 1024)  # 62.5 MiB
    # statistics no wider than the protocol allows, checked before a device reads an image
    backbone = tiny_backbone("efficientvit_b0", 64)  # 7,680 router features at grid 16
    with pytest.raises(ValueError, match="width 5000"):
        data_stats(backbone, _digits(1)[0].train, 2, RouterConfig(dim=5000, grid=16))
    with pytest.raises(ValueError, match="width 7680"):
        StatsCollector(AdapterBank(), backbone, RouterConfig(dim=0, grid=16))


def test_collector_sums_each_clients_statistics_once_into_the_bank(
        two_tasks: tuple[Backbone, list[Task]], tmp_path: Path) -> None:
    backbone, tasks = two_tasks
    bank = AdapterBank()
    task = tasks[0]
    bank.add_task(0, "head", 2, build_adapter(adapter_config("head"), backbone, 2).state(), task.classes)
    collector = StatsCollector(bank, backbone, RouterConfig(dim=16))
    assert collector.wanted(0, 3) == (16, 0, 4)
    halves = [task.train.subset(range(0, 100)), task.train.subset(range(100, len(task.train)))]
    parts = [data_stats(backbone, h, 2, collector.config).tensors() for h in halves]
    bad = dict(parts[1], within=-parts[1]["within"])
    assert set(collector.collect(0, [(3, parts[0]), (4, bad)])) == {4}  # negative variances: rejected
    assert set(collector.collect(0, [(3, parts[0]), (4, parts[1])])) == {3}  # 3 counted already
    assert collector.wanted(0, 3) is None and collector.wanted(0, 4) is None
    whole = data_stats(backbone, task.train, 2, collector.config)
    bank.save(tmp_path)
    stored = AdapterBank.load(tmp_path)[0].stats
    assert torch.equal(stored["count"], whole.count)
    # float32 features of two halves and of the whole batch differ in the last bits; the float64 sums do not add more
    read = FeatureStats.from_tensors(stored, 2, 16)
    scale = float(whole.scatter.abs().max())
    torch.testing.assert_close(read.scatter, whole.scatter, rtol=1e-5, atol=1e-6 * scale)
    assert StatsCollector(AdapterBank.load(tmp_path), backbone, RouterConfig(dim=64)).config.dim == 16  # resumed


def test_summary_and_plots_carry_the_task_free_matrix(tmp_path: Path) -> None:
    records = [
        RoundRecord(1, 0, {0: 0.9}, extra={"bytes_stats_up": 100.0}),
        RoundRecord(2, 0, {0: 0.95}, extra={"task_free_0": 0.95, "task_free_all": 0.95, "task_free_routing": 1.0}),
        RoundRecord(3, 1, {0: 0.95, 1: 0.8}, extra={"bytes_stats_up": 50.0}),
        RoundRecord(4, 1, {0: 0.95, 1: 0.9}, extra={"task_free_0": 0.7, "task_free_1": 0.85, "task_free_all": 0.78,
                                                   "task_free_routing": 0.8}),
    ]
    summary = summarize(records, 2)
    assert summary["task_free_matrix"] == [[0.95, None], [0.7, 0.85]]
    assert summary["task_free_accuracy"] == 0.78 and summary["task_free_routing"] == 0.8
    assert summary["bytes_stats_up_total"] == 150.0
    with RunLog(tmp_path) as log:
        for record in records:
            log.log(record)
    names = {p.name for p in plot_run(tmp_path, 2)}
    assert {"accuracy_matrix.png", "task_free_matrix.png"} <= names
    assert (tmp_path / "task_free_matrix.png").stat().st_size > 1000
