"""The ServerApp's push/pull exchange: a reply that never comes (lost by the SuperLink, or its device died) ends the
exchange after the bounded straggler grace once the others are in, not after the whole reply deadline."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from grids import InProcessGrid

import server.app as server_app
from server.app import Exchange


class TimedGrid(InProcessGrid):
    """Node n answers ``delays[n]`` seconds after its message was pushed (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays, self.due = delays, dict[str, tuple[float, Message]]()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.delays)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            ids.append(self.stamp(message))
            delay = self.delays[message.metadata.dst_node_id]
            if delay is not None:
                self.due[ids[-1]] = time.monotonic() + delay, message
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ready = [m for m, (at, _) in self.due.items() if m in set(message_ids) and at <= time.monotonic()]
        return [Message(RecordDict(), reply_to=self.due.pop(m)[1]) for m in ready]


def _exchange(delays: dict[int, float | None], timeout_s: float) -> tuple[set[int], float]:
    grid = TimedGrid(delays)
    started = time.monotonic()
    replies, _ = Exchange(grid, poll_s=0.01)([Message(RecordDict(), node, "train") for node in delays], timeout_s)
    return set(replies), time.monotonic() - started


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 0.5 s minimum grace, and what Flower's runtime sets in a ServerApp process before it creates messages."""
    monkeypatch.setattr(server_app, "STRAGGLER_MIN_S", 0.5)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_a_lost_reply_ends_the_exchange_after_the_grace_not_the_deadline() -> None:
    # Prepare: 20 nodes answer within 0.1 s, one never does (its reply was lost)
    delays: dict[int, float | None] = {node: 0.1 for node in range(20)} | {99: None}

    # Execute
    answered, seconds = _exchange(delays, timeout_s=30.0)

    # Assert: every other reply, and the grace (max(0.5 s, 5 x 0.1 s)) instead of 30 s
    assert answered == set(range(20))
    assert 0.5 <= seconds < 2.0, seconds


def test_a_straggler_within_the_grace_is_waited_for() -> None:
    # a device five times slower than the others still counts (0.1 s + max(0.5, 5 x 0.1) s > 0.55 s)
    answered, _ = _exchange({0: 0.1, 1: 0.1, 2: 0.1, 3: 0.55}, timeout_s=30.0)
    assert answered == {0, 1, 2, 3}


def test_many_missing_replies_wait_for_the_deadline() -> None:
    # more than a tenth missing is not a straggler or two: the round keeps its deadline
    delays: dict[int, float | None] = {0: 0.05, 1: 0.05, 2: 1.5, 3: None}
    answered, seconds = _exchange(delays, timeout_s=2.0)
    assert answered == {0, 1, 2} and 1.5 <= seconds < 2.0 + 0.5, seconds
    answered, seconds = _exchange({0: None}, timeout_s=1.0)  # nothing else in: no grace either
    assert answered == set() and seconds >= 1.0


def test_a_greeting_lasts_while_replies_keep_coming_and_ends_when_they_stop() -> None:
    # Prepare: 30 nodes answering one every 0.1 s (3 s in all, longer than the idle bound), one that never does
    delays: dict[int, float | None] = {node: 0.1 * (node + 1) for node in range(30)} | {99: None}
    grid = TimedGrid(delays)
    started = time.monotonic()

    # Execute
    hellos = [Message(RecordDict(), node, "query.hello") for node in delays]
    replies, _ = Exchange(grid, poll_s=0.01)(hellos, 60.0, idle_s=1.0)

    # Assert: every reply that came, then 1 s without one ends it (not the straggler grace of 5 x 3 s, not 60 s)
    seconds = time.monotonic() - started
    assert set(replies) == set(range(30))
    assert 3.9 <= seconds < 5.5, seconds
