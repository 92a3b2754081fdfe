"""Structural edits beyond channel pruning: cutting whole attention heads and removing residual blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

HeadPart = tuple[nn.Module, bool, list[list[int]]]
"""A layer touched by head slimming: (layer, True if its output channels carry the heads, per-head indices)."""


@dataclass(frozen=True)
class HeadLayout:
    """How the heads of one attention class map onto channels, and how to update its bookkeeping.

    The callables take the timm attention module itself (typed ``Any``: its head attributes
    are plain Python attributes that ``nn.Module`` typing cannot describe).
    """

    attention_class: str
    parts: Callable[[Any], list[HeadPart]]
    set_num_heads: Callable[[Any, int], None]
    num_heads: Callable[[Any], int] = lambda attn: int(attn.num_heads)  # noqa: E731


def _vit_parts(attn: Any) -> list[HeadPart]:
    """timm ``Attention``: ``qkv`` rows are laid out (q|k|v, head, head_dim); ``proj`` columns (head, dim)."""
    if not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
        raise ValueError("head slimming of timm Attention with scale_norm or gate is not supported")
    heads, dim = int(attn.num_heads), int(attn.head_dim)
    width = heads * dim
    qkv = [[s * width + h * dim + j for s in range(3) for j in range(dim)] for h in range(heads)]
    proj = [[h * dim + j for j in range(dim)] for h in range(heads)]
    return [(attn.qkv, True, qkv), (attn.proj, False, proj)]


def _vit_set(attn: Any, heads: int) -> None:
    attn.num_heads = heads
    attn.attn_dim = heads * int(attn.head_dim)


def _mqa_parts(attn: Any) -> list[HeadPart]:
    """timm ``MultiQueryAttention2d``: per-head query channels in, per-head value channels out."""
    heads, key_dim, value_dim = int(attn.num_heads), int(attn.key_dim), int(attn.value_dim)
    query = [[h * key_dim + j for j in range(key_dim)] for h in range(heads)]
    output = [[h * value_dim + j for j in range(value_dim)] for h in range(heads)]
    return [(attn.query.proj, True, query), (attn.output.proj, False, output)]


def _mqa_set(attn: Any, heads: int) -> None:
    attn.num_heads = heads


def _lite_heads(attn: Any) -> int:
    """timm ``LiteMLA`` keeps no head count: its forward reshapes ``qkv`` into heads of ``3 * dim`` channels."""
    heads, rest = divmod(int(attn.qkv.conv.out_channels), 3 * int(attn.dim))
    if rest:
        raise ValueError(f"LiteMLA qkv width {attn.qkv.conv.out_channels} is not a multiple of 3 * dim")
    return heads


def _lite_parts(attn: Any) -> list[HeadPart]:
    """timm ``LiteMLA``: ``qkv`` rows and every aggregation branch are laid out (head, q|k|v, dim); the
    multi-scale outputs are concatenated (scale, head, dim) into ``proj``'s input."""
    heads, dim = _lite_heads(attn), int(attn.dim)
    rows = [list(range(h * 3 * dim, (h + 1) * 3 * dim)) for h in range(heads)]
    scales = 1 + len(attn.aggreg)
    proj = [[(s * heads + h) * dim + j for s in range(scales) for j in range(dim)] for h in range(heads)]
    branches = [(conv, True, rows) for branch in attn.aggreg for conv in branch]
    return [(attn.qkv.conv, True, rows), *branches, (attn.proj.conv, False, proj)]


def _lite_set(attn: Any, heads: int) -> None:
    if _lite_heads(attn) != heads:  # nothing to rewrite: the head count follows from the channels
        raise ValueError(f"LiteMLA has {_lite_heads(attn)} heads after slimming, expected {heads}")


HEAD_LAYOUTS: dict[str, HeadLayout] = {
    "vit": HeadLayout("Attention", _vit_parts, _vit_set),
    "mqa": HeadLayout("MultiQueryAttention2d", _mqa_parts, _mqa_set),
    "lite": HeadLayout("LiteMLA", _lite_parts, _lite_set, _lite_heads),
}


def head_layout(name: str) -> HeadLayout:
    if name not in HEAD_LAYOUTS:
        raise ValueError(f"unknown head layout {name!r}; valid: {sorted(HEAD_LAYOUTS)}")
    return HEAD_LAYOUTS[name]


