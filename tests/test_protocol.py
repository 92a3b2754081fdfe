"""The typed protocol: round trips, the per-client seed rule, and hostile records rejected with a reason."""

from __future__ import annotations

import contextlib
import io
import math
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpetah.wire.protocol import (
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


def _npy_claiming(shape: tuple[int, ...]) -> bytes:
    """A ``.npy`` header that claims ``shape`` float32, followed by 8 bytes of data."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return stream.getvalue() + bytes(8)


def test_a_reply_is_checked_against_what_was_asked_before_numpy_reads_an_array(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    numpy = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: reads.append(len(self.data)) or numpy(self))  # Flower's
    layout = TrainReply.layout(specs(STATE))

    def content(**junk: ArrayRecord | ConfigRecord) -> RecordDict:
        records = to_recorddict(TrainReply(Status.OK, "", dict(STATE), 16).encode())
        for name, record in junk.items():
            records[name] = record
        return records

    assert TrainReply.decode(from_recorddict(content(), layout), specs(STATE)).num_examples == 16
    assert len(reads) == 2
    reads.clear()
    big = ArrayRecord({"x": Array(np.zeros(2**19, np.float32))})  # 2 MiB (the review sent two of 600 MiB)
    hostile = {
        "unexpected": content(junk=big),
        "keys": content(adapter=ArrayRecord({**{k: Array(v) for k, v in STATE.items()}, "x": Array(np.zeros(1))})),
        "size": content(status=ConfigRecord({"status": "ok", "reason": "x" * 2**21})),  # > 1 MiB besides arrays
    }
    for reason, records in hostile.items():
        with pytest.raises(ProtocolError) as error:
            from_recorddict(records, layout)
        assert error.value.reason == reason
    # the expected records, over a lowered total bound
    wide = {"w": np.zeros(2**19, np.float32)}
    wide_reply = to_recorddict(TrainReply(Status.OK, "", wide, 16).encode())
    with pytest.raises(ProtocolError, match="limit 1048576") as error:
        from_recorddict(wide_reply, TrainReply.layout(specs(wide), max_bytes=2**20))
    assert error.value.reason == "size" and reads == []
    assert from_recorddict(wide_reply, TrainReply.layout(specs(wide))).arrays["adapter"]["w"].shape == (2**19,)
    reads.clear()
    # a header that claims 1 GiB behind 8 bytes: refused by its header, NumPy allocates nothing
    lying = content()
    lying["adapter"]["head.bias"] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                                          data=_npy_claiming((2**28,)))
    tracemalloc.start()
    try:
        for expected, with_layout in (("shape", layout), ("size", None)):
            with pytest.raises(ProtocolError) as error:
                from_recorddict(lying, with_layout)
            assert error.value.reason == expected
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
    assert all(n < 2**10 for n in reads)  # only the honest head.weight was read
    # statistics keep their own reason
    stats_layout = TrainReply.layout(specs(STATE), {"count": ((2,), "<i8")})
    with pytest.raises(ProtocolError) as error:
        from_recorddict(content(stats=ArrayRecord({"count": Array(np.zeros(3, np.int64))})), stats_layout)
    assert error.value.reason == "stats"
    with pytest.raises(ProtocolError) as error:
        from_recorddict(content(stats=ArrayRecord({"count": Array(np.zeros(2, np.int64))})), layout)
    assert error.value.reason == "stats"  # not asked for


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
    "metrics-as-config": "unexpected", "count=nan": "count", "count=inf": "count", "count=neg": "count",
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
    with pytest.raises(ProtocolError) as error:
        TrainRequest.decode(records)
    assert error.value.reason == "malformed" and field in str(error.value)


def test_request_without_a_section_or_with_a_non_list_of_classes_is_refused() -> None:
    records = _request().encode()
    del records.configs["config"]["train.lr"], records.configs["config"]["train.seed"]
    with pytest.raises(ProtocolError, match="train section"):
        TrainRequest.decode(records)
    records = _request().encode()
    records.configs["config"]["task.classes"] = "json:{\"a\": 1}"
    with pytest.raises(ProtocolError, match="classes"):
        TrainRequest.decode(records)


def test_a_client_rebuilds_the_servers_train_section_fedprox_included() -> None:
    """The server sends ``asdict(config.train)``; through Flower's records the client builds the same, validated,
    TrainConfig (``prox_mu`` too), and refuses a negative ``prox_mu`` before training."""
    from fedpetah.config import TrainConfig
    from fedpetah.device.client import TrainSettings

    sent = TrainConfig(prox_mu=0.01, max_steps=None, seed=12)
    for mu, error in ((0.01, None), (-1.0, r"train\.prox_mu")):
        sections = {**_request().sections, "train": asdict(sent) | {"prox_mu": mu}}
        decoded = TrainRequest.decode(_through_flower(_request(sections=sections).encode()))
        if error is None:
            assert TrainSettings.of(decoded).train == sent
        else:
            with pytest.raises(ValueError, match=error):
                TrainSettings.of(decoded)


def test_random_fuzz_only_ever_decodes_or_raises_protocol_error() -> None:
    """Random values of random types in random places: decoding never raises anything but ProtocolError."""
    rng = np.random.default_rng(0)
    junk: list[object] = [None, True, -1, 0, 2**70, math.nan, -math.inf, 1e300, "", "ok", "x" * 1000, b"\x00",
                          [1.0], [True], {"a": 1}, np.zeros(0, np.float32), np.full((2, 3), np.nan, np.float32),
                          np.zeros((2, 3), np.int64), np.zeros((10**4,), np.float32)]
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(500):
        records = _ok_reply()
        for _ in range(int(rng.integers(1, 4))):
            kind = ("arrays", "metrics", "configs")[int(rng.integers(3))]
            section = getattr(records, kind)
            name = str(rng.choice([*section, "adapter", "status", "metrics", "other"]))
            record = section.setdefault(name, {})
            if not isinstance(record, dict):
                record = section[name] = {}
            key = str(rng.choice([*record, "num-examples", "status", "head.bias", "train-loss", "k"])) \
                if rng.random() < 0.9 else None
            if key is None:
                section[name] = junk[int(rng.integers(len(junk)))]  # a whole record of the wrong type
            else:
                record[key] = junk[int(rng.integers(len(junk)))]
        try:
            reply = TrainReply.decode(records, specs(STATE))
        except ProtocolError:
            outcomes["rejected"] += 1
            continue
        outcomes["ok"] += 1  # a mutation that missed what the decoder reads: what it returns is still sound
        assert reply.state is not None and specs(reply.state) == specs(STATE)
        assert 1 <= reply.num_examples <= 10_000_000 and all(math.isfinite(v) for v in reply.metrics.values())
    assert outcomes["rejected"] > 100 and outcomes["ok"] > 20  # a record in the wrong kind is unexpected
