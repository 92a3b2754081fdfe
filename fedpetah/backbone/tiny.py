"""``test_efficientvit``: a tiny EfficientViT registered in timm for tests (as timm registers ``test_vit``).

It is built from timm's own EfficientViT classes (convolution stem, MBConv stages, ``LiteMLA`` attention
blocks), so it belongs to the ``efficientvit`` family and takes every path the default backbone takes
(adapter targets, head slimming, port pruning, block removal, artifact rebuild through ``timm.create_model``),
with about 54k parameters instead of 2.1M. Random weights only: nothing is published for it.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.efficientvit_mit import EfficientVit

default_cfgs = generate_default_cfgs({  # read by register_model: the pretrained cfg (mean, std) of the name
    "test_efficientvit.untrained": {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 32, 32),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.in_conv.conv",
        "classifier": "head.classifier.4",
    },
})


@register_model
def test_efficientvit(pretrained: bool = False, **kwargs: Any) -> EfficientVit:
    """Two attention stages of 4 heads each (head dim 8, widths 32), one block per stage."""
    model_args: dict[str, Any] = dict(
        widths=(4, 8, 16, 32, 32), depths=(1, 1, 1, 1, 1), head_dim=8, head_widths=(32, 48)
    )
    model: EfficientVit = build_model_with_cfg(
        EfficientVit, "test_efficientvit", pretrained, **dict(model_args, **kwargs)
    )
    return model
