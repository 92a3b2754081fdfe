"""Proxy data for the server's offline pretraining and pruning (registry PROXIES): loaded here and only here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedpetah.backbone.augment import Augmentation
from fedpetah.registry import Registry


@dataclass(frozen=True)
class ProxySet:
    """Labelled white-on-black images (uint8, N x 1 x H x W), how to distort them, and what made them."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: int
    augmentation: Augmentation
    versions: dict[str, str] = field(default_factory=dict)
    train_size: int | None = None  # side the warm-up trains at (null: the backbone's); recovery uses the backbone's

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[1] != 1:
            raise ValueError(f"proxy {self.name}: images must be uint8 (N, 1, H, W), got {self.images.shape}")
        if len(self.labels) != len(self.images) or set(np.unique(self.labels)) != set(range(self.classes)):
            raise ValueError(f"proxy {self.name}: labels must cover 0..{self.classes - 1} once per image")

    def tensors(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float images in [0, 1] at native size and int64 labels of the examples at ``index``."""
        rows = index.numpy()
        return torch.from_numpy(self.images[rows]).float() / 255.0, torch.from_numpy(self.labels[rows])


@dataclass(frozen=True)
class Proxy:
    """A registered proxy data set: how to load it, and the warm-up recipe it trains best with (measured in
    docs/backbone.md); ``backbone.warmup.epochs`` / ``lr`` left at null take these."""

    load: Callable[[], ProxySet]
    epochs: int
    lr: float


PROXIES: Registry[Proxy] = Registry("proxy data set")

GLYPH_AUGMENTATION = Augmentation(rotation=45.0, scale=(0.85, 1.05), shear=0.1, shift=0.08, elastic=0.015,
                                  stroke=0.3, sharpen=0.5, noise=0.04, invert=0.0)
"""Milder than the default distortion, rotations within +-45 degrees: at +-180 degrees with every distortion at
full strength the warm-up learnt nothing a short budget could use (docs/backbone.md, the recipe sweep)."""


GLYPH_SIZE = 32
"""The glyph warm-up trains at 32 px (about 1.5x cheaper a step than 64 px for efficientvit_b0, and it transferred
better in the sweep); pruning recovery then trains at the backbone's size."""


def _glyphs() -> ProxySet:
    """110 letters and signs x matplotlib's 16 bundled fonts (1,685 images): no digit, no digit look-alike."""
    from fedpetah.backbone.glyphs import GLYPHS, glyph_images, renderer_versions

    images, labels, _ = glyph_images(64)
    versions = {**renderer_versions(), "augmentation": repr(GLYPH_AUGMENTATION), "train_size": str(GLYPH_SIZE)}
    return ProxySet("glyphs", images, labels, len(GLYPHS), GLYPH_AUGMENTATION, versions, GLYPH_SIZE)


def _digits() -> ProxySet:
    """scikit-learn's 1,797 8x8 digits, the same ten classes as the MNIST streams (the former default)."""
    import sklearn

    from fedpetah.tasks.streams import digits_sample

    images, labels = digits_sample()
    mild = Augmentation(rotation=14.3, scale=(0.9, 1.1), shear=0.0, shift=0.05, elastic=0.0, stroke=0.0,
                        sharpen=1.0, noise=0.0, invert=0.0)
    return ProxySet("digits", images, labels, 10, mild, {"scikit-learn": sklearn.__version__})


PROXIES.add("glyphs", Proxy(_glyphs, epochs=14, lr=5e-3))
PROXIES.add("digits", Proxy(_digits, epochs=12, lr=2e-3))


def load_proxy(name: str) -> ProxySet:
    """The proxy data set registered as ``name``."""
    return PROXIES.get(name).load()


def calibration_batches(
    proxy: ProxySet, img_size: int, in_chans: int, count: int, batch_size: int = 32, seed: int = 0
) -> list[torch.Tensor]:
    """``count`` batches of unaugmented proxy images (a seeded mix of classes) at the backbone's input."""
    order = torch.randperm(len(proxy.labels), generator=torch.Generator().manual_seed(seed))
    images, _ = proxy.tensors(order[: count * batch_size])
    resized = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return list(resized.clamp(0, 1).expand(-1, in_chans, -1, -1).contiguous().split(batch_size))
