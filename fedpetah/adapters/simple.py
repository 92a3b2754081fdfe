"""Adapters that need no extra modules: linear probe, BitFit, full fine-tuning."""

from __future__ import annotations

from fedpetah.adapters.base import Adapter, AdapterConfig
from fedpetah.adapters.registry import ADAPTERS


@ADAPTERS.register("head")
class HeadAdapter(Adapter[AdapterConfig]):
    """Linear probe: only the task head trains."""

    def attach(self) -> None:
        self.model.head.requires_grad_(True)


@ADAPTERS.register("bias")
class BiasAdapter(Adapter[AdapterConfig]):
    """BitFit: every bias of the backbone (convolution, linear and norm layers) plus the head."""

    def attach(self) -> None:
        self.model.head.requires_grad_(True)
        found = 0
        for name, param in self.model.backbone.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
                found += 1
        if not found:
            raise ValueError("bias adapter: the backbone has no bias parameters")


@ADAPTERS.register("full")
class FullAdapter(Adapter[AdapterConfig]):
    """Full fine-tuning, the baseline: every backbone parameter plus the head."""

    def attach(self) -> None:
        self.model.requires_grad_(True)
