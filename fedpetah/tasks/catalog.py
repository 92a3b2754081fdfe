"""The task catalogue ``<state-dir>/tasks.yaml``: tasks declared by name and class names, with no image on the server.

The file is ``tasks: [{name: ..., classes: [...]}, ...]``. :func:`read_catalog` reads and checks it,
:func:`add_task` appends to it while a server may be reading it, and :func:`check_extends` holds it against the
tasks a bank has learned (a catalogue only grows at its end). :func:`catalog_stream` is the ``catalog`` task stream
(registered by ``fedpetah.tasks``): Tasks with empty splits. No torch at import (``fedpetah-server task`` starts
fast): the stream imports it on use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml  # type: ignore[import-untyped]  # PyYAML (a dependency of flwr) ships no types

from fedpetah.atomic import atomic_write_text
from fedpetah.tasks.names import UnsafeNameError, check_name
from fedpetah.wire.protocol import MAX_CATALOG_CLASSES, MAX_CLASSES, MAX_NAME_CHARS, MAX_TASKS

if TYPE_CHECKING:
    from fedpetah.tasks.data import Task
    from fedpetah.tasks.streams import TaskStreamConfig

CATALOG_FILE = "tasks.yaml"
"""The catalogue's name in the server's state dir (:func:`catalog_path`)."""
MAX_CATALOG_BYTES = 2**20
"""The largest catalogue file read or written (1 MiB: thousands of tasks)."""
HEADER = (
    "# fedpetah task catalogue: each task by name and class names (the images stay on the devices).\n"
    "# Append with `fedpetah-server task add NAME --classes a,b,c --state-dir DIR`; a running server picks a new\n"
    "# task up at its next poll. Learned tasks must stay as they are, in order: add new tasks at the end.\n"
)
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader where PyYAML has it


class CatalogError(ValueError):
    """A catalogue that cannot be read or used as it is (the message names the file, the entry and the fault)."""


@dataclass(frozen=True)
class CatalogTask:
    """One declared task: its name and its class names (labels 0..C-1 in this order)."""

    name: str
    classes: tuple[str, ...]


def catalog_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where ``fedpetah-server --state-dir STATE_DIR`` keeps its catalogue."""
    return Path(state_dir) / CATALOG_FILE


def _check_name(name: object, what: str) -> str:
    """A name a device can store as a folder and the wire carries (:data:`MAX_NAME_CHARS` characters at most)."""
    checked = check_name(name, what)
    if len(checked) > MAX_NAME_CHARS:
        raise UnsafeNameError(f"{what} name of {len(checked)} characters (at most {MAX_NAME_CHARS})")
    return checked


def _check_tasks(raw: object, source: str) -> list[CatalogTask]:
    """The tasks of a parsed catalogue, every bound checked; else :class:`CatalogError` naming ``source``."""
    if not isinstance(raw, dict) or set(raw) != {"tasks"}:
        found = f"keys {sorted(map(repr, raw))}" if isinstance(raw, dict) else type(raw).__name__
        raise CatalogError(f"{source}: must be a mapping with the one key 'tasks' (a list of {{name, classes}}), "
                           f"found {found}")
    entries = raw["tasks"]
    if not isinstance(entries, list):
        raise CatalogError(f"{source}: 'tasks' must be a list of {{name, classes}}, found {type(entries).__name__}")
    if len(entries) > MAX_TASKS:
        raise CatalogError(f"{source}: {len(entries)} tasks (at most {MAX_TASKS})")
    tasks: list[CatalogTask] = []
    seen: dict[str, int] = {}
    total = 0
    for index, entry in enumerate(entries):
        where = f"{source}: task {index}"
        if not isinstance(entry, dict) or set(entry) != {"name", "classes"}:
            found = f"keys {sorted(map(repr, entry))}" if isinstance(entry, dict) else type(entry).__name__
            raise CatalogError(f"{where}: must be a mapping with exactly the keys 'name' and 'classes', found {found}")
        classes = entry["classes"]
        try:
            name = _check_name(entry["name"], "task")
            where = f"{where} ({name!r})"
            if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
                count = str(len(classes)) if isinstance(classes, list) else type(classes).__name__
                raise CatalogError(f"classes must be a list of 2 to {MAX_CLASSES} names, found {count}")
            total += len(classes)
            if total > MAX_CATALOG_CLASSES:
                raise CatalogError(f"the catalogue holds more than {MAX_CATALOG_CLASSES} classes in all")
            names = tuple(_check_name(c, "class") for c in classes)
        except (UnsafeNameError, CatalogError) as error:
            raise CatalogError(f"{where}: {error}") from None
        if len(set(names)) != len(names):
            repeated = sorted({c for c in names if names.count(c) > 1})
            raise CatalogError(f"{where}: repeated class names {repeated!r:.200}")
        if name in seen:
            raise CatalogError(f"{where}: the name is task {seen[name]}'s too (task names are unique)")
        seen[name] = index
        tasks.append(CatalogTask(name, names))
    return tasks


