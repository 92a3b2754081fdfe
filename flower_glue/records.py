"""Flower ``RecordDict`` <-> :class:`fedpetah.protocol.Records`, defensively: a malformed record is a ProtocolError."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpetah.protocol import ProtocolError, Records

MAX_ARRAY_BYTES = 256 * 2**20
"""The largest array a message may carry (a whole backbone travels as bytes, not as an array)."""


def to_recorddict(records: Records) -> RecordDict:
    content: dict[str, Any] = {}
    for name, arrays in records.arrays.items():
        content[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    for name, metrics in records.metrics.items():
        content[name] = MetricRecord(dict(metrics))
    for name, config in records.configs.items():
        content[name] = ConfigRecord(dict(config))
    return RecordDict(content)


def from_recorddict(content: RecordDict) -> Records:
    """Every record of ``content`` by kind; arrays are size-checked before NumPy reads them (never pickled)."""
    records = Records()
    try:
        for name, array_record in content.array_records.items():
            arrays: dict[str, np.ndarray] = {}
            for key, array in array_record.items():
                if len(array.data) > MAX_ARRAY_BYTES:
                    raise ProtocolError("size", f"{name}.{key} holds {len(array.data)} B (limit {MAX_ARRAY_BYTES})")
                arrays[key] = array.numpy()  # np.load(..., allow_pickle=False)
            records.arrays[name] = arrays
        for name, metric_record in content.metric_records.items():
            records.metrics[name] = dict(metric_record)
        for name, config_record in content.config_records.items():
            records.configs[name] = dict(config_record)
    except ProtocolError:
        raise
    except Exception as error:  # whatever a hostile peer's bytes make Flower or NumPy raise
        raise ProtocolError("malformed", f"{type(error).__name__}: {error}") from None
    return records


def records_of(message: Message) -> Records:
    """The records of a received message (a ProtocolError for an error reply or malformed content)."""
    if message.has_error():
        raise ProtocolError("malformed", f"error reply: {message.error.reason}")
    return from_recorddict(message.content)


def reply(records: Records, to: Message) -> Message:
    return Message(to_recorddict(records), reply_to=to)
