"""Hybrid timm backbones: the family registry, building, offline warm-up pretraining."""

from fedpetah.backbone.build import Backbone, build_backbone, create_timm_model
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
    "family_of",
    "supported_models",
]
