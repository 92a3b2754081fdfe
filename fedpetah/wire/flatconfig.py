"""Nested config <-> Flower's flat run config: dotted keys, scalar values (bool, int, float, str), lossless.

Encoding (the one place it is defined): a nested mapping ``{"train": {"lr": 0.1}}`` becomes
``{"train.lr": 0.1}``. Values that Flower cannot carry are stored as strings with the prefix ``json:``
followed by JSON: ``None`` -> ``"json:null"``, a list or tuple -> ``"json:[1, 2]"``, an empty mapping
-> ``"json:{}"``. A string that itself starts with ``json:`` is escaped the same way
(``"json:\\"json:...\\""``), so every string decodes unambiguously. Tuples come back as lists
(:func:`build_dataclass` turns them back into tuples where a field is annotated so). Keys must be
non-empty strings without dots. Accepts dataclass instances and OmegaConf containers as well as dicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

Scalar = bool | int | float | str
PREFIX = "json:"
T = TypeVar("T")


def _as_mapping(value: Any) -> Mapping[str, Any] | None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value if isinstance(value, Mapping) else None


def _json_ready(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (lists, dicts, scalars); anything else raises ``TypeError``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: non-finite floats inside lists are not supported")
        return value
    mapping = _as_mapping(value)
    if mapping is not None:
        if not all(isinstance(k, str) for k in mapping):
            raise TypeError(f"{where}: mapping keys inside lists must be strings")
        return {k: _json_ready(v, f"{where}.{k}") for k, v in mapping.items()}
    if isinstance(value, Sequence):
        return [_json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: unsupported config value of type {type(value).__name__}; use str, number or list")


def flatten(nested: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Scalar]:
    """Dotted-key scalars for Flower's run config; see the module docstring for the encoding."""
    mapping = _as_mapping(nested)
    if mapping is None:
        raise TypeError(f"flatten needs a mapping or a dataclass instance, got {type(nested).__name__}")
    flat: dict[str, Scalar] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"config keys must be non-empty strings without dots, got {key!r} in {prefix!r}")
        path = f"{prefix}{key}"
        child = _as_mapping(value)
        if child:
            flat.update(flatten(child, f"{path}."))
        elif isinstance(value, bool | int | float):
            flat[path] = value
        elif isinstance(value, str):
            flat[path] = PREFIX + json.dumps(value) if value.startswith(PREFIX) else value
        else:
            flat[path] = PREFIX + json.dumps(_json_ready(value, path))
    return flat


def _decode(key: str, value: Any) -> Any:
    if isinstance(value, str) and value.startswith(PREFIX):
        try:
            return json.loads(value[len(PREFIX) :])
        except json.JSONDecodeError as error:
            raise ValueError(f"{key}: bad {PREFIX} value {value!r}: {error}") from None
    if not isinstance(value, bool | int | float | str):
        raise TypeError(f"{key}: flat config values are bool, int, float or str, got {type(value).__name__}")
    return value


def unflatten(flat: Mapping[str, Scalar]) -> dict[str, Any]:
    """The nested dict that :func:`flatten` encoded; a key that is both a value and a section raises."""
    nested: dict[str, Any] = {}
    for key in sorted(flat, key=lambda k: k.count(".")):  # sections before the values inside them
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"bad flat config key {key!r}")
        node = nested
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{key!r} is inside {'.'.join(parts[: depth + 1])!r}, which is a value")
            node = child
        if parts[-1] in node:
            raise ValueError(f"{key!r} is both a value and a section")
        node[parts[-1]] = _decode(key, flat[key])
    return nested


def build_dataclass(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls(**data)`` with nested dataclass fields built recursively and lists turned into tuples where
    the field is annotated as a tuple; unknown keys raise ``TypeError``, missing ones take defaults."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    return cls(**{name: _coerce(hints[name], value) for name, value in data.items()})


def _coerce(hint: Any, value: Any) -> Any:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for option in typing.get_args(hint) if union else (hint,):
        if isinstance(value, Mapping) and dataclasses.is_dataclass(option) and isinstance(option, type):
            return build_dataclass(option, value)
        if isinstance(value, list) and (option is tuple or typing.get_origin(option) is tuple):
            return tuple(value)
    return value
