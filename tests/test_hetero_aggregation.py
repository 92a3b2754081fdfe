"""Mixed-rank LoRA: rank views, and the hetlora / flexlora aggregators on small hand-checkable tensors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedpetah.aggregation import (
    AGGREGATORS,
    InvalidUpdate,
    MixedRankAggregator,
    RankedUpdate,
    StateDict,
    aggregator_config,
    build_aggregator,
    full_rank,
    head_view,
    lora_ranks,
    rank_view,
    variant_name,
    variant_rank,
    variant_view,
    view_config_alpha,
)

A_KEY = "blocks.0.qkv.lora_A.default.weight"
B_KEY = "blocks.0.qkv.lora_B.default.weight"
CONV_A = "stem.conv.lora_A.default.weight"
CONV_B = "stem.conv.lora_B.default.weight"
HEAD = "head.weight"


def _mixed(name: str) -> MixedRankAggregator[Any]:
    aggregator = build_aggregator(aggregator_config(name))
    assert isinstance(aggregator, MixedRankAggregator)
    return aggregator


def _t(rows: list[Any]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _random_state(seed: int, rank: int = 4, dtype: torch.dtype = torch.float32) -> StateDict:
    """A Linear pair (out 6, in 5), a Conv2d pair (out 4, in 3, 3x3), a DoRA magnitude and a head."""
    g = torch.Generator().manual_seed(seed)
    shapes = {A_KEY: (rank, 5), B_KEY: (6, rank), CONV_A: (rank, 3, 3, 3), CONV_B: (4, rank, 1, 1),
              "stem.conv.lora_magnitude_vector.default.weight": (1, 4, 1, 1), HEAD: (3, 4), "head.bias": (3,)}
    return {key: torch.randn(shape, generator=g).to(dtype) for key, shape in shapes.items()}


# the hand example: R = 2, one Linear pair (in 3, out 2), a head of 2 --------------------------------------------

CURRENT = {A_KEY: _t([[1, 1, 1], [2, 2, 2]]), B_KEY: _t([[1, 2], [3, 4]]), HEAD: _t([10, 20])}
RANK_1 = RankedUpdate({A_KEY: _t([[1, 2, 3]]), B_KEY: _t([[1], [2]]), HEAD: _t([0, 4])}, rank=1, count=1)
RANK_2 = RankedUpdate({A_KEY: _t([[5, 6, 7], [8, 9, 10]]), B_KEY: _t([[5, 6], [-3, 7]]), HEAD: _t([4, 8])},
                      rank=2, count=3)
HEAD_ONLY = RankedUpdate({HEAD: _t([8, 0])}, rank=0, count=4)


def test_hetlora_averages_each_component_over_the_clients_that_trained_it() -> None:
    result = _mixed("hetlora").mixed(CURRENT, [RANK_1, RANK_2])

    # row / column 0: (1 * client 1 + 3 * client 2) / 4; row / column 1: client 2 alone
    assert torch.equal(result.state[A_KEY], _t([[4, 5, 6], [8, 9, 10]]))
    assert torch.equal(result.state[B_KEY], _t([[4, 6], [-1.75, 7]]))
    assert torch.equal(result.state[HEAD], _t([3, 7]))
    assert result.metrics["lora_components_kept"] == 0 and result.metrics["num_head_updates"] == 0


def test_hetlora_head_updates_move_only_the_shared_tensors() -> None:
    result = _mixed("hetlora").mixed(CURRENT, [RANK_1, RANK_2, HEAD_ONLY])

    assert torch.equal(result.state[A_KEY], _t([[4, 5, 6], [8, 9, 10]]))  # as without the head update
    assert torch.equal(result.state[B_KEY], _t([[4, 6], [-1.75, 7]]))
    assert torch.equal(result.state[HEAD], _t([5.5, 3.5]))  # (1 * [0, 4] + 3 * [4, 8] + 4 * [8, 0]) / 8
    assert result.metrics["num_head_updates"] == 1


def test_hetlora_keeps_the_components_nobody_trained() -> None:
    low = RankedUpdate({**RANK_1.state}, rank=1, count=2)

    result = _mixed("hetlora").mixed(CURRENT, [low, HEAD_ONLY])
    heads_only = _mixed("hetlora").mixed(CURRENT, [HEAD_ONLY])

    assert torch.equal(result.state[A_KEY], _t([[1, 2, 3], [2, 2, 2]]))
    assert torch.equal(result.state[B_KEY], _t([[1, 2], [2, 4]]))
    assert result.metrics["lora_components_kept"] == 1
    assert torch.equal(heads_only.state[A_KEY], CURRENT[A_KEY]) and torch.equal(heads_only.state[B_KEY], CURRENT[B_KEY])
    assert torch.equal(heads_only.state[HEAD], _t([8, 0]))


def test_flexlora_averages_the_products_at_each_clients_rank() -> None:
    result = _mixed("flexlora").mixed(CURRENT, [RANK_1, RANK_2, HEAD_ONLY])

    # 1/4 [[1],[2]] [[1, 2, 3]] + 3/4 [[5, 6], [-3, 7]] [[5, 6, 7], [8, 9, 10]], of rank 2 = R: kept exactly
    a, b = result.state[A_KEY], result.state[B_KEY]
    expected = _t([[55, 63.5, 72], [31.25, 34.75, 38.25]])
    assert torch.allclose(b @ a, expected, rtol=0, atol=1e-12)
    singular = torch.linalg.svdvals(expected)
    assert torch.allclose(a.norm(dim=1), singular.sqrt()) and torch.allclose(b.norm(dim=0), singular.sqrt())
    assert torch.equal(result.state[HEAD], _t([5.5, 3.5]))
    assert result.metrics["lora_residual_max"] < 1e-12 and result.metrics["lora_dead_directions"] == 0


def test_flexlora_below_the_full_rank_reseeds_the_missing_direction() -> None:
    result = _mixed("flexlora").mixed(CURRENT, [RANK_1])

    a, b = result.state[A_KEY], result.state[B_KEY]
    assert torch.allclose(b @ a, _t([[1, 2, 3], [2, 4, 6]]), rtol=0, atol=1e-12)
    assert torch.equal(b[:, 1], _t([0, 0]))  # the product is the client's ...
    assert a[1].norm().item() == pytest.approx(14**0.5)  # ... and the spare row of A trains again
    assert abs(torch.dot(a[0], a[1]).item()) < 1e-12
    assert result.metrics["lora_dead_directions"] == 1


def test_flexlora_without_a_lora_update_keeps_the_factors() -> None:
    result = _mixed("flexlora").mixed(CURRENT, [HEAD_ONLY])

    assert all(torch.equal(result.state[k], CURRENT[k]) for k in (A_KEY, B_KEY))
    assert torch.equal(result.state[HEAD], _t([8, 0]))


# single-rank limits, exactly ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "limit"), [("hetlora", "fedavg"), ("flexlora", "lora_product")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_at_one_rank_each_is_its_single_rank_aggregator_exactly(name: str, limit: str, dtype: torch.dtype) -> None:
    current = _random_state(0, dtype=dtype)
    updates = [_random_state(seed, dtype=dtype) for seed in range(1, 6)]
    counts = [21, 183, 584, 838, 852]  # normalized, these sum to 1 - 2**-53: renormalizing them would change bits

    expected = build_aggregator(aggregator_config(limit))(current, updates, counts)
    plain = build_aggregator(aggregator_config(name))(current, updates, counts)
    mixed = _mixed(name).mixed(current, [RankedUpdate(u, 4, c) for u, c in zip(updates, counts, strict=True)])

    for result in (plain, mixed):
        assert list(result.state) == list(current)
        assert all(torch.equal(result.state[k], expected.state[k]) for k in current)
        assert {k: v for k, v in result.metrics.items() if k in expected.metrics} == expected.metrics


# validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "reason", "detail"),
    [
        (RankedUpdate({**RANK_2.state}, rank=1, count=1), "shape", r"lora-1 update: .*lora_A.*\(2, 3\) != \(1, 3\)"),
        (RankedUpdate({**RANK_1.state, B_KEY: _t([[1, 0], [2, 0]])}, rank=1, count=1), "shape",
         r"lora-1 update: .*lora_B.*\(2, 2\) != \(2, 1\)"),
        (RankedUpdate({**RANK_2.state}, rank=3, count=1), "shape", "rank 3 cannot be served.*ranks 0 \\(head\\) to 2"),
        (RankedUpdate({**RANK_2.state}, rank=-1, count=1), "shape", "rank -1 cannot be served"),
        (RankedUpdate({**RANK_2.state}, rank=True, count=1), "type", "must be an int"),
        (RankedUpdate({**RANK_1.state}, rank=0, count=1), "unexpected_keys", "head update: .*lora_A"),
        (RankedUpdate({}, rank=0, count=1), "missing_keys", "head update: head.weight"),
        (RankedUpdate({**RANK_1.state, HEAD: _t([float("nan"), 0])}, rank=1, count=1), "non_finite", "head.weight"),
        (RankedUpdate({**RANK_1.state, HEAD: torch.zeros(2)}, rank=1, count=1), "dtype", "head.weight"),
    ],
)
@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_an_update_that_does_not_match_its_view_is_rejected(
    name: str, update: RankedUpdate, reason: str, detail: str
) -> None:
    before = {k: v.clone() for k, v in CURRENT.items()}

    with pytest.raises(InvalidUpdate, match=detail) as caught:
        _mixed(name).mixed(CURRENT, [RANK_2, update])

    assert caught.value.reason == reason
    assert all(torch.equal(CURRENT[k], before[k]) for k in CURRENT)


def test_mixed_checks_the_counts_and_leaves_its_inputs_alone() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        _mixed("hetlora").mixed(CURRENT, [])
    with pytest.raises(ValueError, match="not all zero"):
        _mixed("hetlora").mixed(CURRENT, [RankedUpdate(RANK_1.state, 1, 0)])
    before = [{k: v.clone() for k, v in s.items()} for s in (CURRENT, RANK_1.state, RANK_2.state)]
    for name in ("hetlora", "flexlora"):
        _mixed(name).mixed(CURRENT, [RANK_1, RANK_2, HEAD_ONLY])
    after = (CURRENT, RANK_1.state, RANK_2.state)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, after, strict=True) for k in a)


# rank views ---------------------------------------------------------------------------------------------------


def test_rank_views_truncate_the_factors_and_keep_the_rest() -> None:
    state = _random_state(0)

    view = rank_view(state, 2)

    assert lora_ranks(state) == {"blocks.0.qkv": 4, "stem.conv": 4} and full_rank(state) == 4
    assert lora_ranks(view) == {"blocks.0.qkv": 2, "stem.conv": 2}
    assert torch.equal(view[A_KEY], state[A_KEY][:2]) and torch.equal(view[B_KEY], state[B_KEY][:, :2])
    assert torch.equal(view[CONV_A], state[CONV_A][:2]) and view[CONV_B].shape == (4, 2, 1, 1)
    assert view[CONV_B].is_contiguous() and view[HEAD] is state[HEAD]
    assert set(head_view(state)) == {HEAD, "head.bias"} == set(variant_view(state, 0))
    assert variant_view(state, 4).keys() == state.keys()
    for rank in (0, 5, True):
        with pytest.raises(ValueError, match="rank in 1..4"):
            rank_view(state, rank)
    with pytest.raises(ValueError, match="one LoRA rank across layers"):
        full_rank({**state, **{k: v for k, v in rank_view(state, 2).items() if k in (A_KEY, B_KEY)}})
    assert full_rank(head_view(state)) == 0


def test_variant_names_and_view_alpha() -> None:
    assert [variant_rank(n) for n in ("head", "lora-1", "lora-16")] == [0, 1, 16]
    assert [variant_name(r) for r in (0, 1, 16)] == ["head", "lora-1", "lora-16"]
    for bad in ("synqt", "lora-0", "lora-x", "lora-01"):
        with pytest.raises(ValueError, match="not a mixed-rank variant"):
            variant_rank(bad)
    assert view_config_alpha(8.0, 1, 4) == 2.0 and view_config_alpha(8.0, 4, 4) == 8.0
    with pytest.raises(ValueError, match="rank must be in 1..4"):
        view_config_alpha(8.0, 5, 4)
    with pytest.raises(ValueError, match="alpha must be positive"):
        view_config_alpha(0.0, 1, 4)


def test_a_peft_view_computes_the_truncated_delta() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    def lora_linear(rank: int, alpha: float) -> torch.nn.Sequential:
        torch.manual_seed(0)  # the same base weights for both
        model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"])  # type: ignore[arg-type]
        inject_adapter_in_model(config, model)  # in place
        return model

    full = lora_linear(4, 8.0)
    g = torch.Generator().manual_seed(1)
    state = {n: torch.randn(p.shape, generator=g) for n, p in full.named_parameters() if "lora_" in n}
    full.load_state_dict(state, strict=False)
    view = lora_linear(2, view_config_alpha(8.0, 2, 4))
    assert not view.load_state_dict(rank_view(state, 2), strict=False).unexpected_keys
    x = torch.randn(5, 3, generator=g)

    torch.manual_seed(0)
    base = torch.nn.Linear(3, 2)  # the frozen weights both wrap

    with torch.no_grad():
        full_delta, view_delta = full(x) - base(x), view(x) - base(x)

    a, b = state["0.lora_A.default.weight"], state["0.lora_B.default.weight"]
    assert torch.allclose(full_delta, x @ (8.0 / 4 * b @ a).T, atol=1e-6)
    assert torch.allclose(view_delta, x @ (8.0 / 4 * b[:, :2] @ a[:2]).T, atol=1e-6)  # the same scaling 8 / 4


def test_the_new_aggregators_are_registered_with_their_configs() -> None:
    assert AGGREGATORS.get("hetlora").config_class.__name__ == "AggregatorConfig"
    assert aggregator_config("flexlora", dead_rtol=1e-3).dead_rtol == 1e-3  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="no lora_A/lora_B pairs"):
        build_aggregator(aggregator_config("flexlora"))({"w": torch.zeros(1)}, [{"w": torch.ones(1)}], [1])
    plain = build_aggregator(aggregator_config("hetlora"))({"w": torch.zeros(1)}, [{"w": torch.ones(1)}], [1])
    assert torch.equal(plain.state["w"], torch.ones(1))
