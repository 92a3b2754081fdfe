"""The frozen backbone artifact: safetensors weights + a JSON manifest, SHA-256 verified, never unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedpetah.atomic import atomic_write_bytes, atomic_write_text
from fedpetah.backbone import Backbone, create_timm_model, family_of
from fedpetah.config import BackboneConfig, PruningConfig
from fedpetah.pruning import clear_attention_caches, replay_pruning

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
PIPELINE_VERSION = 2
"""Part of every artifact's cache key: bump it when the code changes what the same settings ship (2: LiteMLA heads
slimmed with the residual stream, the per-family depth rule, glyph warm-up)."""

# Bounds on a manifest, checked before anything is built from it: the manifest comes from the server, and
# building a model at a huge image size, or replaying millions of pruning steps, would cost a device hours of
# CPU and gigabytes of memory before any weight is checked. Every timm hybrid we support at 224-384 px is well
# inside them (benchmarks/manifest_bounds.py measures the largest ones).
MAX_MANIFEST_BYTES = 16 * 2**20
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 768
MAX_IN_CHANS = 16
MAX_MODEL_NAME = 128
MAX_PRUNING_STEPS = 1024  # remove_block / slim_heads steps: at most one per block or attention module
MAX_WIDTH_STEPS = 8  # each traces the whole model to build torch-pruning's dependency graph
MAX_TENSORS = 8192
MAX_TENSOR_DIMS = 8
MAX_PARAMS = 2**30  # the largest supported hybrid (efficientvit_l3) has about 0.25 of this


class ArtifactError(Exception):
    """A backbone artifact is missing, malformed, tampered with or does not fit its model."""


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild the backbone's module tree from timm and check its tensors."""

    format_version: int
    model_name: str
    family: str
    create_kwargs: dict[str, Any]
    img_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    pruning_history: list[Any]
    pretraining: dict[str, Any]
    num_params: int
    weights_sha256: str
    tensors: dict[str, dict[str, Any]]
    manifest_sha256: str = ""

    def body(self) -> dict[str, Any]:
        """Every field except the manifest's own digest."""
        body = asdict(self)
        body.pop("manifest_sha256")
        return body

    def digest(self) -> str:
        return manifest_digest(self.body())


MANIFEST_FIELD_TYPES: dict[str, type] = {
    **dict.fromkeys(("format_version", "img_size", "in_chans", "num_params"), int),
    **dict.fromkeys(("model_name", "family", "weights_sha256", "manifest_sha256"), str),
    **dict.fromkeys(("create_kwargs", "pretraining", "tensors"), dict),
    **dict.fromkeys(("mean", "std", "pruning_history"), list),
}


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_digest(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces, ASCII, no NaN) of a manifest's body."""
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != "manifest_sha256"})).hexdigest()


