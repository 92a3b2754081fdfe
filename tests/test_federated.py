"""Federated evaluation on the server: hostile replies refused, honest counts summed exactly, one device's share
of a figure capped, and the federated matrix in summary.json only when devices evaluated."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fedpetah.serving.federated import (
    FederatedTally,
    capped_accuracy,
    check_reply,
    default_max_share,
    share_cap,
    share_weights,
)
from fedpetah.serving.metrics import RoundRecord, summarize
from fedpetah.wire.evaluation import EvaluateReply
from fedpetah.wire.protocol import ProtocolError, Status, TaskInfo
from fedpetah.wire.reasons import Reason

TASKS = (TaskInfo(0, "digits", ("a", "b")), TaskInfo(1, "letters", ("x", "y", "z")))


def _table(*rows: tuple[int, int, int]) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def _confusion(counts: np.ndarray) -> np.ndarray:
    """A task-aware confusion table consistent with ``counts``: the wrong ones all on the next class."""
    classes = len(counts)
    grid = np.zeros((classes, classes), dtype=np.int64)
    for c, (images, aware, _) in enumerate(counts):
        grid[c, c] = aware
        grid[c, (c + 1) % classes] += images - aware
    return grid


def _reply(counts: dict[int, np.ndarray]) -> EvaluateReply:
    return EvaluateReply(Status.OK, counts=counts, confusion={t: _confusion(v) for t, v in counts.items()})


def _holdings(counts: dict[int, np.ndarray], spare: int = 0) -> dict[int, np.ndarray]:
    """A hello's holdings that hold out exactly the evaluated images (plus ``spare`` per class)."""
    return {t: np.stack([10 * v[:, 0], v[:, 0] + spare], axis=1) for t, v in counts.items()}


# ---------------------------------------------------------------------------------------------- share cap


def test_the_share_cap_is_exact_on_small_numbers() -> None:
    assert share_cap([300, 300, 400], 0.5) is None  # nobody above half: no cap
    assert share_cap([100, 100, 800], 0.5) == 200  # 200 / (100 + 100 + 200) = 1/2
    assert share_weights([100, 100, 800], 0.5) == [100, 100, 200]
    assert share_cap([100, 100, 800], 2 / 3) == Fraction(2 / 3) * 200 / (1 - Fraction(2 / 3))  # ~400
    assert share_cap([5, 7, 9], 0.2) == 5  # 1/3 is the least a device can weigh among three: equal weights
    assert share_cap([0, 0, 50], 0.5) == 50  # one device: it is the whole figure
    # the default: twice an equal share; one or two devices are never capped
    assert [default_max_share(n) for n in (1, 2, 3, 4, 50)] == [1.0, 1.0, 2 / 3, 0.5, 0.04]
    assert share_weights([10, 1000]) == [10, 1000]
    assert share_weights([100, 100, 800]) == [100, 100, share_cap([100, 100, 800], 2 / 3)]
    assert share_weights([0, 0]) == [0, 0]
    with pytest.raises(ValueError, match="max_share"):
        share_cap([1, 2], 0.0)


def test_the_share_cap_is_the_largest_that_keeps_every_share_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        images = [int(n) for n in rng.integers(0, 1000, size=int(rng.integers(1, 8)))]
        holding = sum(1 for n in images if n > 0)
        share = float(rng.uniform(0.05, 1.0))
        cap = share_cap(images, share)
        if not holding:
            continue
        weights = [Fraction(n) if cap is None else min(Fraction(n), cap) for n in images]
        largest = max(weights) / sum(weights)
        if share * holding >= 1:
            assert largest <= Fraction(share)
            if cap is not None:  # and a larger cap would break the bound
                looser = [min(Fraction(n), cap * Fraction(1001, 1000)) for n in images]
                assert max(looser) / sum(looser) > Fraction(share)
        else:
            assert largest == Fraction(1, holding)  # the bound cannot be met: equal weights


# ---------------------------------------------------------------------------------------------- check_reply


def test_a_reply_within_the_reported_holdout_is_accepted_and_one_above_it_is_refused() -> None:
    counts = {0: _table((4, 3, 2), (6, 6, 5))}
    assert check_reply(_reply(counts), _holdings(counts)) is None
    over = {0: _table((4, 3, 2), (7, 6, 5))}  # 7 images of class 1, 6 held out
    error = check_reply(_reply(over), _holdings(counts))
    assert error is not None and error.reason is Reason.EVALUATION and "class 1: 7 images" in error.detail
    # a task the hello reported no holdings for has nothing held out: any image is too many
    error = check_reply(_reply(counts), {})
    assert error is not None and error.reason is Reason.EVALUATION
    assert check_reply(_reply(counts), None) is not None
    assert check_reply(_reply({0: _table((0, 0, 0), (0, 0, 0))}), None) is None  # nothing claimed
    # holdings of another shape than the task's classes (a hello about another catalogue)
    error = check_reply(_reply(counts), {0: np.zeros((3, 2), dtype=np.int64)})
    assert error is not None and "shape (3, 2)" in error.detail
    # holdings as the fleet ledger keeps them (lists) work the same
    assert check_reply(_reply(counts), {0: [[40, 4], [60, 6]]}) is None


