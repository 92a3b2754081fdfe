"""Federated evaluation on the server: devices' held-out counts checked, summed with one device's share capped.

A device answers ``query.evaluate`` with counts only (:class:`~fedpetah.wire.evaluation.EvaluateReply`): per learned
task and class, its held-out images and how many of them the task's adapter (task-aware) and the whole task-free
model got right. The decode bounds and cross-checks a reply; :func:`check_reply` adds what only the server knows
(the holdout the device reported in its hello), and :class:`FederatedTally` turns the accepted replies into the
figures of one row of the federated accuracy matrix.

Counts are untrusted, so no device carries more than ``max_share`` of a figure's weight (:func:`share_weights`):
a device that lies about its correct counts moves a figure by at most its share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np
from numpy.typing import ArrayLike

from fedpetah.wire.evaluation import EvaluateReply
from fedpetah.wire.protocol import ProtocolError, Status, TaskInfo
from fedpetah.wire.reasons import Reason

Holdings = Mapping[int, ArrayLike]
"""What a device reported in its hello: per catalogue task, images per class [train, held out] ((C, 2))."""


def default_max_share(devices: int) -> float:
    """The share cap when the config sets none: ``min(1, 2 / devices)``, twice an equal share.

    Why twice: an honest fleet is rarely even (one Pi holds most of the photos), and a cap at the equal share
    would turn every figure into an unweighted mean over devices; twice leaves a fleet of similar devices
    untouched (in simulation each client holds about 1/clients of the test images, so the figure is the plain
    pooled accuracy, comparable to the server's) and still bounds a liar: 3 devices, 2/3 each at most (no cap
    below 1/3 is possible with 3 anyway); 50 simulated clients, 4% each. One or two devices: no cap (with two,
    capping one at half would only average them).
    """
    if devices < 1:
        raise ValueError(f"a figure needs at least one device, got {devices}")
    return min(1.0, 2.0 / devices)


def share_cap(images: Sequence[int], max_share: float) -> Fraction | None:
    """The largest cap ``c`` such that no device's weight ``min(n_i, c)`` exceeds ``max_share`` of the total
    ``sum_j min(n_j, c)``; None when no cap is needed. When no cap can achieve ``max_share`` (fewer than
    ``1 / max_share`` devices hold images), the smallest device's count: every device then weighs the same, the
    smallest share there is.

    Exact (rational): a device's share ``c / sum_j min(n_j, c)`` grows with ``c``, so the caps that satisfy the
    bound are an interval ``[0, c*]``; between two consecutive sorted counts ``n_(m) <= c <= n_(m+1)`` the total
    is ``P_m + (k - m) c`` (``P_m``: the ``m`` smallest counts), which gives ``c*`` in closed form.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    counts = sorted(int(n) for n in images if n > 0)
    if not counts or counts[-1] <= max_share * sum(counts):
        return None
    share, k = Fraction(max_share), len(counts)
    below = sum(counts)
    for m in range(k - 1, -1, -1):  # from the top segment down: the first feasible one holds c*
        below -= counts[m]  # P_m: the m smallest counts
        low = Fraction(counts[m - 1]) if m else Fraction(0)
        slack = 1 - share * (k - m)
        cap = Fraction(counts[m]) if slack <= 0 else min(Fraction(counts[m]), share * below / slack)
        if cap >= low and cap > 0:
            return cap
    return Fraction(counts[0])


def share_weights(images: Sequence[int], max_share: float | None = None) -> list[Fraction]:
    """Each device's weight in a figure: ``min(images, cap)`` with :func:`share_cap`'s cap (``max_share`` None:
    :func:`default_max_share` of the devices holding images). Exact, so an uncapped figure is exactly the
    pooled accuracy."""
    holding = sum(1 for n in images if n > 0)
    if not holding:
        return [Fraction(0)] * len(images)
    cap = share_cap(images, default_max_share(holding) if max_share is None else max_share)
    return [Fraction(int(n)) if cap is None else min(Fraction(int(n)), cap) for n in images]


def capped_accuracy(images: Sequence[int], correct: Sequence[int], weights: Sequence[Fraction]) -> float:
    """``sum_i w_i correct_i / n_i / sum_i w_i``: each device's correct count scaled by its weight's factor
    ``w_i / n_i``; NaN without images. With every weight uncapped this is ``sum(correct) / sum(images)``."""
    total = sum(weights, Fraction(0))
    if total == 0:
        return math.nan
    pooled = sum((w * int(c) / int(n) for n, c, w in zip(images, correct, weights, strict=True) if n > 0),
                 Fraction(0))
    return float(pooled / total)


