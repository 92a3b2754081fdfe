"""``router.head=ccvr``: the router's layer re-fitted on virtual features drawn from the federated statistics."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank
from fedpetah.config import RouterConfig
from fedpetah.routing.features import feature_width
from fedpetah.routing.router import fit_router
from fedpetah.routing.stats import FeatureStats, class_stats
from fedpetah.serving.collect import StatsCollector

CCVR = RouterConfig(dim=0, grid=0, shrinkage=0.0, head="ccvr", ccvr_samples=2000, ccvr_steps=100)


def _stats(means: list[float], std: float, per_class: int = 4000, seed: int = 0) -> FeatureStats:
    """One task's statistics of 1-D Gaussian classes with the given means and a shared ``std``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(means)).repeat_interleave(per_class)
    x = torch.tensor(means, dtype=torch.float64)[labels] + std * torch.randn(len(labels), generator=g,
                                                                                dtype=torch.float64)
    return class_stats(x[:, None], labels, len(means))


def _boundary(layer: torch.nn.Linear, left: int, right: int) -> float:
    """Where classes ``left`` and ``right`` of a 1-D layer score the same."""
    w, b = layer.weight[:, 0].double(), layer.bias.double()
    return float((b[left] - b[right]) / (w[right] - w[left]))


def _bayes_boundary(m1: float, s1: float, m2: float, s2: float) -> float:
    """The point between ``m1`` < ``m2`` where N(m1, s1^2) and N(m2, s2^2) have equal density."""
    a = 1 / s2**2 - 1 / s1**2
    b = 2 * (m1 / s1**2 - m2 / s2**2)
    c = m2**2 / s2**2 - m1**2 / s1**2 + 2 * math.log(s2 / s1)
    roots = [(-b + sign * math.sqrt(b * b - 4 * a * c)) / (2 * a) for sign in (1, -1)]
    return next(r for r in roots if m1 < r < m2)


def test_ccvr_moves_the_boundary_between_tasks_towards_the_bayes_boundary() -> None:
    # task 0: classes at 0 and 2, std 0.3; task 1: classes at 10 and 14, std 2. The pooled LDA puts the boundary
    # between class 1 (at 2) and class 2 (at 10) half way, at 6 exactly; with each task's own spread the density
    # boundary is at 3.18, and CCVR's linear layer, fitted to draws from each task's Gaussian, moves most of the way
    # there (its ridge towards the LDA solution, scaled by the pooled variance, holds it at 3.9).
    stats = [_stats([0.0, 2.0], 0.3), _stats([10.0, 14.0], 2.0, seed=1)]
    lda = fit_router(stats, 1, dataclasses.replace(CCVR, head="lda"))
    means = [float(s.sum[c, 0] / s.count[c]) for s in stats for c in range(2)]
    assert _boundary(lda, 1, 2) == pytest.approx((means[1] + means[2]) / 2, abs=1e-4)
    bayes = _bayes_boundary(2.0, 0.3, 10.0, 2.0)
    assert bayes == pytest.approx(3.18, abs=0.01)
    calibrated = fit_router(stats, 1, CCVR)
    assert bayes < _boundary(calibrated, 1, 2) < 4.0
    # within a task of equal spreads the boundary stays between its two means, as the LDA's does
    assert _boundary(calibrated, 0, 1) == pytest.approx(1.0, abs=0.1)
    assert _boundary(calibrated, 2, 3) == pytest.approx(12.0, abs=0.4)


def test_ccvr_is_seeded_so_the_same_statistics_give_the_same_layer() -> None:
    stats = [_stats([0.0, 2.0], 0.3), _stats([10.0, 14.0], 2.0, seed=1)]
    config = dataclasses.replace(CCVR, ccvr_samples=64, ccvr_steps=10)
    first, again = fit_router(stats, 1, config), fit_router(stats, 1, config)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    other = fit_router(stats, 1, dataclasses.replace(config, seed=1))
    assert not torch.equal(first.weight, other.weight)