def pack_artifact(backbone: Backbone, directory: Path) -> Manifest:
    """Write ``weights.safetensors`` + ``manifest.json`` into ``directory`` atomically (temp dir, rename)."""
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.module.state_dict().items()}
    weights = save_safetensors(state)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_name=backbone.model_name,
        family=backbone.family.name,
        create_kwargs=dict(backbone.create_kwargs),
        img_size=backbone.img_size,
        in_chans=backbone.in_chans,
        mean=[float(v) for v in backbone.mean],
        std=[float(v) for v in backbone.std],
        pruning_history=backbone.pruning_history,
        pretraining=dict(backbone.pretraining),
        num_params=backbone.num_params(),
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        tensors={k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in state.items()},
    )
    try:
        manifest = Manifest(**{**manifest.body(), "manifest_sha256": manifest.digest()})
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"backbone metadata is not plain JSON: {err}") from None
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        atomic_write_bytes(staging / WEIGHTS, weights)  # durable before the folder is swapped into place
        atomic_write_text(staging / MANIFEST, json.dumps(asdict(manifest), indent=1, sort_keys=True))
        _swap_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _swap_into_place(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``; an existing artifact there is moved aside, then deleted."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    os.replace(directory, old / "artifact")
    try:
        os.replace(staging, directory)
    except OSError:
        os.replace(old / "artifact", directory)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: Path) -> Manifest:
    """Parse and verify ``manifest.json`` (format version, fields, its own digest); weights untouched."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST} in {directory}")
    check_manifest_size(path.stat().st_size)
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"unsupported artifact format version {raw.get('format_version')!r}; this fedpetah reads {FORMAT_VERSION}"
        )
    if set(raw) != set(MANIFEST_FIELD_TYPES):
        missing, extra = sorted(set(MANIFEST_FIELD_TYPES) - set(raw)), sorted(set(raw) - set(MANIFEST_FIELD_TYPES))
        raise ArtifactError(f"manifest fields differ: missing {missing}, extra {extra}")
    for name, kind in MANIFEST_FIELD_TYPES.items():
        if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
            raise ArtifactError(f"manifest field {name} must be {kind.__name__}")
    check_manifest_bounds(raw)
    manifest = Manifest(**raw)
    try:
        digest = manifest.digest()
    except ValueError as err:  # NaN or infinity smuggled into the JSON
        raise ArtifactError(f"{path} holds values outside plain JSON: {err}") from None
    if digest != manifest.manifest_sha256:
        raise ArtifactError(f"manifest digest mismatch in {path}: the manifest was modified")
    for stats in (manifest.mean, manifest.std):
        if len(stats) != manifest.in_chans or not all(isinstance(v, int | float) for v in stats):
            raise ArtifactError(f"manifest mean/std must hold {manifest.in_chans} numbers")
    return manifest


def check_manifest_size(size: int) -> None:
    """ArtifactError if a manifest of ``size`` bytes exceeds :data:`MAX_MANIFEST_BYTES`."""
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"manifest size {size} bytes exceeds the limit of {MAX_MANIFEST_BYTES} bytes")


def _bounded(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ArtifactError(f"manifest field {field} = {value} is outside the limits [{low}, {high}]")


def check_manifest_bounds(raw: dict[str, Any]) -> None:
    """Every size a device would spend CPU or memory on, within this module's limits (fields already typed)."""
    _bounded("img_size", raw["img_size"], MIN_IMG_SIZE, MAX_IMG_SIZE)
    _bounded("in_chans", raw["in_chans"], 1, MAX_IN_CHANS)
    _bounded("num_params", raw["num_params"], 0, MAX_PARAMS)
    _bounded("len(model_name)", len(raw["model_name"]), 1, MAX_MODEL_NAME)
    history = raw["pruning_history"]
    _bounded("len(pruning_history)", len(history), 0, MAX_PRUNING_STEPS)
    widths = sum(1 for step in history if isinstance(step, dict) and step.get("op") == "width")
    _bounded("pruning_history width steps", widths, 0, MAX_WIDTH_STEPS)
    tensors = raw["tensors"]
    _bounded("len(tensors)", len(tensors), 1, MAX_TENSORS)
    total = 0
    for name, spec in tensors.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ArtifactError(f"manifest field tensors[{name!r:.80}].shape must be a list of sizes >= 0")
        _bounded(f"len(tensors[{name!r:.80}].shape)", len(shape), 0, MAX_TENSOR_DIMS)
        count = 1
        for size in shape:
            count = min(count * size, MAX_PARAMS + 1)  # capped: no huge integers from hostile shapes
        total += count
        _bounded("total elements of tensors", total, 0, MAX_PARAMS)


def artifact_digest(directory: Path) -> str:
    """The artifact's id (its verified manifest digest, which covers the weights' SHA-256)."""
    return read_manifest(directory).manifest_sha256


