"""The adapter registry: name -> adapter class (each class names its typed config)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpetah.registry import Registry

if TYPE_CHECKING:
    from fedpetah.adapters.base import Adapter

ADAPTERS: Registry[type[Adapter[Any]]] = Registry("adapter")
