"""The server's backbone pipeline, in order: build, warm up, prune, recover, pack (each result cached by settings)."""

from __future__ import annotations

import logging
from pathlib import Path

from fedpetah.artifact import MANIFEST, ArtifactError, cached_artifact_dir, load_artifact, pack_artifact
from fedpetah.backbone import Backbone, build_backbone
from fedpetah.backbone.base import default_cache_dir
from fedpetah.backbone.proxy import calibration_batches, load_proxy
from fedpetah.backbone.warmup import pretrain
from fedpetah.experiment import ExperimentConfig
from fedpetah.pruning import prune_backbone

log = logging.getLogger(__name__)


def prepare_backbone(config: ExperimentConfig, cache_dir: Path | None = None) -> Backbone:
    """The frozen backbone the server ships for ``config``."""
    # 1-2. Build the timm module with the configured weights; `warmup` pretrains on the proxy (cached).
    backbone = build_backbone(config.backbone, cache_dir)
    pruning = config.pruning
    if pruning.ratio == 0 and not pruning.remove_blocks:
        return backbone
    # 3. Prune, scoring channels on unaugmented proxy images (the proxy the warm-up chose, digits or glyphs).
    proxy = load_proxy(config.backbone.warmup.dataset)
    calibration = calibration_batches(proxy, backbone.img_size, backbone.in_chans, pruning.calibration_batches)
    backbone = prune_backbone(backbone, pruning, calibration=calibration)
    # 4. Recover: the same pretraining, shorter, on the pruned module.
    if pruning.recovery_epochs:
        recovery = pretrain(backbone, config.backbone.warmup, proxy, epochs=pruning.recovery_epochs)
        backbone.pretraining = {**backbone.pretraining, "recovery": recovery}
    return backbone


def prepare_artifact(config: ExperimentConfig, cache_dir: Path | None = None) -> Path:
    """5. Pack: the directory of the packed, frozen (and pruned) backbone for ``config``, built once per settings."""
    root = Path(cache_dir or default_cache_dir())
    target = cached_artifact_dir(root, config.backbone, config.pruning)
    if (target / MANIFEST).is_file():
        try:
            load_artifact(target)
            return target
        except ArtifactError as err:
            log.warning("rebuilding the cached artifact %s: %s", target, err)
    pack_artifact(prepare_backbone(config, root), target)
    return target

