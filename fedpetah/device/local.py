"""Client-side work of a federated round: the verified backbone cache, the local shard, one task's training."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpetah.adapters import AdapterConfig, build_adapter
from fedpetah.artifact import MANIFEST, WEIGHTS, ArtifactError, check_manifest_size, load_artifact
from fedpetah.atomic import atomic_write_bytes
from fedpetah.backbone import Backbone
from fedpetah.config import TrainConfig
from fedpetah.tasks import ImageSet, PartitionConfig, TaskStreamConfig, load_stream, partition
from fedpetah.train import train_adapter

log = logging.getLogger(__name__)

CACHE_KEEP = 4
"""Backbones a device keeps by default: a server changes it once per experiment, not per round."""
CACHE_MAX_BYTES = 1024 * 2**20
"""Disk the cached backbones may take by default (the one in use is kept even if it alone is larger)."""
STALE_STAGING_S = 3600.0  # an install directory this old was left by a killed process


def _is_digest(name: str) -> bool:
    """A cache entry's name: lower-case hex (the directories install() creates; nothing else is touched)."""
    return bool(name) and all(c in "0123456789abcdef" for c in name)


class BackboneCache:
    """Backbone artifacts on disk under their digest, plus the last one loaded kept in memory.

    Everything received is verified (SHA-256 of weights and manifest) before it is kept; a cache
    entry that fails verification later is discarded, never used. The cache is bounded: after each install the
    least recently used entries go until at most ``keep`` backbones of at most ``max_bytes`` together are left,
    never the one just installed (a server that sends a new digest per message cannot fill the disk).
    """

    def __init__(self, root: Path, keep: int = CACHE_KEEP, max_bytes: int = CACHE_MAX_BYTES) -> None:
        if keep < 1 or max_bytes < 0:
            raise ValueError(f"a backbone cache keeps at least 1 backbone in max_bytes >= 0, not {keep}, {max_bytes}")
        self.root = Path(root)
        self.keep, self.max_bytes = keep, max_bytes
        self._loaded: dict[str, Backbone] = {}
        self._stamps: dict[str, tuple[tuple[int, int], ...]] = {}  # the files as they were when verified
        self.last_load_seconds = 0.0

    def _stamp(self, digest: str) -> tuple[tuple[int, int], ...]:
        """Size and mtime of the cached files: a long-lived process re-verifies a copy that changed on disk."""
        stamps = []
        for name in (WEIGHTS, MANIFEST):
            try:
                stat = (self.path(digest) / name).stat()
                stamps.append((stat.st_size, stat.st_mtime_ns))
            except OSError:
                stamps.append((-1, -1))
        return tuple(stamps)

    def path(self, digest: str) -> Path:
        if not _is_digest(digest):
            raise ArtifactError(f"malformed artifact digest {digest!r}")
        return self.root / digest

    def has(self, digest: str) -> bool:
        return (self.path(digest) / MANIFEST).is_file()

    def install(self, digest: str, weights: bytes, manifest: bytes) -> int:
        """Verify and store an artifact received from the server; returns bytes written (0 if cached)."""
        if self.has(digest):
            return 0
        check_manifest_size(len(manifest))  # before anything is written
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        needed = 2 * (len(weights) + len(manifest))
        if free < needed:
            raise OSError(f"not enough disk for the backbone cache in {self.root}: {free} B free, {needed} B needed")
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=self.root))
        try:
            atomic_write_bytes(staging / WEIGHTS, weights)
            atomic_write_bytes(staging / MANIFEST, manifest)
            backbone = load_artifact(staging, expected_digest=digest)
            try:
                os.replace(staging, self.path(digest))
            except OSError:
                if not self.has(digest):  # not a concurrent install of the same verified artifact
                    raise
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._loaded, self._stamps = {digest: backbone}, {digest: self._stamp(digest)}
        self.evict(keep=digest)
        return len(weights) + len(manifest)

    def entries(self) -> list[tuple[str, int, int]]:
        """(digest, bytes, last use in ns) of every cached backbone, most recently used first."""
        found = []
        for path in self.root.iterdir() if self.root.is_dir() else ():
            if path.is_symlink() or not path.is_dir() or not _is_digest(path.name):
                continue
            try:
                size = sum(f.lstat().st_size for f in path.iterdir())
                found.append((path.name, size, path.stat().st_mtime_ns))
            except OSError:  # removed meanwhile by another process sharing the cache
                continue
        return sorted(found, key=lambda entry: entry[2], reverse=True)

    def evict(self, keep: str) -> list[str]:
        """Remove the least recently used backbones beyond the bounds, never ``keep``; the digests removed."""
        entries = self.entries()
        removed, full = [], False
        count, total = 1, sum(size for digest, size, _ in entries if digest == keep)
        for digest, size, _ in entries:
            if digest == keep:
                continue
            full = full or count >= self.keep or total + size > self.max_bytes  # then every older one goes too
            if not full:
                count, total = count + 1, total + size
                continue
            shutil.rmtree(self.root / digest, ignore_errors=True)
            self._loaded.pop(digest, None)
            removed.append(digest)
        now = time.time()
        for staging in self.root.glob(".install-*"):
            with contextlib.suppress(OSError):
                if now - staging.lstat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(staging, ignore_errors=True)
        if removed:
            log.info("backbone cache %s: evicted %d least recently used backbone(s)", self.root, len(removed))
        return removed

    def get(self, digest: str) -> Backbone:
        """The verified backbone ``digest`` (memory first, then disk)."""
        path = self.path(digest)
        with contextlib.suppress(OSError):
            os.utime(path)  # its last use, for eviction (the directory's time: the files' stamps stay)
        if digest in self._loaded and self._stamps.get(digest) == self._stamp(digest):
            self.last_load_seconds = 0.0
            return self._loaded[digest]
        if not self.has(digest):
            raise ArtifactError(f"backbone {digest[:12]} is not installed in {self.root}")
        start = time.perf_counter()
        try:
            backbone = load_artifact(path, expected_digest=digest)
        except ArtifactError:
            log.error("discarding cache entry %s: it failed verification", path)
            shutil.rmtree(path, ignore_errors=True)
            raise
        self.last_load_seconds = time.perf_counter() - start
        self._loaded, self._stamps = {digest: backbone}, {digest: self._stamp(digest)}
        return backbone


