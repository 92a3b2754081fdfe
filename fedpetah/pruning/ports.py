"""Attention modules as single layers for torch-pruning: their input and output channels follow the stream.

torch-pruning cannot trace through timm's hybrid attention (reshapes into heads, grouped aggregation
convolutions), so those modules are kept out of channel pruning, which also freezes the width of the
residual stream they sit on. For a class listed in :data:`PORT_PRUNERS`, the module is instead shown to
torch-pruning as one opaque layer: during tracing its forward is a stand-in 1x1 convolution from its input
to its output width, and a customized pruner cuts the real input projection's input channels and the real
output projection's output channels. What lies between (whole heads) is slimmed separately, by
:func:`fedpetah.pruning.structure.remove_heads`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp


class LiteMLAPorts(tp.pruner.BasePruningFunc):  # type: ignore[misc]
    """timm ``LiteMLA``: input channels of ``qkv.conv``; output channels of ``proj.conv`` and its norm."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        attn: Any = layer
        tp.prune_conv_out_channels(attn.proj.conv, list(idxs))
        if isinstance(attn.proj.norm, nn.BatchNorm2d):
            tp.prune_batchnorm_out_channels(attn.proj.norm, list(idxs))
        elif not isinstance(attn.proj.norm, nn.Identity):
            raise ValueError(f"LiteMLA output norm {type(attn.proj.norm).__name__} is not prunable")
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        attn: Any = layer
        tp.prune_conv_in_channels(attn.qkv.conv, list(idxs))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        attn: Any = layer
        return int(attn.proj.conv.out_channels)

    def get_in_channels(self, layer: nn.Module) -> int:
        attn: Any = layer
        return int(attn.qkv.conv.in_channels)


PORT_PRUNERS: dict[str, tp.pruner.BasePruningFunc] = {"LiteMLA": LiteMLAPorts()}
"""Attention class name -> pruner of its input/output channels (the module is opaque while tracing)."""


def has_ports(module: nn.Module) -> bool:
    return type(module).__name__ in PORT_PRUNERS


@contextmanager
def opaque(modules: list[nn.Module]) -> Iterator[dict[Any, tp.pruner.BasePruningFunc]]:
    """While tracing, each module's forward is a 1x1 convolution of its real input and output widths.

    Yields the ``customized_pruners`` mapping to pass to torch-pruning (keyed by class, as torch-pruning
    recognizes customized layers by their type).
    """
    for module in modules:
        pruner = PORT_PRUNERS[type(module).__name__]
        weight = torch.zeros(pruner.get_out_channels(module), pruner.get_in_channels(module), 1, 1)
        module.forward = _stand_in(weight.requires_grad_(True))
    try:
        yield {type(m): PORT_PRUNERS[type(m).__name__] for m in modules}
    finally:
        for module in modules:
            del module.forward


def _stand_in(weight: torch.Tensor) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight)

    return forward
