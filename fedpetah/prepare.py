"""Server-side backbone preparation: build, warm up or load, prune, freeze, pack (cached by settings hash)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import timm

from fedpetah.artifact import ArtifactError, load_artifact, pack_artifact
from fedpetah.backbone import build_backbone
from fedpetah.backbone.build import default_cache_dir
from fedpetah.backbone.warmup import digits_tensors
from fedpetah.experiment import ExperimentConfig

log = logging.getLogger(__name__)


def settings_key(config: ExperimentConfig) -> str:
    """Hash of everything that determines the shipped backbone."""
    payload = {"backbone": asdict(config.backbone), "pruning": asdict(config.pruning), "timm": timm.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
    backbone = build_backbone(config.backbone, root)
    if config.pruning.ratio > 0:
        from fedpetah.pruning import prune_backbone

        images, _ = digits_tensors(backbone.img_size, backbone.in_chans)
        batches = list(images[: 32 * config.pruning.calibration_batches].split(32))
        backbone = prune_backbone(backbone, config.pruning, calibration=batches)
    pack_artifact(backbone, target)
    return target
