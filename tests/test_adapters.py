"""The adapter contract for every registered adapter, then LoRA/DoRA/PETAH specifics, on tiny backbones."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from fedpetah.adapters import ADAPTERS, Adapter, AdapterConfig, adapter_config, build_adapter
from fedpetah.adapters.lora import PEFT_ADAPTER, LoraAdapter, LoraConfig, lora_layers
from fedpetah.adapters.petah import norm_parameters
from fedpetah.backbone import Backbone, build_backbone
from fedpetah.config import BackboneConfig, TrainConfig

NUM_CLASSES = 3
HYBRID = "test_efficientvit"  # the tiny test hybrid (fedpetah/backbone/tiny.py), where any hybrid will do
CONTRACT_MODELS = ("efficientvit_b0", "edgenext_xx_small", "mobilevit_xxs")
ATTACH_ONLY_MODELS = ("mobilevitv2_050", "mobilenetv4_hybrid_medium", "efficientformerv2_s0")
LORA_TENSOR = (".lora_A.", ".lora_B.")


def _is_head(name: str) -> bool:
    return name.startswith("head.")


EXPECTED_TRAINABLE: dict[str, Callable[[str], bool]] = {
    "head": _is_head,
    "bias": lambda n: _is_head(n) or n.endswith(".bias"),
    "full": lambda n: True,
    "lora": lambda n: _is_head(n) or any(t in n for t in LORA_TENSOR),
    "dora": lambda n: _is_head(n) or any(t in n for t in (*LORA_TENSOR, ".lora_magnitude_vector.")),
}
"""Which parameter names each adapter may train (petah is checked against its norm layers below)."""


_BACKBONES: dict[str, Backbone] = {}


def backbone(name: str) -> Backbone:
    """A random-weight backbone at 32 px, built once per test session."""
    if name not in _BACKBONES:
        _BACKBONES[name] = build_backbone(BackboneConfig(name=name, img_size=32, weights="random"))
    return _BACKBONES[name]


def make(name: str, model: str = HYBRID, **fields: object) -> Adapter:
    return build_adapter(adapter_config(name, **fields), backbone(model), NUM_CLASSES)


def make_lora(name: str = "lora", model: str = HYBRID, **fields: object) -> LoraAdapter:
    adapter = make(name, model, **fields)
    assert isinstance(adapter, LoraAdapter)
    return adapter


def lora_weight(layer: LoraLayer, which: str) -> torch.Tensor:
    """The A or B weight of one peft LoRA layer."""
    weight = getattr(layer, which)[PEFT_ADAPTER].weight
    assert isinstance(weight, torch.Tensor)
    return weight


def images(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturb(adapter: Adapter, seed: int = 1, scale: float = 0.05) -> None:
    """Move every trainable tensor away from its init (LoRA's B starts at zero, so merge tests need this)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable().values():
            param.add_(scale * torch.randn(param.shape, generator=gen))


def logits(adapter_or_model: Adapter | nn.Module, x: torch.Tensor) -> torch.Tensor:
    model = adapter_or_model.model if isinstance(adapter_or_model, Adapter) else adapter_or_model
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def check_contract(name: str, model: str) -> None:
    """Trainable set, one optimizer step, state round trip, merge and bad states for one adapter."""
    adapter = make(name, model)
    trainable = adapter.trainable()
    names = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert names == set(trainable) and {"head.weight", "head.bias"} <= names
    if name in EXPECTED_TRAINABLE:
        assert all(EXPECTED_TRAINABLE[name](n) for n in names), sorted(names)[:5]
    if name != "head":
        assert any(not _is_head(n) for n in names), f"{name} trains only the head"

    # One SGD step: every trainable tensor gets a gradient, every other tensor stays bit-identical.
    frozen = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if not p.requires_grad}
    before = adapter.state()
    adapter.model.train()
    optimizer = torch.optim.SGD(list(trainable.values()), lr=0.5)
    loss = nn.functional.cross_entropy(adapter.model(images()), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None for p in trainable.values())
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in adapter.model.named_parameters() if n in frozen)
    after = adapter.state()
    assert not torch.equal(after["head.weight"], before["head.weight"])
    lora_b = [k for k in after if ".lora_B." in k]  # some stay put: timm zero-inits residual BN gammas
    assert not lora_b or any(not torch.equal(after[k], before[k]) for k in lora_b)

    # State round trip into a fresh adapter built under a different global RNG.
    perturb(adapter)
    state = adapter.state()
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    torch.manual_seed(1234)
    fresh = make(name, model)
    x = images(seed=5)
    assert not torch.allclose(logits(fresh, x), logits(adapter, x))
    fresh.load_state(state)
    assert torch.equal(logits(fresh, x), logits(adapter, x))

    # Merge: a plain frozen module with the same logits and no adapter modules left.
    merged = adapter.merge()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("lora_" in n or p.requires_grad for n, p in merged.named_parameters())
    torch.testing.assert_close(logits(merged, x), logits(adapter, x), atol=1e-5, rtol=1e-4)
    assert set(merged.get_submodule("backbone").state_dict()) == set(backbone(model).module.state_dict())

    # Bad states raise and leave the adapter untouched.
    key = next(k for k in state if not _is_head(k)) if name != "head" else "head.weight"
    with pytest.raises(KeyError, match="missing"):
        fresh.load_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(KeyError, match="unexpected"):
        fresh.load_state({**state, "backbone.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state({**state, key: torch.zeros(*state[key].shape, 2)})
    with pytest.raises(ValueError, match="dtype"):
        fresh.load_state({**state, key: state[key].to(torch.int64)})
    assert torch.equal(logits(fresh, x), logits(adapter, x))


def test_registry_holds_every_adapter_with_its_config() -> None:
    assert {"head", "bias", "full", "lora", "dora", "petah"} <= set(ADAPTERS.names())
    for name in ADAPTERS.names():
        assert ADAPTERS.get(name).name == name
        assert isinstance(adapter_config(name), AdapterConfig)


@pytest.mark.parametrize("name", ADAPTERS.names())
def test_contract(name: str) -> None:
    check_contract(name, HYBRID)


@pytest.mark.parametrize("model", CONTRACT_MODELS)
@pytest.mark.parametrize("name", ["lora", "petah"])
def test_contract_other_families(name: str, model: str) -> None:
    check_contract(name, model)


@pytest.mark.parametrize("model", ATTACH_ONLY_MODELS)
@pytest.mark.parametrize("name", ["lora", "dora", "petah"])
def test_attach_other_families(name: str, model: str) -> None:
    adapter = make(name, model)
    assert lora_layers(adapter.model.backbone)
    assert adapter.num_trainable() > sum(p.numel() for p in adapter.model.head.parameters())
    assert logits(adapter, images(n=2)).shape == (2, NUM_CLASSES)


def test_zero_trainable_parameters_raise() -> None:
    class Nothing(Adapter):
        name = "nothing"

        def attach(self) -> None:
            self.model.head.requires_grad_(False)

    with pytest.raises(ValueError, match="zero trainable"):
        Nothing(backbone(HYBRID), NUM_CLASSES, AdapterConfig(name="nothing"))


def test_targets_resolve_per_family_and_regex_full_matches() -> None:
    adapter = make_lora(targets=("attention", "mlp"))
    assert set(adapter.targets.values()) == {"attention", "mlp"}
    assert set(lora_layers(adapter.model.backbone)) == set(adapter.targets)
    regex = r"stages\.\d\.blocks\.\d+\.context_module\.main\.qkv\.conv"  # one block in each of 2 stages
    picked = make_lora(target_regex=regex)
    assert len(picked.targets) == 2 and all(k.endswith("qkv.conv") for k in picked.targets)
    with pytest.raises(ValueError, match=r"select no adaptable layer[\s\S]*attention: stages"):
        make("lora", target_regex=r"stages\.3\.blocks\.1\.context_module\.main\.qkv")  # a container
    with pytest.raises(ValueError, match="select no adaptable layer"):
        make("lora", "mobilenetv4_hybrid_medium", targets=("mlp",))


def test_config_validation() -> None:
    for bad in ({"rank": 0}, {"alpha": 0.0}, {"dropout": 1.0}, {"targets": ("attn",)}, {"targets": ()},
                {"target_regex": "("}):
        with pytest.raises(ValueError, match=rf"^lora\.{next(iter(bad))} "):  # the message names the field
            adapter_config("lora", **bad)
    with pytest.raises(ValueError, match="conv_rank"):
        adapter_config("petah", conv_rank=0)
    # a device rebuilds these configs from a server's request, then builds what they say: sizes are bounded
    with pytest.raises(ValueError, match=r"^lora\.rank must be in \[1, 1024\], got 1000000"):
        adapter_config("lora", rank=10**6)
    with pytest.raises(ValueError, match=r"petah\.conv_rank must be in \[1, 1024\]"):
        adapter_config("petah", conv_rank=4096)
    for key, value in {"grid": 33, "num_queries": 257, "query_dim": 8192, "frozen_batch": 10**5}.items():
        with pytest.raises(ValueError, match=rf"synqt\.{key} must be at most"):
            adapter_config("synqt", **{key: value})
    with pytest.raises(ValueError, match="train.epochs must be at most 1000"):
        TrainConfig(epochs=10**6)
    with pytest.raises(ValueError, match="batch_size at most 4096"):
        TrainConfig(batch_size=10**5)
    assert adapter_config("lora", rank=1024).rank == 1024 and TrainConfig(epochs=1000, batch_size=4096).epochs == 1000
    with pytest.raises(ValueError, match="adapter 'dora' takes DoraConfig, not LoraConfig"):
        LoraConfig(name="dora")
    with pytest.raises(TypeError, match="'rnk'"):
        adapter_config("lora", rnk=3)
    with pytest.raises(TypeError, match="PetahConfig"):
        ADAPTERS.get("petah")(backbone(HYBRID), NUM_CLASSES, LoraConfig(name="lora"))
    listed = adapter_config("lora", targets=["attention", "conv"])
    assert isinstance(listed, LoraConfig) and listed.targets == ("attention", "conv")


def test_construction_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    first = make("lora", init_seed=7)
    rng = torch.get_rng_state()
    torch.manual_seed(99)
    second = make("lora", init_seed=7)
    torch.set_rng_state(rng)
    make("lora", init_seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    a, b = first.state(), second.state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = make("lora", init_seed=8).state()
    lora_a = [k for k in a if ".lora_A." in k]
    assert lora_a and all(not torch.equal(a[k], other[k]) for k in lora_a)


def test_freeze_a_is_ffa_lora() -> None:
    adapter = make("lora", freeze_a=True, targets=("attention", "mlp"), init_seed=3)
    layers = lora_layers(adapter.model.backbone)
    a_before = {n: lora_weight(m, "lora_A").detach().clone() for n, m in layers.items()}
    state = adapter.state()
    assert not any(".lora_A." in k for k in state)
    assert sum(".lora_B." in k for k in state) == len(layers)
    reference = make("lora", targets=("attention", "mlp"), init_seed=3).state()
    for n, weight in a_before.items():  # every party derives the same A from init_seed
        assert torch.equal(weight, reference[f"backbone.{n}.lora_A.{PEFT_ADAPTER}.weight"])

    optimizer = torch.optim.SGD(list(adapter.trainable().values()), lr=0.5)
    adapter.model.train()
    nn.functional.cross_entropy(adapter.model(images()), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for n, m in layers.items():
        assert torch.equal(lora_weight(m, "lora_A"), a_before[n])
        assert lora_weight(m, "lora_B").abs().sum() > 0


def test_petah_ranks_by_kind_and_norms() -> None:
    adapter = make_lora("petah", rank=4, conv_rank=2)
    assert {"attention", "mlp", "pointwise", "conv"} == set(adapter.targets.values())
    for name, layer in lora_layers(adapter.model.backbone).items():
        expected = 4 if adapter.targets[name] in ("attention", "mlp") else 2
        assert layer.r[PEFT_ADAPTER] == expected and layer.scaling[PEFT_ADAPTER] == pytest.approx(2.0)
    norms = {f"backbone.{n}" for n in norm_parameters(adapter.model.backbone)}
    trainable = set(adapter.trainable())
    assert norms and norms <= trainable
    assert all(_is_head(n) or n in norms or any(t in n for t in LORA_TENSOR) for n in trainable)
    assert not norms & set(make("petah", train_norms=False).trainable())


def test_update_sizes_order_head_lora_petah_full() -> None:
    # a real backbone's proportions: the tiny test hybrid is too small for petah to stay under a tenth of it
    sizes = {name: make(name, "efficientvit_b0").num_trainable() for name in ("head", "lora", "petah", "full")}
    assert sizes["head"] < sizes["lora"] < sizes["petah"] < sizes["full"] / 10
