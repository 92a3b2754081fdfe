"""AdapterBank: per task, the versioned global adapter, saved atomically as safetensors + bank.json.

Layout of a bank directory::

    bank.json                              the commit point: tasks, versions, file names, SHA-256
    task-0000-<digest16>.safetensors       "state/<name>", "opt/<name>" and "stats/<name>" tensors of one task

Tensor files are content-addressed and written (temp file, fsync, ``os.replace``) before ``bank.json`` is
replaced the same way, and files no longer referenced are deleted only after that. A server killed at
any moment therefore leaves either the old or the new bank, never a mix. One process writes a bank
directory at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedpetah.aggregation.validate import StateDict, validate_update
from fedpetah.atomic import TEMP_PREFIX, atomic_write_bytes

BANK_FILE = "bank.json"
BANK_FORMAT = "fedpetah-adapter-bank"
EXPORT_FILE, EXPORT_MANIFEST = "adapter.safetensors", "adapter.json"
EXPORT_FORMAT = "fedpetah-adapter"
FORMAT_VERSION = 1


class BankError(RuntimeError):
    """A bank or an exported adapter on disk is missing, malformed or does not match its digest."""


@dataclass(frozen=True)
class TaskRecord:
    """What a run records about a task in its entry's ``metadata``: the task's name and the digest of the backbone
    its adapter was trained on (None when absent, as in older banks). Other metadata keys are the caller's."""

    task_name: str | None = None
    backbone: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in (("task_name", self.task_name), ("backbone", self.backbone)) if v is not None}

    @classmethod
    def from_json(cls, metadata: Mapping[str, Any]) -> TaskRecord:
        name, backbone = metadata.get("task_name"), metadata.get("backbone")
        return cls(None if name is None else str(name), None if backbone is None else str(backbone))


@dataclass(frozen=True)
class TaskEntry:
    """One task's global adapter.

    ``version`` counts aggregations, ``last_round`` is the server round of the latest one (-1: never),
    ``opt_state`` is the server optimizer's state, ``stats`` the task-free router's aggregated statistics
    (:mod:`fedpetah.routing`), ``metadata`` anything JSON-serialisable.
    """

    task: int
    adapter: str
    num_classes: int
    state: StateDict
    class_names: list[str] = field(default_factory=list)
    opt_state: StateDict = field(default_factory=dict)
    version: int = 0
    last_round: int = -1
    metadata: dict[str, Any] = field(default_factory=dict)
    stats: StateDict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task < 0 or self.num_classes < 1 or self.version < 0 or self.last_round < -1:
            raise ValueError(f"task {self.task}: task/version >= 0, num_classes >= 1, last_round >= -1")
        if not self.adapter:
            raise ValueError(f"task {self.task}: adapter name is empty")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"task {self.task}: {len(self.class_names)} class names for {self.num_classes}")
        if not self.state:
            raise ValueError(f"task {self.task}: empty adapter state")
        for key, value in {**self.state, **self.opt_state, **self.stats}.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"task {self.task}: {key} is not a tensor")
        json.dumps(self.metadata, allow_nan=False)  # fail now, not at save time

    @property
    def record(self) -> TaskRecord:
        """The run's record of this task, read from ``metadata``."""
        return TaskRecord.from_json(self.metadata)

    def tensors(self) -> StateDict:
        """The tensors of one task file: ``state/<name>`` and ``opt/<name>``, CPU and contiguous."""
        out = {f"state/{k}": v.detach().to("cpu").contiguous() for k, v in self.state.items()}
        out.update({f"opt/{k}": v.detach().to("cpu").contiguous() for k, v in self.opt_state.items()})
        out.update({f"stats/{k}": v.detach().to("cpu").contiguous() for k, v in self.stats.items()})
        return out

    def describe(self) -> dict[str, Any]:
        """The JSON fields of this entry (everything except tensors)."""
        return {
            "task": self.task,
            "adapter": self.adapter,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "version": self.version,
            "last_round": self.last_round,
            "metadata": self.metadata,
        }


