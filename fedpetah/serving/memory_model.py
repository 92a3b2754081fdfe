"""The measured memory model: peak training memory of each variant above the resting footprint, beside the artifact.

A *variant* is what one device trains (issue 19): ``head`` (the run's adapter with every tensor but
the head frozen: no backward through the backbone), ``synqt``, and ``lora-r`` for r in 1, 2, 4, 8, 16 (the run's
LoRA config at rank r, alpha scaled so that alpha / rank stays the run's). :data:`VARIANTS` lists them from the
poorest to the richest: head < synqt < lora-1 < ... < lora-16. A LoRA run serves head and its views lora-r for
r <= its rank; a synqt run serves head and synqt (pass ``allowed`` to :meth:`MemoryModel.richest_fitting`).

Method (:func:`measure_variant`): each variant runs in a fresh interpreter (arguments as JSON on stdin, one JSON
line back), so one variant's allocator state cannot hide the next one's cost. The process loads the artifact,
builds the variant and ``steps`` batches of random images, then records its *resting* footprint (RSS). On CPU it
resets the kernel's high-water mark of its resident set (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and
reads that mark (``VmHWM``) after ``steps`` steps of :func:`fedpetah.train.train_adapter` (AdamW state and
first-call costs included) and the pass of the task-free router's statistics over the same images at the same
batch size (a device computes them in the same request; default router config): the figure is that mark minus
the resting RSS. ``ru_maxrss`` (what
:func:`fedpetah.train.peak_memory_mb` reads) cannot serve here: it survives ``execve``, so a worker started by a
server that once peaked at 1.2 GB reads that peak (measured: 416 MiB "needed" by a tiny backbone, 340 MiB by
every variant at 224 px). Where there is no ``/proc`` the figure falls back to ``ru_maxrss`` (``method``
``maxrss``: an upper bound). On CUDA it is ``torch.cuda.max_memory_allocated`` minus the memory allocated at rest.
Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` and one torch thread, as ``benchmarks/memory.py`` does: glibc's
adaptive threshold made one configuration read 185, 185 and 301 MiB in three runs; fixed, 148.0-148.1 MiB. The
safety margin of :meth:`MemoryModel.fits` is what covers a device's allocator and thread count. Figures are
rounded to 0.1 MiB, and at least 0.1.

The resting footprint is mostly the libraries: about 830 MiB here (torch 510, timm 195, peft 95), which is what
a device's default budget (``MemAvailable`` minus the footprint) has to subtract.

synqt trains on cached backbone features (``train.cache_features``): its figure holds the cache of the two
batches measured, and a device adds about the cached features of its other local images.

Measured before the statistics' pass was included (format 1; the pass runs at the training batch, no backward,
so it adds little where a variant trains through the backbone) on 2 shared cores, one torch thread, torch 2.15
CPU, load average 2.4-3.6, batch 16, 10 classes,
LoRA rank 4 alpha 8 on attention, two steps; MiB above a resting footprint of 828 (64 px) and 834 (224 px):

| px | head | synqt | lora-1 | lora-2 | lora-4 | lora-8 | lora-16 | 7 variants |
|---|---|---|---|---|---|---|---|---|
| 64 | 13.2-13.3 | 9.4-9.7 | 17.5-17.7 | 17.5-17.8 | 17.5-17.8 | 17.7 | 17.6-17.7 | 43-80 s |
| 224 | 59.4 | 55.4 | 84.3 | 84.3 | 84.6 | 84.9 | 85.5 | 47 s |

64 px: the default run's artifact (efficientvit_b0 pruned by half, warm-up weights), two runs; 224 px: the same
pipeline at 224 px with random weights and no recovery (memory does not depend on the weights), one run.

LoRA's rank barely moves memory: training LoRA on the attention layers holds their activations for the backward
pass, and the rank-r factors add little to that. What separates variants is backward through the backbone or
not (head and synqt against every lora-r); synqt's frozen forward runs 8 images at a time, below head's whole
batch.

It is not measured in a default run: :func:`memory_model` measures once when asked and stores
``memory-<key>.json`` (:func:`stored_path`: one file per batch size, classes, adapter and device) in the artifact's
directory (re-measured when the digest, image size, torch version or the variants asked for differ).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import torch

from fedpetah.adapters import Adapter, AdapterConfig, adapter_config, build_adapter
from fedpetah.adapters.lora import LoraConfig
from fedpetah.adapters.synqt import SynQTConfig
from fedpetah.artifact import MAX_IMG_SIZE, MIN_IMG_SIZE, load_artifact, read_manifest
from fedpetah.assignment import HEAD, LORA_RANKS
from fedpetah.atomic import atomic_write_text
from fedpetah.config import RouterConfig, TrainConfig
from fedpetah.experiment import ExperimentConfig
from fedpetah.routing.features import data_stats
from fedpetah.serving.pipeline import prepare_artifact
from fedpetah.tasks import ImageSet
from fedpetah.train import peak_memory_mb, resolve_device, train_adapter

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = (HEAD, "synqt", *(f"lora-{r}" for r in LORA_RANKS))
"""Every variant name, from the poorest to the richest."""
MEMORY_FILE = "memory.json"
"""The stored model's file name pattern: ``memory-<key>.json``, one file per setting (:func:`stored_path`), so runs
of other adapters or batch sizes beside the same artifact do not measure each other's away."""
MEASURE_STEPS = 8
"""Training steps measured per variant: the peak still grows over the first few (AdamW's state, the allocator), and
at 8 it is within about 5% of a whole local epoch's (25 steps of the default run: 23.4 against 24.4 MiB)."""
FORMAT_VERSION = 3  # 2: the router statistics' pass measured too; 3: frozen features cached a batch at a time
METHODS = ("vmhwm", "maxrss", "cuda")
MAX_MB = float(2**20)  # 1 TiB: no device measured here comes near it
MAX_BATCH, MAX_CLASSES, MAX_STEPS = 4096, 10_000, 64
MAX_FILE_BYTES, MAX_ADAPTER_CHARS, MAX_TEXT = 64 * 1024, 4096, 64
MIB = 2**20
WORKER = "from fedpetah.serving.memory_model import run_worker; run_worker()"


