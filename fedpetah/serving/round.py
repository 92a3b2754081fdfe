"""One round's typed values as the server's round steps pass them: the decoded replies, the rejections, what
the round moved and what its steps made of the replies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpetah.aggregation import RoundResult, StateDict, Update
from fedpetah.wire.protocol import Status, TrainReply
from fedpetah.wire.reasons import Reason


@dataclass
class ClientReply:
    """What came back from one sampled client, decoded and checked at the boundary
    (:meth:`~fedpetah.wire.protocol.TrainReply.decode`): an ok reply's ``state`` has the keys, shapes and dtypes of the
    state the client was sent and ``num_examples`` is in range, which the round trusts.

    ``status`` is None for a reply that was rejected before it decoded: ``rejected`` then says why (a protocol
    reason or ``timeout``) and ``detail`` says more (for a decoded reply, ``detail`` is the client's reason).
    """

    client: int
    state: StateDict | None
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    status: Status | None = Status.OK
    rejected: Reason | None = None
    detail: str = ""
    stats: StateDict | None = None  # the task-free router's statistics, when asked for

    def __post_init__(self) -> None:
        if (self.status is None) != (self.rejected is not None):
            raise ValueError("a reply has a status or a rejection reason, not both")
        if self.status is Status.OK and self.state is None:
            raise ValueError(f"client {self.client}'s ok reply holds no update")

    @classmethod
    def of(cls, client: int, reply: TrainReply) -> ClientReply:
        state = None if reply.state is None else {k: torch.from_numpy(v.copy()) for k, v in reply.state.items()}
        stats = None if reply.stats is None else {k: torch.from_numpy(v.copy()) for k, v in reply.stats.items()}
        return cls(client, state, reply.num_examples, dict(reply.metrics), reply.status, None, reply.reason, stats)

    @classmethod
    def refused(cls, client: int, reason: Reason, detail: str = "") -> ClientReply:
        """A reply that did not decode, or did not come (:attr:`Reason.TIMEOUT`)."""
        return cls(client, None, 0, status=None, rejected=reason, detail=detail)

    @property
    def update(self) -> Update:
        """An ok reply's update, as the round's aggregation takes it."""
        if self.state is None:
            raise ValueError(f"client {self.client}'s reply holds no update")
        return Update(self.state, self.num_examples)


@dataclass(frozen=True)
class Rejected:
    """One client rejected in a round, and why (counted by reason in the round's ``rejections``)."""

    client: int
    reason: Reason
    detail: str


@dataclass(frozen=True)
class RoundTraffic:
    """What a round moved: bytes down (adapters) and up (replies), backbone bytes, when it started, and the
    transport's own extra metrics for the round's row."""

    bytes_down: int
    bytes_up: int
    bytes_backbone: int
    started: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundOutcome:
    """What a round's steps made of its replies: those trained (ok, with valid statistics), those aggregated
    (their update kept), the bounded aggregation's result and every rejection."""

    replies: list[ClientReply]
    trained: list[ClientReply]
    aggregated: list[ClientReply]
    result: RoundResult
    rejected: list[Rejected]

    def aggregation_metrics(self) -> dict[str, float]:
        """The aggregation's metrics as ``agg_*`` and the largest training loss (NaN if a client's diverged)."""
        losses = [r.metrics.get("train-loss", math.nan) for r in self.trained]
        return {**{f"agg_{k}": v for k, v in self.result.metrics.items()},
                "train_loss_max": float(np.max(losses)) if losses else math.nan}


def rejections(replies: list[ClientReply], trained: list[ClientReply], result: RoundResult,
               bad_stats: dict[int, str]) -> list[Rejected]:
    """Every rejection of the round: updates, then replies that did not decode, then statistics."""
    return [*(Rejected(trained[r.index].client, r.reason, r.detail) for r in result.rejected),
            *(Rejected(r.client, r.rejected, r.detail) for r in replies if r.rejected is not None),
            *(Rejected(client, Reason.STATS, detail) for client, detail in bad_stats.items())]
