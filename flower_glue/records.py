"""Flower ``RecordDict`` <-> :class:`fedpetah.wire.protocol.Records`, defensively: a malformed record is a
ProtocolError."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedpetah.wire.protocol import MAX_REASON_CHARS, Layout, ProtocolError, Records, check_npy
from fedpetah.wire.reasons import Reason

MAX_ARRAY_BYTES = 256 * 2**20
"""The largest array a message may carry (a whole backbone travels as bytes, not as an array)."""
_UNAVAILABLE = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                          ErrorCode.REPLY_MESSAGE_UNAVAILABLE})
"""Flower's error codes for a reply the transport wrote on the device's behalf (any other is the device's app's)."""


def to_recorddict(records: Records) -> RecordDict:
    content: dict[str, Any] = {}
    for name, arrays in records.arrays.items():
        content[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    for name, metrics in records.metrics.items():
        content[name] = MetricRecord(dict(metrics))
    for name, config in records.configs.items():
        content[name] = ConfigRecord(dict(config))
    return RecordDict(content)


def from_recorddict(content: RecordDict, layout: Layout | None = None) -> Records:
    """Every record of ``content`` by kind; arrays are size-checked against their ``.npy`` header before NumPy reads
    them (never pickled). With ``layout`` (what the receiver expects), any other record, key, shape, dtype or
    a total beyond ``layout.total_bytes`` is a ProtocolError before any array is read."""
    records = Records()
    try:
        if layout is not None:
            _check(content, layout)
        for name, array_record in content.array_records.items():
            records.arrays[name] = _arrays(name, array_record, layout)
        for name, metric_record in content.metric_records.items():
            records.metrics[name] = dict(metric_record)
        for name, config_record in content.config_records.items():
            records.configs[name] = dict(config_record)
    except ProtocolError:
        raise
    except Exception as error:  # whatever a hostile peer's bytes make Flower or NumPy raise
        raise ProtocolError(Reason.MALFORMED, f"{type(error).__name__}: {error}") from None
    return records


def _arrays(name: str, array_record: ArrayRecord, layout: Layout | None) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    try:
        for key, array in array_record.items():
            if len(array.data) > MAX_ARRAY_BYTES:
                raise ProtocolError(Reason.SIZE, f"{name}.{key} holds {len(array.data)} B (limit {MAX_ARRAY_BYTES})")
            check_npy(f"{name}.{key}", array.data, None if layout is None else layout.arrays[name][key])
            arrays[key] = array.numpy()  # np.load(..., allow_pickle=False)
    except ProtocolError as error:
        raise error if layout is None else layout.relabel(name, error) from None
    return arrays


def _check(content: RecordDict, layout: Layout) -> None:
    """ProtocolError unless ``content`` holds only ``layout``'s records and array keys, within its total bytes."""
    layout.check_names(content.array_records, content.config_records, content.metric_records)
    total = 0
    for name, array_record in content.array_records.items():
        unexpected = sorted(set(array_record) - set(layout.arrays[name]))
        if unexpected:
            raise layout.relabel(name, ProtocolError(Reason.KEYS, f"{name}: unexpected {unexpected[:3]!r:.120}"))
        total += sum(len(array.data) for array in array_record.values())
    for config_record in content.config_records.values():
        total += sum(len(v) for v in config_record.values() if isinstance(v, str | bytes))
    if total > layout.total_bytes:
        raise ProtocolError(Reason.SIZE, f"the message holds {total} B (limit {layout.total_bytes})")


def records_of(message: Message, layout: Layout | None = None) -> Records:
    """The records of a received message (a ProtocolError for an error reply or malformed content; with
    ``layout``, for anything it does not expect, see :func:`from_recorddict`)."""
    if message.has_error():
        reason = Reason.UNAVAILABLE if message.error.code in _UNAVAILABLE else Reason.CLIENT_ERROR
        raise ProtocolError(reason, f"error reply {message.error.code}: {message.error.reason}"[:MAX_REASON_CHARS])
    return from_recorddict(message.content, layout)


def reply(records: Records, to: Message) -> Message:
    return Message(to_recorddict(records), reply_to=to)
