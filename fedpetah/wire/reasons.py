"""Why a reply or an update was rejected: one vocabulary for the protocol decode and the aggregation round.

Standard library only, so the flwr-free protocol module, the device worker and the torch aggregation layer
can all use it. The values are the keys of ``rejections`` in ``metrics.jsonl`` (scripts read them): never
respell one.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """A machine-readable rejection reason (a :class:`~fedpetah.wire.protocol.ProtocolError`'s, an
    :class:`~fedpetah.aggregation.InvalidUpdate`'s, a round's)."""

    # the message does not decode (fedpetah.wire.protocol, the transports)
    MALFORMED = "malformed"  # a missing or ill-typed record or field
    STATUS = "status"  # an unknown status
    COUNT = "count"  # num-examples is not an integer in range
    METRICS = "metrics"  # too many metrics, or one that is not a finite number
    KEYS = "keys"  # array keys other than those sent
    SHAPE = "shape"  # an array (or tensor) of another shape
    DTYPE = "dtype"  # an array (or tensor) of another dtype
    SIZE = "size"  # more bytes than allowed
    STATS = "stats"  # router statistics that were not asked for, are missing or are invalid
    UNEXPECTED = "unexpected"  # a record that was not asked for
    TIMEOUT = "timeout"  # no reply before the round's deadline
    UNAVAILABLE = "unavailable"  # the transport answered for the device: it went away, or the message expired
    CLIENT_ERROR = "client_error"  # the device's app raised, crashed or did not load (an error reply)
    EVALUATION = "evaluation"  # evaluation counts that are inconsistent or exceed the device's reported holdout
    HOLDINGS = "holdings"  # image counts in a hello reply that are not a bounded table of the catalogue's tasks
    PROFILE = "profile"  # a hello reply's device profile that is incomplete, not finite or out of bounds
    # the update does not aggregate (fedpetah.aggregation)
    TYPE = "type"  # no update, or not a map of names to tensors
    MISSING_KEYS = "missing_keys"
    UNEXPECTED_KEYS = "unexpected_keys"
    NON_FINITE = "non_finite"  # NaN or infinite values
    NORM = "norm"  # a delta longer than the absolute bound
    NORM_OUTLIER = "norm_outlier"  # a delta far longer than the round's median
    WEIGHT = "weight"  # an example count that is not a positive whole number

