"""SynQT-style query tuning: learnable queries read a frozen backbone's stages; only they train.

The backbone runs once under ``torch.no_grad`` and keeps nothing for backward: training memory
is the inference peak plus a small query path, and :meth:`SynQTAdapter.frozen_features` can be
cached across epochs because it does not depend on any trainable tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedpetah.adapters.base import Adapter, AdapterConfig
from fedpetah.adapters.registry import ADAPTERS
from fedpetah.adapters.synqt_features import Tap, block_width, plan_taps, query_block, read_backbone
from fedpetah.model import TaskModel


@dataclass
class SynQTConfig(AdapterConfig):
    """Memory-efficient query tuning.

    ``stages``: feature levels to read (indices into timm's ``feature_info``, negative from the
    end). ``num_queries`` learnable queries of width ``query_dim`` per stage; ``num_heads`` heads
    for our own cross-attention. Every stage is average-pooled to at most ``grid`` x ``grid``
    tokens. ``reuse_attention``: where a stage holds a ViT block with a Linear qkv (MobileViT),
    the queries go through that block's frozen attention and MLP, as in the paper, instead of our
    own cross-attention (off by default: 4-20 points less accurate on warm-up MobileViT, docs/synqt.md).
    ``frozen_batch``: the frozen forward runs over at most this many images at a time, which
    bounds its peak memory whatever the training batch or the feature-caching chunk (on CPU,
    chunks of 8 were also faster than whole batches of 32; raise it on GPUs).
    """

    stages: list[int] = field(default_factory=lambda: [-3, -2, -1])
    num_queries: int = 4
    query_dim: int = 64
    num_heads: int = 4
    grid: int = 4
    reuse_attention: bool = False
    frozen_batch: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.stages = list(self.stages)
        if not self.stages or any(type(s) is not int for s in self.stages):
            raise ValueError(f"synqt.stages must be a non-empty list of ints, got {self.stages!r}")
        if min(self.num_queries, self.query_dim, self.num_heads, self.grid, self.frozen_batch) < 1:
            raise ValueError("synqt.num_queries, query_dim, num_heads, grid and frozen_batch must be >= 1")
        limits = {"stages": (len(self.stages), 16), "num_queries": (self.num_queries, 256),
                  "query_dim": (self.query_dim, 4096), "num_heads": (self.num_heads, 64),
                  "grid": (self.grid, 32), "frozen_batch": (self.frozen_batch, 4096)}
        for key, (value, limit) in limits.items():  # a config may come from a server: bound what it makes us build
            if value > limit:
                raise ValueError(f"synqt.{key} must be at most {limit}, got {value}")
        if self.query_dim % self.num_heads:
            raise ValueError(
                f"synqt.query_dim {self.query_dim} must be divisible by num_heads {self.num_heads}"
            )


class CrossRead(nn.Module):
    """Our own light cross-attention: what queries (B, Q, D) read from stage tokens (B, N, C)."""

    def __init__(self, width: int, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(width)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(width, 2 * dim), nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.q(self.norm_q(queries)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = self.kv(self.norm_kv(tokens)).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        read: torch.Tensor = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return read


class BlockRead(nn.Module):
    """Queries enter a frozen ViT block's width; its attention and MLP update them query-only."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor, block: nn.Module) -> torch.Tensor:
        read: torch.Tensor = self.out(query_block(block, self.inp(queries), keys_values))
        return read


class QueryPath(nn.Module):
    """Per stage: synthesize queries from the previous stage's queries, read; concatenate the reads.

    Each stage's output is what its queries read (the update, averaged over queries): the
    learned queries themselves are the same for every image and would only dilute it.
    """

    def __init__(self, config: SynQTConfig, widths: Sequence[int], reuse: Sequence[bool]) -> None:
        super().__init__()
        dim, stages = config.query_dim, len(widths)
        self.queries = nn.Parameter(torch.empty(stages, config.num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.synthesis = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
            for _ in range(stages - 1)
        )
        self.readers = nn.ModuleList(
            BlockRead(w, dim) if r else CrossRead(w, dim, config.num_heads)
            for w, r in zip(widths, reuse, strict=True)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, stage_features: Sequence[torch.Tensor], blocks: Sequence[nn.Module | None]
    ) -> torch.Tensor:
        batch = stage_features[0].shape[0]
        outputs: list[torch.Tensor] = []
        previous: torch.Tensor | None = None
        for s, (reader, features, block) in enumerate(zip(self.readers, stage_features, blocks, strict=True)):
            queries = self.queries[s].expand(batch, -1, -1)
            if previous is not None:
                queries = queries + self.synthesis[s - 1](previous)
            read = reader(queries, features) if block is None else reader(queries, features, block)
            outputs.append(read.mean(dim=1))
            previous = queries + read
        normed: torch.Tensor = self.norm(torch.stack(outputs, dim=1))
        return normed.flatten(1)


class SynQTModel(TaskModel):
    """``head([pooled backbone output, query read-outs])``; the backbone stays frozen and in eval mode."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        config: SynQTConfig,
    ) -> None:
        super().__init__(backbone, num_classes, img_size, mean, std)
        self.backbone.eval()
        self.grid, self.frozen_batch = config.grid, config.frozen_batch
        example = torch.zeros(1, len(mean), img_size, img_size)
        taps = plan_taps(backbone, config.stages, example, config.reuse_attention)
        self.taps: tuple[Tap, ...] = tuple(taps)
        pooled, *features = read_backbone(backbone, example, self.taps, self.grid)
        widths = [
            block_width(backbone.get_submodule(tap.module)) if tap.block else f.shape[-1]
            for tap, f in zip(self.taps, features, strict=True)
        ]
        self.synqt = QueryPath(config, widths, [tap.block for tap in self.taps])
        self.head = nn.Linear(pooled.shape[1] + len(self.taps) * config.query_dim, num_classes)

    def frozen_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[pooled output, one tensor per stage]: normalized input, frozen backbone, no autograd."""
        x = (x - self.mean) / self.std
        parts = [read_backbone(self.backbone, chunk, self.taps, self.grid) for chunk in x.split(self.frozen_batch)]
        return parts[0] if len(parts) == 1 else [torch.cat(p) for p in zip(*parts, strict=True)]

    def forward_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits from :meth:`frozen_features`' output (live or cached)."""
        if len(features) != 1 + len(self.taps):
            raise ValueError(f"synqt expects {1 + len(self.taps)} feature tensors, got {len(features)}")
        pooled, *stage_features = features
        blocks = [self.backbone.get_submodule(t.module) if t.block else None for t in self.taps]
        logits: torch.Tensor = self.head(torch.cat([pooled, self.synqt(stage_features, blocks)], dim=1))
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.frozen_features(x))

    def train(self, mode: bool = True) -> SynQTModel:
        super().train(mode)
        self.backbone.eval()
        return self


@ADAPTERS.register("synqt")
class SynQTAdapter(Adapter[SynQTConfig]):
    """Query tuning (SynQT, arXiv 2407.06964) on a frozen hybrid: queries, readers and head train."""

    model: SynQTModel

    def attach(self) -> None:
        task, source = self.model, self.backbone
        self.model = SynQTModel(
            task.backbone, task.head.out_features, task.img_size, source.mean, source.std, self.config
        )
        self.model.synqt.requires_grad_(True)
        self.model.head.requires_grad_(True)

    def frozen_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What :meth:`forward_features` needs; independent of trainable tensors, so cacheable."""
        return self.model.frozen_features(x)

    def forward_features(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.model.forward_features(features)
