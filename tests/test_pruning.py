"""Structured pruning: every family prunes, stays finite and trainable, and replays from its JSON history."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.adapters.lora import LoraAdapter
from fedpetah.backbone import Backbone, create_timm_model, family_of
from fedpetah.config import PruningConfig
from fedpetah.model import TaskModel
from fedpetah.pruning import policy_of, prune_backbone, prune_report, replay_pruning
from fedpetah.pruning.structure import head_layout, remove_heads

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


def lite_heads(attn: torch.nn.Module) -> int:
    return int(attn.get_submodule("qkv.conv").out_channels) // (3 * int(attn.dim))


def lite_modules(backbone: Backbone) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in backbone.module.named_modules() if type(m).__name__ == "LiteMLA"}


def test_litemla_heads_channels_and_groups_stay_consistent() -> None:
    before, after = lite_modules(base("efficientvit_b0")), lite_modules(pruned("efficientvit_b0", 0.5))
    assert after and set(after) <= set(before)
    for name, attn in after.items():
        heads, dim, scales = lite_heads(attn), int(attn.dim), 1 + len(attn.aggreg)
        assert heads == lite_heads(before[name]) // 2
        assert attn.qkv.conv.out_channels == 3 * heads * dim
        for depthwise, grouped in attn.aggreg:
            assert depthwise.in_channels == depthwise.out_channels == depthwise.groups == 3 * heads * dim
            assert grouped.in_channels == grouped.out_channels == 3 * heads * dim and grouped.groups == 3 * heads
        assert attn.proj.conv.in_channels == scales * heads * dim
        # the ports follow the residual stream, which channel pruning narrowed
        assert attn.qkv.conv.in_channels == attn.proj.conv.out_channels == attn.proj.norm.num_features
        assert attn.qkv.conv.in_channels < before[name].qkv.conv.in_channels


def test_removing_a_litemla_head_equals_silencing_it() -> None:
    """A head only reaches the output through its columns of ``proj``: zeroing them is cutting the head."""
    name, original = next(iter(lite_modules(base("efficientvit_b0")).items()))
    heads, dim, scales = lite_heads(original), int(original.dim), 1 + len(original.aggreg)
    silenced, cut = copy.deepcopy(original), copy.deepcopy(original)
    head = heads - 2
    with torch.no_grad():
        for s in range(scales):
            silenced.proj.conv.weight[:, (s * heads + head) * dim : (s * heads + head + 1) * dim] = 0
    remove_heads(cut, head_layout("lite"), [head])
    assert lite_heads(cut) == heads - 1
    x = torch.randn(2, original.qkv.conv.in_channels, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(cut(x), silenced(x))
        assert not torch.allclose(cut(x), original(x))
    with pytest.raises(ValueError, match="invalid heads"):
        remove_heads(cut, head_layout("lite"), list(range(heads - 1)))


def test_depth_rule_removes_blocks_and_whole_attention_policy_keeps_litemla() -> None:
    policy = policy_of(family_of("efficientvit_b0"))
    removed = [s["module"] for s in pruned("efficientvit_b0", 0.5).pruning_history if s["op"] == "remove_block"]
    assert removed and all(n not in lite_modules(pruned("efficientvit_b0", 0.5)) for n in removed)
    whole = replace(policy, head_layout=None, head_skip_reason="test", prune_ports=False, depth_ratio=0.0)
    kept = prune_backbone(base("efficientvit_b0"), PruningConfig(ratio=0.5), policy=whole)
    assert not any(s["op"] in ("remove_block", "slim_heads") for s in kept.pruning_history)
    before = lite_modules(base("efficientvit_b0"))
    for name, attn in lite_modules(kept).items():
        assert [p.shape for p in attn.parameters()] == [p.shape for p in before[name].parameters()]
    assert kept.num_params() > pruned("efficientvit_b0", 0.5).num_params()
    with pytest.raises(ValueError, match="depth_ratio"):
        replace(policy, depth_ratio=1.5)


@pytest.mark.parametrize("adapter", ["lora", "petah", "synqt"])
def test_adapters_attach_to_slimmed_efficientvit(adapter: str) -> None:
    backbone = pruned("efficientvit_b0", 0.5)
    model = build_adapter(adapter_config(adapter), backbone, 3)
    trainable = model.trainable()
    assert any(not n.startswith("head.") for n in trainable)
    if adapter == "lora":
        assert isinstance(model, LoraAdapter)
        assert model.targets and all(".context_module.main." in n for n in model.targets)
    model.model.train()
    loss = F.cross_entropy(model.model(images()), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
