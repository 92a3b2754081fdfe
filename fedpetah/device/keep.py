"""The snapshot a device keeps: the learned tasks' task-free model beside its backbone cache, stored atomically.

A snapshot is the torch form of ``fedpetah-export`` without the backbone (``model.safetensors`` + ``model.json``,
whose ``"backbone"`` names the artifact digest it builds on). The device writes it into a fresh staging directory,
fsyncs it, verifies it by rebuilding it, and only then points ``<cache>/bank`` at it (a symbolic link replaced in
one ``os.replace``): a reader, or a process killed at any moment, sees the previous snapshot or the new one, whole.
``kept.json`` records the SHA-256 of ``model.json`` (which covers ``model.safetensors``'s), checked on every load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpetah.artifact import ArtifactError
from fedpetah.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from fedpetah.backbone import Backbone
from fedpetah.device.local import STALE_STAGING_S, BackboneCache
from fedpetah.routing.export import MODEL_FILE, WEIGHTS_FILE, ExportError, load_export
from fedpetah.routing.predict import TaskFreePredictor
from fedpetah.wire.protocol import DIGEST, TaskInfo

BANK_DIR = "bank"
"""Where a cache root keeps its snapshot: ``<cache>/bank`` (a link to the current ``.bank-*`` directory)."""
KEPT_FILE = "kept.json"
BANK_MAX_BYTES = 256 * 2**20
"""The largest snapshot a device keeps by default (``--bank-max-mb``)."""
STAGING_PREFIX = ".bank-"


class SnapshotError(Exception):
    """A snapshot that is missing, too big, corrupt, or does not fit the backbone or the learned tasks."""


@dataclass
class Snapshot:
    """A rebuilt, verified snapshot: its predictor, its ``model.json`` and the backbone digest it builds on."""

    predictor: TaskFreePredictor
    info: dict[str, Any]
    digest: str
    directory: Path

    @property
    def version(self) -> int:
        version = self.info.get("version", 0)
        return version if isinstance(version, int) else 0


def _info(manifest: bytes) -> dict[str, Any]:
    try:
        info = json.loads(manifest)
    except (UnicodeDecodeError, ValueError) as error:
        raise SnapshotError(f"the snapshot's model.json is not JSON: {error}") from None
    if not isinstance(info, dict):
        raise SnapshotError("the snapshot's model.json is not an object")
    return info


def open_snapshot(directory: Path, backbone: Backbone, digest: str) -> Snapshot:
    """The snapshot in ``directory`` rebuilt on ``backbone`` (artifact ``digest``, the one it must name);
    the tensors' SHA-256 is checked against ``model.json``."""
    try:
        info = _info((directory / MODEL_FILE).read_bytes())
    except OSError as error:
        raise SnapshotError(f"{directory / MODEL_FILE} is unreadable: {error}") from None
    named = info.get("backbone")
    if named != digest:
        raise SnapshotError(f"the snapshot builds on backbone {str(named)[:12]!r}, not on {digest[:12]}")
    try:
        predictor = load_export(directory, backbone=backbone)
    except ExportError as error:
        raise SnapshotError(str(error)) from None
    return Snapshot(predictor, info, digest, directory)


def check_tasks(snapshot: Snapshot, tasks: tuple[TaskInfo, ...]) -> None:
    """The snapshot's model holds exactly ``tasks``, in this order, with these class names."""
    predictor = snapshot.predictor
    names = [c for t in tasks for c in t.classes]
    if predictor.task_order != [t.index for t in tasks] or predictor.model.widths != [t.num_classes for t in tasks] \
            or predictor.class_names != names:
        raise SnapshotError(f"the snapshot holds tasks {predictor.task_order} of widths {predictor.model.widths}, "
                            f"not the learned tasks {[t.index for t in tasks]} the request names")


def stage(root: Path, model: bytes, manifest: bytes, max_bytes: int | None = None) -> Path:
    """A new staging directory under ``root`` holding the snapshot's files, fsynced (``max_bytes``: refuse a
    bigger snapshot before writing anything)."""
    size = len(model) + len(manifest)
    if max_bytes is not None and size > max_bytes:
        raise SnapshotError(f"a snapshot of {size / 2**20:.1f} MiB exceeds this device's bound of "
                            f"{max_bytes / 2**20:.1f} MiB (fedpetah-client --bank-max-mb)")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        atomic_write_bytes(staging / WEIGHTS_FILE, model)
        atomic_write_bytes(staging / MODEL_FILE, manifest)
        kept = {"model_json_sha256": hashlib.sha256(manifest).hexdigest(), "bytes": size,
                "backbone": _info(manifest).get("backbone")}
        atomic_write_text(staging / KEPT_FILE, json.dumps(kept, indent=1))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def commit(root: Path, staging: Path) -> Path:
    """Point ``<root>/bank`` at ``staging`` in one step; the previous snapshot's directory goes afterwards."""
    link = root / BANK_DIR
    previous = link.resolve() if link.is_symlink() else None
    if link.exists() and not link.is_symlink():
        raise SnapshotError(f"{link} is not a link this device made: move it away")
    temporary = root / f"{STAGING_PREFIX}link-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(staging.name, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_dir(root)
    if previous is not None and previous != staging.resolve() and previous.parent == root.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    _sweep(root, keep=staging)
    return link


def _sweep(root: Path, keep: Path) -> None:
    """Remove staging directories older than an hour (left by a killed process), never ``keep``."""
    now = time.time()
    for path in root.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if path != keep and not path.is_symlink() and now - path.lstat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(path, ignore_errors=True)


def load_kept(cache: BackboneCache) -> Snapshot:
    """The snapshot kept under ``cache.root``, verified: ``kept.json``'s digest of ``model.json``, the tensors'
    digest in it, and the backbone it names (verified by the cache)."""
    link = cache.root / BANK_DIR
    if not link.exists():
        raise SnapshotError(f"no kept bank in {cache.root}: the device keeps one after its first finished task "
                            "(or pass --cache DIR, the cache dir fedpetah-client uses)")
    directory = link.resolve()
    try:
        kept = json.loads((directory / KEPT_FILE).read_text())
        manifest = (directory / MODEL_FILE).read_bytes()
    except (OSError, ValueError) as error:
        raise SnapshotError(f"the kept bank in {link} is incomplete or unreadable: {error}") from None
    if not isinstance(kept, dict) or kept.get("model_json_sha256") != hashlib.sha256(manifest).hexdigest():
        raise SnapshotError(f"{directory / MODEL_FILE}: SHA-256 does not match {KEPT_FILE} (corrupted or tampered)")
    digest = _info(manifest).get("backbone")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise SnapshotError(f"{directory / MODEL_FILE} names no backbone digest")
    try:
        backbone = cache.get(digest)
    except ArtifactError as error:
        raise SnapshotError(f"the kept bank's backbone {digest[:12]}: {error}") from None
    return open_snapshot(directory, backbone, digest)
