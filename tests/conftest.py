"""Shared fixtures: offline environment, tiny random backbones, a temporary cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedpetah.backbone import Backbone, build_backbone  # noqa: E402
from fedpetah.config import BackboneConfig  # noqa: E402

_BACKBONES: dict[tuple[str, int], Backbone] = {}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fedpetah-cache")
    os.environ["FEDPETAH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone() -> Callable[..., Backbone]:
    """``tiny_backbone(name, img_size)``: a random-weight backbone, built once per session."""

    def make(name: str = "efficientvit_b0", img_size: int = 32) -> Backbone:
        key = (name, img_size)
        if key not in _BACKBONES:
            _BACKBONES[key] = build_backbone(BackboneConfig(name=name, img_size=img_size, weights="random"))
        return _BACKBONES[key]

    return make
