"""Aggregators and update validation on small hand-checkable tensors."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedpetah.aggregation import (
    AGGREGATORS,
    BoundedAggregation,
    BoundsConfig,
    InvalidUpdate,
    StateDict,
    aggregator_config,
    build_aggregator,
    check_count,
    clip_update,
    filter_updates,
    validate_update,
)
from fedpetah.aggregation.lora_product import lora_pairs
from fedpetah.bank import AdapterBank

A_KEY = "blocks.0.qkv.lora_A.default.weight"
B_KEY = "blocks.0.qkv.lora_B.default.weight"


def _lora_state(seed: int, out: int = 6, inp: int = 5, rank: int = 2) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    return {
        A_KEY: torch.randn(rank, inp, generator=g, dtype=torch.float64),
        B_KEY: torch.randn(out, rank, generator=g, dtype=torch.float64),
        "head.weight": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "head.bias": torch.randn(3, generator=g, dtype=torch.float64),
    }


def _clone(states: list[StateDict]) -> list[StateDict]:
    return [{k: v.clone() for k, v in s.items()} for s in states]


def _same(a: StateDict, b: StateDict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.pop("b"), "missing_keys"),
        (lambda s: s.update(extra=torch.zeros(1)), "unexpected_keys"),
        (lambda s: s.update(a=torch.zeros(3)), "shape"),
        (lambda s: s.update(a=torch.zeros(2, 2, dtype=torch.float64)), "dtype"),
        (lambda s: s.update(a=torch.zeros(2, 2, dtype=torch.int32)), "dtype"),
        (lambda s: s.update(a=torch.tensor([[0.0, math.nan], [0.0, 0.0]])), "non_finite"),
        (lambda s: s.update(b=torch.tensor([math.inf])), "non_finite"),
        (lambda s: s.update(b=[1.0]), "type"),
    ],
)
def test_validate_rejects_with_reason(mutate: Callable[[dict[str, Any]], object], reason: str) -> None:
    reference = {"a": torch.zeros(2, 2), "b": torch.zeros(1)}
    update = {k: v.clone() for k, v in reference.items()}
    validate_update(update, reference)
    mutate(update)
    with pytest.raises(InvalidUpdate) as caught:
        validate_update(update, reference)
    assert caught.value.reason == reason


def test_validate_norm_bound() -> None:
    reference = {"a": torch.ones(2)}
    update = {"a": torch.tensor([4.0, 5.0])}  # delta (3, 4), norm 5
    validate_update(update, reference, max_norm=5.0)
    with pytest.raises(InvalidUpdate, match="norm") as caught:
        validate_update(update, reference, max_norm=4.9)
    assert caught.value.reason == "norm"


def test_filter_updates_keeps_order_and_reports_rejections() -> None:
    reference = {"a": torch.zeros(2)}
    updates = [
        {"a": torch.tensor([1.0, 0.0])},
        {"a": torch.tensor([math.nan, 0.0])},
        {"a": torch.tensor([2.0, 0.0])},
        {"a": torch.tensor([100.0, 0.0])},
        {"a": torch.tensor([3.0, 0.0])},
    ]
    result = filter_updates(updates, [1, 2, 3, 4, 0], reference, max_norm=10.0)
    assert [u["a"][0].item() for u in result.updates] == [1.0, 2.0]
    assert result.weights == [1.0, 3.0]
    rejected = [(r.index, r.reason) for r in result.rejected]
    assert rejected == [(1, "non_finite"), (3, "norm"), (4, "weight")]


# fedavg and clipping ----------------------------------------------------------------------------------


def test_fedavg_is_example_weighted_and_pure() -> None:
    current = {"w": torch.zeros(2), "h": torch.zeros(1, dtype=torch.float16)}
    updates = [
        {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16)},
        {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([5.0], dtype=torch.float16)},
    ]
    before = _clone([current, *updates])
    result = build_aggregator(aggregator_config("fedavg"))(current, updates, [10, 30])
    assert torch.equal(result.state["w"], torch.tensor([2.5, 5.0]))
    assert result.state["h"].dtype == torch.float16 and result.state["h"].item() == 4.0
    assert result.opt_state == {} and result.metrics["num_updates"] == 2
    assert all(_same(a, b) for a, b in zip(before, [current, *updates], strict=True))


def test_aggregator_refuses_an_invalid_update() -> None:
    current = {"w": torch.zeros(2)}
    with pytest.raises(InvalidUpdate, match=r"w: \(3,\) != \(2,\)"):
        build_aggregator(aggregator_config("fedavg"))(current, [{"w": torch.zeros(3)}], [1])
    with pytest.raises(ValueError, match="weights"):
        build_aggregator(aggregator_config("fedavg"))(current, [{"w": torch.zeros(2)}], [0])


def test_clip_update_scales_the_delta_not_the_state() -> None:
    current = {"w": torch.tensor([1.0, 1.0])}
    far = {"w": torch.tensor([7.0, 9.0])}  # delta (6, 8), norm 10
    clipped, scale = clip_update(far, current, 2.0)
    assert scale == pytest.approx(0.2) and torch.allclose(clipped["w"], torch.tensor([2.2, 2.6]))
    assert torch.equal(far["w"], torch.tensor([7.0, 9.0]))


# server optimizers ------------------------------------------------------------------------------------


def _fedopt_step(
    name: str, d: float, m: float, v: float, eta: float, b1: float, b2: float, tau: float
) -> tuple[float, float, float]:
    """One scalar step of Reddi et al.'s Algorithm 2, written out independently of the library."""
    m = b1 * m + (1 - b1) * d
    if name == "fedadam":
        v = b2 * v + (1 - b2) * d * d
    elif name == "fedyogi":
        v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d)
    else:
        v = v + d * d
    return eta * m / (math.sqrt(v) + tau), m, v


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_two_rounds_match_the_paper(name: str) -> None:
    fields = {"eta": 0.1, "beta1": 0.9, "tau": 1e-2}
    if name != "fedadagrad":
        fields["beta2"] = 0.99
    aggregate = build_aggregator(aggregator_config(name, **fields))
    b2 = fields.get("beta2", 0.0)
    x = {"w": torch.tensor([0.0], dtype=torch.float64)}
    opt: StateDict = {}
    m, v, expected = 0.0, 1e-4, 0.0  # v starts at tau**2
    for target in (0.5, -0.2):
        # clients return x + 2*target and x + 0 with weights 1:1 -> pseudo-gradient = target
        ups = [{"w": x["w"] + 2 * target}, {"w": x["w"].clone()}]
        result = aggregate(x, ups, [1, 1], opt)
        step, m, v = _fedopt_step(name, target, m, v, 0.1, 0.9, b2, 1e-2)
        expected += step
        x, opt = result.state, result.opt_state
        assert x["w"].item() == pytest.approx(expected, rel=1e-6)
        assert opt["m/w"].item() == pytest.approx(m, rel=1e-5)
        assert opt["v/w"].item() == pytest.approx(v, rel=1e-5)
    assert opt["step"].item() == 2
    with pytest.raises(ValueError, match="optimizer state"):
        aggregate({"other": torch.zeros(1)}, [{"other": torch.ones(1)}], [1], opt)


