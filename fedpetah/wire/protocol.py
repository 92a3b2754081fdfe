"""The message protocol between ServerApp, ClientApp and device worker: names, typed requests and replies, records.

This module is the one place a message name or a record key is spelled. It needs only NumPy and the standard
library (no torch, no flwr), so the thin per-message ClientApp and the device worker can both use it; the Flower
glue (``flower_glue.records``) converts :class:`Records` to and from Flower's ``RecordDict``.

Every ``decode`` treats its input as hostile: a missing record, a wrong type, a non-finite or out-of-range number,
an unexpected array key, shape or dtype, or an oversized payload raises :class:`ProtocolError` with a
machine-readable :class:`~fedpetah.wire.reasons.Reason`, which the receiver turns into a counted rejection or an
error reply; nothing is unpickled or executed.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from fedpetah.wire.flatconfig import flatten, unflatten
from fedpetah.wire.profile import MAX_BUDGET_MB, PROFILE, DeviceProfile
from fedpetah.wire.reasons import Reason

HELLO, TRAIN = "query.hello", "train"
"""Flower message types (``query.<action>`` is Flower's spelling for a query handler named ``<action>``)."""

NO_PARTITION = -1
"""The partition id a real device reports (simulated clients report their partition)."""

ATTACK_ENV = "FEDPETAH_ATTACK"
"""Environment variable that carries ``simulation.attack`` to simulated clients (JSON; unset on every device)."""

MAX_REASON_CHARS = 500
MAX_METRICS = 32
MAX_EXAMPLES = 10_000_000  # a claim above this is not a client's local data set
MAX_CLASSES = 10_000
MAX_NAME_CHARS = 128
MAX_ARTIFACT_BYTES = 512 * 2**20
MAX_STATS_DIM = 4096
MAX_STATS_GRID = 16
MAX_STATS_DIM_CELLS = 16 * MAX_STATS_DIM
"""Bound on ``dim * max(grid, 1)**2`` of a statistics request (the default 512 * 4**2 is an eighth of it): a
projection is (router features) x dim, and the router features grow with grid**2 (e.g. dim 4096 at grid 16
asks a mobilevitv2_200 device for a 16 GB matrix). The exact bound on the matrix a device builds is
``fedpetah.routing.router.MAX_PROJECTION_BYTES``."""
STATS_REQUEST = "router_stats"
"""Header section of a train request that asks for router statistics (renamed from ``stats`` when ``grid``
was added, so a client that would ignore ``grid`` sends none and its reply is rejected instead of misread)."""
DIGEST = re.compile(r"[0-9a-f]{64}")
ArraySpec = tuple[tuple[int, ...], str]  # (shape, numpy dtype string)
STATS_KEYS = ("count", "sum", "within")
"""Arrays of a task-free router's statistics (fedpetah.routing.stats.FeatureStats), in the ``stats`` array record:
class counts, class feature sums, and the within-class scatter as a float32 packed upper triangle (the key was
``scatter``, the raw float64 matrix at 4x the bytes: a client that still sends it is rejected, not misread)."""


def stats_specs(num_classes: int, dim: int) -> dict[str, ArraySpec]:
    """What a client's statistics of ``dim``-wide features of a ``num_classes``-class task must look like."""
    return {"count": ((num_classes,), "<i8"), "sum": ((num_classes, dim), "<f8"),
            "within": ((dim * (dim + 1) // 2,), "<f4")}


class ProtocolError(ValueError):
    """A message that does not decode, and why."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Status(StrEnum):
    """How a client answered a train request."""

    OK = "ok"
    NO_DATA = "no-data"  # the client holds no data for this task
    NEEDS_BACKBONE = "needs-backbone"  # the artifact is missing or failed verification: send it again
    NO_BUDGET = "no-budget"  # the device's memory budget cannot hold this work (never a rejection: assign less)
    ERROR = "error"


@dataclass
class Records:
    """A Flower ``RecordDict`` without Flower: record name -> {key: value}, by record kind."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # numbers (or lists, never accepted)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # scalars, bytes (or lists, never accepted)

    def array_bytes(self, name: str) -> int:
        """Payload bytes of array record ``name`` (0 when absent)."""
        return sum(int(a.nbytes) for a in self.arrays.get(name, {}).values())


# ---------------------------------------------------------------------------------------------- field readers


def _record(records: Records, kind: str, name: str) -> dict[str, Any]:
    record = getattr(records, kind).get(name)
    if not isinstance(record, dict):
        raise ProtocolError(Reason.MALFORMED, f"the {kind[:-1]} record {name!r} is missing")
    return record


def _int(record: Mapping[str, Any], key: str, low: int, high: int, reason: Reason = Reason.MALFORMED) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ProtocolError(reason, f"{key} must be an integer, got {type(value).__name__} {value!r:.40}")
    if not low <= int(value) <= high:
        raise ProtocolError(reason, f"{key}={value} is outside [{low}, {high}]")
    return int(value)


def _str(record: Mapping[str, Any], key: str, limit: int = MAX_NAME_CHARS) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ProtocolError(Reason.MALFORMED, f"{key} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(Reason.SIZE, f"{key} is {len(value)} characters long (limit {limit})")
    return value


def _digest(record: Mapping[str, Any]) -> str:
    digest = _str(record, "digest")
    if not DIGEST.fullmatch(digest):
        raise ProtocolError(Reason.MALFORMED, f"digest {digest!r:.80} is not a SHA-256 hex digest")
    return digest


def _nested(record: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return unflatten({k: v for k, v in record.items() if not isinstance(v, bytes)})
    except (TypeError, ValueError) as error:
        raise ProtocolError(Reason.MALFORMED, str(error)) from None


def _arrays(records: Records, name: str, expected: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """Array record ``name`` checked key for key, shape for shape, dtype for dtype against ``expected``."""
    arrays = _record(records, "arrays", name)
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ProtocolError(Reason.KEYS, f"{name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in expected.items():
        value = arrays[key]
        if not isinstance(value, np.ndarray):
            raise ProtocolError(Reason.MALFORMED, f"{name}.{key} is not an array")
        if tuple(value.shape) != tuple(shape):
            raise ProtocolError(Reason.SHAPE, f"{name}.{key}: {tuple(value.shape)} != {tuple(shape)}")
        if value.dtype.str != np.dtype(dtype).str:
            raise ProtocolError(Reason.DTYPE, f"{name}.{key}: {value.dtype}, expected {np.dtype(dtype)}")
        out[key] = value
    return out


NPY_HEADER_BYTES = 4096
"""The longest ``.npy`` header an array may carry (NumPy writes 128 bytes for every array we send)."""
MAX_RECORDS_EXTRA_BYTES = 2**20
"""Bytes a message may carry besides its arrays' expected data and headers (strings and bytes of its configs)."""


@dataclass(frozen=True)
class Layout:
    """What a received message may hold: array records with the (shape, dtype) of every array, the names of its
    config and metric records, and a bound on its total bytes (array data, config strings and bytes). The
    transport glue checks a message against it before NumPy reads an array (:func:`check_npy`): any other record
    is reason ``unexpected``; a key, shape, dtype or size that differs is ``keys``, ``shape``, ``dtype``, ``size``."""

    arrays: Mapping[str, Mapping[str, ArraySpec]] = field(default_factory=dict)
    configs: frozenset[str] = frozenset()
    metrics: frozenset[str] = frozenset()
    max_bytes: int | None = None  # None: the expected arrays' bytes plus MAX_RECORDS_EXTRA_BYTES
    reasons: Mapping[str, Reason] = field(default_factory=dict)  # record name -> the reason of any error in it

    @property
    def total_bytes(self) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        data = sum(_spec_bytes(spec) + NPY_HEADER_BYTES for specs in self.arrays.values() for spec in specs.values())
        return data + MAX_RECORDS_EXTRA_BYTES

    def check_names(self, arrays: Mapping[str, object], configs: Mapping[str, object],
                    metrics: Mapping[str, object]) -> None:
        """ProtocolError ``unexpected`` for a record this layout does not hold (by kind)."""
        for kind, names, allowed in (("array", arrays, self.arrays), ("config", configs, self.configs),
                                     ("metric", metrics, self.metrics)):
            unexpected = sorted(set(names) - set(allowed))
            if unexpected:
                raise ProtocolError(self.reasons.get(unexpected[0], Reason.UNEXPECTED),
                                    f"{kind} records {unexpected[:3]!r:.120} were not asked for")

    def relabel(self, name: str, error: ProtocolError) -> ProtocolError:
        """``error`` in record ``name`` with that record's own reason, if it has one."""
        reason = self.reasons.get(name)
        return error if reason is None else ProtocolError(reason, error.detail)


def _spec_bytes(spec: ArraySpec) -> int:
    return math.prod(spec[0]) * np.dtype(spec[1]).itemsize


def check_npy(where: str, data: bytes, spec: ArraySpec | None = None) -> None:
    """ProtocolError unless ``data`` is one ``.npy`` array (header at most :data:`NPY_HEADER_BYTES`, no objects)
    whose header declares exactly as many bytes as follow it, and, given ``spec``, that (shape, dtype): read
    from the header alone, before NumPy allocates what a header claims."""
    stream = io.BytesIO(data[:NPY_HEADER_BYTES])
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(stream, max_header_size=NPY_HEADER_BYTES)
    except (ValueError, SyntaxError, TypeError, EOFError) as error:
        raise ProtocolError(Reason.MALFORMED, f"{where} is not a .npy array: {error}"[:MAX_REASON_CHARS]) from None
    if dtype.hasobject:
        raise ProtocolError(Reason.DTYPE, f"{where} holds Python objects")
    declared = (tuple(shape), dtype.str)
    if spec is not None:
        if declared[0] != tuple(spec[0]):
            raise ProtocolError(Reason.SHAPE, f"{where}: {declared[0]} != {tuple(spec[0])}")
        if declared[1] != np.dtype(spec[1]).str:
            raise ProtocolError(Reason.DTYPE, f"{where}: {dtype}, expected {np.dtype(spec[1])}")
    expected = stream.tell() + _spec_bytes(declared)
    if len(data) != expected:
        raise ProtocolError(Reason.SIZE, f"{where} holds {len(data)} B, its header declares {expected} B")


def specs(state: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """The (shape, dtype) of every array of ``state``: what a reply to it must match."""
    return {k: (tuple(v.shape), v.dtype.str) for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- hello


MAX_TASKS = 1024
"""The most tasks a catalogue (and so a hello or an evaluation) may hold."""
MAX_CATALOG_CLASSES = 65_536
"""The most class names a catalogue may hold over all its tasks (bounds a hello reply's table too)."""
HOLDINGS = "holdings"
"""Array record of a hello reply: per catalogue task ``t<index>``, int64 (classes, 2) images [train, held out]."""


def task_key(index: int) -> str:
    """The array key of task ``index`` in a per-task array record (hello holdings, evaluation counts)."""
    return f"t{index}"


def encode_tasks(tasks: tuple[TaskInfo, ...]) -> dict[str, Any]:
    """Tasks as a nested config section ``{"<index>": {"name", "classes"}}`` (flattened by the caller)."""
    return {str(t.index): {"name": t.name, "classes": list(t.classes)} for t in tasks}


def decode_tasks(section: object) -> tuple[TaskInfo, ...]:
    """The tasks of :func:`encode_tasks`' section, bounded (at most :data:`MAX_TASKS` tasks and
    :data:`MAX_CATALOG_CLASSES` classes in all, names of 1..:data:`MAX_NAME_CHARS` characters), by index."""
    if section is None:
        return ()
    if not isinstance(section, dict) or len(section) > MAX_TASKS:
        raise ProtocolError(Reason.MALFORMED, f"the task list must map indices to tasks (at most {MAX_TASKS})")
    tasks, total = [], 0
    for key, task in section.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 6) or not isinstance(task, dict):
            raise ProtocolError(Reason.MALFORMED, f"task entry {key!r:.40} is not '<index>': {{name, classes}}")
        classes = task.get("classes")
        if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES or \
                not all(isinstance(c, str) and 0 < len(c) <= MAX_NAME_CHARS for c in classes):
            raise ProtocolError(Reason.MALFORMED, f"task {key}: classes must be 1..{MAX_CLASSES} non-empty names")
        total += len(classes)
        if total > MAX_CATALOG_CLASSES:
            raise ProtocolError(Reason.SIZE, f"the task list holds more than {MAX_CATALOG_CLASSES} classes")
        tasks.append(TaskInfo(int(key), _str(task, "name"), tuple(classes)))
    return tuple(sorted(tasks, key=lambda t: t.index))


@dataclass(frozen=True)
class HelloRequest:
    """Who are you, do you hold backbone ``digest`` already, and which images of the catalogue's ``tasks``?

    In simulation the run's ``seed``, ``clients`` and config ``sections`` (as a train request's) come too, so a
    simulated client can count its shard and its share of the test split; ``clients`` 0: not sent (a device
    needs none of them). ``profile``: send your :class:`~fedpetah.wire.profile.DeviceProfile` (a server that
    does not ask gets none, so it never meets a record it does not know)."""

    digest: str
    tasks: tuple[TaskInfo, ...] = ()
    seed: int = 0
    clients: int = 0
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile: bool = False

    def encode(self) -> Records:
        header: dict[str, Any] = {"digest": self.digest, "catalog": encode_tasks(self.tasks)}
        if self.profile:
            header[PROFILE] = True
        if self.clients:
            header |= {"seed": self.seed, "clients": self.clients, **self.sections}
        return Records(configs={"config": flatten(header)})

    @classmethod
    def decode(cls, records: Records) -> HelloRequest:
        config = _record(records, "configs", "config")
        nested = _nested(config)
        tasks = decode_tasks(nested.get("catalog"))
        profile = nested.get(PROFILE) is True
        if "clients" not in nested:
            return cls(_digest(config), tasks, profile=profile)
        sections = {s: nested[s] for s in SENT_SECTIONS if isinstance(nested.get(s), dict)}
        return cls(_digest(config), tasks, _int(nested, "seed", -2**62, 2**62), _int(nested, "clients", 1, 2**31),
                   sections, profile)


def holdings_specs(tasks: tuple[TaskInfo, ...]) -> dict[str, ArraySpec]:
    """What a hello reply's :data:`HOLDINGS` may hold: per task ``(classes, 2)`` int64 (train, held out)."""
    return {task_key(t.index): ((t.num_classes, 2), "<i8") for t in tasks}


@dataclass(frozen=True)
class HelloReply:
    """A simulated client's partition id (:data:`NO_PARTITION` on a device), whether it holds the backbone, per
    catalogue task (by index) it holds images of: images per class, [train, held out] (counts only), and its
    :class:`~fedpetah.wire.profile.DeviceProfile` when asked (None: not asked, or a device from before it)."""

    partition: int
    has_backbone: bool
    holdings: dict[int, np.ndarray] = field(default_factory=dict)
    profile: DeviceProfile | None = None

    def encode(self) -> Records:
        records = Records(configs={"config": {"partition-id": self.partition, "has-backbone": self.has_backbone}})
        if self.profile is not None:
            records.configs[PROFILE] = self.profile.record()
        if self.holdings:
            records.arrays[HOLDINGS] = {task_key(t): np.asarray(v, dtype="<i8") for t, v in self.holdings.items()}
        return records

    @staticmethod
    def layout(tasks: tuple[TaskInfo, ...] = ()) -> Layout:
        arrays = {HOLDINGS: holdings_specs(tasks)} if tasks else {}
        return Layout(arrays, frozenset({"config", PROFILE}),
                      max_bytes=64 * 2**10 + 2 * 8 * sum(t.num_classes for t in tasks) + NPY_HEADER_BYTES * len(tasks),
                      reasons={HOLDINGS: Reason.HOLDINGS, PROFILE: Reason.PROFILE})

    @classmethod
    def decode(cls, records: Records, tasks: tuple[TaskInfo, ...] = ()) -> HelloReply:
        """Bounded: holdings only for the asked ``tasks`` (any subset), exact shapes, 0..:data:`MAX_EXAMPLES`."""
        HelloReply.layout(tasks).check_names(records.arrays, records.configs, records.metrics)
        config = _record(records, "configs", "config")
        has = config.get("has-backbone")
        if not isinstance(has, bool):
            raise ProtocolError(Reason.MALFORMED, "has-backbone must be a boolean")
        holdings: dict[int, np.ndarray] = {}
        if HOLDINGS in records.arrays:
            expected = holdings_specs(tasks)
            arrays = records.arrays[HOLDINGS]
            try:
                checked = _arrays(records, HOLDINGS, {k: expected[k] for k in arrays if k in expected}) \
                    if set(arrays) <= set(expected) else None
            except ProtocolError as error:
                raise ProtocolError(Reason.HOLDINGS, error.detail) from None
            if checked is None:
                raise ProtocolError(Reason.HOLDINGS, f"holdings of tasks that were not asked about: "
                                                     f"{sorted(set(arrays) - set(expected))[:3]!r:.120}")
            for t in tasks:
                counts = checked.get(task_key(t.index))
                if counts is None:
                    continue
                if int(counts.min(initial=0)) < 0 or int(counts.max(initial=0)) > MAX_EXAMPLES:
                    raise ProtocolError(Reason.HOLDINGS, f"task {t.index}: image counts outside [0, {MAX_EXAMPLES}]")
                if int(counts.sum()) > 0:
                    holdings[t.index] = counts.copy()
        return cls(_int(config, "partition-id", NO_PARTITION, 2**31), has, holdings, _profile(records))


def _profile(records: Records) -> DeviceProfile | None:
    """The hello reply's device profile, bounded (reason ``profile``); None when it carries none."""
    if PROFILE not in records.configs:
        return None
    record = records.configs[PROFILE]
    if not isinstance(record, dict):
        raise ProtocolError(Reason.PROFILE, "the profile record is not a config record")
    try:
        return DeviceProfile.decode(record)
    except ValueError as error:
        raise ProtocolError(Reason.PROFILE, str(error)[:MAX_REASON_CHARS]) from None


# ---------------------------------------------------------------------------------------------- train


def client_seed(seed: int, round: int, client: int) -> int:
    """The training seed of ``client`` (partition or node id) in ``round`` of a run seeded ``seed``.

    Distinct per client, round and run seed, the same in simulation and on devices, and below 2**62 so it
    travels as a Flower integer.
    """
    words = np.random.SeedSequence([seed % 2**64, round % 2**64, client % 2**64]).generate_state(2, np.uint32)
    return (int(words[0]) << 30) ^ int(words[1])


@dataclass(frozen=True)
class TaskInfo:
    """The task a train request is about: its position in the stream, its name and its class names."""

    index: int
    name: str
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


SECTIONS = ("adapter", "train", "tasks", "partition")
"""Experiment config sections a train request carries (each rebuilt into its dataclass by the client)."""
OPTIONAL_SECTIONS = ("fleet",)
"""Sections a request may carry besides (``fleet``: a simulated mixed fleet's tiers, see ``FleetConfig``)."""
SENT_SECTIONS = SECTIONS + OPTIONAL_SECTIONS
"""Every section the server sends."""


@dataclass(frozen=True)
class TrainRequest:
    """Train ``task``'s adapter from ``state`` on your data.

    ``seed`` is the run's seed (it fixes the simulated partitioning, identical for every client);
    ``sections["train"]["seed"]`` is this client's own training seed (:func:`client_seed`). ``artifact`` carries
    the backbone (weights and manifest bytes) to a client that does not hold it yet. ``stats`` = (dim, seed, grid)
    asks for the task-free router's statistics of the client's data, as ``RouterConfig(dim, seed, grid=grid)``.
    ``memory_need_mb``: the training memory above its resting footprint this work needs (the server's memory
    model): a device whose budget is smaller answers :attr:`Status.NO_BUDGET` without training (None: not said).
    """

    digest: str
    round: int
    seed: int
    clients: int
    task: TaskInfo
    sections: dict[str, dict[str, Any]]
    state: dict[str, np.ndarray]
    artifact: tuple[bytes, ...] | None = None  # (weights, manifest)
    stats: tuple[int, int, int] | None = None  # (dim, seed, grid)
    memory_need_mb: float | None = None

    def encode(self) -> Records:
        header: dict[str, Any] = {
            "digest": self.digest, "round": self.round, "seed": self.seed, "clients": self.clients,
            "task": {"index": self.task.index, "name": self.task.name, "classes": list(self.task.classes)}}
        if self.stats is not None:
            header[STATS_REQUEST] = {"dim": self.stats[0], "seed": self.stats[1], "grid": self.stats[2]}
        if self.memory_need_mb is not None:
            header[MEMORY_NEED] = float(self.memory_need_mb)
        return Records(arrays={"adapter": dict(self.state)},
                       configs={"config": flatten({**header, **self.sections}), **artifact_record(self.artifact)})

    @classmethod
    def decode(cls, records: Records) -> TrainRequest:
        config = _record(records, "configs", "config")
        nested = _nested(config)
        task = nested.get("task")
        if not isinstance(task, dict):
            raise ProtocolError(Reason.MALFORMED, "the task section is missing")
        classes = task.get("classes")
        if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES or \
                not all(isinstance(c, str) and 0 < len(c) <= MAX_NAME_CHARS for c in classes):
            raise ProtocolError(Reason.MALFORMED, f"task.classes must be 1..{MAX_CLASSES} non-empty names")
        sections = {s: nested.get(s) for s in SECTIONS}
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ProtocolError(Reason.MALFORMED, f"the {name} section is missing")
        sections |= {s: nested[s] for s in OPTIONAL_SECTIONS if isinstance(nested.get(s), dict)}
        state = records.arrays.get("adapter")
        if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
            raise ProtocolError(Reason.MALFORMED, "the adapter array record is missing")
        artifact = decode_artifact(records)
        stats = nested.get(STATS_REQUEST)
        if stats is not None and not isinstance(stats, dict):
            raise ProtocolError(Reason.MALFORMED, f"the {STATS_REQUEST} section must hold dim, seed and grid")
        router = None if stats is None else (_int(stats, "dim", 0, MAX_STATS_DIM), _int(stats, "seed", 0, 2**31),
                                             _int(stats, "grid", 0, MAX_STATS_GRID))
        if router is not None and router[0] * max(router[2], 1) ** 2 > MAX_STATS_DIM_CELLS:
            raise ProtocolError(Reason.SIZE, f"{STATS_REQUEST} dim={router[0]} at grid={router[2]}: dim * grid**2 "
                                        f"exceeds {MAX_STATS_DIM_CELLS}")
        return cls(
            digest=_digest(config), round=_int(nested, "round", 1, 2**31), seed=_int(nested, "seed", -2**62, 2**62),
            clients=_int(nested, "clients", 1, 2**31),
            task=TaskInfo(_int(task, "index", 0, 2**31), _str(task, "name"), tuple(classes)),
            sections=sections,  # type: ignore[arg-type]
            state=dict(state), artifact=artifact, stats=router, memory_need_mb=_memory_need(nested))


MEMORY_NEED = "memory-need-mb"
"""Header key of a train request: the training memory above the resting footprint its work needs, in MB."""


def _memory_need(nested: Mapping[str, Any]) -> float | None:
    value = nested.get(MEMORY_NEED)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_BUDGET_MB:
        raise ProtocolError(Reason.MALFORMED, f"{MEMORY_NEED} must be a number in [0, {MAX_BUDGET_MB}], "
                                              f"got {value!r:.40}")
    return float(value)


def artifact_record(artifact: tuple[bytes, ...] | None) -> dict[str, dict[str, Any]]:
    """The ``artifact`` config record that carries a backbone (weights, manifest) to a client; none without one."""
    return {} if artifact is None else {"artifact": {"weights": artifact[0], "manifest": artifact[1]}}


def decode_artifact(records: Records) -> tuple[bytes, bytes] | None:
    """The backbone a request carries in its ``artifact`` config record (weights, manifest), bounded; None when
    it carries none."""
    if "artifact" not in records.configs:
        return None
    raw = records.configs["artifact"]
    weights, manifest = raw.get("weights"), raw.get("manifest")
    if not isinstance(weights, bytes) or not isinstance(manifest, bytes):
        raise ProtocolError(Reason.MALFORMED, "artifact weights and manifest must be bytes")
    if len(weights) + len(manifest) > MAX_ARTIFACT_BYTES:
        raise ProtocolError(Reason.SIZE, f"artifact of {len(weights) + len(manifest)} B exceeds the limit")
    return weights, manifest


METRICS = ("train-loss", "train-accuracy", "step-time-ms", "train-seconds", "peak-memory-mb",
           "backbone-load-seconds", "peak-memory-above-rest-mb")
"""The metrics a train reply may carry besides ``num-examples`` (others are dropped on decode)."""


@dataclass(frozen=True)
class TrainReply:
    """A client's answer: a status, its trained adapter state (status ok), its example count and metrics, and
    the router statistics of its data when the request asked for them (:data:`STATS_KEYS`)."""

    status: Status
    reason: str = ""
    state: dict[str, np.ndarray] | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    stats: dict[str, np.ndarray] | None = None

    def encode(self) -> Records:
        records = Records(configs={"status": {"status": self.status.value, "reason": self.reason[:MAX_REASON_CHARS]}},
                          metrics={"metrics": {"num-examples": self.num_examples, **self.metrics}})
        if self.state is not None:
            records.arrays["adapter"] = dict(self.state)
        if self.stats is not None:
            records.arrays["stats"] = dict(self.stats)
        return records

    @staticmethod
    def layout(expected: Mapping[str, ArraySpec], expected_stats: Mapping[str, ArraySpec] | None = None,
               max_bytes: int | None = None) -> Layout:
        """What a reply to a request whose adapter state had ``expected`` specs (and that asked for statistics
        of ``expected_stats`` specs) may hold; ``max_bytes`` lowers its total bound."""
        arrays = {"adapter": expected, **({} if expected_stats is None else {"stats": expected_stats})}
        return Layout(arrays, frozenset({"status"}), frozenset({"metrics"}), max_bytes, {"stats": Reason.STATS})

    @classmethod
    def decode(cls, records: Records, expected: Mapping[str, ArraySpec],
               expected_stats: Mapping[str, ArraySpec] | None = None) -> TrainReply:
        """Decode and bound a reply to a request whose adapter state had ``expected`` specs.

        Statistics must come exactly when ``expected_stats`` is given, match it, be finite, and count
        exactly the reply's ``num-examples`` (reason ``stats`` otherwise). Any record besides ``status``,
        ``metrics``, ``adapter`` and ``stats`` is reason ``unexpected``."""
        layout = TrainReply.layout(expected, {} if "stats" in records.arrays else None)  # stats: judged by _stats
        layout.check_names(records.arrays, records.configs, records.metrics)
        _, status, reason = read_status(records)
        if status is not Status.OK:
            return cls(status, reason)
        metrics_record = _record(records, "metrics", "metrics")
        if len(metrics_record) > MAX_METRICS:
            raise ProtocolError(Reason.METRICS, f"{len(metrics_record)} metrics (limit {MAX_METRICS})")
        count = _int(metrics_record, "num-examples", 1, MAX_EXAMPLES, reason=Reason.COUNT)
        metrics: dict[str, float] = {}
        for key in METRICS:
            if key not in metrics_record:
                continue
            value = metrics_record[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ProtocolError(Reason.METRICS, f"{key} must be a finite number, got {value!r:.40}")
            metrics[key] = float(value)
        return cls(status, reason, _arrays(records, "adapter", expected), count, metrics,
                   _stats(records, expected_stats, count))


def read_status(records: Records) -> tuple[dict[str, Any], Status, str]:
    """A reply's ``status`` config record, its status (reason ``status`` when unknown) and its reason text
    (bounded; empty when not a string)."""
    record = _record(records, "configs", "status")
    try:
        status = Status(str(record.get("status")))
    except ValueError:
        raise ProtocolError(Reason.STATUS, f"unknown status {record.get('status')!r:.40}") from None
    reason = record.get("reason", "")
    return record, status, reason[:MAX_REASON_CHARS] if isinstance(reason, str) else ""


def _stats(records: Records, expected: Mapping[str, ArraySpec] | None, count: int) -> dict[str, np.ndarray] | None:
    if expected is None:
        if "stats" in records.arrays:
            raise ProtocolError(Reason.STATS, "statistics that were not asked for")
        return None
    if "stats" not in records.arrays:
        raise ProtocolError(Reason.STATS, "the statistics asked for are missing")
    try:
        stats = _arrays(records, "stats", expected)
    except ProtocolError as error:
        raise ProtocolError(Reason.STATS, error.detail) from None
    counts = stats["count"]
    if int(counts.min(initial=0)) < 0 or int(counts.sum()) != count:
        raise ProtocolError(Reason.STATS, f"class counts {counts.tolist()[:8]} do not add up to num-examples={count}")
    if not (np.isfinite(stats["sum"]).all() and np.isfinite(stats["within"]).all()):
        raise ProtocolError(Reason.STATS, "statistics hold NaN or infinite values")
    return stats
