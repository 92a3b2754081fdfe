"""PETAH: attention and convolution layers of a hybrid adapted together with LoRA, plus norms and head.

PETAH (Augustin et al., "Parameter Efficient Task Adaptation for Hybrid Transformers", CVPRW 2025,
arXiv 2410.17661; we read its abstract and published summaries, not its full method section): in a hybrid
CNN-Transformer, attention and convolution layers should be adapted together, unlike the ViT practice of
adapting attention alone; low-rank (LoRA-style) task adaptation of a shared backbone outperforms ViT
adaptation methods with fewer task-specific parameters, and combines with pruning of that backbone.

What we follow: LoRA on every dense layer kind of the hybrid at once: the attention projections and the
feed-forward layers of attention blocks (rank ``rank``) and the 1x1 and dense k x k convolutions of the
convolutional blocks and stem (rank ``conv_rank``), plus a new head per task. The whole update folds into
the backbone's weights for inference (:meth:`merge`), so an adapted model runs at the pruned backbone's cost.

Where we differ, and why:
- The paper studies EfficientFormer; we resolve the layer kinds per backbone family through
  :mod:`fedpetah.backbone.families`, so the same recipe applies to every registered hybrid. Depthwise and
  grouped convolutions are never adapted (peft cannot merge them).
- Convolutions get their own, smaller rank (``conv_rank``, default 2): conv stages hold many layers, and in
  a federated round every tensor travels, so we spend the rank budget where tokens mix. All layers share the
  scaling ``alpha / rank``, so ``conv_rank`` changes capacity but not the step size.
- ``train_norms`` (default on) also trains the affine weight and bias of every normalization layer
  (batch-, layer- and group-norm; batch-norm statistics stay frozen). This is our addition in the spirit of
  BitFit/TinyTL: a few thousand parameters that re-centre each channel, which a low-rank update cannot do
  cheaply; they stay plain parameters of the merged model. Set it off for a LoRA-only PETAH.
- ``freeze_a`` (FFA-LoRA) and ``init_seed`` behave as for :class:`fedpetah.adapters.lora.LoraAdapter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedpetah.adapters.base import MAX_RANK
from fedpetah.adapters.lora import LoraAdapter, LoraConfig
from fedpetah.adapters.registry import ADAPTERS

NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
"""Normalization layers whose affine parameters ``train_norms`` trains (timm's variants subclass these)."""

ATTENTION_KINDS = ("attention", "mlp")
"""Layer kinds that get ``rank``; the convolutional kinds (``pointwise``, ``conv``) get ``conv_rank``."""


@dataclass
class PetahConfig(LoraConfig):
    """PETAH: LoRA rank ``rank`` on attention and MLP layers, ``conv_rank`` on convolutions; norms; head."""

    rank: int = 4
    alpha: float = 8.0
    conv_rank: int = 2
    targets: tuple[str, ...] = ("attention", "mlp", "pointwise", "conv")
    train_norms: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.conv_rank <= MAX_RANK:
            raise ValueError(f"petah.conv_rank must be in [1, {MAX_RANK}], got {self.conv_rank}")


def norm_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Affine parameters of the normalization layers in ``module`` by qualified name."""
    return {
        f"{name}.{pname}" if name else pname: param
        for name, norm in module.named_modules()
        if isinstance(norm, NORM_TYPES)
        for pname, param in norm.named_parameters(recurse=False)
    }


@ADAPTERS.register("petah")
class PetahAdapter(LoraAdapter[PetahConfig]):
    """PETAH: attention and convolution layers adapted together (see the module docstring)."""

    def rank_of(self, kind: str) -> int:
        return self.config.rank if kind in ATTENTION_KINDS else self.config.conv_rank

    def attach(self) -> None:
        super().attach()
        if self.config.train_norms:
            for param in norm_parameters(self.model.backbone).values():
                param.requires_grad_(True)
