"""Flower ServerApp: drive the continual schedule over Flower's Grid (messages in, fedpetah calls, messages out).

Every reply is decoded with fedpetah.wire.protocol: whatever a client sends, a malformed reply becomes a counted
rejection with its reason, never an exception here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedpetah.experiment import ExperimentConfig, to_experiment
from fedpetah.serving.continual import ContinualServer, RoundPlan
from fedpetah.serving.metrics import RoundRecord
from fedpetah.serving.round import ClientReply
from fedpetah.wire.flatconfig import unflatten
from fedpetah.wire.protocol import HELLO, TRAIN, HelloReply, HelloRequest, ProtocolError, Status, TrainReply, specs
from fedpetah.wire.reasons import Reason
from flower_glue.records import records_of, to_recorddict
from server.progress import Progress

log = logging.getLogger("fedpetah.server")
POLL_S = 0.2  # how often replies are pulled (Flower's own send_and_receive waits 3 s between pulls)


def make_server_app(config: ExperimentConfig, run_dir: Path, cache_dir: Path | None = None) -> ServerApp:
    """A ServerApp bound to a typed config (the simulation entry point uses this)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, config, run_dir, cache_dir)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry for ``flwr run`` / the deployment engine: the run config carries the flat experiment config."""
    config = to_experiment(unflatten(dict(context.run_config)))
    run(grid, config, Path(config.output_dir))


class Exchange:
    """Push messages, then pull replies every :data:`POLL_S` until all are in or the deadline passes.

    Replies to an earlier exchange that arrive after its deadline are pulled with the next exchange and
    counted as late (their round is over: they are not aggregated).
    """

    def __init__(self, grid: Grid, poll_s: float = POLL_S) -> None:
        self.grid = grid
        self.poll_s = poll_s
        self.overdue: set[str] = set()

    def __call__(self, messages: list[Message], timeout_s: float) -> tuple[dict[int, Message], int]:
        """Replies by destination node, and how many late replies to earlier exchanges came in meanwhile."""
        pushed = {str(mid) for mid in self.grid.push_messages(messages) if mid}
        waiting = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id in pushed}
        if len(waiting) < len(messages):
            log.warning("Flower could not push %d of %d messages", len(messages) - len(waiting), len(messages))
        replies: dict[int, Message] = {}
        late = 0
        deadline = time.monotonic() + timeout_s
        while True:
            for reply in self.grid.pull_messages(set(waiting) | self.overdue):
                origin = reply.metadata.reply_to_message_id
                if origin in waiting:
                    replies[waiting.pop(origin)] = reply
                elif origin in self.overdue:
                    self.overdue.discard(origin)
                    late += 1
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        if waiting:
            log.warning("%d node(s) did not answer within %.0f s: %s", len(waiting), timeout_s,
                        sorted(waiting.values()))
        self.overdue |= set(waiting)
        return replies, late


def run(grid: Grid, config: ExperimentConfig, run_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The whole federated continual run; returns the summary."""
    server = ContinualServer(config, run_dir, cache_dir)
    exchange = Exchange(grid)
    nodes = _wait_for_nodes(grid, config.clients)
    clients = _hello(exchange, server, nodes)
    progress = Progress(len(server.tasks) * config.rounds_per_task, [t.name for t in server.tasks])
    with progress:
        for plan in server.schedule():
            progress.update(_round(exchange, server, plan, clients))
    summary = server.finish({"clients": config.clients})
    progress.final(summary)
    return summary


def _wait_for_nodes(grid: Grid, expected: int, timeout: float = 600.0) -> list[int]:
    start = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected or (nodes and time.monotonic() - start > timeout):
            return nodes
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"no client connected within {timeout:.0f} s")
        time.sleep(1.0)


def _hello(exchange: Exchange, server: ContinualServer, nodes: list[int]) -> dict[int, int]:
    """Map each client id (partition id in simulation, node id on devices) to its Flower node id."""
    content = HelloRequest(server.digest).encode()
    replies, _ = exchange([Message(to_recorddict(content), node, HELLO) for node in nodes],
                          server.config.reply_timeout_s)
    clients: dict[int, int] = {}
    for node, message in sorted(replies.items()):
        try:
            hello = HelloReply.decode(records_of(message, HelloReply.layout()))
        except ProtocolError as error:
            log.warning("node %s: bad hello reply (%s); it takes no part in this run", node, error)
            continue
        clients[hello.partition if hello.partition >= 0 else node] = node
        if hello.has_backbone and node not in server.state.installed:
            server.state.installed.append(node)
    return clients


def _round(exchange: Exchange, server: ContinualServer, plan: RoundPlan, clients: dict[int, int]) -> RoundRecord:
    started = time.perf_counter()
    sampled = server.sample(list(clients), plan)
    current = server.global_state(plan.task)
    messages, artifact_bytes, bytes_down = [], 0, 0
    client_of: dict[int, int] = {}
    asked: set[int] = set()  # nodes asked for the task-free router's statistics
    for client in sampled:
        node = clients[client]
        request = server.train_request(plan, client, current, with_artifact=node not in server.state.installed)
        if request.artifact is not None:
            artifact_bytes += sum(len(part) for part in request.artifact)
        if request.stats is not None:
            asked.add(node)
        records = request.encode()
        bytes_down += records.array_bytes("adapter")
        messages.append(Message(to_recorddict(records), node, TRAIN))
        client_of[node] = client
    answers, late = exchange(messages, server.config.reply_timeout_s)
    expected = specs({k: v.numpy() for k, v in current.items()})
    expected_stats = server.router.specs(server.tasks[plan.task].num_classes)
    replies, bytes_up, bytes_stats = [], 0, 0
    for node, client in sorted(client_of.items(), key=lambda item: item[1]):  # a fixed order: reproducible sums
        if node not in answers:
            replies.append(ClientReply.refused(client, Reason.TIMEOUT))
            continue
        stats_specs = expected_stats if node in asked else None
        try:
            records = records_of(answers[node], TrainReply.layout(expected, stats_specs))
            answer = TrainReply.decode(records, expected, stats_specs)
        except ProtocolError as error:
            replies.append(ClientReply.refused(client, error.reason, error.detail))
            continue
        bytes_up += records.array_bytes("adapter") + records.array_bytes("stats")
        bytes_stats += records.array_bytes("stats")
        _track_install(server, node, answer.status)
        replies.append(ClientReply.of(client, answer))
    return server.complete_round(plan, current, replies, bytes_down, bytes_up, started, artifact_bytes,
                                 {"late_replies": float(late), "bytes_stats_up": float(bytes_stats)})


def _track_install(server: ContinualServer, node: int, status: Status) -> None:
    """A node that answered holds the backbone, unless it says it needs it (missing or failed verification)."""
    installed = server.state.installed
    if status is Status.NEEDS_BACKBONE:
        if node in installed:
            installed.remove(node)
    elif node not in installed:
        installed.append(node)
