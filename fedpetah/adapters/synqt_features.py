"""Frozen-backbone reading for query tuning: stage taps, token pooling and reusable ViT blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class Tap:
    """Where one read stage takes its tokens.

    ``block`` False: the output map of feature level ``level`` (module ``module``), pooled to
    tokens. ``block`` True: the input of the last ViT block (``module``) that runs inside that
    level; the tap stores the block's own keys and values so queries can reuse its attention.
    """

    level: int
    module: str
    block: bool


def feature_levels(backbone: nn.Module) -> list[str]:
    """Module names of the backbone's feature levels, shallow to deep (timm ``feature_info``)."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__} has no timm feature_info: cannot locate its stages")
    return [str(entry["module"]) for entry in info]


def reusable_block(module: nn.Module) -> bool:
    """A timm pre-norm ViT block whose softmax attention has fused Linear qkv and Linear proj."""
    attn = getattr(module, "attn", None)
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("norm1", "norm2", "mlp")):
        return False
    if attn is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        return False
    if not isinstance(getattr(attn, "proj", None), nn.Linear) or getattr(attn, "gate", None) is not None:
        return False
    heads, qkv = getattr(attn, "num_heads", 0), attn.qkv
    return isinstance(heads, int) and heads > 0 and qkv.out_features % (3 * heads) == 0


def plan_taps(
    backbone: nn.Module, stages: Sequence[int], example: torch.Tensor, reuse_attention: bool
) -> list[Tap]:
    """Resolve stage indices (negative from the end) to taps, found by one traced forward pass."""
    levels = feature_levels(backbone)
    resolved = sorted({s % len(levels) for s in stages if -len(levels) <= s < len(levels)})
    if len(resolved) != len(stages):
        raise ValueError(
            f"synqt stages {list(stages)} must be distinct indices into the {len(levels)} feature "
            f"levels {levels}"
        )
    blocks = {n for n, m in backbone.named_modules() if reuse_attention and reusable_block(m)}
    order: list[str] = []
    watched = [(n, m) for n, m in backbone.named_modules() if n in blocks or n in levels]
    handles = [m.register_forward_hook(lambda *_, name=n: order.append(name)) for n, m in watched]
    try:
        with torch.no_grad():
            backbone(example)
    finally:
        for handle in handles:
            handle.remove()
    taps: list[Tap] = []
    for level in resolved:
        end = order.index(levels[level])
        start = order.index(levels[level - 1]) + 1 if level > 0 else 0
        inside = [n for n in order[start:end] if n in blocks and order.count(n) == 1]
        taps.append(Tap(level, inside[-1], True) if inside else Tap(level, levels[level], False))
    return taps


def pool_tokens(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) maps or (B, N, C) tokens -> (B, N', C) with N' <= grid * grid (average pooling)."""
    if x.ndim == 3:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            pooled = F.adaptive_avg_pool1d(x.transpose(1, 2), min(x.shape[1], grid * grid))
            return pooled.transpose(1, 2).contiguous()
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    if x.ndim != 4:
        raise ValueError(f"cannot pool a feature of shape {tuple(x.shape)} into tokens")
    pooled = F.adaptive_avg_pool2d(x, (min(grid, x.shape[2]), min(grid, x.shape[3])))
    return pooled.flatten(2).transpose(1, 2).contiguous()


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, A) -> (B, N, heads, A / heads)."""
    split: torch.Tensor = x.unflatten(-1, (heads, x.shape[-1] // heads))
    return split


def block_width(block: nn.Module) -> int:
    """Token width of a :func:`reusable_block`."""
    attn: Any = block.attn
    return int(attn.qkv.in_features)


def _optional(module: nn.Module, name: str) -> nn.Module:
    """A sub-layer some timm versions or configurations lack (layer scale, q/k norm): identity if absent."""
    layer = getattr(module, name, None)
    return layer if isinstance(layer, nn.Module) else nn.Identity()


def block_keys_values(block: nn.Module, x: torch.Tensor, batch: int, grid: int) -> torch.Tensor:
    """The block's own normalized keys and values of its input tokens, pooled: (B, 2, N', A).

    ``x`` is the block input (batch * P, N, C); MobileViT runs P pixel positions per patch as
    separate sequences, which are averaged. qkv is affine, so pooling normalized tokens before
    projecting equals pooling the keys and values themselves.
    """
    b: Any = block
    tokens = b.norm1(x)
    tokens = pool_tokens(tokens.reshape(batch, -1, *tokens.shape[1:]).mean(1), grid)
    qkv, width = b.attn.qkv, b.attn.qkv.out_features // 3
    bias = qkv.bias[width:] if qkv.bias is not None else None
    k, v = F.linear(tokens, qkv.weight[width:], bias).split(width, dim=-1)
    k = _optional(b.attn, "k_norm")(_split_heads(k, b.attn.num_heads)).flatten(2)
    return torch.stack([k, v], dim=1)


def query_block(block: nn.Module, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
    """The frozen block's residual update of queries (B, Q, C) that attend to its stored keys/values.

    Query-only: the backbone's tokens never see the queries, so its features stay unchanged.
    """
    b: Any = block
    qkv, width, heads = b.attn.qkv, b.attn.qkv.out_features // 3, b.attn.num_heads
    bias = qkv.bias[:width] if qkv.bias is not None else None
    q = _optional(b.attn, "q_norm")(_split_heads(F.linear(b.norm1(queries), qkv.weight[:width], bias), heads))
    k, v = (_split_heads(t, heads) for t in keys_values.unbind(1))
    read = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    read = b.attn.proj(_optional(b.attn, "norm")(read.transpose(1, 2).flatten(2)))
    update: torch.Tensor = _optional(b, "ls1")(read)
    mlp_update: torch.Tensor = _optional(b, "ls2")(b.mlp(b.norm2(queries + update)))
    return update + mlp_update


def read_backbone(
    backbone: nn.Module, x: torch.Tensor, taps: Sequence[Tap], grid: int
) -> list[torch.Tensor]:
    """[pooled output (B, F), one tensor per tap], computed without autograd.

    Map taps give (B, N', C) tokens; block taps give (B, 2, N', A) keys and values.
    """
    found: dict[int, torch.Tensor] = {}
    handles: list[RemovableHandle] = []
    for i, tap in enumerate(taps):
        module = backbone.get_submodule(tap.module)
        if tap.block:

            def before(m: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
                found[i] = block_keys_values(m, args[0], x.shape[0], grid)

            handles.append(module.register_forward_pre_hook(before))
        else:

            def after(m: nn.Module, args: tuple[Any, ...], out: Any, i: int = i) -> None:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"stage {taps[i].module} returns {type(out).__name__}, not a tensor")
                found[i] = pool_tokens(out, grid)

            handles.append(module.register_forward_hook(after))
    try:
        with torch.no_grad():
            pooled = backbone(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [tap.module for i, tap in enumerate(taps) if i not in found]
    if missing:
        raise RuntimeError(f"stage taps {missing} did not run in the backbone's forward pass")
    return [pooled, *(found[i] for i in range(len(taps)))]
