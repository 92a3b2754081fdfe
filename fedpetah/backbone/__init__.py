"""Hybrid timm backbones: the family registry, building, offline warm-up pretraining on proxy data."""

from fedpetah.backbone.base import Backbone, create_timm_model, default_cache_dir
from fedpetah.backbone.build import build_backbone
from fedpetah.backbone.families import (
    FAMILIES,
    LAYER_KINDS,
    BackboneFamily,
    family_of,
    supported_models,
)

__all__ = [
    "FAMILIES",
    "LAYER_KINDS",
    "Backbone",
    "BackboneFamily",
    "build_backbone",
    "create_timm_model",
    "default_cache_dir",
    "family_of",
    "supported_models",
]