_SHARDS: dict[tuple[str, int, int], list[np.ndarray]] = {}


def simulated_shard(stream: TaskStreamConfig, split: PartitionConfig, clients: int, client: int,
                    task_index: int, seed: int) -> ImageSet:
    """Client ``client``'s share of task ``task_index``'s training data (seeded per task)."""
    tasks = load_stream(stream)
    if not 0 <= task_index < len(tasks):
        raise IndexError(f"task {task_index} is not in the stream ({len(tasks)} tasks)")
    if not 0 <= client < clients:
        raise IndexError(f"client {client} is outside 0..{clients - 1}")
    train = tasks[task_index].train
    key = (repr((asdict(stream), asdict(split))), clients, seed + task_index)
    if key not in _SHARDS:
        if len(_SHARDS) > 64:
            _SHARDS.clear()
        _SHARDS[key] = partition(train.labels.numpy(), clients, split, seed + task_index)
    return train.subset(_SHARDS[key][client])


def train_task(backbone: Backbone, adapter: AdapterConfig, num_classes: int, global_state: dict[str, torch.Tensor],
               data: ImageSet, config: TrainConfig, step_hook: Callable[[], None] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Attach ``adapter`` to ``backbone``, start from ``global_state``, train on ``data`` (``step_hook`` after each
    step, see :func:`~fedpetah.train.train_adapter`); return state + metrics."""
    model = build_adapter(adapter, backbone, num_classes)
    model.load_state(global_state)
    result = train_adapter(model, data, config, step_hook)
    return model.state(), {
        "num-examples": result.examples,
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "step-time-ms": result.step_time_ms,
        "train-seconds": result.seconds,
        "peak-memory-mb": result.peak_memory_mb,
    }
