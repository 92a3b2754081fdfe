"""Continual-learning metrics on a hand-checked accuracy matrix; run log, summary and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedpetah.serving.metrics import (
    AccuracyMatrix,
    RoundRecord,
    RunLog,
    percentiles,
    plot_run,
    read_rounds,
    summarize,
    tensor_bytes,
)

# R[i][j]; task 0 improves after task 1 (0.95), then is forgotten (0.5)
ROWS = [[0.9], [0.95, 0.8], [0.5, 0.7, 0.95]]


def _matrix() -> AccuracyMatrix:
    matrix = AccuracyMatrix(3)
    for i, row in enumerate(ROWS):
        for j, accuracy in enumerate(row):
            matrix.record(i, j, accuracy)
    return matrix


def test_average_accuracy_bwt_and_forgetting_by_hand() -> None:
    matrix = _matrix()
    assert matrix.complete_rows() == 3
    assert matrix.average_accuracy() == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert matrix.backward_transfer() == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)  # -0.25
    assert matrix.forgetting() == pytest.approx(((0.95 - 0.5) + (0.8 - 0.7)) / 2)  # 0.275: max over rows
    assert matrix.average_accuracy(after=1) == pytest.approx(0.875)
    assert matrix.backward_transfer(after=1) == pytest.approx(0.05)
    assert matrix.forgetting(after=1) == pytest.approx(-0.05)
    assert matrix.average_accuracy(after=0) == pytest.approx(0.9)
    assert math.isnan(matrix.backward_transfer(after=0)) and math.isnan(matrix.forgetting(after=0))
    assert matrix.to_list()[0] == [0.9, None, None]


def test_matrix_rejects_future_cells_and_incomplete_rows() -> None:
    matrix = AccuracyMatrix(3)
    with pytest.raises(ValueError, match="task"):
        matrix.record(0, 1, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        matrix.record(0, 0, 1.5)
    matrix.record(0, 0, 0.9)
    matrix.record(1, 1, 0.8)  # R[1][0] missing: row 1 incomplete
    assert matrix.complete_rows() == 1
    with pytest.raises(ValueError, match="not complete"):
        matrix.average_accuracy(after=1)


def _records() -> list[RoundRecord]:
    records = []
    for task, row in enumerate(ROWS):
        for step in range(2):
            accuracy = {j: (a if step == 1 else a / 2) for j, a in enumerate(row)}
            records.append(
                RoundRecord(
                    round=2 * task + step + 1,
                    task=task,
                    accuracy=accuracy,
                    bytes_up=1000 * (task + 1),
                    bytes_down=500,
                    num_clients=4,
                    num_rejected=step,
                    round_time_s=float(task + 1),
                    step_time_s=0.01 * (task + 1),
                    peak_memory_mb=100.0 + task,
                    extra={"train_loss": 0.5},
                )
            )
    return records


def test_run_log_summary_and_resume(tmp_path: Path) -> None:
    records = _records()
    with RunLog(tmp_path) as log:
        for record in records[:4]:
            log.log(record)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"round": 5, "ta')  # the server was killed mid-line
    assert [r.round for r in read_rounds(tmp_path)] == [1, 2, 3, 4]
    with RunLog(tmp_path) as log:  # resumed: the torn line is cut, round 4 re-run, then the rest
        for record in records[3:]:
            log.log(record)
        assert read_rounds(tmp_path) == records
        summary = summarize(read_rounds(tmp_path))
        path = log.write_summary(summary)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 7
    assert summary["accuracy_matrix"] == _matrix().to_list()
    assert summary["backward_transfer"] == pytest.approx(-0.25)
    assert summary["average_accuracy_per_task"] == pytest.approx([0.9, 0.875, 2.15 / 3])
    assert summary["bytes_up_total"] == 2 * (1000 + 2000 + 3000) and summary["bytes_down_total"] == 3000
    assert summary["rejected_total"] == 3 and summary["peak_memory_mb"] == 102.0
    assert summary["round_time_s"]["total"] == 12.0 and summary["round_time_s"]["p50"] == 2.0
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["accuracy_matrix"][0] == [0.9, None, None]


def test_rows_of_rounds_the_bank_never_committed_are_dropped_on_resume(tmp_path: Path) -> None:
    # Prepare: rounds 1-4 logged, but the server was killed after logging round 4 and before the bank
    # committed it (the bank says 3 rounds are complete)
    records = _records()
    with RunLog(tmp_path) as log:
        for record in records[:4]:
            log.log(record)

    # Execute: the resumed run drops round 4's row, trains round 4 again and goes on
    with RunLog(tmp_path, committed_rounds=3) as log:
        assert [r.round for r in read_rounds(tmp_path)] == [1, 2, 3]
        for record in records[3:]:
            log.log(record)

    # Assert: every round exactly once in the file itself, not only after read_rounds' de-duplication
    rounds = [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5, 6]
    assert read_rounds(tmp_path) == records
    with RunLog(tmp_path, committed_rounds=0):  # a fresh run in an old directory starts an empty log
        pass
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""


def test_unevaluated_accuracies_are_nan_and_survive_json(tmp_path: Path) -> None:
    nan = float("nan")
    records = [
        RoundRecord(round=1, task=0, accuracy={0: 0.4}),
        RoundRecord(round=2, task=0, accuracy={0: nan}, extra={"train_loss": nan}),
        RoundRecord(round=3, task=1, accuracy={0: nan, 1: 0.6}),
        RoundRecord(round=4, task=1, accuracy={0: 0.3}),
    ]
    with RunLog(tmp_path) as log:
        for record in records:
            log.log(record)
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    restored = read_rounds(tmp_path)
    assert math.isnan(restored[1].accuracy[0]) and math.isnan(restored[1].extra["train_loss"])
    assert AccuracyMatrix.from_rounds(restored).to_list() == [[0.4, None], [0.3, 0.6]]


def test_plot_run_writes_three_pngs(tmp_path: Path) -> None:
    with RunLog(tmp_path) as log:
        for record in _records():
            log.log(record)
    paths = plot_run(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["accuracy_matrix.png", "accuracy_per_task.png", "bytes_per_round.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_percentiles_and_tensor_bytes() -> None:
    assert percentiles(range(1, 101)) == {"p50": pytest.approx(50.5), "p95": pytest.approx(95.05)}
    assert percentiles([3.0], (50, 99.9)) == {"p50": 3.0, "p99.9": 3.0}
    with pytest.raises(ValueError, match="empty"):
        percentiles([])
    state = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.float16)}
    assert tensor_bytes(state) == 2 * 3 * 4 + 4 * 2
