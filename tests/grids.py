"""Flower's Grid interface answered in this process, for the ServerApp's tests: a stand-in for the transport only
(the nodes behind it run the real ClientApp handlers or a test's script)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message
from flwr.serverapp import Grid

import clients.app as client_app
from fedpetah.wire.evaluation import EVALUATE
from fedpetah.wire.protocol import HELLO

HANDLERS = {HELLO: client_app.hello, EVALUATE: client_app.evaluate}
"""The ClientApp's handler of each message type (every other type is a train message)."""


def answer_honestly(message: Message, context: Context) -> Message:
    """What the real ClientApp answers ``message`` with, on the node of ``context``."""
    return HANDLERS.get(message.metadata.message_type, client_app.train)(message, context)


class InProcessGrid(Grid):
    """The Grid methods a ServerApp does not use here, and message ids: a subclass pushes and pulls."""

    counter = 0

    def set_run(self, run: object) -> None:  # type: ignore[override]
        pass

    @property
    def run(self) -> object:  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("the ServerApp must use its own push/pull loop")

    def stamp(self, message: Message) -> str:
        """Give ``message`` the next message id, as the SuperLink would."""
        self.counter += 1
        message.metadata.__dict__["_message_id"] = f"m{self.counter}"
        return f"m{self.counter}"


class AnsweringGrid(InProcessGrid):
    """A grid whose replies wait in ``outbox`` (a subclass pushes into it) until pulled by the ids they answer."""

    outbox: list[Message]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        ready = [m for m in self.outbox if m.metadata.reply_to_message_id in wanted]
        self.outbox = [m for m in self.outbox if m not in ready]
        return ready
