"""Build a timm hybrid by name and size, with hub, local-checkpoint, offline warm-up or random weights."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from fedpetah.backbone.base import Backbone, create_timm_model, default_cache_dir
from fedpetah.backbone.config import BackboneConfig
from fedpetah.backbone.families import family_of
from fedpetah.backbone.warmup import warm_up
from fedpetah.model import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Backbone", "build_backbone", "create_timm_model", "default_cache_dir", "load_checkpoint"]


def build_backbone(config: BackboneConfig, cache_dir: Path | None = None) -> Backbone:
    """The unpruned, frozen backbone with the weights ``config.weights`` asks for (warm-up: cached)."""
    module, kwargs = create_timm_model(
        config.name, config.img_size, config.in_chans, pretrained=config.weights == "pretrained"
    )
    pretrained_cfg = getattr(module, "pretrained_cfg", {}) or {}
    mean = tuple(float(v) for v in pretrained_cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in pretrained_cfg.get("std", IMAGENET_STD))
    backbone = Backbone(module, config.name, family_of(config.name), config.img_size, config.in_chans, mean, std,
                        kwargs)
    if config.weights == "checkpoint":
        assert config.checkpoint is not None
        load_checkpoint(module, Path(config.checkpoint))
        backbone.pretraining = {"source": "checkpoint", "path": str(config.checkpoint)}
    elif config.weights == "pretrained":
        backbone.pretraining = {"source": "timm hub", "tag": pretrained_cfg.get("tag", "")}
    elif config.weights == "warmup":
        backbone.pretraining = warm_up(backbone, config.warmup, cache_dir or default_cache_dir())
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
