"""Federated evaluation and what devices keep: the ``query.evaluate`` request and its reply.

The server sends a snapshot of the learned tasks (the torch form of ``fedpetah-export`` without the backbone:
``model.safetensors`` and ``model.json`` bytes, see :func:`fedpetah.routing.export.export_payload`). A device
evaluates it on its own held-out images and answers with counts only; with ``keep`` it also stores the snapshot
for ``fedpetah-client predict``. Like every message, a reply is decoded as hostile (:class:`EvaluateReply.decode`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpetah.wire.flatconfig import flatten
from fedpetah.wire.protocol import (
    MAX_EXAMPLES,
    MAX_REASON_CHARS,
    NPY_HEADER_BYTES,
    SECTIONS,
    ArraySpec,
    Layout,
    ProtocolError,
    Records,
    Status,
    TaskInfo,
    _arrays,
    _digest,
    _int,
    _nested,
    _record,
    artifact_record,
    decode_artifact,
    decode_tasks,
    encode_tasks,
    read_status,
    task_key,
)
from fedpetah.wire.reasons import Reason

EVALUATE = "query.evaluate"
"""Flower message type of an evaluation (and keep) request."""
COUNTS, CONFUSION = "counts", "confusion"
"""Array records of an evaluation reply: per task ``t<index>``, int64 (classes, 3) per class [held-out images,
task-aware correct, task-free correct]; and int64 (classes, classes) task-aware [true, predicted] counts for a
task of at most :data:`MAX_CONFUSION_CLASSES` classes."""
MAX_CONFUSION_CLASSES = 32
MAX_SNAPSHOT_BYTES = 256 * 2**20
"""The largest snapshot (model tensors and manifest) a request may carry."""


@dataclass(frozen=True)
class EvaluateRequest:
    """Evaluate the snapshot of the learned ``tasks`` (bank ``version``) on your held-out images when ``evaluate``;
    store it for local prediction when ``keep``. ``artifact`` carries the backbone to a device without it;
    ``seed``, ``clients`` and ``sections`` are the run's (a simulated client rebuilds its holdout from them)."""

    digest: str
    version: int
    tasks: tuple[TaskInfo, ...]
    model: bytes
    manifest: bytes
    keep: bool
    evaluate: bool
    seed: int
    clients: int
    sections: dict[str, dict[str, Any]]
    artifact: tuple[bytes, bytes] | None = None

    def encode(self) -> Records:
        header = {"digest": self.digest, "version": self.version, "keep": self.keep, "evaluate": self.evaluate,
                  "seed": self.seed, "clients": self.clients, "learned": encode_tasks(self.tasks)}
        return Records(configs={"config": flatten({**header, **self.sections}),
                                "snapshot": {"model": self.model, "manifest": self.manifest},
                                **artifact_record(self.artifact)})

    @classmethod
    def decode(cls, records: Records) -> EvaluateRequest:
        config = _record(records, "configs", "config")
        nested = _nested(config)
        tasks = decode_tasks(nested.get("learned"))
        if not tasks:
            raise ProtocolError(Reason.MALFORMED, "an evaluation request names no learned task")
        sections = {s: nested.get(s) for s in SECTIONS}
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ProtocolError(Reason.MALFORMED, f"the {name} section is missing")
        snapshot = _record(records, "configs", "snapshot")
        model, manifest = snapshot.get("model"), snapshot.get("manifest")
        if not isinstance(model, bytes) or not isinstance(manifest, bytes):
            raise ProtocolError(Reason.MALFORMED, "the snapshot's model and manifest must be bytes")
        if len(model) + len(manifest) > MAX_SNAPSHOT_BYTES:
            raise ProtocolError(Reason.SIZE, f"a snapshot of {len(model) + len(manifest)} B exceeds the limit")
        artifact = decode_artifact(records)
        flags = {}
        for key in ("keep", "evaluate"):
            if not isinstance(nested.get(key), bool):
                raise ProtocolError(Reason.MALFORMED, f"{key} must be a boolean")
            flags[key] = bool(nested[key])
        return cls(digest=_digest(config), version=_int(nested, "version", 0, 2**62), tasks=tasks, model=model,
                   manifest=manifest, keep=flags["keep"], evaluate=flags["evaluate"],
                   seed=_int(nested, "seed", -2**62, 2**62), clients=_int(nested, "clients", 1, 2**31),
                   sections=sections, artifact=artifact)  # type: ignore[arg-type]


def counts_specs(tasks: tuple[TaskInfo, ...]) -> dict[str, ArraySpec]:
    return {task_key(t.index): ((t.num_classes, 3), "<i8") for t in tasks}