def artifact_size(directory: Path) -> int:
    """Bytes on disk of the weights and the manifest: what a client downloads once."""
    paths = [Path(directory) / name for name in (WEIGHTS, MANIFEST)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ArtifactError(f"{directory} lacks {missing}")
    return sum(p.stat().st_size for p in paths)


def load_artifact(directory: Path, expected_digest: str | None = None) -> Backbone:
    """Verify, rebuild from timm + manifest, load tensors strictly and freeze; any defect is ArtifactError."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if expected_digest is not None and manifest.manifest_sha256 != expected_digest:
        raise ArtifactError(f"artifact digest {manifest.manifest_sha256} != expected {expected_digest}")
    weights_path = directory / WEIGHTS
    if not weights_path.is_file():
        raise ArtifactError(f"no {WEIGHTS} in {directory}")
    weights = weights_path.read_bytes()
    if hashlib.sha256(weights).hexdigest() != manifest.weights_sha256:
        raise ArtifactError(f"{weights_path} does not match the manifest's SHA-256: weights were modified")
    try:
        state = load_safetensors(weights)
    except SafetensorError as err:
        raise ArtifactError(f"{weights_path} is not a valid safetensors file: {err}") from None
    _check_tensors(state, manifest)
    backbone = _rebuild(manifest)
    expected = {k: tuple(v.shape) for k, v in backbone.module.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state.items()}:
        wrong = sorted(set(expected.items()) ^ {(k, tuple(v.shape)) for k, v in state.items()})
        raise ArtifactError(f"weights do not fit the rebuilt {manifest.model_name}: {wrong[:4]}")
    backbone.module.load_state_dict(state, strict=True)
    clear_attention_caches(backbone.module)
    backbone.module.eval().requires_grad_(False)
    return backbone


def _check_tensors(state: dict[str, torch.Tensor], manifest: Manifest) -> None:
    found = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in state.items()}
    if found != manifest.tensors:
        diff = sorted(k for k in set(found) | set(manifest.tensors) if found.get(k) != manifest.tensors.get(k))
        raise ArtifactError(f"tensors differ from the manifest: {diff[:4]}")


def _rebuild(manifest: Manifest) -> Backbone:
    """The module tree from timm (no weights) plus the replayed pruning history."""
    try:
        family = family_of(manifest.model_name)
        module, kwargs = create_timm_model(manifest.model_name, manifest.img_size, manifest.in_chans)
    except (ValueError, RuntimeError) as err:
        raise ArtifactError(f"cannot build {manifest.model_name!r}: {err}") from None
    if family.name != manifest.family or _canonical(kwargs) != _canonical(manifest.create_kwargs):
        raise ArtifactError(
            f"manifest says family {manifest.family!r} with {manifest.create_kwargs}; "
            f"this fedpetah builds {family.name!r} with {kwargs}"
        )
    try:
        replay_pruning(module, family, manifest.pruning_history, manifest.img_size, manifest.in_chans)
    except (ValueError, KeyError, IndexError, AttributeError, RuntimeError, TypeError) as err:
        raise ArtifactError(f"cannot replay the pruning history: {err}") from None
    return Backbone(
        module,
        manifest.model_name,
        family,
        manifest.img_size,
        manifest.in_chans,
        tuple(manifest.mean),
        tuple(manifest.std),
        dict(kwargs),
        manifest.pruning_history,
        dict(manifest.pretraining),
    )


def settings_key(backbone: BackboneConfig, pruning: PruningConfig) -> str:
    """Hash of everything that determines the shipped backbone (the server's pipeline, fedpetah.serving.pipeline,
    builds it from these settings)."""
    payload = {"backbone": asdict(backbone), "pruning": asdict(pruning), "timm": timm.__version__,
               "pipeline": PIPELINE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cached_artifact_dir(root: Path, backbone: BackboneConfig, pruning: PruningConfig) -> Path:
    """Where the artifact of these settings is cached under ``root`` (built once per settings)."""
    return root / "artifacts" / f"{backbone.name}-{settings_key(backbone, pruning)}"
