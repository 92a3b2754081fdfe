"""Records on a local stream socket: length-prefixed frames of a JSON header, a safetensors blob and raw bytes.

A frame is ``MAGIC``, the payload length (8 bytes, big-endian), then the payload: the header length (4 bytes), the
UTF-8 JSON header, and the segments the header lists. Segment 0 is a safetensors blob holding every array; each
``bytes`` config value (the backbone artifact) is a segment of its own, named in the header as ``{"$bytes": i}``.
Decoding checks every length against the limits before reading, every value's type, and that the segments fill
the payload exactly; whatever does not fit raises :class:`FrameError`. Nothing is unpickled.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from fedpetah.wire.protocol import MAX_ARTIFACT_BYTES, ProtocolError, Records
from fedpetah.wire.reasons import Reason

MAGIC = b"FPW1"
PREFIX = struct.Struct(">4sQ")
HEADER_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = MAX_ARTIFACT_BYTES + 64 * 2**20
"""The largest frame either side accepts: a whole backbone artifact plus the adapter state and the header."""
MAX_HEADER_BYTES = 4 * 2**20
MAX_SEGMENTS = 64
KINDS = ("arrays", "metrics", "configs")


class FrameError(ProtocolError):
    """A frame that is truncated, oversized or malformed (``reason`` size or malformed)."""


def _scalar(value: Any, where: str, allow_bytes: bool, segments: list[bytes] | None) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict) and allow_bytes and segments is not None:
        index = value.get("$bytes")
        if set(value) != {"$bytes"} or isinstance(index, bool) or not isinstance(index, int) \
                or not 1 <= index < len(segments):
            raise FrameError(Reason.MALFORMED,
                             f"{where}: a bytes reference must be {{'$bytes': 1..{len(segments) - 1}}}")
        return segments[index]
    raise FrameError(Reason.MALFORMED, f"{where}: {type(value).__name__} is not a record value")


def _value(value: Any, where: str, allow_bytes: bool, segments: list[bytes] | None = None) -> Any:
    """A metric or config value from JSON: a scalar, a list of scalars of one type, or (configs) a bytes segment."""
    if isinstance(value, list):
        items = [_scalar(v, where, False, None) for v in value]
        if len({type(v) for v in items}) > 1:
            raise FrameError(Reason.MALFORMED, f"{where}: a list mixes value types")
        return items
    return _scalar(value, where, allow_bytes, segments)


def encode(kind: str, records: Records) -> bytes:
    """The frame carrying ``records`` as a message of type ``kind``."""
    tensors: dict[str, np.ndarray] = {}
    arrays: dict[str, dict[str, str]] = {}
    for name, record in records.arrays.items():
        arrays[name] = {}
        for key, array in record.items():
            arrays[name][key] = tensor = str(len(tensors))
            tensors[tensor] = np.ascontiguousarray(array)
    segments = [save_arrays(tensors) if tensors else b""]
    configs: dict[str, dict[str, Any]] = {}
    for name, record in records.configs.items():
        configs[name] = {}
        for key, value in record.items():
            if isinstance(value, bytes):
                configs[name][key] = {"$bytes": len(segments)}
                segments.append(value)
            else:
                configs[name][key] = value
    header = json.dumps({"type": kind, "arrays": arrays, "metrics": records.metrics, "configs": configs,
                         "segments": [len(s) for s in segments]}, allow_nan=True).encode()
    payload_length = HEADER_LENGTH.size + len(header) + sum(len(s) for s in segments)
    if payload_length > MAX_FRAME_BYTES:
        raise FrameError(Reason.SIZE, f"a frame of {payload_length} B exceeds the limit of {MAX_FRAME_BYTES} B")
    return b"".join([PREFIX.pack(MAGIC, payload_length), HEADER_LENGTH.pack(len(header)), header, *segments])


def payload_length(prefix: bytes, limit: int = MAX_FRAME_BYTES) -> int:
    """The payload length a frame's first :data:`PREFIX` bytes announce, checked against ``limit``."""
    if len(prefix) != PREFIX.size:
        raise FrameError(Reason.MALFORMED, f"truncated frame prefix ({len(prefix)} of {PREFIX.size} B)")
    magic, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(Reason.MALFORMED, f"not a fedpetah frame (magic {magic!r})")
    if length > limit:
        raise FrameError(Reason.SIZE, f"a frame of {length} B exceeds the limit of {limit} B")
    return int(length)


