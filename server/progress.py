"""Live per-round progress and the final table, with rich (console only; numbers come from fedpetah)."""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from fedpetah.serving.metrics import RoundRecord


class Progress:
    """A progress bar with the last round's accuracy line on a terminal, one plain line per round elsewhere (logs,
    CI, ``flwr log``); a summary table at the end."""

    def __init__(self, rounds_per_task: int, task_names: list[str]) -> None:
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.rounds_per_task = rounds_per_task
        self.total_rounds = rounds_per_task * len(task_names)
        self.task_names = list(task_names)
        self.bar = RichProgress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                                TextColumn("{task.description}"), console=self.console)
        self.task_id = self.bar.add_task("", total=self.total_rounds)

    def __enter__(self) -> Progress:
        if self.live:
            self.bar.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.live:
            self.bar.__exit__(kind, value, tb)

    def tasks(self, names: list[str]) -> None:
        """The task list as it grows (a live stream): the total rounds follow it."""
        if names != self.task_names:
            self.task_names = list(names)
            self.total_rounds = self.rounds_per_task * len(names)
            self.bar.update(self.task_id, total=self.total_rounds)

    def update(self, record: RoundRecord) -> None:
        accs = " ".join(f"{100 * a:.0f}" for a in record.accuracy.values() if not math.isnan(a))
        rejected = f", {record.num_rejected} rejected" if record.num_rejected else ""
        text = (f"task {record.task} ({self.task_names[record.task]}) acc% [{accs}] "
                f"{record.num_clients}/{int(record.extra.get('sampled', 0))} trained{rejected}, "
                f"{record.round_time_s:.1f}s")
        if self.live:
            self.bar.update(self.task_id, completed=record.round, description=text)
        else:
            self.console.print(f"round {record.round}/{self.total_rounds} {text}", highlight=False)

    def final(self, summary: dict[str, Any]) -> None:
        rows = summary.get("accuracy_matrix", [])
        kind = ""
        if not any(v is not None for row in rows for v in row) and "federated_accuracy_matrix" in summary:
            rows, kind = summary["federated_accuracy_matrix"], "federated "  # the server holds no test images
        table = Table(title=f"{kind}accuracy matrix R[i][j] (%), row = after task i")
        table.add_column("after")
        for name in self.task_names:
            table.add_column(name, justify="right")
        for i, row in enumerate(rows):
            cells = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}" for v in row]
            table.add_row(self.task_names[i], *cells)
        self.console.print(table)
        keys = ("average_accuracy", "backward_transfer", "forgetting", "federated_average_accuracy",
                "federated_task_free_accuracy", "bytes_up_total", "bytes_down_total", "bytes_backbone_total",
                "trainable_params")
        for key in keys:
            if key in summary:
                self.console.print(f"{key}: {summary[key]}")
