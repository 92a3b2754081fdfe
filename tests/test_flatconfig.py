"""Flat run-config conversion: lossless round trips, the json: encoding, clear errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedpetah.config import BackboneConfig, TrainConfig
from fedpetah.wire.flatconfig import build_dataclass, flatten, unflatten


@dataclass
class _Inner:
    sizes: tuple[int, ...] = (32, 64)
    note: str | None = None


@dataclass
class _Outer:
    name: str = "json:looks-encoded"
    ratio: float = 0.25
    enabled: bool = False
    rounds: int = 3
    inner: _Inner = field(default_factory=_Inner)
    schedule: list[dict[str, int]] = field(default_factory=lambda: [{"task": 0, "rounds": 2}])
    empty: dict[str, int] = field(default_factory=dict)


def test_nested_dataclasses_round_trip() -> None:
    for config in (_Outer(), _Outer(inner=_Inner(note="x")), BackboneConfig(), TrainConfig(max_steps=5)):
        flat = flatten(dataclasses.asdict(config))
        assert all(isinstance(v, bool | int | float | str) for v in flat.values())
        assert build_dataclass(type(config), unflatten(flat)) == config


def test_the_encoding_is_flowers_dotted_scalars() -> None:
    flat = flatten(_Outer())
    assert flat == {
        "name": 'json:"json:looks-encoded"',
        "ratio": 0.25,
        "enabled": False,
        "rounds": 3,
        "inner.sizes": "json:[32, 64]",
        "inner.note": "json:null",
        "schedule": 'json:[{"task": 0, "rounds": 2}]',
        "empty": "json:{}",
    }
    restored = unflatten(flat)
    assert restored["inner"] == {"sizes": [32, 64], "note": None} and restored["name"] == "json:looks-encoded"
    assert flatten(OmegaConf.create({"train": {"lr": 0.1, "ids": [1, 2]}})) == {
        "train.lr": 0.1,
        "train.ids": "json:[1, 2]",
    }


def test_unsupported_values_and_keys_raise() -> None:
    with pytest.raises(TypeError, match="a.path: unsupported"):
        flatten({"a": {"path": Path("/tmp")}})
    with pytest.raises(ValueError, match="without dots"):
        flatten({"a.b": 1})
    with pytest.raises(TypeError, match="mapping or a dataclass"):
        flatten([1, 2])
    with pytest.raises(ValueError, match="non-finite"):
        flatten({"a": [float("nan")]})
    with pytest.raises(ValueError, match="which is a value"):
        unflatten({"a": 1, "a.b": 2})
    with pytest.raises(ValueError, match="bad json"):
        unflatten({"a": "json:[1,"})
    with pytest.raises(TypeError, match="flat config values"):
        unflatten({"a": [1]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="no field"):
        build_dataclass(TrainConfig, {"learning_rate": 0.1})
    with pytest.raises(ValueError, match="train.optimizer"):
        build_dataclass(TrainConfig, unflatten({"optimizer": "adam"}))
