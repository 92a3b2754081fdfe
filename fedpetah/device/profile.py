"""What this device can do (memory budget, cores, free disk, a warm training step time), and the guard that keeps
its training within the memory budget: it answers ``no-budget`` instead of being killed.

Memory is counted as the server's memory model counts it: what training adds above the runtime's resting footprint
(the process's resident set just before training, with the backbone loaded). The default budget is the kernel's
``MemAvailable``: the memory that can still be given out, which already leaves out the resting footprint of this
process (``--memory-budget-mb`` sets it instead).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import torch
import torch.nn.functional as F

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.artifact import ArtifactError
from fedpetah.backbone import Backbone
from fedpetah.device.local import BackboneCache
from fedpetah.wire.profile import MAX_BUDGET_MB, MAX_CORES, MAX_DISK_MB, MAX_STEP_TIME_S, DeviceProfile

log = logging.getLogger(__name__)

CALIBRATION_ADAPTER = "head"
"""The adapter a device times its warm training step with: the same on every device, so the figures compare."""
CALIBRATION_BATCH = 8
SAMPLE_INTERVAL_S = 0.005
"""How often :class:`MemoryWatch` reads the resident set while training (a read takes about 15 us)."""
_STEP_TIMES: dict[str, float] = {}
"""Measured warm step times by backbone digest: measured once per process (every hello after the first, and the
simulated clients that share a process, re-use it)."""


def resident_mb() -> float | None:
    """This process's resident set now (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_resident_mb() -> float:
    """The process's peak resident set so far (exact: the kernel's high-water mark)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def available_mb() -> float | None:
    """Memory the system can still give out: ``MemAvailable`` (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return None


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_disk_mb(path: Path) -> float:
    """Free disk where ``path`` is (or would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 2**20


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc), so the resting footprint is what the runtime
    holds, and what training takes shows as growth above it (under a millisecond; a full ``gc.collect`` would
    take 0.2 s with torch loaded, for cycles that rarely hold tensors)."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


MMAP_THRESHOLD = 65536
"""Bytes from which glibc serves an allocation with its own mmap (returned to the system when freed) on a device
that trains under a budget: the memory model measures with this threshold (``MALLOC_MMAP_THRESHOLD_``), and glibc's
default, adaptive one lets freed blocks stay resident (measured: a device's peak 15-20% above the model's)."""
_STEADY: list[bool] = []


def steady_allocator() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process, once (a no-op elsewhere), so a
    device's peak memory is what the memory model measured."""
    if _STEADY:
        return
    _STEADY.append(True)
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def warm_step_seconds(backbone: Backbone, batch: int = CALIBRATION_BATCH) -> float:
    """Seconds of the second of two training steps of the :data:`CALIBRATION_ADAPTER` on a random batch."""
    adapter = build_adapter(adapter_config(CALIBRATION_ADAPTER), backbone, 2)
    model = adapter.model.train()
    optimizer = torch.optim.SGD(list(adapter.trainable().values()), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, backbone.in_chans, backbone.img_size, backbone.img_size, generator=generator)
    y = torch.arange(batch) % 2
    seconds = 0.0
    with torch.random.fork_rng(devices=[]):
        for _ in range(2):
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - start
    return seconds


def budget_mb(override: float | None) -> float | None:
    """The training memory budget: ``override`` (``--memory-budget-mb``), else what the system can give out now
    (None: unknown, no guard)."""
    return override if override is not None else available_mb()


def measure_profile(cache: BackboneCache, digest: str, override_mb: float | None = None) -> DeviceProfile:
    """This device's profile for a server whose backbone is ``digest``; its step time is measured once per
    backbone, and only when the backbone is cached already (0.0 before)."""
    held = cache.has(digest)
    step = _STEP_TIMES.get(digest) if held else None  # measured in this process (simulated clients share it)
    if step is None and held:
        try:
            step = _STEP_TIMES[digest] = warm_step_seconds(cache.get(digest))
        except (ArtifactError, ValueError, TypeError, KeyError, OSError, RuntimeError) as error:
            log.warning("cannot time a training step: %s", error)
    budget = budget_mb(override_mb)
    return DeviceProfile(memory_budget_mb=min(max(budget or 0.0, 0.0), float(MAX_BUDGET_MB)),
                         cores=min(usable_cores(), MAX_CORES), free_disk_mb=min(free_disk_mb(cache.root), MAX_DISK_MB),
                         step_time_s=min(step or 0.0, MAX_STEP_TIME_S))


class MemoryBudgetExceeded(Exception):
    """Training took more memory above the resting footprint than the budget allows."""

    def __init__(self, peak_mb: float, budget_mb: float, step: int) -> None:
        super().__init__(f"training stopped after {step} step(s): it took {peak_mb:.1f} MB above the resting "
                         f"footprint, the budget is {budget_mb:.1f} MB")
        self.peak_mb, self.budget_mb, self.step = peak_mb, budget_mb, step


class MemoryWatch:
    """The peak resident memory above the resting footprint while it is open, and a guard against a budget.

    On entry it releases free memory (:func:`release_free_memory`) and reads the resting footprint; a thread then
    reads the resident set every :data:`SAMPLE_INTERVAL_S`, and every :meth:`check` (the training loop calls it
    after each step) reads it too, together with the kernel's exact high-water mark whenever training pushed it
    past where it stood on entry. :meth:`check` raises :class:`MemoryBudgetExceeded` once the peak is over
    ``budget_mb`` (None: measure only), so training stops at the next step instead of growing further.
    """

    def __init__(self, budget_mb: float | None, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.budget_mb, self.interval_s = budget_mb, interval_s
        self.rest_mb = 0.0
        self.peak_mb = 0.0  # above rest
        self.steps = 0
        self._high_water = 0.0
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryWatch:
        if self.budget_mb is not None:
            steady_allocator()
        release_free_memory()
        self._high_water = _max_resident_mb()
        resident = resident_mb()
        self.rest_mb = self._high_water if resident is None else resident
        if resident is not None:
            self._thread = threading.Thread(target=self._sample_until_stopped, name="memory-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> float:
        """Read the resident set (and the high-water mark) now; returns the peak above rest so far."""
        found = [resident_mb() or 0.0, self.rest_mb]
        high_water = _max_resident_mb()
        if high_water > self._high_water:  # training set a new high: the kernel's figure is exact
            found.append(high_water)
        with self._lock:
            self.peak_mb = max(self.peak_mb, max(found) - self.rest_mb)
        return self.peak_mb

    def over(self) -> bool:
        return self.budget_mb is not None and self.peak_mb > self.budget_mb

    def check(self, step: bool = True) -> None:
        """After a training ``step`` (or other work): :class:`MemoryBudgetExceeded` if the peak so far is over
        the budget."""
        self.steps += step
        self.sample()
        if self.over():
            assert self.budget_mb is not None
            raise MemoryBudgetExceeded(self.peak_mb, self.budget_mb, self.steps)