@pytest.mark.parametrize("table", [
    _table((4, 5, 0), (6, 6, 5)),  # more task-aware correct than images
    _table((4, 3, 2), (6, 6, -1)),  # a negative count
    np.array([[4.0, 3.0, 2.0], [6.0, 6.0, math.nan]]),  # not integers
    _table((4, 3, 2)),  # fewer classes than the task has
])
def test_check_reply_holds_a_reply_built_without_the_decode_to_the_same_rules(table: np.ndarray) -> None:
    reply = EvaluateReply(Status.OK, counts={0: table})
    error = check_reply(reply, {0: np.full((2, 2), 100, dtype=np.int64)})
    assert error is not None and error.reason is Reason.EVALUATION


@pytest.mark.parametrize("change", ["over_total", "negative", "nan", "huge_confusion", "confusion_mismatch",
                                    "unasked_task", "missing_confusion"])
def test_hostile_evaluation_replies_do_not_decode(change: str) -> None:
    counts = {0: _table((4, 3, 2), (6, 6, 5))}
    records = _reply(counts).encode()
    assert EvaluateReply.decode(records, TASKS).counts[0].tolist() == counts[0].tolist()  # the unbroken reply
    table, grid = records.arrays["counts"]["t0"], records.arrays["confusion"]["t0"]
    if change == "over_total":
        table[0, 2] = 5  # 5 task-free correct of 4 images
    elif change == "negative":
        table[1] = (-1, 0, 0)
        grid[1] = (0, -1)
    elif change == "nan":
        records.arrays["counts"]["t0"] = table.astype(np.float64)
        records.arrays["counts"]["t0"][0, 1] = math.nan
    elif change == "huge_confusion":
        records.arrays["confusion"]["t0"] = np.zeros((2, 100_000), dtype=np.int64)
    elif change == "confusion_mismatch":
        grid[0] = (2, 2)  # rows add up to the images, but the diagonal is not the task-aware correct count
    elif change == "unasked_task":
        records.arrays["counts"]["t7"] = _table((1, 1, 1))
    elif change == "missing_confusion":
        del records.arrays["confusion"]["t0"]
    with pytest.raises(ProtocolError) as caught:
        EvaluateReply.decode(records, TASKS)
    assert caught.value.reason is Reason.EVALUATION


# ---------------------------------------------------------------------------------------------- the tally


def test_honest_devices_under_the_cap_give_exactly_the_pooled_accuracy() -> None:
    devices = {
        1: {0: _table((4, 3, 2), (6, 6, 5)), 1: _table((1, 1, 1), (2, 1, 0), (3, 2, 2))},
        2: {0: _table((5, 4, 4), (5, 5, 4))},
        3: {0: _table((3, 1, 1), (4, 4, 3)), 1: _table((2, 2, 2), (2, 2, 1), (2, 1, 0))},
    }
    tally = FederatedTally(TASKS, max_share=0.5)  # each device holds less than half of every figure's images
    for client, counts in devices.items():
        tally.add(client, _reply(counts), _holdings(counts, spare=1))
    figures = tally.figures()
    assert figures == {
        "federated_accuracy_0": (3 + 6 + 4 + 5 + 1 + 4) / 27,
        "federated_task_free_0": (2 + 5 + 4 + 4 + 1 + 3) / 27,
        "federated_devices_0": 3.0,
        "federated_images_0": 27.0,
        "federated_accuracy_1": (1 + 1 + 2 + 2 + 2 + 1) / 12,
        "federated_task_free_1": (1 + 0 + 2 + 2 + 1 + 0) / 12,
        "federated_devices_1": 2.0,
        "federated_images_1": 12.0,
        "federated_task_free_accuracy": (19 + 6) / 39,
        "federated_devices": 3.0,
        "federated_images": 39.0,
    }
    # with the default share (2/3 of three devices) nobody is capped either
    default = FederatedTally(TASKS)
    for client, counts in devices.items():
        default.add(client, _reply(counts), _holdings(counts))
    assert default.figures() == figures


def test_a_refused_reply_counts_nothing_and_a_later_reply_replaces_an_earlier_one() -> None:
    tally = FederatedTally(TASKS)
    counts = {0: _table((4, 3, 2), (6, 6, 5))}
    with pytest.raises(ProtocolError) as caught:
        tally.add(1, _reply(counts), {0: np.array([[9, 4], [9, 5]])})  # 6 images of class 1, 5 held out
    assert caught.value.reason is Reason.EVALUATION and tally.figures() == {}
    with pytest.raises(ProtocolError, match="not asked for"):
        tally.add(1, _reply({5: _table((1, 1, 1))}), {5: np.array([[1, 1]])})
    tally.add(1, EvaluateReply(Status.ERROR, "no images"), None)  # a device that could not evaluate
    assert tally.figures() == {}
    tally.add(1, _reply(counts), _holdings(counts))
    tally.add(1, _reply({0: _table((4, 0, 0), (6, 0, 0))}), _holdings(counts))  # the same device again
    assert tally.figures()["federated_accuracy_0"] == 0.0 and tally.figures()["federated_images"] == 10.0


