"""Task-aware prediction with the statistics classifier (``router.task_aware_mix``): the combination on hand-made
logits, the model, the export, the device's and the server's evaluation; 0 is the adapter alone, bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from snapshots import ROUTER, TASKS, Learned, learned
from torch.nn.modules.batchnorm import _BatchNorm

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.backbone import Backbone
from fedpetah.config import BackboneConfig, PruningConfig, RouterConfig, TrainConfig
from fedpetah.device.holdout import evaluate_holdout
from fedpetah.experiment import ExperimentConfig
from fedpetah.routing.export import load_export, write_export
from fedpetah.routing.features import FrozenFeatures, data_stats, feature_width
from fedpetah.routing.model import TaskFreeModel, task_aware_scores
from fedpetah.routing.router import fit_router
from fedpetah.routing.stats import FeatureStats
from fedpetah.serving.continual import ContinualServer
from fedpetah.tasks import ImageSet, TaskStreamConfig, batches
from fedpetah.train import evaluate

MIXED = dataclasses.replace(ROUTER, task_aware_mix=1.0)


def test_task_aware_scores_add_the_routers_within_task_log_posterior() -> None:
    # Prepare: the expert says 1/3, 2/3 (class 1: wrong), the router's rows 3/4, 1/4 (class 0: right)
    expert = torch.tensor([[0.0, math.log(2.0)], [5.0, 5.0]])
    router = torch.tensor([[math.log(3.0), 0.0], [1.0, 1.0 + math.log(3.0)]])

    # Act
    off, half, full = (task_aware_scores(expert, router, mix) for mix in (0.0, 0.5, 1.0))

    # Assert: mix 0 is the expert's logits themselves; mix m adds m log p_router
    assert off is expert
    expected = torch.log(torch.tensor([[1 / 3 * 3 / 4, 2 / 3 * 1 / 4], [1 / 2 * 1 / 4, 1 / 2 * 3 / 4]]))
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-6)
    expected_half = torch.log(torch.tensor([[1 / 3 * math.sqrt(3 / 4), 2 / 3 * math.sqrt(1 / 4)],
                                            [1 / 2 * math.sqrt(1 / 4), 1 / 2 * math.sqrt(3 / 4)]]))
    torch.testing.assert_close(half, expected_half, rtol=0, atol=1e-6)
    assert expert.argmax(1).tolist() == [1, 0]  # wrong on the first image, a tie on the second
    assert full.argmax(1).tolist() == [0, 1]  # the router flips the first and breaks the tie
    assert half.argmax(1).tolist() == [1, 1]  # 1/3 * sqrt(3/4) = 0.289 < 2/3 * 1/2: half a vote is not enough
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="mix must be finite and >= 0"):
            task_aware_scores(expert, router, bad)
    with pytest.raises(ValueError, match="router scores"):
        task_aware_scores(expert, router[:, :1], 1.0)


def test_router_config_validates_the_mix_and_older_records_read_as_off() -> None:
    assert RouterConfig().task_aware_mix == 1.0  # on by default (benchmarks/results/cross_device.md)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="router.task_aware_mix"):
            RouterConfig(task_aware_mix=bad)
    assert RouterConfig.from_record(dataclasses.asdict(MIXED)) == MIXED
    before = {k: v for k, v in dataclasses.asdict(MIXED).items() if k != "task_aware_mix"}
    assert RouterConfig.from_record(before) == ROUTER


@pytest.fixture(scope="module")
def snapshots(tiny_backbone: Callable[..., Backbone]) -> tuple[Learned, Learned]:
    """The same learned tasks (same tensors) built with mix 0 and mix 1."""
    backbone = tiny_backbone()
    return learned(backbone), learned(backbone, router=MIXED)


def _router_rows(model: TaskFreeModel, x: torch.Tensor) -> list[torch.Tensor]:
    return list(model.router(model.features.routed(x)[1]).split(model.widths, dim=1))


def test_the_model_combines_each_expert_with_its_tasks_router_rows(snapshots: tuple[Learned, Learned]) -> None:
    plain, mixed = snapshots[0].predictor.model, snapshots[1].predictor.model
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores0, aware0 = plain.outputs(x)
        scores1, aware1 = mixed.outputs(x)
        experts = [e(x) for e in plain.experts]  # LoRA experts: not shared, each runs on the images
        rows = _router_rows(mixed, x)
        assert (plain.task_aware_mix, mixed.task_aware_mix) == (0.0, 1.0) and not any(plain.shared)
        assert torch.equal(scores0, scores1)  # task-free scores never use the mix
        for t in range(len(TASKS)):
            assert torch.equal(aware0[t], experts[t])  # mix 0: the adapter's logits, as before
            assert torch.equal(plain.task_scores(x, t), experts[t])
            combined = torch.log_softmax(experts[t], 1) + torch.log_softmax(rows[t], 1)
            torch.testing.assert_close(aware1[t], combined, rtol=0, atol=1e-6)
            assert torch.equal(mixed.task_scores(x, t), aware1[t])
    with pytest.raises(ValueError, match="task_aware_mix"):
        TaskFreeModel(plain.features, plain.router, list(plain.experts), plain.widths, task_aware_mix=-1.0)


def test_export_and_load_keep_the_mix(snapshots: tuple[Learned, Learned], tmp_path: Path) -> None:
    plain, mixed = snapshots
    for name, snapshot in (("plain", plain), ("mixed", mixed)):
        write_export(snapshot.predictor, snapshot.backbone, snapshot.adapter, tmp_path / name, onnx=False)
    info = json.loads((tmp_path / "mixed" / "model.json").read_text())
    assert info["router"] == {"grid": ROUTER.grid, "joint": ROUTER.joint, "task_aware_mix": 1.0}
    # mix 0 writes the manifest as before it (devices that do not know the key still load it)
    assert json.loads((tmp_path / "plain" / "model.json").read_text())["router"] == \
        {"grid": ROUTER.grid, "joint": ROUTER.joint}
    reloaded = load_export(tmp_path / "mixed")
    assert reloaded.model.task_aware_mix == 1.0 and load_export(tmp_path / "plain").model.task_aware_mix == 0.0
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for ours, theirs in zip(reloaded.model.outputs(x)[1], mixed.predictor.model.outputs(x)[1], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_device_evaluation_counts_the_combined_prediction(snapshots: tuple[Learned, Learned]) -> None:
    # Prepare: 30 random images per task labelled in its classes
    g = torch.Generator().manual_seed(3)
    plain, mixed = (s.predictor for s in snapshots)
    for position, task in enumerate(TASKS):
        labels = torch.arange(task.num_classes).repeat(10)
        data = ImageSet(torch.randint(0, 256, (len(labels), 3, 20, 20), dtype=torch.uint8, generator=g), labels)

        # Act
        counts0, table0 = evaluate_holdout(plain, position, task, data, batch_size=7)
        counts1, table1 = evaluate_holdout(mixed, position, task, data, batch_size=7)

        # Assert: task-free counts are the same; task-aware ones are the expert's argmax at 0 and the
        # combination's at 1, which differ on some images
        np.testing.assert_array_equal(counts0[:, [0, 2]], counts1[:, [0, 2]])
        picked: dict[float, list[int]] = {0.0: [], 1.0: []}
        with torch.no_grad():
            for x, _ in batches(data, plain.img_size, plain.in_chans, 7):
                expert = plain.model.experts[position](x)
                rows = _router_rows(mixed.model, x)[position]
                picked[0.0] += expert.argmax(1).tolist()
                picked[1.0] += (torch.log_softmax(expert, 1) + torch.log_softmax(rows, 1)).argmax(1).tolist()
        for counts, table, mix in ((counts0, table0, 0.0), (counts1, table1, 1.0)):
            right = np.asarray(picked[mix]) == labels.numpy()
            np.testing.assert_array_equal(counts[:, 1], np.bincount(labels.numpy()[right], minlength=task.num_classes))
            np.testing.assert_array_equal(table.sum(0), np.bincount(picked[mix], minlength=task.num_classes))
        assert picked[0.0] != picked[1.0] and not np.array_equal(table0, table1)  # the mix reached the device


def _server(root: Path, cache_dir: Path, mix: float) -> ContinualServer:
    config = ExperimentConfig(
        clients=2, rounds_per_task=1, output_dir=str(root), evaluate_every_round=False,
        backbone=BackboneConfig(name="test_efficientvit", img_size=32, weights="random"),
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("head"),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=2),
        train=TrainConfig(epochs=1, batch_size=32, max_steps=1, loss="cross_entropy"),
        router=RouterConfig(dim=16, grid=0, task_aware_mix=mix))
    return ContinualServer(config, root / "run", cache_dir)


def _calibrate(backbone: Backbone, data: ImageSet) -> None:
    """Batch-norm statistics from one batch of real images, in place: the random backbone's stock ones give
    near-constant features (every head and router at chance); calibrated ones separate digits."""
    for layer in backbone.module.modules():
        if isinstance(layer, _BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None
    x, _ = next(batches(data, backbone.img_size, backbone.in_chans, 128, True, torch.Generator().manual_seed(0)))
    mean, std = torch.tensor(backbone.mean).view(1, -1, 1, 1), torch.tensor(backbone.std).view(1, -1, 1, 1)
    with torch.no_grad():
        backbone.module.train()((x - mean) / std)
    backbone.module.eval()


def test_server_evaluation_adds_the_router_rows_of_the_seen_tasks(tmp_path: Path, cache_dir: Path) -> None:
    # Prepare: two seen tasks with their fresh (seeded, untrained) heads and statistics of 300 training images each
    servers = [_server(tmp_path / str(mix), cache_dir, mix) for mix in (0.0, 1.0)]
    stats: list[FeatureStats] = []
    for server in servers:
        _calibrate(server.backbone, server.tasks[0].train)
        for task in server.tasks:
            server.global_state(task.index)
            train = task.train.subset(torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))[:300])
            if server is servers[0]:
                stats.append(data_stats(server.backbone, train, task.num_classes, server.router.config))
            server.bank.set_stats(task.index, stats[task.index].tensors())
    plain, mixed = servers

    # Act
    accuracies = [server.evaluate_seen(1) for server in servers]

    # Assert: mix 0 is each head's own accuracy; mix 1 adds the rows of the task's classes in the router
    # fitted on both tasks' statistics, and nothing else
    backbone, router = mixed.backbone, mixed.router.config
    features = FrozenFeatures(copy.deepcopy(backbone.module), backbone.mean, backbone.std, router.grid).eval()
    layer = fit_router(stats, feature_width(backbone, router.grid), router)
    expected: dict[float, list[float]] = {0.0: [], 1.0: []}
    for task, start in zip(mixed.tasks, (0, 2), strict=True):
        adapter = build_adapter(mixed.config.adapter, backbone, task.num_classes)
        adapter.load_state(mixed.bank[task.index].state)
        expected[0.0].append(evaluate(adapter.model, task.test, backbone.img_size, backbone.in_chans).accuracy)
        right = 0
        with torch.no_grad():
            for x, y in batches(task.test, backbone.img_size, backbone.in_chans, 256):
                rows = layer(features.routed(x)[1])[:, start : start + task.num_classes]
                scores = torch.log_softmax(adapter.model(x), 1) + torch.log_softmax(rows, 1)
                right += int((scores.argmax(1) == y).sum())
        expected[1.0].append(right / len(task.test))
    assert accuracies == [expected[0.0], expected[1.0]]
    assert all(a > b for a, b in zip(accuracies[1], accuracies[0], strict=True)), accuracies  # untrained heads
    # a seen task without statistics: the heads alone (today's path)
    mixed.bank.set_stats(1, {})
    assert mixed.evaluate_seen(1) == expected[0.0]
    plain.log.close()
    mixed.log.close()
