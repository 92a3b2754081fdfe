"""A device's profile as a hello reply carries it: memory budget, cores, free disk and a warm training step time.

Standard library only (the thin ClientApp and the server decode it without torch). The device measures it
(:mod:`fedpetah.device.profile`); the server decodes it bounded like every reply, keeps the last one per device in
its fleet ledger (:class:`fedpetah.serving.fleet.DeviceRecord`) and may assign work by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROFILE = "profile"
"""The config record of a hello reply that holds the profile (sent when the hello request asks for it)."""
MAX_BUDGET_MB = 16 * 2**20
"""The largest memory budget a device may claim: 16 TiB, in MB."""
MAX_CORES = 4096
MAX_DISK_MB = float(2**30)
"""The most free disk a device may claim: 1 PiB, in MB."""
MAX_STEP_TIME_S = 3600.0
MAX_PROFILE_KEYS = 16
"""Keys a profile record may hold (unknown ones, from a newer device, are dropped)."""


@dataclass(frozen=True)
class DeviceProfile:
    """What a device can do: ``memory_budget_mb`` of training memory above its resting footprint, ``cores`` it may
    use, ``free_disk_mb`` in its backbone cache, and ``step_time_s`` of one warm training step of the calibration
    batch (0.0: not measured, e.g. before the backbone is cached)."""

    memory_budget_mb: float
    cores: int
    free_disk_mb: float
    step_time_s: float = 0.0

    def __post_init__(self) -> None:
        check_profile(self)

    def record(self) -> dict[str, Any]:
        """The hello reply's :data:`PROFILE` config record."""
        return {"memory-budget-mb": float(self.memory_budget_mb), "cores": int(self.cores),
                "free-disk-mb": float(self.free_disk_mb), "step-time-s": float(self.step_time_s)}

    @classmethod
    def decode(cls, record: Mapping[str, Any]) -> DeviceProfile:
        """A received :data:`PROFILE` record, bounded: every key present, finite and within its bound
        (``ValueError`` otherwise, which :meth:`fedpetah.wire.protocol.HelloReply.decode` reports as reason
        ``profile``)."""
        if len(record) > MAX_PROFILE_KEYS:
            raise _error(f"{len(record)} keys (limit {MAX_PROFILE_KEYS})")
        cores = record.get("cores")
        if isinstance(cores, bool) or not isinstance(cores, int):
            raise _error(f"cores must be an integer, got {type(cores).__name__} {cores!r:.40}")
        return cls(_number(record, "memory-budget-mb"), cores, _number(record, "free-disk-mb"),
                   _number(record, "step-time-s"))


def check_profile(profile: DeviceProfile) -> None:
    """ValueError unless every figure is a finite number within its bound."""
    bounds = (("memory-budget-mb", profile.memory_budget_mb, 0.0, MAX_BUDGET_MB),
              ("cores", profile.cores, 1, MAX_CORES), ("free-disk-mb", profile.free_disk_mb, 0.0, MAX_DISK_MB),
              ("step-time-s", profile.step_time_s, 0.0, MAX_STEP_TIME_S))
    for key, value, low, high in bounds:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _error(f"{key} must be a finite number, got {value!r:.40}")
        if not low <= value <= high:
            raise _error(f"{key}={value:g} is outside [{low:g}, {high:g}]")


def _number(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(f"{key} must be a number, got {type(value).__name__} {value!r:.40}")
    return float(value)


def _error(detail: str) -> ValueError:
    return ValueError(f"device profile: {detail}")
