"""The typed protocol: round trips, the per-client seed rule, and hostile records rejected with a reason."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import pytest

from fedpetah.protocol import (
    NO_PARTITION,
    HelloReply,
    HelloRequest,
    ProtocolError,
    Records,
    Status,
    TaskInfo,
    TrainReply,
    TrainRequest,
    client_seed,
    specs,
)
from flower_glue.records import from_recorddict, to_recorddict

DIGEST = "ab" * 32
STATE = {"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "head.bias": np.zeros(2, np.float32)}


def _request(**changes: object) -> TrainRequest:
    fields: dict[str, object] = dict(
        digest=DIGEST, round=3, seed=7, clients=50, task=TaskInfo(1, "mnist_2_3", ("2", "3")),
        sections={"adapter": {"name": "lora", "rank": 4, "targets": ["attention"], "target_regex": None},
                  "train": {"lr": 0.005, "seed": 12}, "tasks": {"name": "split_mnist"},
                  "partition": {"name": "dirichlet", "alpha": 0.5}},
        state=STATE)
    fields.update(changes)
    return TrainRequest(**fields)  # type: ignore[arg-type]


def _through_flower(records: Records) -> Records:
    return from_recorddict(to_recorddict(records))


def test_requests_and_replies_survive_flower_records() -> None:
    request = _request(artifact=(b"weights", b"{}"))
    decoded = TrainRequest.decode(_through_flower(request.encode()))
    assert decoded.sections == request.sections and decoded.task == request.task
    assert (decoded.digest, decoded.round, decoded.seed, decoded.clients) == (DIGEST, 3, 7, 50)
    assert decoded.artifact == (b"weights", b"{}")
    for key, value in STATE.items():
        np.testing.assert_array_equal(decoded.state[key], value)

    reply = TrainReply(Status.OK, "", {k: v + 1 for k, v in STATE.items()}, 16, {"train-loss": 0.5})
    back = TrainReply.decode(_through_flower(reply.encode()), specs(STATE))
    assert (back.status, back.num_examples, back.metrics) == (Status.OK, 16, {"train-loss": 0.5})
    np.testing.assert_array_equal(back.state["head.bias"], np.ones(2, np.float32))  # type: ignore[index]

    assert HelloRequest.decode(_through_flower(HelloRequest(DIGEST).encode())).digest == DIGEST
    hello = HelloReply.decode(_through_flower(HelloReply(NO_PARTITION, True).encode()))
    assert (hello.partition, hello.has_backbone) == (NO_PARTITION, True)


def test_client_seeds_differ_per_client_and_round_and_fit_flower_integers() -> None:
    node_ids = [0, 1, 2, 2**64 - 1, 2**63 + 5]  # Flower node ids are uint64
    seeds = {client_seed(0, r, c) for r in (1, 2) for c in node_ids}
    assert len(seeds) == 2 * len(node_ids)
    assert all(0 <= s < 2**62 for s in seeds)
    assert client_seed(0, 1, 5) == client_seed(0, 1, 5) != client_seed(1, 1, 5)


def _ok_reply() -> Records:
    return TrainReply(Status.OK, "", dict(STATE), 10, {"train-loss": 0.1}).encode()


EXPECTED_REASON = {
    "no-status": "malformed", "status-unknown": "status", "status-number": "status", "no-metrics": "malformed",
    "metrics-as-config": "malformed", "count=nan": "count", "count=inf": "count", "count=neg": "count",
    "count=zero": "count", "count=bool": "count", "count=float": "count", "count=huge": "count",
    "count=list": "count", "loss-nan": "metrics", "loss-list": "metrics", "too-many-metrics": "metrics",
    "no-adapter": "malformed", "missing-key": "keys", "extra-key": "keys", "shape": "shape", "dtype": "dtype",
    "object-dtype": "dtype",
}


@pytest.mark.parametrize("change", sorted(EXPECTED_REASON))
def test_every_malformed_reply_is_a_protocol_error_with_its_reason(
    change: str, malform: Callable[[Records, str], Records]
) -> None:
    records = malform(_ok_reply(), change)
    with contextlib.suppress(TypeError):  # Flower's sender refuses some; a hostile peer writes raw protobuf
        records = _through_flower(records)
    with pytest.raises(ProtocolError) as caught:
        TrainReply.decode(records, specs(STATE))
    assert caught.value.reason == EXPECTED_REASON[change], caught.value


def test_a_non_ok_status_needs_no_payload_and_keeps_a_bounded_reason() -> None:
    records = Records(configs={"status": {"status": "no-data", "reason": "x" * 10_000}})
    reply = TrainReply.decode(_through_flower(records), specs(STATE))
    assert reply.status is Status.NO_DATA and reply.state is None and len(reply.reason) == 500


@pytest.mark.parametrize("field,value", [("digest", "../../etc"), ("round", 0), ("round", "3"), ("clients", -1)])
def test_hostile_requests_are_refused(field: str, value: object) -> None:
    records = _request().encode()
    records.configs["config"][field] = value
    with pytest.raises(ProtocolError):
        TrainRequest.decode(records)


def test_request_without_a_section_or_with_a_non_list_of_classes_is_refused() -> None:
    records = _request().encode()
    del records.configs["config"]["train.lr"], records.configs["config"]["train.seed"]
    with pytest.raises(ProtocolError, match="train section"):
        TrainRequest.decode(records)
    records = _request().encode()
    records.configs["config"]["task.classes"] = "json:{\"a\": 1}"
    with pytest.raises(ProtocolError, match="classes"):
        TrainRequest.decode(records)