def check_reply(reply: EvaluateReply, holdings: Holdings | None) -> ProtocolError | None:
    """Why the server refuses a decoded evaluation reply (reason ``evaluation``), or None when it accepts it.

    Every per-class image count must be within the held-out count the device reported in its hello for that
    task and class (column 1 of ``holdings[task]``, (C, 2)); a task it reported no holdings for has none. The
    decode's invariants (integer tables of the right shape, ``0 <= correct <= images``) are checked again, so a
    reply built without the decode is held to the same rules. Never raises.
    """
    for task, table in sorted(reply.counts.items()):
        counts = np.asarray(table)
        if counts.ndim != 2 or counts.shape[1] != 3 or counts.dtype.kind not in "iu":
            return ProtocolError(Reason.EVALUATION, f"task {task}: counts are not an integer (classes, 3) table")
        if int(counts.min(initial=0)) < 0 or bool((counts[:, 1:] > counts[:, :1]).any()):
            return ProtocolError(Reason.EVALUATION, f"task {task}: negative counts or more correct than images")
        reported = None if holdings is None else holdings.get(task)
        if reported is None:
            held = np.zeros(len(counts), dtype=np.int64)  # no holdings reported: nothing held out
        elif np.shape(reported) == (len(counts), 2):
            held = np.asarray(reported, dtype=np.int64)[:, 1]
        else:
            return ProtocolError(Reason.EVALUATION, f"task {task}: {len(counts)} classes evaluated, the hello "
                                                    f"reported holdings of shape {np.shape(reported)}")
        over = np.flatnonzero(counts[:, 0] > held)
        if over.size:
            c = int(over[0])
            return ProtocolError(Reason.EVALUATION, f"task {task} class {c}: {int(counts[c, 0])} images evaluated, "
                                                    f"{int(held[c])} held out in the hello")
    return None


class FederatedTally:
    """The devices' evaluation of the learned ``tasks`` after one task-end round, summed into figures.

    Use: ``tally.add(client, reply, holdings)`` for each decoded reply (it raises the :class:`ProtocolError` of
    :func:`check_reply`: count it as a rejection), then ``tally.figures()`` into the round's ``RoundRecord.extra``
    (:func:`fedpetah.serving.metrics.summarize` builds the federated matrix from them).

    ``max_share``: the most of a figure's weight one device may carry (None: :func:`default_max_share` of the
    devices behind that figure).
    """

    def __init__(self, tasks: Sequence[TaskInfo], max_share: float | None = None) -> None:
        if max_share is not None and not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1] or None, got {max_share}")
        self.tasks = tuple(tasks)
        self.max_share = max_share
        self.counts: dict[int, dict[int, np.ndarray]] = {}  # client -> task -> [images, aware, free] sums

    def add(self, client: int, reply: EvaluateReply, holdings: Holdings | None) -> None:
        """Count a decoded reply of ``client`` (a later reply of the same client replaces its earlier one; a
        reply that is not ok counts nothing). Raises :class:`ProtocolError` (reason ``evaluation``) for a reply
        :func:`check_reply` refuses, or one about tasks that were not asked for; nothing is counted then."""
        if reply.status is not Status.OK:
            return
        classes = {t.index: t.num_classes for t in self.tasks}
        unasked = sorted(set(reply.counts) - set(classes))
        if unasked:
            raise ProtocolError(Reason.EVALUATION, f"counts of tasks that were not asked for: {unasked[:3]}")
        for task, table in reply.counts.items():
            if np.shape(table) != (classes[task], 3):
                raise ProtocolError(Reason.EVALUATION, f"task {task}: counts of shape {np.shape(table)}, "
                                                       f"expected ({classes[task]}, 3)")
        error = check_reply(reply, holdings)
        if error is not None:
            raise error
        self.counts[client] = {t: np.asarray(v, dtype=np.int64).sum(0) for t, v in reply.counts.items()}

    def figures(self) -> dict[str, float]:
        """The row's figures, as ``RoundRecord.extra`` scalars (a key is absent where no device held images):

        - ``federated_accuracy_<t>``: task-aware accuracy on task ``t`` (its own adapter picks among its classes);
        - ``federated_task_free_<t>``: task-free accuracy on task ``t``'s images (the whole model, no task id);
        - ``federated_devices_<t>``, ``federated_images_<t>``: the devices and held-out images behind both;
        - ``federated_task_free_accuracy``, ``federated_devices``, ``federated_images``: task-free accuracy over
          every learned task's images, and the devices and images behind it.

        Each figure weighs a device by :func:`share_weights` of its images in that figure.
        """
        figures: dict[str, float] = {}
        clients = sorted(self.counts)
        for task in self.tasks:
            rows = [self.counts[c][task.index] for c in clients if task.index in self.counts[c]]
            images = [int(r[0]) for r in rows]
            if not sum(images):
                continue
            weights = share_weights(images, self.max_share)
            figures[f"federated_accuracy_{task.index}"] = capped_accuracy(images, [int(r[1]) for r in rows], weights)
            figures[f"federated_task_free_{task.index}"] = capped_accuracy(images, [int(r[2]) for r in rows], weights)
            figures[f"federated_devices_{task.index}"] = float(sum(1 for n in images if n > 0))
            figures[f"federated_images_{task.index}"] = float(sum(images))
        totals = [np.sum([*self.counts[c].values(), np.zeros(3, dtype=np.int64)], axis=0) for c in clients]
        images = [int(r[0]) for r in totals]
        if sum(images):
            weights = share_weights(images, self.max_share)
            figures["federated_task_free_accuracy"] = capped_accuracy(images, [int(r[2]) for r in totals], weights)
            figures["federated_devices"] = float(sum(1 for n in images if n > 0))
            figures["federated_images"] = float(sum(images))
        return figures