def test_a_liar_moves_a_figure_by_at_most_its_capped_share() -> None:
    honest = {c: {0: _table((50, 40, 30), (50, 45, 35))} for c in (1, 2, 3)}
    hoard = {0: np.array([[10_000, 5_000], [10_000, 5_000]])}  # the liar's hello claims a huge holdout

    def figures(aware: int, free: int) -> dict[str, float]:
        tally = FederatedTally(TASKS, max_share=0.25)
        for client, counts in honest.items():
            tally.add(client, _reply(counts), _holdings(counts))
        tally.add(9, _reply({0: _table((5_000, aware, free), (5_000, aware, free))}), hoard)
        return tally.figures()

    right, wrong = figures(5_000, 5_000), figures(0, 0)
    # its weight is capped at 100 images: 100 / (3 x 100 + 100) = 1/4 of every figure it is in
    assert share_weights([100, 100, 100, 10_000], 0.25) == [100, 100, 100, 100]
    for key in ("federated_accuracy_0", "federated_task_free_0", "federated_task_free_accuracy"):
        assert right[key] - wrong[key] == pytest.approx(0.25, abs=1e-12)
    assert wrong["federated_accuracy_0"] == pytest.approx(0.75 * 255 / 300, abs=1e-12)  # the honest 85%, diluted
    assert right["federated_images_0"] == 10_300.0 and right["federated_devices_0"] == 4.0  # what was claimed


def test_capped_accuracy_scales_a_capped_device_s_correct_count() -> None:
    weights = share_weights([100, 100, 800], 0.5)
    assert capped_accuracy([100, 100, 800], [50, 100, 800], weights) == (50 + 100 + 200) / 400
    assert math.isnan(capped_accuracy([0], [0], [Fraction(0)]))


# ---------------------------------------------------------------------------------------------- summary


def _rounds(federated: bool) -> list[RoundRecord]:
    """Two tasks of two rounds; with ``federated``, the devices' figures on each task's last round."""
    extras: dict[int, dict[str, float]] = {
        1: {"federated_accuracy_0": 0.9, "federated_task_free_0": 0.8, "federated_devices_0": 3.0,
            "federated_images_0": 60.0, "federated_task_free_accuracy": 0.8, "federated_devices": 3.0,
            "federated_images": 60.0},
        3: {"federated_accuracy_0": 0.7, "federated_task_free_0": 0.6, "federated_devices_0": 3.0,
            "federated_images_0": 60.0, "federated_accuracy_1": 0.8, "federated_task_free_1": 0.5,
            "federated_devices_1": 2.0, "federated_images_1": 40.0, "federated_task_free_accuracy": 0.56,
            "federated_devices": 3.0, "federated_images": 100.0},
    }
    return [RoundRecord(round=r, task=r // 2, accuracy={0: 0.5}, extra=extras.get(r, {}) if federated else {})
            for r in range(4)]


def test_the_summary_has_the_federated_matrix_only_when_devices_evaluated() -> None:
    plain, federated = summarize(_rounds(False)), summarize(_rounds(True))
    assert not any(k.startswith("federated") for k in plain)
    assert {k: v for k, v in federated.items() if not k.startswith("federated")} == plain
    assert federated["federated_accuracy_matrix"] == [[0.9, None], [0.7, 0.8]]
    assert federated["federated_tasks_learned"] == 2
    assert federated["federated_average_accuracy"] == pytest.approx(0.75)
    assert federated["federated_bwt"] == pytest.approx(-0.2) and federated["federated_forgetting"] == pytest.approx(0.2)
    assert federated["federated_task_free_matrix"] == [[0.8, None], [0.6, 0.5]]
    assert federated["federated_devices_matrix"] == [[3, None], [3, 2]]
    assert federated["federated_images_matrix"] == [[60, None], [60, 40]]
    assert (federated["federated_task_free_accuracy"], federated["federated_after_task"],
            federated["federated_devices"], federated["federated_images"]) == (0.56, 1, 3, 100)


def test_the_tally_s_figures_are_what_the_summary_reads() -> None:
    counts = {0: _table((4, 3, 2), (6, 6, 5))}
    tally = FederatedTally(TASKS[:1])
    tally.add(1, _reply(counts), _holdings(counts))
    summary = summarize([RoundRecord(round=0, task=0, extra=tally.figures())])
    assert summary["federated_accuracy_matrix"] == [[0.9]] and summary["federated_average_accuracy"] == 0.9
    assert summary["federated_task_free_accuracy"] == 0.7 and summary["federated_images"] == 10
