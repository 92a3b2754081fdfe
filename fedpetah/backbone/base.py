"""The Backbone record (a timm module and what rebuilds and feeds it), its timm constructor and the cache root."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

import fedpetah.backbone.tiny  # noqa: F401 (registers test_efficientvit in timm before any create_model)
from fedpetah.backbone.families import BackboneFamily, family_of
from fedpetah.model import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class Backbone:
    """A (possibly pruned) frozen timm backbone and what is needed to rebuild and feed it."""

    module: nn.Module
    model_name: str
    family: BackboneFamily
    img_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    pruning_history: list[Any] = field(default_factory=list)
    pretraining: dict[str, Any] = field(default_factory=dict)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def default_cache_dir() -> Path:
    """``$FEDPETAH_CACHE`` or ``~/.cache/fedpetah``."""
    return Path(os.environ.get("FEDPETAH_CACHE", Path.home() / ".cache" / "fedpetah"))


def create_timm_model(
    model_name: str, img_size: int, in_chans: int = 3, pretrained: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model without classifier (pooled features out) and the kwargs that built it."""
    family = family_of(model_name)
    if img_size < family.min_img_size:
        raise ValueError(f"{model_name} needs img_size >= {family.min_img_size}, got {img_size}")
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_chans, **family.create_kwargs(img_size)}
    module = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    return module, kwargs
