"""Structured pruning: every family prunes, stays finite and trainable, and replays from its JSON history."""

from __future__ import annotations

import copy
import json
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from fedpetah.backbone import Backbone, create_timm_model, family_of
from fedpetah.config import PruningConfig
from fedpetah.model import TaskModel
from fedpetah.pruning import prune_backbone, prune_report, replay_pruning

SIZE = 32
MODELS = [
    "efficientvit_b0",
    "edgenext_xx_small",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "mobilenetv4_hybrid_medium",
    "efficientformerv2_s0",
]
CASES = [(name, ratio) for name in MODELS for ratio in (0.3, 0.5)]


def fresh(name: str) -> Backbone:
    module, kwargs = create_timm_model(name, SIZE)
    module.eval().requires_grad_(False)
    return Backbone(module, name, family_of(name), SIZE, create_kwargs=kwargs)


@cache
def base(name: str) -> Backbone:
    """Random weights, with noise on zero-initialised tensors (biases, attention biases, layer scales)."""
    torch.manual_seed(0)
    backbone = fresh(name)
    with torch.no_grad():
        for tensor in backbone.module.parameters():
            tensor.add_(0.05 * torch.randn_like(tensor))
    return backbone


@cache
def pruned(name: str, ratio: float) -> Backbone:
    return prune_backbone(base(name), PruningConfig(ratio=ratio))


@cache
def images() -> torch.Tensor:
    return torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def features(backbone: Backbone) -> torch.Tensor:
    with torch.no_grad():
        return backbone.module(images())


def replayed(backbone: Backbone) -> Backbone:
    """The pruned tree rebuilt from JSON on a fresh timm model, weights loaded strictly."""
    rebuilt = fresh(backbone.model_name)
    history = json.loads(json.dumps(backbone.pruning_history))
    replay_pruning(rebuilt.module, rebuilt.family, history, SIZE)
    rebuilt.module.load_state_dict(backbone.module.state_dict(), strict=True)
    rebuilt.module.eval()
    return rebuilt


@pytest.mark.parametrize(("name", "ratio"), CASES)
def test_pruning_shrinks_and_keeps_pooled_finite_features(name: str, ratio: float) -> None:
    before, after = base(name), pruned(name, ratio)
    out = features(after)
    assert after.num_params() < before.num_params()
    assert out.shape[0] == 4 and out.ndim == 2 and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in after.module.parameters())
    assert not after.module.training


@pytest.mark.parametrize(("name", "ratio"), CASES)
def test_replayed_history_gives_identical_features(name: str, ratio: float) -> None:
    backbone = pruned(name, ratio)
    assert torch.equal(features(replayed(backbone)), features(backbone))


@pytest.mark.parametrize(("name", "ratio"), CASES)
def test_pruned_backbone_is_retrainable(name: str, ratio: float) -> None:
    torch.manual_seed(0)
    model = TaskModel(copy.deepcopy(pruned(name, ratio).module), 3, SIZE)
    model.requires_grad_(True).train()
    labels = torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(images()), labels)
    optimizer.zero_grad()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("backbone."))
    optimizer.step()
    assert F.cross_entropy(model(images()), labels).item() != loss.item()


def test_report_counts_params_and_macs() -> None:
    report = prune_report(base("mobilevit_xxs"), pruned("mobilevit_xxs", 0.5))
    assert report.params_before == base("mobilevit_xxs").num_params()
    assert report.params_after == pruned("mobilevit_xxs", 0.5).num_params()
    assert 0 < report.mac_ratio < 1 and 0 < report.param_ratio < 1
    with pytest.raises(ValueError, match="cannot compare"):
        prune_report(base("mobilevit_xxs"), base("mobilevitv2_050"))


def test_ratio_zero_returns_untouched_copy() -> None:
    backbone = base("mobilevitv2_050")
    same = prune_backbone(backbone, PruningConfig(ratio=0.0, remove_blocks=2))
    assert same.module is not backbone.module and same.pruning_history == []
    assert same.num_params() == backbone.num_params()
    assert torch.equal(features(same), features(backbone))


def test_input_backbone_is_left_untouched() -> None:
    backbone = base("mobilevit_xxs")
    params, out = backbone.num_params(), features(backbone)
    pruned("mobilevit_xxs", 0.5)
    assert backbone.num_params() == params and backbone.pruning_history == []
    assert torch.equal(features(backbone), out)


def test_heads_are_slimmed_where_the_family_allows() -> None:
    heads = [
        (s["module"], len(s["heads"])) for s in pruned("mobilevit_xxs", 0.5).pruning_history
        if s["op"] == "slim_heads"
    ]
    assert heads and all(count == 2 for _, count in heads)  # 4 heads each, half removed
    attn = pruned("mobilevit_xxs", 0.5).module.get_submodule(heads[0][0])
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * attn.head_dim
    assert not any(s["op"] == "slim_heads" for s in pruned("edgenext_xx_small", 0.5).pruning_history)


def test_block_removal_and_taylor_importance_replay() -> None:
    calibration = [torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))]
    config = PruningConfig(ratio=0.3, importance="taylor", remove_blocks=2, calibration_batches=1)
    backbone = prune_backbone(base("mobilevit_xxs"), config, calibration)
    removed = [s["module"] for s in backbone.pruning_history if s["op"] == "remove_block"]
    assert len(removed) == 2
    assert all(type(backbone.module.get_submodule(n)).__name__ == "Identity" for n in removed)
    assert torch.equal(features(replayed(backbone)), features(backbone))


def test_too_many_blocks_or_bad_calibration_raise() -> None:
    with pytest.raises(ValueError, match="only"):
        prune_backbone(base("mobilevitv2_050"), PruningConfig(ratio=0.3, remove_blocks=50))
    with pytest.raises(ValueError, match="does not match"):
        prune_backbone(
            base("mobilevitv2_050"), PruningConfig(ratio=0.3, importance="taylor"), [torch.rand(2, 3, 8, 8)]
        )


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ({"op": "width"}, "must be a list"),
        ([{"op": "explode"}], "unknown op"),
        ([{"op": "remove_block", "module": "no.such.block"}], "not a submodule"),
        ([{"op": "slim_heads", "module": "stages.2.1", "layout": "mqa", "heads": [0]}], "does not belong"),
        ([{"op": "width", "groups": [["stem.conv", True, ["0"]]]}], "list of integers"),
    ],
)
def test_malformed_history_raises(history: object, message: str) -> None:
    backbone = fresh("mobilevit_xxs")
    with pytest.raises(ValueError, match=message):
        replay_pruning(backbone.module, backbone.family, history, SIZE)  # type: ignore[arg-type]
