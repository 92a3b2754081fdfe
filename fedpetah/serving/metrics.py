"""Continual-learning metrics (accuracy matrix, average accuracy, BWT, forgetting), run logs and plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedpetah.atomic import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"


class AccuracyMatrix:
    """``R[i][j]``: accuracy on task ``j`` after learning task ``i`` (NaN until recorded, and for ``j > i``).

    The metrics take ``after=k`` (default: the last task with a complete row) and need rows ``0..k``
    complete on and below the diagonal.
    """

    def __init__(self, num_tasks: int) -> None:
        if num_tasks < 0:
            raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
        self._r = np.full((num_tasks, num_tasks), np.nan)

    @property
    def num_tasks(self) -> int:
        return self._r.shape[0]

    @property
    def values(self) -> np.ndarray:
        return self._r.copy()

    def record(self, learned: int, task: int, accuracy: float) -> None:
        """Set ``R[learned][task]``; a later call for the same cell overwrites it."""
        if not 0 <= task <= learned < self.num_tasks:
            raise ValueError(f"need 0 <= task ({task}) <= learned ({learned}) < {self.num_tasks}")
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        self._r[learned, task] = accuracy

    def complete_rows(self) -> int:
        """How many leading rows are complete on and below the diagonal."""
        count = 0
        while count < self.num_tasks and not np.isnan(self._r[count, : count + 1]).any():
            count += 1
        return count

    def _after(self, after: int | None) -> int:
        complete = self.complete_rows()
        k = complete - 1 if after is None else after
        if not 0 <= k < complete:
            raise ValueError(f"rows 0..{k} of the accuracy matrix are not complete ({complete} complete rows)")
        return k

    def average_accuracy(self, after: int | None = None) -> float:
        """``A_k = mean_{j<=k} R[k][j]``."""
        k = self._after(after)
        return float(self._r[k, : k + 1].mean())

    def backward_transfer(self, after: int | None = None) -> float:
        """Lopez-Paz & Ranzato 2017: ``mean_{j<k} (R[k][j] - R[j][j])``; negative means forgetting.

        NaN after the first task (undefined).
        """
        k = self._after(after)
        if k == 0:
            return math.nan
        return float(np.mean([self._r[k, j] - self._r[j, j] for j in range(k)]))

    def forgetting(self, after: int | None = None) -> float:
        """Chaudhry et al. 2018: ``mean_{j<k} (max_{j<=l<k} R[l][j] - R[k][j])``; NaN after the first task."""
        k = self._after(after)
        if k == 0:
            return math.nan
        return float(np.mean([self._r[j:k, j].max() - self._r[k, j] for j in range(k)]))

    def to_list(self) -> list[list[float | None]]:
        """Rows as JSON-ready lists, NaN as ``None``."""
        return [[None if math.isnan(v) else float(v) for v in row] for row in self._r]

    @classmethod
    def from_rounds(cls, records: Sequence[RoundRecord], num_tasks: int | None = None) -> AccuracyMatrix:
        """Row ``i`` from the last round of task ``i`` that reported each seen task's accuracy (not NaN); without
        records, ``num_tasks`` empty rows (a server stopped before its first round)."""
        if not records and num_tasks is None:
            raise ValueError("no round records, and no task count")
        matrix = cls(num_tasks if num_tasks is not None else max(r.task for r in records) + 1)
        for record in records:  # rounds in order: later rounds overwrite earlier ones
            for task, accuracy in record.accuracy.items():
                if task <= record.task and not math.isnan(accuracy):
                    matrix.record(record.task, task, accuracy)
        return matrix


@dataclass
class RoundRecord:
    """One server round: the task trained, the global models' accuracy per seen task, costs.

    ``bytes_up``/``bytes_down``: adapter payload bytes summed over the round's clients;
    ``step_time_s``: the clients' median training-step time; ``peak_memory_mb``: the clients' maximum;
    ``rejections``: rejected replies and updates counted by reason (``num_rejected`` is their total);
    ``extra``: any other scalars (train loss, aggregation metrics, ...). NaN marks a value not measured
    (an accuracy not evaluated this round); it is written as ``null``.
    """

    round: int
    task: int
    accuracy: dict[int, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    num_clients: int = 0
    num_rejected: int = 0
    round_time_s: float = 0.0
    step_time_s: float | None = None
    peak_memory_mb: float | None = None
    rejections: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy"] = {str(k): v for k, v in self.accuracy.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_json` after strict JSON: ``null`` accuracies and extras come back as NaN."""
        fields = dict(data)
        fields["accuracy"] = {int(k): _float(v) for k, v in fields.get("accuracy", {}).items()}
        fields["extra"] = {str(k): _float(v) for k, v in fields.get("extra", {}).items()}
        return cls(**fields)


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def tensor_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes of a state dict (what an adapter update costs on the wire, before framing)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 95)) -> dict[str, float]:
    """``{"p50": ..., "p95": ...}`` with linear interpolation; empty input raises ``ValueError``."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ValueError("percentiles of an empty sequence")
    return {f"p{q:g}": float(np.percentile(data, q)) for q in qs}


def _jsonable(value: Any) -> Any:
    """NaN and infinities become ``None`` so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class RunLog:
    """Appends one JSON object per round to ``metrics.jsonl`` (flushed and fsynced per line) and writes
    ``summary.json``.

    Reopening a run directory appends (a resumed server); a line torn by a kill is cut off first, and with
    ``committed_rounds`` the rows of later rounds are dropped too: a round is logged before the bank commits it,
    so a server killed between the two left a row for a round that the resumed run trains again. Each round then
    has exactly one row, and every committed round has its row.
    """

    def __init__(self, run_dir: str | os.PathLike[str], committed_rounds: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if path.exists():
            data = path.read_bytes()
            kept = data[: data.rfind(b"\n") + 1]  # a torn last line goes
            if committed_rounds is not None:
                kept = b"".join(line for line in kept.splitlines(keepends=True)
                                if not _round_after(line, committed_rounds))
            if kept != data:
                atomic_write_bytes(path, kept)
        self._file = path.open("a", encoding="utf-8")

    def log(self, record: RoundRecord) -> None:
        """Append the round's row and make it durable (the bank commit that follows must not get ahead of it)."""
        self._file.write(json.dumps(_jsonable(record.to_json()), allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write ``summary.json`` atomically, so a reader never sees half of it."""
        return atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(_jsonable(summary), indent=2,
                                                                          allow_nan=False))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _round_after(line: bytes, committed: int) -> bool:
    """Whether a ``metrics.jsonl`` line is the row of a round after ``committed`` (unparsable lines are kept,
    for :func:`read_rounds` to report)."""
    try:
        number = json.loads(line).get("round")
    except (ValueError, AttributeError):
        return False
    return isinstance(number, int) and number > committed


def read_rounds(run_dir: str | os.PathLike[str]) -> list[RoundRecord]:
    """The records of ``metrics.jsonl`` by round; a re-run round (after a resume) keeps its last record."""
    lines = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    by_round: dict[int, RoundRecord] = {}
    for number, line in enumerate(lines, 1):
        try:
            record = RoundRecord.from_json(json.loads(line))
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            if number == len(lines):
                break  # torn last line of a killed run
            raise ValueError(f"{run_dir}/{METRICS_FILE}:{number}: {error}") from None
        by_round[record.round] = record
    return [by_round[r] for r in sorted(by_round)]


def task_free_rows(records: Sequence[RoundRecord]) -> dict[int, RoundRecord]:
    """Per task, its last round that evaluated task-free prediction (extras ``task_free_<j>``)."""
    return {r.task: r for r in records if "task_free_0" in r.extra}


def task_free_summary(records: Sequence[RoundRecord], num_tasks: int) -> dict[str, Any]:
    """``task_free_matrix`` (row i: accuracy on task j <= i without task ids, after learning task i, NaN where
    not evaluated), ``task_free_accuracy`` (after the last evaluated task, over all its tasks' test images),
    the router's share of right tasks, its time per image and the statistics' upload bytes."""
    rows = task_free_rows(records)
    matrix = np.full((num_tasks, num_tasks), np.nan)
    for i, record in rows.items():
        for j in range(i + 1):
            matrix[i, j] = record.extra.get(f"task_free_{j}", math.nan)
    last = rows[max(rows)] if rows else None
    return {
        "task_free_matrix": [[None if math.isnan(v) else float(v) for v in row] for row in matrix],
        "task_free_accuracy": last.extra.get("task_free_all") if last else None,
        "task_free_after_task": last.task if last else None,
        "task_free_routing": last.extra.get("task_free_routing") if last else None,
        "task_free_s_per_image": last.extra.get("task_free_s_per_image") if last else None,
        "bytes_stats_up_total": sum(r.extra.get("bytes_stats_up", 0.0) for r in records),
    }


def federated_rows(records: Sequence[RoundRecord]) -> dict[int, RoundRecord]:
    """Per task, its last round with the devices' federated evaluation (extra ``federated_images``, see
    :meth:`fedpetah.serving.federated.FederatedTally.figures`)."""
    return {r.task: r for r in records if "federated_images" in r.extra}


def federated_summary(records: Sequence[RoundRecord], num_tasks: int) -> dict[str, Any]:
    """The devices' evaluation (empty without any): ``federated_accuracy_matrix`` (task-aware, row i after
    learning task i) with its average accuracy, BWT and forgetting (over its complete rows, None before one),
    ``federated_task_free_matrix``, and the devices and images behind each cell (``federated_devices_matrix``,
    ``federated_images_matrix``); ``federated_task_free_accuracy`` over every learned task's held-out images
    after the last evaluated task, with the devices and images behind it."""
    rows = federated_rows(records)
    if not rows:
        return {}
    num_tasks = max(num_tasks, max(rows) + 1)
    aware = AccuracyMatrix(num_tasks)
    free, devices, images = (np.full((num_tasks, num_tasks), np.nan) for _ in range(3))
    for i, record in rows.items():
        for j in range(i + 1):
            accuracy = record.extra.get(f"federated_accuracy_{j}", math.nan)
            if not math.isnan(accuracy):
                aware.record(i, j, accuracy)
            free[i, j] = record.extra.get(f"federated_task_free_{j}", math.nan)
            devices[i, j] = record.extra.get(f"federated_devices_{j}", math.nan)
            images[i, j] = record.extra.get(f"federated_images_{j}", math.nan)
    learned, last = aware.complete_rows(), rows[max(rows)]

    def cells(values: np.ndarray, kind: type[float] | type[int]) -> list[list[float | int | None]]:
        return [[None if math.isnan(v) else kind(v) for v in row] for row in values]

    return {
        "federated_accuracy_matrix": aware.to_list(),
        "federated_tasks_learned": learned,
        "federated_average_accuracy": aware.average_accuracy() if learned else None,
        "federated_bwt": aware.backward_transfer() if learned else None,
        "federated_forgetting": aware.forgetting() if learned else None,
        "federated_task_free_matrix": cells(free, float),
        "federated_devices_matrix": cells(devices, int),
        "federated_images_matrix": cells(images, int),
        "federated_task_free_accuracy": last.extra.get("federated_task_free_accuracy"),
        "federated_after_task": last.task,
        "federated_devices": int(last.extra["federated_devices"]),
        "federated_images": int(last.extra["federated_images"]),
    }


def summarize(records: Sequence[RoundRecord], num_tasks: int | None = None) -> dict[str, Any]:
    """Run totals and continual-learning metrics from the round records."""
    matrix = AccuracyMatrix.from_rounds(records, num_tasks)
    learned = matrix.complete_rows()
    steps = [r.step_time_s for r in records if r.step_time_s is not None]
    memory = [r.peak_memory_mb for r in records if r.peak_memory_mb is not None]
    return {
        "num_tasks": matrix.num_tasks,
        "tasks_learned": learned,
        "rounds": len(records),
        "accuracy_matrix": matrix.to_list(),
        "average_accuracy": matrix.average_accuracy() if learned else None,
        "average_accuracy_per_task": [matrix.average_accuracy(k) for k in range(learned)],
        "backward_transfer": matrix.backward_transfer() if learned else None,
        "forgetting": matrix.forgetting() if learned else None,
        "bytes_up_total": sum(r.bytes_up for r in records),
        "bytes_down_total": sum(r.bytes_down for r in records),
        "rejected_total": sum(r.num_rejected for r in records),
        "round_time_s": {
            "total": sum(r.round_time_s for r in records),
            **(percentiles(r.round_time_s for r in records) if records else {}),
        },
        "step_time_s": percentiles(steps) if steps else None,
        "peak_memory_mb": max(memory) if memory else None,
        **task_free_summary(records, matrix.num_tasks),
        **federated_summary(records, matrix.num_tasks),
    }


def plot_run(run_dir: str | os.PathLike[str], num_tasks: int | None = None) -> list[Path]:
    """Write ``accuracy_matrix.png``, ``accuracy_per_task.png`` and ``bytes_per_round.png`` into ``run_dir``
    from its ``metrics.jsonl``; returns their paths."""
    root = Path(run_dir)
    records = read_rounds(root)
    if not records:  # a server stopped before its first round: nothing to draw
        return []
    matrix = AccuracyMatrix.from_rounds(records, num_tasks)
    rounds = [r.round for r in records]
    paths = []

    if bool(np.isfinite(matrix.values).any()):  # a server without test images (tasks=catalog) has none
        paths.append(_heatmap(matrix.values, "accuracy R[i][j]", root / "accuracy_matrix.png"))
    federated = federated_summary(records, matrix.num_tasks).get("federated_accuracy_matrix", [])
    if any(v is not None for row in federated for v in row):
        values = np.array([[math.nan if v is None else v for v in row] for row in federated])
        paths.append(_heatmap(values, "federated accuracy (the devices' held-out images)",
                              root / "federated_accuracy_matrix.png"))
    free = task_free_summary(records, matrix.num_tasks)["task_free_matrix"]
    if any(v is not None for row in free for v in row):
        values = np.array([[math.nan if v is None else v for v in row] for row in free])
        paths.append(_heatmap(values, "task-free accuracy (no task id)", root / "task_free_matrix.png"))

    fig = _figure((7, 4))
    ax = fig.add_subplot()
    for task in range(matrix.num_tasks):
        points = [(r.round, r.accuracy[task]) for r in records if task in r.accuracy]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=f"task {task}")
    for before, after in zip(records, records[1:], strict=False):
        if after.task != before.task:
            ax.axvline((before.round + after.round) / 2, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0.0, 1.02), title="global accuracy per task")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
        paths.append(_save(fig, root / "accuracy_per_task.png"))

    fig = _figure((7, 4))
    ax = fig.add_subplot()
    ax.plot(rounds, [r.bytes_up / 1024 for r in records], marker=".", label="up (clients -> server)")
    ax.plot(rounds, [r.bytes_down / 1024 for r in records], marker=".", label="down (server -> clients)")
    ax.set(xlabel="round", ylabel="KiB per round", title="adapter traffic per round")
    ax.legend(fontsize=8)
    paths.append(_save(fig, root / "bytes_per_round.png"))
    return paths


def _heatmap(values: np.ndarray, title: str, path: Path) -> Path:
    side = 1.0 + 0.6 * values.shape[0]
    fig = _figure((side + 0.4, side))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis")
    for (i, j), value in np.ndenumerate(values):
        if not math.isnan(value):
            color = "w" if value < 0.6 else "k"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set(xlabel="evaluated task j", ylabel="after learning task i", title=title)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _figure(size: tuple[float, float]) -> Figure:
    """A figure drawn by the Agg canvas: no pyplot, no global backend switch, safe off the main thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path