def _copy(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


class AdapterBank:
    """Task id -> :class:`TaskEntry`, plus bank-wide JSON ``metadata`` (e.g. where a run should resume)."""

    def __init__(self, metadata: Mapping[str, Any] | None = None) -> None:
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._entries: dict[int, TaskEntry] = {}

    def __contains__(self, task: object) -> bool:
        return task in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, task: int) -> TaskEntry:
        try:
            return self._entries[task]
        except KeyError:
            raise KeyError(f"task {task} is not in the bank; tasks: {self.tasks()}") from None

    def tasks(self) -> list[int]:
        return sorted(self._entries)

    def add_task(
        self,
        task: int,
        adapter: str,
        num_classes: int,
        state: Mapping[str, torch.Tensor],
        class_names: list[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TaskEntry:
        """Register a new task with its initial adapter state (version 0, never aggregated)."""
        if task in self._entries:
            raise ValueError(f"task {task} is already in the bank")
        entry = TaskEntry(
            task, adapter, num_classes, _copy(state), list(class_names or []), metadata=dict(metadata or {})
        )
        self._entries[task] = entry
        return entry

    def update(
        self,
        task: int,
        state: Mapping[str, torch.Tensor],
        server_round: int,
        opt_state: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TaskEntry:
        """Install an aggregated state: version + 1, ``server_round`` recorded, metadata merged in.

        The state must match the current one key for key (shape, dtype, finite); ``opt_state=None``
        keeps the previous optimizer state.
        """
        old = self[task]
        validate_update(state, old.state)
        if server_round < old.last_round:
            raise ValueError(f"task {task}: round {server_round} is older than the bank's {old.last_round}")
        new = dataclasses.replace(
            old,
            state=_copy(state),
            opt_state=old.opt_state if opt_state is None else _copy(opt_state),
            version=old.version + 1,
            last_round=server_round,
            metadata={**old.metadata, **(metadata or {})},
        )
        self._entries[task] = new
        return new

    def check_backbone(self, digest: str) -> None:
        """BankError unless every task's adapter was trained on backbone ``digest`` (its ``backbone`` metadata;
        tasks without one, from older banks, are not checked): adapters only fit the backbone they were made for."""
        for task in self.tasks():
            saved = self._entries[task].record.backbone
            if saved is not None and saved != digest:
                raise BankError(
                    f"the bank's task {task} was trained on backbone {saved}, but this run's backbone is {digest}: "
                    "resume with the backbone and pruning settings (and timm version) the run started with, "
                    "or start a new run in another directory"
                )

    def set_stats(self, task: int, stats: Mapping[str, torch.Tensor]) -> TaskEntry:
        """Replace task ``task``'s router statistics (validated by the caller, :mod:`fedpetah.routing`);
        non-finite ones are a ValueError, never stored."""
        if not all(bool(torch.isfinite(v).all()) for v in stats.values()):
            raise ValueError(f"task {task}: router statistics with NaN or infinite values are not stored")
        entry = dataclasses.replace(self[task], stats=_copy(stats))
        self._entries[task] = entry
        return entry

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the bank atomically into ``directory``; returns the path of ``bank.json``."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        records = []
        for task in self.tasks():
            entry = self._entries[task]
            data = save_safetensors(entry.tensors())
            digest = hashlib.sha256(data).hexdigest()
            name = f"task-{task:04d}-{digest[:16]}.safetensors"
            if not (root / name).is_file():
                atomic_write_bytes(root / name, data, mode=0o600)
            records.append({**entry.describe(), "file": name, "sha256": digest})
        manifest = {
            "format": BANK_FORMAT,
            "format_version": FORMAT_VERSION,
            "metadata": self.metadata,
            "tasks": records,
        }
        atomic_write_bytes(root / BANK_FILE, json.dumps(manifest, indent=2, allow_nan=False).encode(), mode=0o600)
        keep = {r["file"] for r in records}
        for stale in [*root.glob("task-*.safetensors"), *root.glob(f"{TEMP_PREFIX}*")]:
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        return root / BANK_FILE

    @classmethod
    def load(cls, directory: str | os.PathLike[str], drop_stats: Collection[int] = ()) -> AdapterBank:
        """Read a bank written by :meth:`save`, verifying every file's SHA-256; a task's router statistics with
        NaN or infinite values are a BankError that names the recovery: load with ``drop_stats`` = those tasks
        (their statistics are left out; ``fedpetah-server --resume --drop-stats TASK``)."""
        root = Path(directory)
        manifest = _read_manifest(root / BANK_FILE, BANK_FORMAT)
        records = manifest.get("tasks")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise BankError(f"{root / BANK_FILE}: 'tasks' must be a list of task records")
        bank = cls(manifest.get("metadata", {}))
        for record in records:
            tensors = _read_tensors(root, record)
            state = {k[len("state/") :]: v for k, v in tensors.items() if k.startswith("state/")}
            opt = {k[len("opt/") :]: v for k, v in tensors.items() if k.startswith("opt/")}
            stats = {k[len("stats/") :]: v for k, v in tensors.items() if k.startswith("stats/")}
            if len(state) + len(opt) + len(stats) != len(tensors):
                raise BankError(f"{record['file']}: tensors outside the state/, opt/ and stats/ namespaces")
            entry = _entry(record, state, opt)
            if entry.task in drop_stats:
                stats = {}
            elif not all(bool(torch.isfinite(v).all()) for v in stats.values() if v.is_floating_point()):
                raise BankError(
                    f"{root / BANK_FILE}: task {entry.task}'s router statistics hold NaN or infinite values "
                    f"(a device's statistics overflowed them); drop them and continue the run with "
                    f"`fedpetah-server --resume --drop-stats {entry.task}` (a simulation: "
                    f"fedpetah.serving.collect.drop_stats('{root}', [{entry.task}]))"
                )
            entry = dataclasses.replace(entry, stats=stats)
            if entry.task in bank._entries:
                raise BankError(f"{root / BANK_FILE}: task {entry.task} listed twice")
            bank._entries[entry.task] = entry
        return bank

    def export_task(self, task: int, directory: str | os.PathLike[str]) -> Path:
        """Write one task's adapter (state only) as ``adapter.safetensors`` + ``adapter.json`` (with its
        SHA-256) into ``directory``; returns the manifest path. Read it back with :func:`read_export`."""
        entry = self[task]
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        data = save_safetensors(dataclasses.replace(entry, opt_state={}, stats={}).tensors())
        atomic_write_bytes(root / EXPORT_FILE, data, mode=0o600)
        manifest = {
            "format": EXPORT_FORMAT,
            "format_version": FORMAT_VERSION,
            **entry.describe(),
            "file": EXPORT_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write_bytes(root / EXPORT_MANIFEST, json.dumps(manifest, indent=2, allow_nan=False).encode(), mode=0o600)
        return root / EXPORT_MANIFEST


def read_export(directory: str | os.PathLike[str]) -> TaskEntry:
    """Load an adapter written by :meth:`AdapterBank.export_task`, verifying its digest."""
    root = Path(directory)
    manifest = _read_manifest(root / EXPORT_MANIFEST, EXPORT_FORMAT)
    tensors = _read_tensors(root, manifest)
    if not all(k.startswith("state/") for k in tensors):
        raise BankError(f"{root / EXPORT_FILE}: tensors outside the state/ namespace")
    return _entry(manifest, {k[len("state/") :]: v for k, v in tensors.items()}, {})


def _read_manifest(path: Path, expected_format: str) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BankError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BankError(f"{path} is unreadable: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise BankError(f"{path} is not a {expected_format} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BankError(f"{path}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    return manifest


def _read_tensors(root: Path, record: Mapping[str, Any]) -> StateDict:
    """The tensors of ``record['file']`` after checking the file's SHA-256 against ``record['sha256']``."""
    name = record.get("file")
    if not isinstance(name, str) or Path(name).name != name:
        raise BankError(f"{root}: bad tensor file name {name!r}")
    try:
        data = (root / name).read_bytes()
    except FileNotFoundError:
        raise BankError(f"{root / name} is missing") from None
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise BankError(f"{root / name}: SHA-256 does not match the manifest (corrupted or tampered)")
    try:
        return load_safetensors(data)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise BankError(f"{root / name} is not a safetensors file: {error}") from None


def _entry(record: Mapping[str, Any], state: StateDict, opt_state: StateDict) -> TaskEntry:
    try:
        return TaskEntry(
            task=int(record["task"]),
            adapter=str(record["adapter"]),
            num_classes=int(record["num_classes"]),
            state=state,
            class_names=[str(c) for c in record.get("class_names", [])],
            opt_state=opt_state,
            version=int(record["version"]),
            last_round=int(record["last_round"]),
            metadata=dict(record.get("metadata", {})),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise BankError(f"malformed task record {dict(record)!r:.200}: {error}") from None