def test_ccvr_never_predicts_a_class_without_examples() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 2]).repeat_interleave(50)
    x = torch.randn(150, 4, generator=g, dtype=torch.float64) + 3 * labels[:, None].double()
    stats = class_stats(x, labels, 4)  # class 3 has no examples
    layer = fit_router([stats], 4, dataclasses.replace(CCVR, ccvr_samples=32, ccvr_steps=10))
    scores = layer(torch.randn(500, 4, generator=g) * 20)
    assert int((scores.argmax(1) == 3).sum()) == 0
    assert bool(torch.isfinite(layer.weight).all())


def test_router_head_is_validated_and_old_records_read_as_lda() -> None:
    with pytest.raises(ValueError, match="router.head"):
        RouterConfig(head="qda")
    with pytest.raises(ValueError, match="router.ccvr_samples"):
        RouterConfig(ccvr_samples=0)
    assert RouterConfig.from_record({"dim": 8, "grid": 0}).head == "lda"
    assert RouterConfig.from_record(dataclasses.asdict(CCVR)) == CCVR


def test_fits_are_remembered_but_each_caller_gets_its_own_layer() -> None:
    stats = [_stats([0.0, 2.0], 0.3)]
    config = dataclasses.replace(CCVR, ccvr_samples=16, ccvr_steps=5)
    first = fit_router(stats, 1, config)
    with torch.no_grad():
        first.weight.fill_(7.0)  # a caller's change must not reach the next caller
    again = fit_router(stats, 1, config)
    assert not torch.equal(again.weight, first.weight)
    assert torch.equal(again.weight, fit_router(stats, 1, config).weight)


def test_a_client_pulls_the_calibrated_router_no_further_than_its_capped_share(
        tiny_backbone: Callable[..., Backbone]) -> None:
    # three honest clients and one that sends the task with its classes swapped, claiming 1,000 times the examples
    # it holds: counted at the round's cap (the statistics path's, which CCVR reads), the calibrated router is the
    # one it would be had that client claimed its real count, one voice in four; summed as it came, it turns the
    # classes round
    backbone = tiny_backbone()
    config = RouterConfig(dim=0, grid=0, head="ccvr", ccvr_samples=64, ccvr_steps=300)
    width = feature_width(backbone, 0)
    g = torch.Generator().manual_seed(5)
    means = 4.0 * torch.randn(2, width, generator=g, dtype=torch.float64)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(2).repeat_interleave(n)
        return means[labels] + torch.randn(2 * n, width, generator=g, dtype=torch.float64), labels

    honest = [class_stats(*sample(50), 2).tensors() for _ in range(3)]
    x, y = sample(50)
    swapped = class_stats(x, 1 - y, 2)
    claimed = FeatureStats(swapped.count * 1000, swapped.sum * 1000, swapped.scatter * 1000).tensors()
    test_x, test_y = sample(200)
    layers, accuracy = {}, {}
    for case, hostile, cap in (("share", swapped.tensors(), 100.0), ("capped", claimed, 100.0),
                               ("uncapped", claimed, math.inf)):
        bank = AdapterBank()
        bank.add_task(0, "head", 2, build_adapter(adapter_config("head"), backbone, 2).state(), ["a", "b"])
        collector = StatsCollector(bank, backbone, config)
        replies = list(enumerate([*honest, hostile]))
        assert collector.collect(0, replies, cap=cap) == {}  # valid statistics, every one of them
        fitted = collector.fit([0])
        assert fitted is not None
        layers[case] = fitted[1]
        accuracy[case] = float((fitted[1](test_x.float()).argmax(1) == test_y).float().mean())
    # the same up to the float32 re-fit's tolerance (the scaled statistics differ from the share's in the last bits)
    torch.testing.assert_close(layers["capped"].weight, layers["share"].weight, rtol=0, atol=2e-3)
    torch.testing.assert_close(layers["capped"].bias, layers["share"].bias, rtol=0, atol=2e-3)
    assert accuracy["capped"] == accuracy["share"] >= 0.7
    assert accuracy["uncapped"] <= 0.05