def head_scores(attn: Any, layout: HeadLayout, taylor: bool) -> torch.Tensor:
    """Importance of each head: sum of w^2 (magnitude) or |w * dL/dw| (Taylor) over its channels."""
    scores = torch.zeros(layout.num_heads(attn))
    for layer, out_side, per_head in layout.parts(attn):
        tensors = [p for n, p in layer.named_parameters(recurse=False) if n == "weight" or (out_side and n == "bias")]
        for tensor in tensors:
            grad = tensor.grad
            if taylor and grad is None:
                raise ValueError("Taylor head importance needs gradients; none were accumulated")
            element = (tensor * grad).abs() if grad is not None and taylor else tensor.pow(2)
            dim = 0 if out_side or tensor.ndim == 1 else 1
            per_channel = element.detach().transpose(0, dim).reshape(element.shape[dim], -1).sum(1)
            scores += torch.stack([per_channel[idx].sum() for idx in per_head])
    return scores


def remove_heads(attn: Any, layout: HeadLayout, heads: Sequence[int]) -> None:
    """Physically remove ``heads`` (indices into the current heads) and update the head count."""
    if type(attn).__name__ != layout.attention_class:
        raise ValueError(f"head layout for {layout.attention_class} applied to {type(attn).__name__}")
    total = layout.num_heads(attn)
    if len(set(heads)) != len(heads) or not all(0 <= h < total for h in heads) or len(heads) >= total:
        raise ValueError(f"invalid heads {list(heads)} to remove out of {total}")
    for layer, out_side, per_head in layout.parts(attn):
        idxs = sorted(i for h in heads for i in per_head[h])
        if isinstance(layer, nn.Linear):
            (tp.prune_linear_out_channels if out_side else tp.prune_linear_in_channels)(layer, idxs)
        elif isinstance(layer, nn.Conv2d) and layer.groups == 1:
            (tp.prune_conv_out_channels if out_side else tp.prune_conv_in_channels)(layer, idxs)
        elif isinstance(layer, nn.Conv2d) and out_side:
            _drop_conv_groups(layer, idxs)
        else:
            raise ValueError(f"cannot slim heads through a {type(layer).__name__}")
    layout.set_num_heads(attn, total - len(heads))


def _drop_conv_groups(conv: nn.Conv2d, idxs: list[int]) -> None:
    """Remove whole groups of a grouped (or depthwise) convolution that maps each group onto itself."""
    per_group = conv.out_channels // conv.groups
    if conv.in_channels != conv.out_channels or len(idxs) % per_group or conv.transposed:
        raise ValueError(f"cannot drop {len(idxs)} channels of a grouped conv as whole groups")
    dropped = set(idxs)
    if any(set(range(i - i % per_group, i - i % per_group + per_group)) - dropped for i in idxs):
        raise ValueError("head channels of a grouped conv must cover whole groups")
    keep = torch.tensor([c for c in range(conv.out_channels) if c not in dropped])
    conv.weight = nn.Parameter(conv.weight.detach()[keep], requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[keep], requires_grad=conv.bias.requires_grad)
    conv.out_channels = conv.in_channels = len(keep)
    conv.groups = len(keep) // per_group


def block_candidates(module: nn.Module, classes: tuple[str, ...]) -> list[str]:
    """Qualified names of blocks of ``classes`` that are direct children of an ``nn.Sequential``."""
    names = []
    for parent_name, parent in module.named_modules():
        if isinstance(parent, nn.Sequential):
            for child_name, child in parent.named_children():
                if type(child).__name__ in classes:
                    names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


@torch.no_grad()
def block_scores(module: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean relative change ``||f(x) - x|| / ||x||`` each shape-preserving block makes on ``batches``."""
    totals: dict[str, float] = dict.fromkeys(names, 0.0)
    eligible = set(names)

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(_: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0] if len(args) == 1 else None
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or x.shape != out.shape:
                eligible.discard(name)
                return
            totals[name] += float((out - x).norm() / x.norm().clamp_min(1e-12))

        return record

    handles = [module.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            module(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {n: totals[n] / len(batches) for n in names if n in eligible}


def least_important_blocks(scores: dict[str, float], count: int) -> list[str]:
    """The ``count`` lowest-scoring blocks, never one nested inside another chosen one."""
    chosen: list[str] = []
    for name in sorted(scores, key=lambda n: (scores[n], n)):
        if len(chosen) == count:
            break
        if not any(name.startswith(c + ".") or c.startswith(name + ".") for c in chosen):
            chosen.append(name)
    if len(chosen) < count:
        raise ValueError(f"asked to remove {count} blocks but only {len(chosen)} are removable")
    return chosen


def remove_block(module: nn.Module, name: str) -> None:
    """Replace the residual block ``name`` (a child of an ``nn.Sequential``) by ``nn.Identity``."""
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential) or child not in parent._modules:
        raise ValueError(f"{name!r} is not a block inside an nn.Sequential")
    setattr(parent, child, nn.Identity())
