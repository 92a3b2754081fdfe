"""Build a timm hybrid by name and size, with hub, local or offline warm-up weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
from safetensors.torch import load_file, save

from fedpetah.atomic import atomic_write_bytes, atomic_write_text
from fedpetah.backbone.families import BackboneFamily, family_of
from fedpetah.config import BackboneConfig
from fedpetah.model import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

WARMUP_FORMAT = 2


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


def build_backbone(config: BackboneConfig, cache_dir: Path | None = None) -> Backbone:
    """Build the unpruned backbone with the weights ``config.weights`` asks for."""
    family = family_of(config.name)
    module, kwargs = create_timm_model(
        config.name, config.img_size, config.in_chans, pretrained=config.weights == "pretrained"
    )
    pretrained_cfg = getattr(module, "pretrained_cfg", {}) or {}
    mean = tuple(float(v) for v in pretrained_cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in pretrained_cfg.get("std", IMAGENET_STD))
    backbone = Backbone(module, config.name, family, config.img_size, config.in_chans, mean, std, kwargs)
    if config.weights == "checkpoint":
        assert config.checkpoint is not None
        load_checkpoint(module, Path(config.checkpoint))
        backbone.pretraining = {"source": "checkpoint", "path": str(config.checkpoint)}
    elif config.weights == "pretrained":
        backbone.pretraining = {"source": "timm hub", "tag": pretrained_cfg.get("tag", "")}
    elif config.weights == "warmup":
        backbone.pretraining = _warmed_up(backbone, config, cache_dir or default_cache_dir())
    else:
        backbone.pretraining = {"source": "random"}
    module.eval().requires_grad_(False)
    return backbone


def load_checkpoint(module: nn.Module, path: Path) -> None:
    """Load a local safetensors state dict strictly (no pickle)."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"backbone checkpoint must be a .safetensors file, got {path.name}")
    state = load_file(str(path))
    state = {k: v for k, v in state.items() if not k.startswith(("head.fc.", "fc.", "classifier."))}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def warmup_key(config: BackboneConfig) -> str:
    """Content hash of everything that determines the warm-up weights."""
    payload = {
        "format": WARMUP_FORMAT,
        "name": config.name,
        "img_size": config.img_size,
        "in_chans": config.in_chans,
        "warmup": asdict(config.warmup),
        "timm": timm.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _warmed_up(backbone: Backbone, config: BackboneConfig, cache_dir: Path) -> dict[str, Any]:
    from fedpetah.backbone.warmup import warmup_pretrain

    stem = cache_dir / f"warmup-{config.name}-{config.img_size}px-{warmup_key(config)}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.is_file() and meta.is_file():
        try:
            backbone.module.load_state_dict(load_file(str(weights)), strict=True)
            info: dict[str, Any] = json.loads(meta.read_text())
            return info
        except Exception as err:  # a corrupt cache entry is rebuilt, never trusted
            log.warning("discarding corrupt warm-up cache %s: %s", weights, err)
    log.info("warm-up pretraining %s at %d px on %s (cached)", config.name, config.img_size, config.warmup.dataset)
    info = warmup_pretrain(backbone, config.warmup)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights, save({k: v.contiguous() for k, v in backbone.module.state_dict().items()}))
    atomic_write_text(meta, json.dumps(info, indent=2))
    return info