class MemoryModelError(ValueError):
    """A memory model (or a stored ``memory.json``) is malformed, or a variant could not be measured."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MemoryModelError(message)


def _count(name: str, value: Any, low: int, high: int) -> None:
    _check(type(value) is int and low <= value <= high, f"memory model {name} must be an int in [{low}, {high}], "
           f"got {value!r:.80}")


def _megabytes(name: str, value: Any) -> None:
    _check(type(value) in (int, float) and math.isfinite(value) and 0 < value <= MAX_MB,
           f"memory model {name} must be a finite number of MB in (0, {MAX_MB:.0f}], got {value!r:.80}")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class MemoryModel:
    """Peak training memory (MiB above the resting footprint) per variant, for one artifact and training setup."""

    digest: str
    img_size: int
    batch_size: int
    num_classes: int
    adapter: dict[str, Any]
    device: str
    torch: str
    method: str
    measured_at: str
    resting_mb: float
    variants: dict[str, float]
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check(self.format_version == FORMAT_VERSION, f"memory model format_version must be {FORMAT_VERSION}")
        _check(isinstance(self.digest, str) and re.fullmatch(r"[0-9a-f]{64}", self.digest) is not None,
               "memory model digest must be 64 lower-case hex digits")
        _count("img_size", self.img_size, MIN_IMG_SIZE, MAX_IMG_SIZE)
        _count("batch_size", self.batch_size, 1, MAX_BATCH)
        _count("num_classes", self.num_classes, 1, MAX_CLASSES)
        _check(isinstance(self.adapter, dict) and len(_canonical(self.adapter)) <= MAX_ADAPTER_CHARS,
               f"memory model adapter must be a JSON object of at most {MAX_ADAPTER_CHARS} characters")
        try:
            fields = dict(self.adapter)
            adapter_config(str(fields.pop("name", "")), **fields)
        except (KeyError, TypeError, ValueError) as err:
            raise MemoryModelError(f"memory model adapter is not a valid adapter config: {err}") from None
        _check(self.device in ("cpu", "cuda"), f"memory model device must be cpu or cuda, got {self.device!r:.80}")
        _check(isinstance(self.torch, str) and 0 < len(self.torch) <= MAX_TEXT,
               f"memory model torch must be a version string of 1..{MAX_TEXT} characters")
        _check(self.method in METHODS, f"memory model method must be one of {list(METHODS)}, got {self.method!r:.80}")
        _check(isinstance(self.measured_at, str) and len(self.measured_at) <= MAX_TEXT,
               "memory model measured_at must be an ISO 8601 time")
        try:
            when = datetime.fromisoformat(self.measured_at)
        except ValueError:
            raise MemoryModelError("memory model measured_at must be an ISO 8601 time") from None
        _check(when.tzinfo is not None, "memory model measured_at must carry its time zone")
        _megabytes("resting_mb", self.resting_mb)
        _check(isinstance(self.variants, dict) and len(self.variants) > 0, "memory model variants must not be empty")
        unknown = sorted(str(v)[:40] for v in self.variants if v not in VARIANTS)
        _check(not unknown, f"memory model variants {unknown} are not among {list(VARIANTS)}")
        for name, mb in self.variants.items():
            _megabytes(f"variants[{name!r}]", mb)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> MemoryModel:
        """Parse and validate; anything malformed (fields, types, bounds, names) raises MemoryModelError."""
        _check(len(text) <= MAX_FILE_BYTES, f"memory model exceeds {MAX_FILE_BYTES} bytes")
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise MemoryModelError(f"memory model is not valid JSON: {err}") from None
        _check(isinstance(raw, dict), "memory model must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, extra = sorted(names - set(raw)), sorted(str(k)[:40] for k in set(raw) - names)
        _check(not missing and not extra, f"memory model fields differ: missing {missing}, extra {extra}")
        return cls(**raw)

    def need_mb(self, variant: str, margin: float = 0.0) -> float:
        """What ``variant`` needs with a safety ``margin`` (a fraction: 0.2 asks 20% more than measured)."""
        _check(isinstance(margin, int | float) and math.isfinite(margin) and 0 <= margin <= 10,
               f"margin must be a fraction in [0, 10], got {margin!r:.80}")
        _check(variant in self.variants, f"variant {variant!r:.40} was not measured (have {sorted(self.variants)})")
        return self.variants[variant] * (1 + margin)

    def _allowed(self, allowed: Sequence[str] | None) -> list[str]:
        names = list(self.variants) if allowed is None else list(allowed)
        missing = sorted(str(v)[:40] for v in names if v not in self.variants)
        _check(not missing, f"variants {missing} were not measured (have {sorted(self.variants)})")
        _check(len(names) > 0, "allowed variants must not be empty")
        return sorted(set(names), key=VARIANTS.index)

    def fits(self, budget_mb: float, margin: float = 0.0, allowed: Sequence[str] | None = None) -> list[str]:
        """The variants (of ``allowed``, default every measured one) whose need with ``margin`` is within
        ``budget_mb``, from the poorest to the richest."""
        _check(isinstance(budget_mb, int | float) and math.isfinite(budget_mb) and budget_mb >= 0,
               f"budget must be a finite number of MB >= 0, got {budget_mb!r:.80}")
        return [v for v in self._allowed(allowed) if self.need_mb(v, margin) <= budget_mb]

    def richest_fitting(self, budget_mb: float, margin: float = 0.0,
                        allowed: Sequence[str] | None = None) -> str | None:
        """The richest variant of ``allowed`` that fits (:meth:`fits`); None when none does (the device cannot
        train: :meth:`smallest_need_mb` says what it would need)."""
        fitting = self.fits(budget_mb, margin, allowed)
        return fitting[-1] if fitting else None

    def smallest_need_mb(self, margin: float = 0.0, allowed: Sequence[str] | None = None) -> float:
        """The least budget that trains any variant of ``allowed`` with ``margin``."""
        return min(self.need_mb(v, margin) for v in self._allowed(allowed))

    def matches(self, digest: str, batch_size: int, num_classes: int, adapter: AdapterConfig, device: str,
                variants: Sequence[str]) -> bool:
        """Whether this model answers for these settings (and this torch), with every variant of ``variants``."""
        return (self.digest, self.batch_size, self.num_classes, self.device, self.torch) == (
            digest, batch_size, num_classes, device, torch.__version__
        ) and _canonical(self.adapter) == _canonical(asdict(adapter)) and set(variants) <= set(self.variants)


def variant_config(run_adapter: AdapterConfig, variant: str) -> AdapterConfig:
    """The adapter config a variant builds: the run's LoRA at rank r (alpha scaled with it) for ``lora-r``, the
    run's synqt config (or the default) for ``synqt``, the run's adapter for ``head`` (frozen but the head)."""
    _check(variant in VARIANTS, f"unknown variant {variant!r:.40}; variants are {list(VARIANTS)}")
    if variant.startswith("lora-"):
        rank = int(variant.removeprefix("lora-"))
        base = run_adapter if isinstance(run_adapter, LoraConfig) else adapter_config("lora")
        assert isinstance(base, LoraConfig)
        return dataclasses.replace(base, rank=rank, alpha=base.alpha * rank / base.rank)
    if variant == "synqt":
        return run_adapter if isinstance(run_adapter, SynQTConfig) else adapter_config("synqt")
    if isinstance(run_adapter, LoraConfig):  # loads the LoRA tensors, then trains the head alone
        return dataclasses.replace(run_adapter, train_lora=False)
    return run_adapter


def build_variant(backbone: Any, run_adapter: AdapterConfig, variant: str, num_classes: int) -> Adapter[Any]:
    """The adapter that ``variant`` trains on ``backbone``; for ``head`` every trainable tensor but the head's
    is frozen, so no gradient flows through the backbone."""
    adapter = build_adapter(variant_config(run_adapter, variant), backbone, num_classes)
    if variant == "head":
        for name, param in adapter.model.named_parameters():
            if not name.startswith("head."):
                param.requires_grad_(False)
    return adapter


def _status_mb(field: str) -> float | None:
    """``VmRSS`` or ``VmHWM`` of ``/proc/self/status`` in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as handle:
            found = re.search(rf"^{field}:\s+(\d+) kB$", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def reset_high_water_mark() -> bool:
    """Set the kernel's peak RSS of this process (``VmHWM``) to its current RSS (Linux >= 4.0); False where it
    cannot. ``ru_maxrss`` is not reset with it: it also keeps the peak seen when any thread exited."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def measure_here(request: dict[str, Any]) -> dict[str, Any]:
    """One variant in this process (what :func:`run_worker` runs): peak training MiB above the resting footprint."""
    torch.set_num_threads(int(request["threads"]))
    raw = dict(request["adapter"])
    run_adapter = adapter_config(str(raw.pop("name")), **raw)
    backbone = load_artifact(Path(request["artifact"]))
    variant, batch, steps, classes = request["variant"], int(request["batch_size"]), int(request["steps"]), \
        int(request["num_classes"])
    adapter = build_variant(backbone, run_adapter, variant, classes)
    device = torch.device(request["device"])
    adapter.model.to(device)
    count, chans = batch * steps, 1 if backbone.in_chans == 1 else 3
    images = torch.randint(0, 256, (count, chans, backbone.img_size, backbone.img_size),
                           generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(count) % classes)
    config = TrainConfig(epochs=1, batch_size=batch, max_steps=steps, device=device.type, seed=0)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        resting, method = torch.cuda.memory_allocated(device) / MIB, "cuda"
        torch.cuda.reset_peak_memory_stats(device)
    else:
        method = "vmhwm" if reset_high_water_mark() else "maxrss"
        resting = psutil.Process().memory_info().rss / MIB
    train_adapter(adapter, data, config)
    data_stats(backbone, data, classes, RouterConfig(), batch_size=batch)  # a device's first round sends them too
    peak = _status_mb("VmHWM") if method == "vmhwm" else peak_memory_mb(device)
    assert peak is not None
    return {"variant": variant, "mb": peak - resting, "resting_mb": resting, "method": method,
            "trainable": adapter.num_trainable()}


def run_worker() -> None:
    """The measuring subprocess: one JSON request on stdin, one JSON line on stdout."""
    print(json.dumps(measure_here(json.loads(sys.stdin.read()))), flush=True)


def measure_variant(artifact_path: Path, variant: str, num_classes: int, batch_size: int, steps: int = MEASURE_STEPS, *,
                    adapter: AdapterConfig | None = None, device: str = "cpu", threads: int = 1,
                    timeout_s: float = 600.0) -> float:
    """Peak training memory of ``variant`` in MiB above the resting footprint, measured in a fresh interpreter.

    ``adapter``: the run's adapter config (default: the default LoRA). A failure or a run past ``timeout_s``
    raises MemoryModelError naming the variant.
    """
    result = _measure(Path(artifact_path), variant, num_classes, batch_size, steps,
                      adapter or adapter_config("lora"), device, threads, timeout_s)
    return float(result["mb"])


def _measure(artifact: Path, variant: str, num_classes: int, batch_size: int, steps: int, adapter: AdapterConfig,
             device: str, threads: int, timeout_s: float) -> dict[str, Any]:
    variant_config(adapter, variant)  # an unknown variant fails here, not in the subprocess
    _count("batch_size", batch_size, 1, MAX_BATCH)
    _count("num_classes", num_classes, 1, MAX_CLASSES)
    _count("steps", steps, 1, MAX_STEPS)
    _check(device in ("cpu", "cuda"), f"device must be cpu or cuda, got {device!r:.40}")
    request = {"artifact": str(artifact.resolve()), "variant": variant, "num_classes": num_classes,
               "batch_size": batch_size, "steps": steps, "adapter": asdict(adapter), "device": device,
               "threads": threads}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        done = subprocess.run([sys.executable, "-c", WORKER], input=json.dumps(request), capture_output=True,
                              text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise MemoryModelError(f"measuring variant {variant!r} took longer than {timeout_s:g} s") from None
    if done.returncode:
        raise MemoryModelError(f"measuring variant {variant!r} failed (exit {done.returncode}):\n"
                               f"{done.stderr[-2000:]}")
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        float(result["mb"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise MemoryModelError(f"measuring variant {variant!r} gave no result: {done.stdout[-500:]!r}") from None
    return result


def stored_path(artifact_dir: Path, batch_size: int, num_classes: int, adapter: AdapterConfig, device: str) -> Path:
    """Where the model of these settings is stored beside the artifact (``memory-<key>.json``)."""
    key = hashlib.sha256(json.dumps([batch_size, num_classes, _canonical(asdict(adapter)), device]).encode())
    return Path(artifact_dir) / MEMORY_FILE.replace(".json", f"-{key.hexdigest()[:16]}.json")


def load_stored(path: Path) -> MemoryModel | None:
    """A stored model; None when absent or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        _check(path.stat().st_size <= MAX_FILE_BYTES, f"{path} exceeds {MAX_FILE_BYTES} bytes")
        return MemoryModel.from_json(path.read_bytes())
    except MemoryModelError as err:
        log.warning("ignoring %s: %s", path, err)
        return None


def memory_model(source: ExperimentConfig | Path, batch_size: int | None = None, num_classes: int = 10, *,
                 adapter: AdapterConfig | None = None, variants: Sequence[str] = VARIANTS,
                 device: str | None = None, steps: int = MEASURE_STEPS, threads: int = 1, timeout_s: float = 600.0,
                 cache_dir: Path | None = None) -> MemoryModel:
    """The memory model of an artifact (a directory) or of a run's artifact (an ExperimentConfig: built by the
    pipeline if needed; batch size, adapter and device default to the run's): :func:`stored_path` beside the artifact
    when it matches, else measured (one subprocess per variant) and stored there atomically."""
    if isinstance(source, ExperimentConfig):
        artifact_dir = prepare_artifact(source, cache_dir)
        batch_size = source.train.batch_size if batch_size is None else batch_size
        adapter = adapter or source.adapter
        device = device or resolve_device(source.train.device).type
    else:
        artifact_dir = Path(source)
        _check(batch_size is not None, "memory_model of an artifact directory needs batch_size")
    assert batch_size is not None
    adapter, device = adapter or adapter_config("lora"), device or "cpu"
    for variant in variants:
        variant_config(adapter, variant)
    wanted = sorted(set(variants), key=VARIANTS.index)
    manifest = read_manifest(artifact_dir)
    digest = manifest.manifest_sha256
    path = stored_path(artifact_dir, batch_size, num_classes, adapter, device)
    stored = load_stored(path)
    if stored is not None and stored.matches(digest, batch_size, num_classes, adapter, device, wanted):
        return stored
    start, results = time.perf_counter(), []
    for variant in wanted:
        results.append(_measure(artifact_dir, variant, num_classes, batch_size, steps, adapter, device, threads,
                                timeout_s))
        log.info("memory model %s: %s needs %.1f MiB", artifact_dir.name, variant, results[-1]["mb"])
    model = MemoryModel(
        digest=digest, img_size=manifest.img_size, batch_size=batch_size,
        num_classes=num_classes, adapter=json.loads(_canonical(asdict(adapter))), device=device,
        torch=torch.__version__, method=max((r["method"] for r in results), key=METHODS.index),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        resting_mb=round(max(float(r["resting_mb"]) for r in results), 1),
        variants={r["variant"]: max(round(float(r["mb"]), 1), 0.1) for r in results},
    )
    atomic_write_text(path, model.to_json())
    log.info("measured the memory model of %s in %.0f s", artifact_dir.name, time.perf_counter() - start)
    return model
