"""Mixed fleets: the run's variants, the assignment policies, the simulated tiers, the head variant's training."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import pytest
import torch

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.assignment import AssignmentConfig, build_policy, run_variants
from fedpetah.backbone import Backbone
from fedpetah.config import FleetConfig
from fedpetah.serving.memory_model import variant_config

NEEDS = {"head": 13.0, "lora-1": 17.5, "lora-2": 17.6, "lora-4": 17.8}
VARIANTS = ("head", "lora-1", "lora-2", "lora-4")


def test_a_lora_run_serves_its_head_and_its_measured_lower_ranks() -> None:
    assert run_variants(adapter_config("lora")) == VARIANTS  # rank 4
    assert run_variants(adapter_config("lora", rank=3)) == ("head", "lora-1", "lora-2", "lora-3")
    assert run_variants(adapter_config("lora", rank=1)) == ("head", "lora-1")
    assert run_variants(adapter_config("dora")) == ("dora",)  # a view of DoRA is no exact truncation
    assert run_variants(adapter_config("lora", freeze_a=True)) == ("lora",)
    assert run_variants(adapter_config("synqt")) == ("synqt",)


@pytest.mark.parametrize(("policy", "budgets", "expected"), [
    # margin 0.2: head needs 15.6, lora-1 21.0, lora-2 21.12, lora-4 21.36
    ("budget", [None, 15.5, 15.6, 21.0, 21.2, 21.36, 1000.0], [
        "lora-4", None, "head", "lora-1", "lora-2", "lora-4", "lora-4"]),
    ("strict", [None, 15.6, 21.35, 21.36], ["lora-4", None, None, "lora-4"]),
    ("uniform", [None, 0.5, 1000.0], ["lora-4", "lora-4", "lora-4"]),
])
def test_policies_choose_by_budget_with_the_margin(policy: str, budgets: list[float | None],
                                                   expected: list[str | None]) -> None:
    chosen = build_policy(AssignmentConfig(policy, margin=0.2))
    assert [chosen.choose(b, NEEDS, VARIANTS) for b in budgets] == expected


def test_assignment_and_fleet_configs_are_validated() -> None:
    with pytest.raises(ValueError, match="assignment.name must be one of budget, strict, uniform"):
        AssignmentConfig("greedy")
    with pytest.raises(ValueError, match="assignment.margin"):
        AssignmentConfig("budget", margin=-0.1)
    with pytest.raises(ValueError, match="fleet.shares must be positive and add up to 1"):
        FleetConfig("mixed", shares=(0.5, 0.4, 0.2))
    with pytest.raises(ValueError, match="one positive budget per tier"):
        FleetConfig("mixed", budgets_mb=(1.0, 2.0))
    with pytest.raises(ValueError, match="fleet.name"):
        FleetConfig("tiny")


def test_simulated_tiers_hold_their_shares_and_are_the_same_for_everyone() -> None:
    fleet = FleetConfig("mixed", budgets_mb=(15.0, 21.2, 30.0))
    tiers = [fleet.tier(0, p, 50) for p in range(50)]
    assert Counter(tiers) == {0: 10, 1: 25, 2: 15}
    assert tiers == [FleetConfig("mixed").tier(0, p, 50) for p in range(50)]  # from the seed alone
    assert tiers != [fleet.tier(1, p, 50) for p in range(50)]
    assert [fleet.budget_mb(0, p, 50) for p in range(3)] == [(15.0, 21.2, 30.0)[t] for t in tiers[:3]]
    assert FleetConfig().tier(0, 3, 50) is None and FleetConfig("mixed").budget_mb(0, 3, 50) is None


def test_the_head_variant_loads_the_lora_it_is_sent_and_trains_the_head_alone(
        tiny_backbone: Callable[..., Backbone]) -> None:
    backbone = tiny_backbone()
    run = adapter_config("lora", rank=2)
    full = build_adapter(run, backbone, 3)
    with torch.no_grad():  # a trained global adapter: LoRA B no longer zero
        for value in full.trainable().values():
            value.add_(0.05)
    sent = full.state()
    head = build_adapter(variant_config(run, "head"), backbone, 3)
    head.load_state(sent)
    assert sorted(head.state()) == ["head.bias", "head.weight"]
    x = torch.rand(4, backbone.in_chans, backbone.img_size, backbone.img_size)
    torch.testing.assert_close(head.model(x), full.model(x))  # the LoRA it was sent is in its forward
    loss = head.model(x).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is None for n, p in head.model.named_parameters() if not n.startswith("head."))
    lora2 = variant_config(run, "lora-1")
    assert dataclasses.asdict(lora2) | {"rank": 2, "alpha": run.alpha} == dataclasses.asdict(run)
    assert lora2.alpha / 1 == run.alpha / run.rank  # the views keep alpha / rank


def test_after_a_no_budget_answer_budget_offers_poorer_strict_nothing_uniform_the_same() -> None:
    assert build_policy(AssignmentConfig("budget")).after_refusal(VARIANTS, "lora-2") == ("head", "lora-1")
    assert build_policy(AssignmentConfig("budget")).after_refusal(VARIANTS, "head") == ()
    assert build_policy(AssignmentConfig("strict")).after_refusal(VARIANTS, "lora-4") == ()
    assert build_policy(AssignmentConfig("uniform")).after_refusal(VARIANTS, "lora-4") == VARIANTS