def confusion_specs(tasks: tuple[TaskInfo, ...]) -> dict[str, ArraySpec]:
    return {task_key(t.index): ((t.num_classes, t.num_classes), "<i8") for t in tasks
            if t.num_classes <= MAX_CONFUSION_CLASSES}


@dataclass(frozen=True)
class EvaluateReply:
    """A device's evaluation: per learned task it holds held-out images of, ``counts[t]`` (classes, 3) = [images,
    task-aware correct, task-free correct] per class and, for a small task, ``confusion[t]`` (task-aware, [true,
    predicted]); ``kept``: the snapshot is stored for local prediction."""

    status: Status
    reason: str = ""
    counts: dict[int, np.ndarray] = field(default_factory=dict)
    confusion: dict[int, np.ndarray] = field(default_factory=dict)
    kept: bool = False

    def encode(self) -> Records:
        records = Records(configs={"status": {"status": self.status.value, "reason": self.reason[:MAX_REASON_CHARS],
                                              "kept": self.kept}})
        if self.counts:
            records.arrays[COUNTS] = {task_key(t): np.asarray(v, dtype="<i8") for t, v in self.counts.items()}
        if self.confusion:
            records.arrays[CONFUSION] = {task_key(t): np.asarray(v, dtype="<i8") for t, v in self.confusion.items()}
        return records

    @staticmethod
    def layout(tasks: tuple[TaskInfo, ...]) -> Layout:
        arrays: dict[str, Mapping[str, ArraySpec]] = {COUNTS: counts_specs(tasks), CONFUSION: confusion_specs(tasks)}
        data = sum(8 * (3 * t.num_classes + (t.num_classes**2 if t.num_classes <= MAX_CONFUSION_CLASSES else 0))
                   for t in tasks)
        return Layout(arrays, frozenset({"status"}), max_bytes=64 * 2**10 + data + 2 * NPY_HEADER_BYTES * len(tasks),
                      reasons={COUNTS: Reason.EVALUATION, CONFUSION: Reason.EVALUATION})

    @classmethod
    def decode(cls, records: Records, tasks: tuple[TaskInfo, ...]) -> EvaluateReply:
        """Bounded and consistent: tasks among the asked ones, exact shapes, ``0 <= correct <= images <=``
        :data:`MAX_EXAMPLES`, a confusion table exactly for the tasks with counts (of small ones), whose rows
        add up to the images and whose diagonal is the task-aware correct count (reason ``evaluation``)."""
        EvaluateReply.layout(tasks).check_names(records.arrays, records.configs, records.metrics)
        status_record, status, reason = read_status(records)
        kept = status_record.get("kept", False)
        if not isinstance(kept, bool):
            raise ProtocolError(Reason.MALFORMED, "kept must be a boolean")
        if status is not Status.OK:
            return cls(status, reason, kept=kept)
        counts = _subset(records, COUNTS, counts_specs(tasks))
        confusion = _subset(records, CONFUSION, confusion_specs(tasks))
        if set(confusion) != {k for k in counts if k in confusion_specs(tasks)}:
            raise ProtocolError(Reason.EVALUATION, "a confusion table must come with each small task's counts")
        by_task: dict[int, np.ndarray] = {}
        tables: dict[int, np.ndarray] = {}
        for t in tasks:
            key = task_key(t.index)
            if key not in counts:
                continue
            table = counts[key]
            images, aware, free = table[:, 0], table[:, 1], table[:, 2]
            if int(table.min(initial=0)) < 0 or int(images.sum()) > MAX_EXAMPLES:
                raise ProtocolError(Reason.EVALUATION, f"task {t.index}: counts outside [0, {MAX_EXAMPLES}]")
            if bool((aware > images).any()) or bool((free > images).any()):
                raise ProtocolError(Reason.EVALUATION, f"task {t.index}: more correct predictions than images")
            if key in confusion:
                grid = confusion[key]
                if int(grid.min(initial=0)) < 0 or not np.array_equal(grid.sum(1), images) or \
                        not np.array_equal(np.diagonal(grid), aware):
                    raise ProtocolError(Reason.EVALUATION, f"task {t.index}: the confusion table does not match "
                                                           "its counts")
                tables[t.index] = grid.copy()
            by_task[t.index] = table.copy()
        return cls(status, reason, by_task, tables, kept)


def _subset(records: Records, name: str, expected: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """Array record ``name`` (absent: empty), each key among ``expected`` and matching its spec."""
    arrays = records.arrays.get(name, {})
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        raise ProtocolError(Reason.EVALUATION, f"{name}: tasks that were not asked for: {unexpected[:3]!r:.120}")
    if not arrays:
        return {}
    try:
        return _arrays(records, name, {k: expected[k] for k in arrays})
    except ProtocolError as error:
        raise ProtocolError(Reason.EVALUATION, error.detail) from None
