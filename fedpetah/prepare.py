"""Server-side backbone preparation: build, warm up or load, prune, recover, freeze, pack (cached by settings)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import timm

from fedpetah.artifact import ArtifactError, load_artifact, pack_artifact
from fedpetah.backbone import Backbone, build_backbone
from fedpetah.backbone.build import default_cache_dir
from fedpetah.backbone.warmup import digits_tensors, warmup_pretrain
from fedpetah.experiment import ExperimentConfig
from fedpetah.pruning import prune_backbone

log = logging.getLogger(__name__)


def settings_key(config: ExperimentConfig) -> str:
    """Hash of everything that determines the shipped backbone."""
    payload = {"backbone": asdict(config.backbone), "pruning": asdict(config.pruning), "timm": timm.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def prepare_backbone(config: ExperimentConfig, cache_dir: Path | None = None) -> Backbone:
    """Build (warm-up weights cached), prune, and recover on the proxy data; frozen."""
    backbone = build_backbone(config.backbone, cache_dir)
    pruning = config.pruning
    if pruning.ratio > 0 or pruning.remove_blocks:
        images, _ = digits_tensors(backbone.img_size, backbone.in_chans)
        calibration = list(images[: 32 * pruning.calibration_batches].split(32))
        backbone = prune_backbone(backbone, pruning, calibration=calibration)
        if pruning.recovery_epochs:
            recovery = replace(config.backbone.warmup, epochs=pruning.recovery_epochs)
            backbone.pretraining = {**backbone.pretraining, "recovery": warmup_pretrain(backbone, recovery)}
    return backbone


def prepare_artifact(config: ExperimentConfig, cache_dir: Path | None = None) -> Path:
    """Directory of the packed, frozen (and pruned) backbone for ``config``; built once per settings."""
    root = Path(cache_dir or default_cache_dir())
    target = root / "artifacts" / f"{config.backbone.name}-{settings_key(config)}"
    if (target / "manifest.json").is_file():
        try:
            load_artifact(target)
            return target
        except ArtifactError as err:
            log.warning("rebuilding the cached artifact %s: %s", target, err)
    pack_artifact(prepare_backbone(config, root), target)
    return target