def decode_payload(payload: bytes | bytearray) -> tuple[str, Records]:
    """The message type and records of a frame's payload (everything after the prefix)."""
    if len(payload) < HEADER_LENGTH.size:
        raise FrameError(Reason.MALFORMED, "truncated frame: no header length")
    (header_length,) = HEADER_LENGTH.unpack_from(payload)
    if header_length > MAX_HEADER_BYTES or HEADER_LENGTH.size + header_length > len(payload):
        raise FrameError(Reason.SIZE if header_length > MAX_HEADER_BYTES else Reason.MALFORMED,
                         f"header of {header_length} B does not fit (limit {MAX_HEADER_BYTES} B, "
                         f"payload {len(payload)} B)")
    start = HEADER_LENGTH.size + header_length
    try:
        header = json.loads(payload[HEADER_LENGTH.size:start])
    except (UnicodeDecodeError, ValueError) as error:
        raise FrameError(Reason.MALFORMED, f"header is not JSON: {error}") from None
    except RecursionError:  # deeply nested brackets: json's parser recurses once per level
        raise FrameError(Reason.MALFORMED, "header nests too deeply") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FrameError(Reason.MALFORMED, "header must be an object with a string type")
    lengths = header.get("segments")
    if not isinstance(lengths, list) or not 1 <= len(lengths) <= MAX_SEGMENTS or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise FrameError(Reason.MALFORMED, f"segments must list 1..{MAX_SEGMENTS} lengths")
    if start + sum(lengths) != len(payload):
        raise FrameError(Reason.MALFORMED,
                         f"segments of {sum(lengths)} B do not fill the {len(payload) - start} B after the header")
    segments, offset = [], start
    for length in lengths:
        segments.append(bytes(payload[offset:offset + length]))
        offset += length
    records = Records()
    tensors = _tensors(segments[0])
    for kind in KINDS:
        section = header.get(kind, {})
        if not isinstance(section, dict) or not all(isinstance(r, dict) for r in section.values()):
            raise FrameError(Reason.MALFORMED, f"{kind} must map record names to records")
    used: set[str] = set()
    for name, record in header.get("arrays", {}).items():
        arrays: dict[str, np.ndarray] = {}
        for key, tensor in record.items():
            if not isinstance(tensor, str) or tensor not in tensors or tensor in used:
                raise FrameError(Reason.MALFORMED, f"arrays {name}.{key}: no such tensor {tensor!r:.40}")
            used.add(tensor)
            arrays[key] = tensors[tensor]
        records.arrays[name] = arrays
    if used != set(tensors):
        raise FrameError(Reason.MALFORMED, f"{len(set(tensors) - used)} tensor(s) belong to no record")
    for name, record in header.get("metrics", {}).items():
        records.metrics[name] = {k: _value(v, f"metrics {name}.{k}", False) for k, v in record.items()}
    for name, record in header.get("configs", {}).items():
        records.configs[name] = {k: _value(v, f"configs {name}.{k}", True, segments) for k, v in record.items()}
    return header["type"], records


def _tensors(blob: bytes) -> dict[str, np.ndarray]:
    if not blob:
        return {}
    try:
        tensors = load_arrays(blob)
    except Exception as error:  # safetensors raises its own error types for a corrupt blob
        raise FrameError(Reason.MALFORMED, f"array blob: {type(error).__name__}: {error}") from None
    return {k: v for k, v in tensors.items()}


def decode(frame: bytes, limit: int = MAX_FRAME_BYTES) -> tuple[str, Records]:
    """The message type and records of a whole frame (prefix included)."""
    length = payload_length(frame[:PREFIX.size], limit)
    if len(frame) != PREFIX.size + length:
        raise FrameError(Reason.MALFORMED, f"frame of {len(frame)} B, its prefix announces {PREFIX.size + length} B")
    return decode_payload(frame[PREFIX.size:])


def _read(sock: socket.socket, count: int) -> bytearray:
    buffer = bytearray(count)
    view, got = memoryview(buffer), 0
    while got < count:
        n = sock.recv_into(view[got:], min(count - got, 2**20))
        if n == 0:
            raise FrameError(Reason.MALFORMED, f"connection closed after {got} of {count} B")
        got += n
    return buffer


def send(sock: socket.socket, kind: str, records: Records) -> None:
    sock.sendall(encode(kind, records))


def receive(sock: socket.socket, limit: int = MAX_FRAME_BYTES) -> tuple[str, Records]:
    """Read one frame from ``sock`` (its timeout applies to every read); oversized frames are refused unread."""
    length = payload_length(bytes(_read(sock, PREFIX.size)), limit)
    return decode_payload(_read(sock, length))
