"""Registry of hybrid backbone families: where attention, MLP and convolution layers live in each."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn

from fedpetah.registry import Registry

LAYER_KINDS = ("attention", "mlp", "pointwise", "conv")
"""Kinds of adaptable layers (all dense: ``groups == 1``):

- ``attention``: projections inside an attention module (q/k/v/qkv, output projection);
- ``mlp``: Linear / 1x1 layers of the feed-forward part of a block that contains attention;
- ``pointwise``: Linear / 1x1 convolutions of purely convolutional blocks and stems;
- ``conv``: dense k x k convolutions (k > 1).
Depthwise and grouped convolutions are never adapter targets.
"""


@dataclass(frozen=True)
class BackboneFamily:
    """What the library needs to know about one family of timm hybrids."""

    name: str
    prefixes: tuple[str, ...]
    attention_classes: tuple[str, ...]
    block_classes: tuple[str, ...]
    min_img_size: int = 32
    fixed_img_size: bool = False
    excluded: tuple[str, ...] = ()
    create_kwargs: Callable[[int], dict[str, object]] = field(default=lambda size: {})

    def matches(self, model_name: str) -> bool:
        return model_name.startswith(self.prefixes) and not model_name.startswith(self.excluded)

    def is_attention(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.attention_classes

    def classify_layers(self, backbone: nn.Module) -> dict[str, str]:
        """Map each adaptable layer's qualified name to one of :data:`LAYER_KINDS`."""
        attention_roots = [n for n, m in backbone.named_modules() if self.is_attention(m)]
        block_roots = [
            n
            for n, m in backbone.named_modules()
            if type(m).__name__ in self.block_classes
            and any(a.startswith(n + ".") for a in attention_roots)
        ]
        kinds: dict[str, str] = {}
        for name, module in backbone.named_modules():
            if isinstance(module, nn.Conv2d):
                if module.groups != 1:
                    continue
                pointwise = module.kernel_size == (1, 1)
            elif isinstance(module, nn.Linear):
                pointwise = True
            else:
                continue
            if _under(name, attention_roots):
                kinds[name] = "attention"
            elif not pointwise:
                kinds[name] = "conv"
            elif _under(name, block_roots):
                kinds[name] = "mlp"
            else:
                kinds[name] = "pointwise"
        return kinds

    def target_names(self, backbone: nn.Module, kinds: tuple[str, ...]) -> list[str]:
        """Qualified names of the layers of the given kinds; unknown kinds raise."""
        unknown = set(kinds) - set(LAYER_KINDS)
        if unknown:
            raise ValueError(f"unknown layer kinds {sorted(unknown)}; valid: {list(LAYER_KINDS)}")
        return [n for n, k in self.classify_layers(backbone).items() if k in kinds]


def _under(name: str, roots: list[str]) -> bool:
    return any(name.startswith(root + ".") for root in roots)


FAMILIES: Registry[BackboneFamily] = Registry("backbone family")

for _family in (
    BackboneFamily(
        name="efficientvit",
        prefixes=("efficientvit_b", "efficientvit_l", "test_efficientvit"),  # test_*: fedpetah/backbone/tiny.py
        attention_classes=("LiteMLA",),
        block_classes=("EfficientVitBlock", "EfficientVitLargeBlock"),
    ),
    BackboneFamily(
        name="edgenext",
        prefixes=("edgenext_",),
        attention_classes=("CrossCovarianceAttn",),
        block_classes=("SplitTransposeBlock",),
    ),
    BackboneFamily(
        name="mobilevit",
        prefixes=("mobilevit_",),
        attention_classes=("Attention",),
        block_classes=("Block",),
    ),
    BackboneFamily(
        name="mobilevitv2",
        prefixes=("mobilevitv2_",),
        attention_classes=("LinearSelfAttention",),
        block_classes=("LinearTransformerBlock",),
    ),
    BackboneFamily(
        name="mobilenetv4_hybrid",
        prefixes=("mobilenetv4_hybrid_",),
        attention_classes=("MultiQueryAttention2d",),
        block_classes=("MobileAttention",),
    ),
    BackboneFamily(
        name="efficientformerv2",
        prefixes=("efficientformerv2_",),
        attention_classes=("Attention2d", "Attention2dDownsample"),
        block_classes=("EfficientFormerV2Block", "Downsample"),
        fixed_img_size=True,
        create_kwargs=lambda size: {"img_size": size},
    ),
):
    FAMILIES.add(_family.name, _family)


def family_of(model_name: str) -> BackboneFamily:
    """The family of a timm model name; unsupported names fail with the supported ones."""
    for name in FAMILIES:
        family = FAMILIES.get(name)
        if family.matches(model_name):
            return family
    raise ValueError(
        f"unsupported backbone {model_name!r}; supported: {', '.join(supported_models())}"
    )


def supported_models() -> list[str]:
    """Every timm model name that belongs to a registered family."""
    import timm

    names: list[str] = []
    for fam_name in FAMILIES:
        family = FAMILIES.get(fam_name)
        for prefix in family.prefixes:
            names += [n for n in timm.list_models(prefix + "*") if family.matches(n)]
    return sorted(set(names))


def compile_targets(names: list[str]) -> str:
    """A regex (peft ``target_modules`` string form, full match) selecting exactly ``names``."""
    if not names:
        raise ValueError("no target layers selected")
    return "|".join(re.escape(n) for n in names)
