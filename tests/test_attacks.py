"""Byzantine attacks on tiny states: what each sends, that it is seeded, and that the default bounds hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpetah.aggregation import BoundedAggregation, BoundsConfig, aggregator_config, build_aggregator
from fedpetah.aggregation.validate import InvalidUpdate, StateDict, check_count, validate_update
from fedpetah.attacks import ATTACKS, HUGE_SCALE, SINGLE, AttackConfig, byzantine_clients, corrupt

REFERENCE = {"a": torch.zeros(2, 2), "b": torch.ones(3)}
HONEST = {"a": torch.tensor([[0.1, -0.2], [0.0, 0.3]]), "b": torch.tensor([1.1, 0.9, 1.0])}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _reason(state: StateDict, count: float) -> str | None:
    """Why the server refuses this reply (None: accepted as a valid update)."""
    try:
        check_count(count)
        validate_update(state, REFERENCE)
    except InvalidUpdate as error:
        return error.reason
    return None


@pytest.mark.parametrize(
    ("name", "reason"),
    [("non_finite", "non_finite"), ("wrong_shape", "shape"), ("missing_key", "missing_keys"),
     ("nan_count", "weight"), ("inf_count", "weight"), ("negative_count", "weight"),
     ("huge_norm", None), ("inflated_count", None), ("noise", None)],
)
def test_each_attack_is_caught_by_validation_or_left_to_the_bounds(name: str, reason: str | None) -> None:
    honest = {k: v.clone() for k, v in HONEST.items()}
    state, count = ATTACKS.get(name)(honest, REFERENCE, 40, _rng())
    assert _reason(state, count) == reason
    assert all(torch.equal(honest[k], HONEST[k]) for k in HONEST)  # the honest state is not mutated


def test_the_finite_attacks_send_what_they_say() -> None:
    state, count = ATTACKS.get("huge_norm")(HONEST, REFERENCE, 40, _rng())
    assert count == 40.0
    assert torch.equal(state["a"], torch.tensor([[-1e3, 2e3], [0.0, -3e3]]))  # -1e4 x the honest delta
    assert torch.allclose(state["b"], 1 - HUGE_SCALE * (HONEST["b"] - 1))
    assert ATTACKS.get("inflated_count")(HONEST, REFERENCE, 40, _rng())[1] == 1e6
    assert ATTACKS.get("negative_count")(HONEST, REFERENCE, 40, _rng())[1] < 0
    assert math.isnan(ATTACKS.get("nan_count")(HONEST, REFERENCE, 40, _rng())[1])
    noisy, _ = ATTACKS.get("noise")(HONEST, REFERENCE, 40, _rng())
    assert noisy["a"].dtype == torch.float32 and (noisy["a"] - HONEST["a"]).abs().max() > 0.05


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attacks_are_seeded_by_the_passed_generator(name: str) -> None:
    first = ATTACKS.get(name)(HONEST, REFERENCE, 40, _rng(3))
    again = ATTACKS.get(name)(HONEST, REFERENCE, 40, _rng(3))
    assert first[0].keys() == again[0].keys()
    for key in first[0]:
        torch.testing.assert_close(first[0][key], again[0][key], equal_nan=True, rtol=0, atol=0)
    assert first[1] == again[1] or (math.isnan(first[1]) and math.isnan(again[1]))


def test_mix_uses_every_single_attack() -> None:
    rng = _rng(1)
    reasons = {_reason(*ATTACKS.get("mix")(HONEST, REFERENCE, 40, rng)) for _ in range(200)}
    assert reasons == {"non_finite", "shape", "missing_keys", "weight", None}
    assert "mix" not in SINGLE and len(SINGLE) == 9


def test_byzantine_clients_are_a_seeded_fraction() -> None:
    bad = byzantine_clients(50, 0.2, seed=0)
    assert len(bad) == 10 and bad == byzantine_clients(50, 0.2, seed=0) and bad <= set(range(50))
    assert bad != byzantine_clients(50, 0.2, seed=1) and not byzantine_clients(50, 0.0, seed=0)
    honest_client = min(set(range(50)) - bad)
    config = AttackConfig("huge_norm", 0.2)
    kept, count = corrupt(config, clients=50, client=honest_client, seed=0, round=1, state=HONEST,
                          reference=REFERENCE, num_examples=40)
    assert kept is HONEST and count == 40
    sent, _ = corrupt(config, clients=50, client=min(bad), seed=0, round=1, state=HONEST, reference=REFERENCE,
                      num_examples=40)
    assert torch.equal(sent["a"], ATTACKS.get("huge_norm")(HONEST, REFERENCE, 40, _rng())[0]["a"])
    with pytest.raises(ValueError, match="simulation.attack"):
        AttackConfig("nope")
    with pytest.raises(ValueError, match="simulation.attack_fraction"):
        AttackConfig("mix", 1.5)


def _honest_round(clients: int, seed: int) -> list[StateDict]:
    g = torch.Generator().manual_seed(seed)
    return [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in HONEST.items()} for _ in range(clients)]


@pytest.mark.parametrize("name", ATTACKS.names())
def test_default_bounds_keep_a_fifth_of_attackers_near_the_honest_mean(name: str) -> None:
    honest = _honest_round(8, seed=0)
    replies = [(s, 40.0 + 5 * i) for i, s in enumerate(honest)]
    rng = _rng(7)
    replies += [ATTACKS.get(name)(s, REFERENCE, 40, rng) for s in _honest_round(2, seed=1)]
    aggregate = BoundedAggregation(build_aggregator(aggregator_config("fedavg")), BoundsConfig())
    result = aggregate(REFERENCE, [s for s, _ in replies], [c for _, c in replies])
    assert result.aggregate is not None
    honest_mean = {k: torch.stack([s[k] for s in honest]).mean(0) for k in HONEST}
    honest_spread = math.sqrt(sum(float((s[k] - honest_mean[k]).square().sum()) for s in honest for k in s) / 8)
    gap = math.sqrt(sum(float((result.aggregate.state[k] - honest_mean[k]).square().sum()) for k in HONEST))
    assert gap < honest_spread  # within one honest client's typical distance from the honest mean
    unbounded = BoundedAggregation(build_aggregator(aggregator_config("fedavg")), BoundsConfig.off())
    loose = unbounded(REFERENCE, [s for s, _ in replies], [c for _, c in replies]).aggregate
    worse = {"huge_norm": 1000.0, "noise": 1.5}  # without bounds, how much further from the honest mean
    if name in worse:
        assert loose is not None
        far = math.sqrt(sum(float((loose.state[k] - honest_mean[k]).square().sum()) for k in HONEST))
        assert far > worse[name] * gap


def test_the_attack_travels_to_simulated_clients_through_the_environment() -> None:
    from fedpetah.attacks import from_env, to_env
    from fedpetah.wire.protocol import ATTACK_ENV

    assert from_env({}) == AttackConfig() and AttackConfig().name == "none"
    assert from_env({ATTACK_ENV: to_env(AttackConfig("noise", 0.4))}) == AttackConfig("noise", 0.4)
    with pytest.raises(ValueError, match="simulation.attack"):
        from_env({ATTACK_ENV: '{"name": "evil", "fraction": 0.2}'})


@pytest.mark.parametrize(
    ("name", "decode_reason", "aggregation_reason"),
    [("non_finite", None, "non_finite"), ("wrong_shape", "shape", None), ("missing_key", "keys", None),
     ("nan_count", "count", None), ("inf_count", "count", None), ("negative_count", "count", None),
     ("inflated_count", None, None), ("huge_norm", None, "norm_outlier"), ("noise", None, None)],
)
def test_a_corrupted_reply_meets_the_real_protocol_then_the_bounds(
        name: str, decode_reason: str | None, aggregation_reason: str | None) -> None:
    from fedpetah.attacks import corrupt_reply
    from fedpetah.wire.protocol import ProtocolError, Status, TaskInfo, TrainReply, TrainRequest, specs
    from flower_glue.records import from_recorddict, to_recorddict

    reference = {k: v.numpy() for k, v in REFERENCE.items()}
    request = TrainRequest(digest="0" * 64, round=2, seed=0, clients=10, task=TaskInfo(0, "t", ("a", "b")),
                           sections={}, state=reference)
    byzantine = min(byzantine_clients(10, 0.2, seed=0))
    honest = TrainReply(Status.OK, "", {k: v.numpy() for k, v in HONEST.items()}, 40, {"train-loss": 0.5})
    sent = corrupt_reply(honest, request, byzantine, AttackConfig(name, 0.2))
    assert corrupt_reply(honest, request, byzantine, AttackConfig("none")) is honest
    try:
        decoded = TrainReply.decode(from_recorddict(to_recorddict(sent.encode())), specs(reference))
    except ProtocolError as error:
        assert error.reason == decode_reason
        return
    assert decode_reason is None and decoded.state is not None
    replies = [{k: torch.from_numpy(v.copy()) for k, v in decoded.state.items()}] + _honest_round(4, seed=2)
    result = BoundedAggregation(build_aggregator(aggregator_config("fedavg")), BoundsConfig())(
        REFERENCE, replies, [decoded.num_examples, 40, 40, 40, 40])
    assert [r.reason for r in result.rejected] == ([aggregation_reason] if aggregation_reason else [])
    assert result.metrics["max_weight_share"] <= 3 / 7  # one claim counts at most 3x the median claim
