"""Seeded batch augmentation of white-on-black stroke images for proxy pretraining (pure torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """How hard the proxy images are distorted; every draw comes from the generator passed in."""

    rotation: float = 180.0  # degrees, uniform in [-rotation, rotation]
    scale: tuple[float, float] = (0.75, 1.1)
    shear: float = 0.25
    shift: float = 0.15  # fraction of the image side
    elastic: float = 0.03  # displacement amplitude, fraction of the image side
    stroke: float = 0.6  # probability of changing stroke width: 3 in 4 of those thicken, 1 in 4 thin
    sharpen: float = 0.5  # probability of a random soft threshold (crisp strokes); else a random blur
    noise: float = 0.08  # largest Gaussian noise standard deviation
    invert: float = 0.05  # probability of black on white


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _chance(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, 1, 1, 1, generator=generator) < p).float()


def change_strokes(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Thicker (grey dilation) strokes with probability ``3p / 4``, thinner (grey erosion) with ``p / 4``."""
    kind = torch.rand(len(x), 1, 1, 1, generator=generator)
    thick = F.max_pool2d(x, 3, 1, 1)
    thin = -F.max_pool2d(-x, 3, 1, 1)
    return torch.where(kind < 0.75 * p, thick, torch.where(kind < p, thin, x))


def warp(
    x: torch.Tensor, degrees: torch.Tensor, aug: Augmentation, size: int, generator: torch.Generator
) -> torch.Tensor:
    """Rotation by ``degrees``, random anisotropic scale, shear, shift and a smooth elastic field, at ``size``."""
    n = len(x)
    angle = degrees * (math.pi / 180)
    sx, sy = _uniform(n, *aug.scale, generator), _uniform(n, *aug.scale, generator)
    shear = _uniform(n, -aug.shear, aug.shear, generator)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output -> input coordinates: rotate, shear, then divide by the scale (a larger scale shows a larger glyph)
    a, b = cos / sx, (-sin + shear * cos) / sx
    c, d = sin / sy, (cos + shear * sin) / sy
    shift = _uniform(2 * n, -aug.shift, aug.shift, generator).view(n, 2) * 2
    theta = torch.stack([torch.stack([a, b, shift[:, 0]], 1), torch.stack([c, d, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    if aug.elastic > 0:
        coarse = torch.randn(n, 2, 3, 3, generator=generator) * (2 * aug.elastic)
        field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        grid = grid + field.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sharpen_or_blur(x: torch.Tensor, p_sharpen: float, generator: torch.Generator) -> torch.Tensor:
    """Either a random soft threshold (crisp pen strokes) or a random-strength 3x3 blur (soft scans)."""
    n = len(x)
    steepness = _uniform(n, 4.0, 20.0, generator).view(n, 1, 1, 1)
    threshold = _uniform(n, 0.25, 0.6, generator).view(n, 1, 1, 1)
    sharp = torch.sigmoid((x - threshold) * steepness)
    low, high = sharp.amin((1, 2, 3), keepdim=True), sharp.amax((1, 2, 3), keepdim=True)
    sharp = (sharp - low) / (high - low).clamp_min(1e-6)
    strength = torch.rand(n, 1, 1, 1, generator=generator)
    blurred = torch.lerp(x, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), strength)
    return torch.where(_chance(n, p_sharpen, generator) > 0, sharp, blurred)


def augment(
    images: torch.Tensor, aug: Augmentation, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """float (N, 1, H, W) images in [0, 1] -> distorted (N, 1, size, size) images in [0, 1], and the
    rotation angle (degrees) each one received."""
    n = len(images)
    degrees = _uniform(n, -aug.rotation, aug.rotation, generator)
    x = change_strokes(images, aug.stroke, generator)
    x = warp(x, degrees, aug, size, generator)
    x = sharpen_or_blur(x.clamp(0, 1), aug.sharpen, generator)
    x = x * _uniform(n, 0.6, 1.0, generator).view(n, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * _uniform(n, 0.0, aug.noise, generator).view(n, 1, 1, 1)
    x = x.clamp(0, 1)
    flip = _chance(n, aug.invert, generator)
    return flip * (1 - x) + (1 - flip) * x, degrees