def test_fedadam_moves_the_global_state_to_the_clients_consensus() -> None:
    aggregate = build_aggregator(aggregator_config("fedadam", eta=0.05))
    target = torch.tensor([1.0, -2.0, 0.5])
    x: StateDict = {"w": torch.zeros(3)}
    opt: StateDict = {}
    for _ in range(300):
        result = aggregate(x, [{"w": target}], [1], opt)
        x, opt = result.state, result.opt_state
    assert torch.allclose(x["w"], target, atol=0.05)


def test_fedavgm_two_rounds_carry_the_momentum_through_the_bank(tmp_path: Path) -> None:
    """Hsu et al. 2019: ``m = beta m + d``, ``x = x + eta m``; eta = beta = 0.5, numbers exact in binary. Between
    rounds the buffer goes where the server keeps it: the task's optimizer state in a saved and reloaded bank."""
    bounded = BoundedAggregation(build_aggregator(aggregator_config("fedavgm", server_lr=0.5, momentum=0.5)),
                                 BoundsConfig.off())
    bank = AdapterBank()
    bank.add_task(0, "head", 2, {"w": torch.tensor([0.0, 1.0])})
    rounds = [  # (clients' states, counts) -> (new x, new m)
        ([[1.0, 1.0], [3.0, 5.0]], [1, 3], [1.25, 2.5], [2.5, 3.0]),  # mean (2.5, 4), d = m = (2.5, 3)
        ([[2.0, 2.5], [0.0, 0.5]], [5, 5], [1.75, 2.75], [1.0, 0.5]),  # mean (1, 1.5), d = (-0.25, -1)
    ]
    for server_round, (states, counts, x, m) in enumerate(rounds):
        entry = bank[0]
        result = bounded(entry.state, [{"w": torch.tensor(s)} for s in states], counts, entry.opt_state)
        assert result.aggregate is not None
        assert torch.equal(result.aggregate.state["w"], torch.tensor(x))
        assert set(result.aggregate.opt_state) == {"m/w"} and torch.equal(result.aggregate.opt_state["m/w"],
                                                                           torch.tensor(m))
        bank.update(0, result.aggregate.state, server_round, result.aggregate.opt_state)
        bank.save(tmp_path / f"bank{server_round}")
        bank = AdapterBank.load(tmp_path / f"bank{server_round}")
    assert result.metrics["pseudo_grad_norm"] == pytest.approx(math.hypot(0.25, 1.0))
    assert result.metrics["momentum_norm"] == pytest.approx(math.hypot(1.0, 0.5))
    with pytest.raises(ValueError, match="optimizer state"):  # a FedAdam state (resumed with another aggregator)
        bounded({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], [1], {"m/w": torch.zeros(2), "v/w": torch.zeros(2)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_fedavgm_without_momentum_is_fedavg_bit_for_bit(dtype: torch.dtype) -> None:
    current = _lora_state(0)
    current = {k: v.to(dtype) for k, v in current.items()}
    fedavg = build_aggregator(aggregator_config("fedavg"))
    plain = build_aggregator(aggregator_config("fedavgm", momentum=0.0))
    opt: StateDict = {}
    for server_round in range(2):
        updates = [{k: v.to(dtype) for k, v in _lora_state(10 * server_round + i).items()} for i in (1, 2, 3)]
        expected = fedavg(current, updates, [3, 1, 7])
        result = plain(current, updates, [3, 1, 7], opt)
        for key, value in expected.state.items():
            torch.testing.assert_close(result.state[key], value, rtol=0, atol=0)
        current, opt = result.state, result.opt_state
    assert set(opt) == {f"m/{k}" for k in current}  # the buffer is kept (and is the last pseudo-gradient)
    with pytest.raises(ValueError, match="strategy.aggregator.momentum"):
        aggregator_config("fedavgm", momentum=1.0)
    with pytest.raises(ValueError, match="strategy.aggregator.server_lr"):
        aggregator_config("fedavgm", server_lr=0.0)


def test_fedavgm_momentum_keeps_moving_when_the_clients_agree() -> None:
    """With every client at the current state (d = 0) the server still steps along the buffer, decaying by beta."""
    aggregate = build_aggregator(aggregator_config("fedavgm"))  # server_lr 1, momentum 0.9
    x = {"w": torch.tensor([0.0], dtype=torch.float64)}
    first = aggregate(x, [{"w": torch.tensor([1.0], dtype=torch.float64)}], [1])
    assert first.state["w"].item() == 1.0
    second = aggregate(first.state, [dict(first.state)], [1], first.opt_state)
    assert second.state["w"].item() == pytest.approx(1.9, abs=1e-15)
    assert second.opt_state["m/w"].item() == pytest.approx(0.9, abs=1e-15)


# LoRA product aggregation -----------------------------------------------------------------------------


# (6, 5): 3 clients x rank 2 >= min(out, in), dense SVD; (12, 10): the QR-factored SVD path
SIZES = pytest.mark.parametrize(("out", "inp"), [(6, 5), (12, 10)])


@SIZES
def test_lora_product_is_exact_when_the_mean_has_rank_r(out: int, inp: int) -> None:
    shared_a = _lora_state(0, out, inp)[A_KEY]
    updates = [_lora_state(i, out, inp) | {A_KEY: shared_a} for i in (1, 2, 3)]
    current = _lora_state(9, out, inp)
    result = build_aggregator(aggregator_config("lora_product"))(current, updates, [1, 2, 5])
    w = [1 / 8, 2 / 8, 5 / 8]
    mean_product = torch.stack([wi * u[B_KEY] @ u[A_KEY] for wi, u in zip(w, updates, strict=True)]).sum(0)
    assert torch.allclose(result.state[B_KEY] @ result.state[A_KEY], mean_product, atol=1e-10)
    assert result.metrics["lora_residual_max"] < 1e-12
    mean_head = torch.stack([wi * u["head.weight"] for wi, u in zip(w, updates, strict=True)]).sum(0)
    assert torch.allclose(result.state["head.weight"], mean_head)


@SIZES
def test_lora_product_truncates_optimally_and_splits_symmetrically(out: int, inp: int) -> None:
    updates = [_lora_state(i, out, inp) for i in (1, 2, 3)]
    result = build_aggregator(aggregator_config("lora_product"))(_lora_state(0, out, inp), updates, [1, 1, 1])
    mean_product = torch.stack([u[B_KEY] @ u[A_KEY] for u in updates]).mean(0)
    s = torch.linalg.svdvals(mean_product)
    a, b = result.state[A_KEY], result.state[B_KEY]
    gap = torch.linalg.matrix_norm(mean_product - b @ a)
    assert gap.item() == pytest.approx(s[2:].norm().item(), rel=1e-9)  # Eckart-Young optimum
    assert result.metrics["lora_residual_max"] == pytest.approx((s[2:].norm() / s.norm()).item(), rel=1e-9)
    assert torch.allclose(a.norm(dim=1), s[:2].sqrt()) and torch.allclose(b.norm(dim=0), s[:2].sqrt())
    plain = build_aggregator(aggregator_config("fedavg"))(_lora_state(0, out, inp), updates, [1, 1, 1]).state
    assert torch.linalg.matrix_norm(mean_product - plain[B_KEY] @ plain[A_KEY]) > gap


def test_lora_product_handles_conv_factors_and_reseeds_dead_directions() -> None:
    a_key, b_key = "stem.conv.lora_A.default.weight", "stem.conv.lora_B.default.weight"
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 3, 3, generator=g)
    b = torch.zeros(4, 2, 1, 1)
    b[:, 0, 0, 0] = torch.randn(4, generator=g)  # rank-1 update, so one of the r=2 directions is dead
    mag = "stem.conv.lora_magnitude_vector.default.weight"
    update = {a_key: a, b_key: b, mag: torch.ones(1, 4, 1, 1)}
    current = {a_key: torch.zeros_like(a), b_key: torch.zeros_like(b), mag: torch.zeros(1, 4, 1, 1)}
    result = build_aggregator(aggregator_config("lora_product"))(current, [update], [1])
    new_a, new_b = result.state[a_key], result.state[b_key]
    assert new_a.shape == a.shape and new_b.shape == b.shape and torch.equal(result.state[mag], update[mag])
    assert result.metrics["lora_dead_directions"] == 1
    flat_a = new_a.reshape(2, -1)
    product = (new_b.reshape(4, 2) @ flat_a).to(torch.float64)
    expected = (b.reshape(4, 2) @ a.reshape(2, -1)).to(torch.float64)
    assert torch.allclose(product, expected, atol=1e-5)
    assert torch.equal(new_b[:, 1], torch.zeros(4, 1, 1))
    rms_row = a.reshape(2, -1).square().sum(dim=1).mean().sqrt()
    assert flat_a[1].norm().item() == pytest.approx(rms_row.item(), rel=1e-5)
    assert abs(torch.dot(flat_a[0], flat_a[1]).item()) < 1e-4


def test_lora_pairs_require_both_factors() -> None:
    assert lora_pairs([A_KEY, B_KEY, "head.weight"]) == [(A_KEY, B_KEY)]
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs([A_KEY])
    with pytest.raises(ValueError, match="no matching lora_A"):
        lora_pairs([B_KEY])
    with pytest.raises(ValueError, match="use fedavg"):
        aggregate = build_aggregator(aggregator_config("lora_product"))
        aggregate({"w": torch.zeros(1)}, [{"w": torch.ones(1)}], [1])


# robust -----------------------------------------------------------------------------------------------


def test_median_and_trimmed_mean_ignore_an_outlier() -> None:
    current = {"w": torch.zeros(2)}
    values = [[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [4.0, 40.0], [1e6, -1e6]]
    updates = [{"w": torch.tensor(v)} for v in values]
    weights = [1, 1, 1, 1, 1000]
    median = build_aggregator(aggregator_config("median"))(current, updates, weights).state
    assert torch.equal(median["w"], torch.tensor([3.0, 20.0]))
    even = build_aggregator(aggregator_config("median"))(current, updates[:4], [1] * 4).state
    assert torch.equal(even["w"], torch.tensor([2.5, 30.0]))
    trimmed = build_aggregator(aggregator_config("trimmed_mean", trim_ratio=0.2))(current, updates, weights)
    assert torch.allclose(trimmed.state["w"], torch.tensor([3.0, 70 / 3]))
    assert trimmed.metrics["trimmed_per_side"] == 1
    with pytest.raises(ValueError, match="trim_ratio"):
        aggregator_config("trimmed_mean", trim_ratio=0.5)


# registry ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_aggregator_is_pure_and_keeps_the_layout(name: str) -> None:
    current = _lora_state(0) | {"head.bias": torch.zeros(3, dtype=torch.float32)}
    updates = [_lora_state(i) | {"head.bias": torch.full((3,), float(i))} for i in (1, 2, 3)]
    before = _clone([current, *updates])
    result = build_aggregator(aggregator_config(name))(current, updates, [1, 2, 3])
    again = build_aggregator(aggregator_config(name))(current, updates, [1, 2, 3])
    assert all(_same(x, y) for x, y in zip(before, [current, *updates], strict=True))
    assert _same(result.state, again.state)
    assert {k: (v.shape, v.dtype) for k, v in result.state.items()} == {
        k: (v.shape, v.dtype) for k, v in current.items()
    }
    assert all(math.isfinite(v) for v in result.metrics.values())


def test_registry_rejects_unknown_names_fields_and_configs() -> None:
    with pytest.raises(KeyError, match="fedavg"):
        aggregator_config("fedsgd")
    with pytest.raises(TypeError, match="'eta'"):
        aggregator_config("fedavg", eta=0.1)
    with pytest.raises(TypeError, match="FedYogi needs FedYogiConfig"):
        AGGREGATORS.get("fedyogi")(aggregator_config("fedadam"))
    with pytest.raises(TypeError, match="'clip_norm'"):
        aggregator_config("median", clip_norm=1.0)  # bounds are strategy.bounds, not an aggregator option
    with pytest.raises(ValueError, match="strategy.aggregator.eta"):
        aggregator_config("fedadam", eta=-1.0)


def test_lora_product_averages_peft_weight_deltas_exactly() -> None:
    from peft import LoraConfig, get_peft_model

    def lora_model() -> Any:  # a peft PeftModel
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5))
        return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))

    def delta(state: StateDict) -> list[torch.Tensor]:
        model = lora_model()
        assert not model.load_state_dict(state, strict=False).unexpected_keys
        merged = model.merge_and_unload()
        return [merged[0].weight - base[0].weight, merged[2].weight - base[2].weight]

    base = lora_model().merge_and_unload()  # B = 0: the frozen weights
    names = [n for n, p in lora_model().named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    current = {n: p.detach().clone() for n, p in lora_model().named_parameters() if p.requires_grad}
    shared_a = {n: torch.randn(current[n].shape, generator=g) for n in names if ".lora_A." in n}
    updates = [
        {n: shared_a[n] if n in shared_a else torch.randn(current[n].shape, generator=g) for n in names}
        for _ in range(3)
    ]
    result = build_aggregator(aggregator_config("lora_product"))(current, updates, [1, 1, 2])
    with torch.no_grad():
        deltas = [delta(u) for u in updates]
        expected = [0.25 * d0 + 0.25 * d1 + 0.5 * d2 for d0, d1, d2 in zip(*deltas, strict=True)]
        got = delta(result.state)
    assert result.metrics["lora_pairs"] == 2
    for got_layer, expected_layer in zip(got, expected, strict=True):
        assert expected_layer.abs().max() > 0.1
        assert torch.allclose(got_layer, expected_layer, atol=1e-5)


# bounded rounds: validation, count caps and norm bounds relative to the round ----------------------------


def _round_fixture() -> tuple[StateDict, list[StateDict | None], list[object]]:
    """Norms 5, 5, 15, 100, -, -, 4 around zero; counts 10, 10, 20, 10, 10, NaN, 1e9."""
    current = {"w": torch.zeros(2)}
    rows = [[3.0, 4.0], [0.0, 5.0], [9.0, 12.0], [60.0, 80.0], [math.nan, 0.0], [1.0, 0.0], [0.0, 4.0]]
    updates: list[StateDict | None] = [{"w": torch.tensor(r)} for r in rows]
    return current, updates, [10, 10, 20, 10, 10, math.nan, 1e9]


def test_bounded_round_rejects_clips_and_caps_against_the_round() -> None:
    current, updates, counts = _round_fixture()
    before = _clone([current, *updates])  # type: ignore[list-item]
    bounded = BoundedAggregation(build_aggregator(aggregator_config("fedavg")), BoundsConfig())
    result = bounded(current, updates, counts)
    # valid norms 5, 5, 15, 100, 4 -> median 5: 100 > 10 x 5 is rejected, 15 > 2 x 5 is clipped to (6, 8);
    # kept counts 10, 10, 20, 1e9 -> median 15: the 1e9 claim counts as 3 x 15 = 45
    assert [(r.index, r.reason) for r in result.rejected] == [(3, "norm_outlier"), (4, "non_finite"), (5, "weight")]
    assert result.aggregate is not None
    expected = (10 * torch.tensor([3.0, 4.0]) + 10 * torch.tensor([0.0, 5.0]) + 20 * torch.tensor([6.0, 8.0])
                + 45 * torch.tensor([0.0, 4.0])) / 85
    assert torch.allclose(result.aggregate.state["w"], expected)
    metrics = result.metrics
    assert metrics["median_norm"] == 5.0 and metrics["clip_bound"] == 10.0 and metrics["weight_cap"] == 45.0
    assert (metrics["num_clipped"], metrics["num_norm_rejected"], metrics["num_weight_capped"]) == (1, 1, 1)
    assert metrics["max_weight_share"] == pytest.approx(45 / 85) and metrics["num_updates"] == 4
    for a, b in zip(before, [current, *updates], strict=True):  # inputs untouched
        torch.testing.assert_close(b, a, equal_nan=True, rtol=0, atol=0)
    with_size = bounded(current, updates, counts, task_size=30)  # no client holds more than the whole task
    assert with_size.metrics["weight_cap"] == 30.0 and with_size.aggregate is not None
    assert torch.allclose(with_size.aggregate.state["w"], torch.tensor([150 / 70, (40 + 50 + 160 + 120) / 70]))


def test_unbounded_round_lets_one_liar_dominate() -> None:
    current, updates, counts = _round_fixture()
    result = BoundedAggregation(build_aggregator(aggregator_config("fedavg")), BoundsConfig.off())(
        current, updates, counts)
    assert [r.reason for r in result.rejected] == ["non_finite", "weight"]
    assert result.aggregate is not None and result.metrics["max_weight_share"] > 0.999999
    assert torch.allclose(result.aggregate.state["w"], torch.tensor([0.0, 4.0]), atol=1e-5)


def test_bounded_round_with_fixed_bounds_and_a_robust_aggregator() -> None:
    current, updates, counts = _round_fixture()
    fixed = BoundsConfig(weight_cap=None, clip_multiple=None, reject_multiple=None, clip_norm=4.5, max_norm=50.0)
    result = BoundedAggregation(build_aggregator(aggregator_config("median")), fixed)(current, updates, counts)
    assert [(r.index, r.reason) for r in result.rejected] == [(3, "norm"), (4, "non_finite"), (5, "weight")]
    # clipped to norm 4.5: (2.7, 3.6), (0, 4.5), (2.7, 3.6), (0, 4) -> coordinate median (1.35, 3.8)
    assert result.aggregate is not None and result.metrics["num_clipped"] == 3
    assert torch.allclose(result.aggregate.state["w"], torch.tensor([1.35, 3.8]))


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi", "fedadagrad"])
def test_a_non_finite_aggregate_of_finite_updates_is_never_installed(name: str) -> None:
    """Two of three clients send float32 values near the largest (finite, so validation passes them): the
    aggregate or the FedOpt second moment (their squares) must not overflow into what the bank stores."""
    current = {"w": torch.zeros(4)}
    updates: list[StateDict | None] = [{"w": torch.full((4,), 0.1)}, *[{"w": torch.full((4,), 3e38)}] * 2]
    result = BoundedAggregation(build_aggregator(aggregator_config(name)), BoundsConfig())(
        current, updates, [10, 10, 10])
    if result.aggregate is not None:  # fedavg: the mean of finite values is finite (poisoned: 2 of 3 lie)
        assert name == "fedavg"
        assert all(bool(torch.isfinite(v).all()) for v in result.aggregate.state.values())
    else:
        assert result.metrics["non_finite_aggregate"] == 1.0


def test_a_round_with_nothing_valid_has_no_aggregate() -> None:
    current = {"w": torch.zeros(2)}
    result = BoundedAggregation(build_aggregator(aggregator_config("fedavg")), BoundsConfig())(
        current, [None, {"w": torch.zeros(3)}], [5, 5])
    assert result.aggregate is None and [r.reason for r in result.rejected] == ["type", "shape"]
    with pytest.raises(ValueError, match="counts"):
        BoundedAggregation(build_aggregator(aggregator_config("fedavg")), BoundsConfig())(current, [None], [])


@pytest.mark.parametrize("count", [True, math.nan, math.inf, -math.inf, -5, 0, 3.5, "7", None, [7]])
def test_a_count_must_be_a_positive_whole_number(count: object) -> None:
    with pytest.raises(InvalidUpdate) as caught:
        check_count(count)
    assert caught.value.reason == "weight"


@pytest.mark.parametrize("count", [7, 7.0, np.int64(7), np.float32(7.0)])
def test_whole_counts_of_any_numeric_type_pass(count: object) -> None:
    assert check_count(count) == 7 and type(check_count(count)) is int


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"weight_cap": 0.5}, "strategy.bounds.weight_cap"), ({"clip_multiple": math.inf}, "strategy.bounds.clip"),
     ({"clip_multiple": 4.0, "reject_multiple": 3.0}, "strategy.bounds.reject_multiple"),
     ({"max_norm": 0.0}, "strategy.bounds.max_norm"), ({"clip_norm": -1.0}, "strategy.bounds.clip_norm")],
)
def test_bounds_config_names_the_yaml_path(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BoundsConfig(**fields)  # type: ignore[arg-type]
