"""Per-task adapters on a frozen backbone, one registry: head, bias, full, lora, dora, petah, synqt."""

from __future__ import annotations

from typing import Any

from fedpetah.adapters import lora, petah, simple, synqt  # noqa: F401  (each module registers its adapters)
from fedpetah.adapters.base import Adapter, AdapterConfig
from fedpetah.adapters.registry import ADAPTERS
from fedpetah.backbone import Backbone


def adapter_config(name: str, **fields: Any) -> AdapterConfig:
    """The typed config of adapter ``name``; unknown fields raise ``TypeError``."""
    return ADAPTERS.get(name).config_class(name=name, **fields)


def build_adapter(config: AdapterConfig, backbone: Backbone, num_classes: int) -> Adapter[Any]:
    """Attach adapter ``config.name`` to a private copy of ``backbone`` for one task."""
    return ADAPTERS.get(config.name)(backbone, num_classes, config)


__all__ = ["ADAPTERS", "Adapter", "AdapterConfig", "adapter_config", "build_adapter"]