def _read_text(path: Path) -> str:
    """The file's text, at most :data:`MAX_CATALOG_BYTES`; FileNotFoundError passes through."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CATALOG_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise CatalogError(f"{path}: cannot be read: {error.strerror or error}") from None
    if len(data) > MAX_CATALOG_BYTES:
        raise CatalogError(f"{path}: larger than {MAX_CATALOG_BYTES} bytes (not a task catalogue?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CatalogError(f"{path}: not UTF-8 text (byte {error.start})") from None


def _parse(text: str, source: str) -> list[CatalogTask]:
    try:
        raw = yaml.load(text, Loader=_LOADER)  # noqa: S506 (a safe loader: plain YAML types only)
    except yaml.YAMLError as error:
        raise CatalogError(f"{source}: not valid YAML: {' '.join(str(error).split())}") from None
    return _check_tasks(raw, source)


def read_catalog(path: str | os.PathLike[str], *, missing_ok: bool = False) -> list[CatalogTask]:
    """The tasks of the catalogue at ``path``, in order. A missing file is a :class:`CatalogError` unless
    ``missing_ok`` (then no task); so is a file larger than :data:`MAX_CATALOG_BYTES`, not YAML, not
    ``{tasks: [{name, classes}, ...]}``, with a name that is not a plain folder name, a task with fewer than 2 or
    repeated classes, a repeated task name, or more than :data:`MAX_TASKS` tasks."""
    target = Path(path)
    try:
        text = _read_text(target)
    except FileNotFoundError:
        if missing_ok:
            return []
        raise CatalogError(f"{target}: no task catalogue (declare a task with `fedpetah-server task add NAME "
                           f"--classes a,b --state-dir {target.parent}`)") from None
    return _parse(text, str(target))


def format_catalog(tasks: Sequence[CatalogTask]) -> str:
    """The catalogue file holding ``tasks``: :data:`HEADER`, then ``tasks:`` with one ``- name/classes`` each."""
    body = {"tasks": [{"name": t.name, "classes": list(t.classes)} for t in tasks]}
    return HEADER + _dump(body)


def _dump(data: object) -> str:
    text: str = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None, width=2**20)
    return text


def _appended(old: str | None, tasks: list[CatalogTask], new: CatalogTask, source: str) -> str:
    """The old text with ``new`` appended as one more block-list item when that parses back to exactly
    ``tasks + [new]`` (the operator's comments and layout are kept); else the whole catalogue written afresh."""
    if old and tasks:
        item = _dump([{"name": new.name, "classes": list(new.classes)}])
        candidate = old + ("" if old.endswith("\n") else "\n") + item
        try:
            if _parse(candidate, source) == [*tasks, new]:
                return candidate
        except CatalogError:
            pass
    return format_catalog([*tasks, new])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (one writer at a time; readers need none: writes are atomic)."""
    import fcntl  # imported here: POSIX only, and only writers need it

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def add_task(path: str | os.PathLike[str], name: str, classes: Sequence[str]) -> list[CatalogTask]:
    """Append task ``name`` with ``classes`` to the catalogue at ``path`` (created if missing) and return the whole
    catalogue. Safe beside other writers (a file lock) and readers (an atomic replace). A name already declared,
    a bad name or class list, or a catalogue that does not read raises :class:`CatalogError` and changes nothing."""
    target = Path(path)
    source = str(target)
    if isinstance(classes, str):
        raise CatalogError(f"task {name!r}: classes must be a list of names, not the one string {classes!r:.80}")
    with _locked(target):
        try:
            old: str | None = _read_text(target)
        except FileNotFoundError:
            old = None
        tasks = [] if old is None else _parse(old, source)
        for index, task in enumerate(tasks):
            if task.name == name:
                if list(task.classes) == list(classes):
                    raise CatalogError(f"{source}: task {name!r} is declared already (task {index}, classes "
                                       f"{list(task.classes)!r:.300}): nothing to add")
                raise CatalogError(f"{source}: task {name!r} is declared already as task {index} with classes "
                                   f"{list(task.classes)!r:.300}, not {list(classes)!r:.300}: a task's classes "
                                   "cannot change; declare the new classes under a new task name")
        entries = [{"name": t.name, "classes": list(t.classes)} for t in tasks]
        updated = _check_tasks({"tasks": [*entries, {"name": name, "classes": list(classes)}]}, source)
        text = _appended(old, tasks, updated[-1], source)
        if len(text.encode("utf-8")) > MAX_CATALOG_BYTES:
            raise CatalogError(f"{source}: with task {name!r} the catalogue would exceed {MAX_CATALOG_BYTES} bytes")
        mode = 0o644 if old is None else target.stat().st_mode & 0o777
        atomic_write_text(target, text, mode)
    return updated


def check_extends(learned: Sequence[tuple[str, Sequence[str]]], catalog: Sequence[CatalogTask]) -> None:
    """Accept ``catalog`` only if it starts with the ``learned`` (name, classes) tasks, in order and unchanged
    (what ``--resume`` allows: new tasks appended at the end); else :class:`CatalogError` naming the first
    difference."""
    for index, (name, classes) in enumerate(learned):
        was = f"learned task {index} {name!r} with classes {list(classes)!r:.300}"
        if index >= len(catalog):
            raise CatalogError(f"the catalogue has {len(catalog)} task(s): {was} is missing (a learned task cannot be "
                               "removed)")
        now = catalog[index]
        if now.name != name or list(now.classes) != list(classes):
            raise CatalogError(f"catalogue task {index} is {now.name!r} with classes {list(now.classes)!r:.300}, "
                               f"but the {was}: learned tasks cannot be renamed, reordered or given other classes "
                               "(append new tasks at the end)")


def catalog_stream(config: TaskStreamConfig) -> list[Task]:
    """The ``catalog`` stream: the catalogue at ``config.root`` (read afresh on every call), each task with EMPTY
    train and test splits of (0, channels, store_size, store_size) uint8 images (the server holds no image)."""
    import torch

    from fedpetah.tasks.data import ImageSet, Task

    if not config.root:
        raise ValueError("tasks.name=catalog needs tasks.root=<state-dir>/tasks.yaml")
    tasks = read_catalog(Path(config.root).expanduser())
    count = len(tasks) if config.num_tasks is None else config.num_tasks
    if count > len(tasks):
        raise ValueError(f"tasks.num_tasks={count} but {config.root} declares only {len(tasks)} tasks")

    def empty() -> ImageSet:
        images = torch.empty((0, config.channels, config.store_size, config.store_size), dtype=torch.uint8)
        return ImageSet(images, torch.empty(0, dtype=torch.int64))

    return [Task(t, task.name, list(task.classes), empty(), empty()) for t, task in enumerate(tasks[:count])]
