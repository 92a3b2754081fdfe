"""Typed configuration of the backbone group: which hybrid, which weights, and the offline warm-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpetah.backbone.families import family_of
from fedpetah.backbone.proxy import PROXIES


@dataclass
class WarmupConfig:
    """Short offline pretraining on a proxy data set before pruning (see ``dataset`` for which one).

    ``dataset``: ``digits`` (default: scikit-learn's 1,797 8x8 digits, the same ten classes the MNIST streams
    present later) or ``glyphs`` (110 letters and signs, no digit and no digit look-alike, rendered from
    matplotlib's fonts under augmentation: the class-disjoint proxy; docs/backbone.md has what each transfers).
    ``epochs`` / ``lr``: null takes the data set's own recipe (digits 12 epochs at 2e-3, glyphs in
    ``fedpetah.backbone.proxy``), filled in here so that the resolved values enter every cache key.
    ``rotation``: largest rotation (degrees) of the augmentation; null keeps the data set's own
    (glyphs 45, digits 14.3). ``angle_weight``: weight of an auxiliary loss that predicts the rotation (8 bins of 45
    degrees), so features stay orientation-aware while the glyph head learns to ignore orientation.
    """

    dataset: str = "digits"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 64
    rotation: float | None = None
    angle_weight: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in PROXIES:
            raise ValueError(
                f"backbone.warmup.dataset={self.dataset!r} is not a proxy data set; valid: {PROXIES.names()}"
            )
        own = PROXIES.get(self.dataset)
        self.epochs = own.epochs if self.epochs is None else self.epochs
        self.lr = own.lr if self.lr is None else self.lr
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError(
                f"backbone.warmup: epochs >= 1, batch_size >= 2 and lr > 0 needed, got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}"
            )
        if self.rotation is not None and not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"backbone.warmup.rotation must be in [0, 180] degrees, got {self.rotation}")
        if self.angle_weight < 0:
            raise ValueError(f"backbone.warmup.angle_weight must be >= 0 (0 disables it), got {self.angle_weight}")


@dataclass
class BackboneConfig:
    """Which timm hybrid to build, at which input size, with which weights.

    ``weights`` is one of ``warmup`` (offline default: proxy pretraining, cached),
    ``pretrained`` (timm hub weights, needs the network), ``checkpoint`` (a local
    safetensors state dict at ``checkpoint``) or ``random`` (tests only).
    """

    name: str = "efficientvit_b0"
    img_size: int = 64
    in_chans: int = 3
    weights: str = "warmup"
    checkpoint: str | None = None
    warmup: WarmupConfig = field(default_factory=WarmupConfig)

    def __post_init__(self) -> None:
        family_of(self.name)  # unsupported names fail here, listing the supported ones
        if self.weights not in {"warmup", "pretrained", "checkpoint", "random"}:
            raise ValueError(
                f"backbone.weights must be warmup|pretrained|checkpoint|random, got {self.weights!r}"
            )
        if self.weights == "checkpoint" and not self.checkpoint:
            raise ValueError("backbone.weights=checkpoint needs backbone.checkpoint=PATH")
        if self.img_size < 16:
            raise ValueError(f"backbone.img_size must be >= 16, got {self.img_size}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"backbone.in_chans must be 1 or 3, got {self.in_chans}")
