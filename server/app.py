"""Flower ServerApp: drive the continual schedule over Flower's Grid (messages in, fedpetah calls, messages out).

Every reply is decoded with fedpetah.wire.protocol: whatever a client sends, a malformed reply becomes a counted
rejection with its reason, never an exception here.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedpetah.experiment import ExperimentConfig, to_experiment
from fedpetah.routing.export import ExportError, snapshot
from fedpetah.serving.continual import ContinualServer, RoundPlan
from fedpetah.serving.federated import FederatedTally
from fedpetah.serving.metrics import RoundRecord
from fedpetah.serving.round import ClientReply
from fedpetah.serving.status import build_status, write_status
from fedpetah.tasks import Task
from fedpetah.wire.evaluation import EVALUATE, EvaluateReply, EvaluateRequest
from fedpetah.wire.flatconfig import unflatten
from fedpetah.wire.protocol import (
    HELLO,
    SENT_SECTIONS,
    TRAIN,
    HelloReply,
    HelloRequest,
    ProtocolError,
    Status,
    TaskInfo,
    TrainReply,
    specs,
)
from fedpetah.wire.reasons import Reason
from flower_glue.records import records_of, to_recorddict
from server.progress import Progress

log = logging.getLogger("fedpetah.server")
POLL_S = 0.2  # how often replies are pulled (Flower's own send_and_receive waits 3 s between pulls)
IDLE_POLL_S = 2.0  # how often a waiting server looks at the task list and the connected nodes again
LISTED_NODES = 10  # a log line names at most this many nodes (then how many more)
STATUS_REFRESH_S = 30.0  # the longest status.json goes unwritten while the server waits
HELLO_IDLE_S = 120.0  # a greeting ends once no hello reply came for this long (a node that missed it: greeted again)
HELLO_RETRY_S = (60.0, 3600.0)  # a node that missed its hello is greeted again after 60 s, doubled per miss to 1 h
STRAGGLER_SHARE = 0.1  # once all replies but at most this share (at least one) are in, the rest are stragglers:
STRAGGLER_MIN_S, STRAGGLER_FACTOR = 60.0, 5.0  # they get max(60 s, 5 x the others' time) more, within the deadline
# (generous: in a mixed fleet a small device may be several times slower than the rest; Flower answers for a node
# that died, so what this bounds is a reply lost on the way, rare since the SuperLink waits for SQLite's lock)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry for ``flwr run`` / the deployment engine: the run config carries the flat experiment config."""
    _say_what_happens()
    config = to_experiment(unflatten(dict(context.run_config)))
    run(grid, config, Path(config.output_dir))


def _say_what_happens() -> None:
    """Our INFO lines (a device joined, a task added, what the server waits for) on stderr, which Flower streams
    to ``flwr log`` and fedpetah-server prints; without a handler Python drops everything below WARNING."""
    logger = logging.getLogger("fedpetah")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedpetah %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class Exchange:
    """Push messages, then pull replies every :data:`POLL_S` until all are in or the deadline passes.

    Replies to an earlier exchange that arrive after its deadline are pulled with the next exchange and
    counted as late (their round is over: they are not aggregated).

    A reply the SuperLink lost (e.g. a device's push answered HTTP 500) or a device that died never arrives, so
    the exchange does not wait for the whole deadline once only stragglers are missing: when every reply but at
    most :data:`STRAGGLER_SHARE` of them (at least one) is in, the stragglers get ``max(STRAGGLER_MIN_S,
    STRAGGLER_FACTOR x the time the others took)`` more: a straggler may take six times as long as the rest (at
    least 60 s more), never longer than ``timeout_s``.

    With ``idle_s``, the exchange also ends once no reply has come for that long: a greeting of thousands of
    nodes (a simulation's, answered a few dozen a second) runs as long as replies keep coming, while one lost
    hello costs ``idle_s``, not the whole deadline.
    """

    def __init__(self, grid: Grid, poll_s: float = POLL_S) -> None:
        self.grid = grid
        self.poll_s = poll_s
        self.overdue: set[str] = set()

    def __call__(self, messages: list[Message], timeout_s: float,
                 idle_s: float | None = None) -> tuple[dict[int, Message], int]:
        """Replies by destination node, and how many late replies to earlier exchanges came in meanwhile."""
        pushed = {str(mid) for mid in self.grid.push_messages(messages) if mid}
        waiting = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id in pushed}
        if len(waiting) < len(messages):
            log.warning("Flower could not push %d of %d messages", len(messages) - len(waiting), len(messages))
        replies: dict[int, Message] = {}
        late, stragglers = 0, max(1, int(STRAGGLER_SHARE * len(waiting)))
        started = last_reply = time.monotonic()
        deadline = started + timeout_s
        while True:
            for reply in self.grid.pull_messages(set(waiting) | self.overdue):
                origin = reply.metadata.reply_to_message_id
                if origin in waiting:
                    replies[waiting.pop(origin)] = reply
                    last_reply = time.monotonic()
                elif origin in self.overdue:
                    self.overdue.discard(origin)
                    late += 1
            now = time.monotonic()
            if idle_s is not None and now - last_reply >= idle_s:
                break
            if replies and 0 < len(waiting) <= stragglers:  # only stragglers missing: their grace starts (once)
                deadline = min(deadline, now + max(STRAGGLER_MIN_S, STRAGGLER_FACTOR * (now - started)))
                stragglers = 0
            if not waiting or now >= deadline:
                break
            time.sleep(self.poll_s)
        if waiting:
            missing = sorted(waiting.values())
            log.warning("%d node(s) did not answer within %.0f s: %s%s", len(missing), time.monotonic() - started,
                        missing[:LISTED_NODES], f" and {len(missing) - LISTED_NODES} more"
                        if len(missing) > LISTED_NODES else "")
        self.overdue |= set(waiting)
        return replies, late


def run(grid: Grid, config: ExperimentConfig, run_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The whole federated continual run; returns the summary."""
    return Federation(grid, ContinualServer(config, run_dir, cache_dir)).run()


class Federation:
    """The live loop over Flower's Grid: greet the nodes connected now, train the next task's rounds among those
    that hold its images, evaluate on the devices and hand them the learned tasks after each task, and wait
    (saying for what) when there is nothing to do."""

    def __init__(self, grid: Grid, server: ContinualServer) -> None:
        self.grid, self.server, self.config = grid, server, server.config
        self.exchange = Exchange(grid)
        self.refused: set[int] = set()  # nodes whose hello did not decode: not greeted again while connected
        self.unanswered: dict[int, tuple[int, float]] = {}  # node -> (hellos missed in a row, when to greet again)
        self.federated: dict[int, float] = {}  # the latest federated accuracy per task (status)
        self.task_free: float | None = None
        self.snapshots: dict[int, tuple[bytes, bytes]] = {}  # bank version -> snapshot (the latest only)
        self.offered: dict[int, int] = {}  # client -> the latest snapshot version sent to it (sent once each)
        self.written: tuple[dict[str, Any], float] = ({}, -math.inf)  # the status last written, and when
        self.server.federated = self.evaluate

    def run(self) -> dict[str, Any]:
        server, config = self.server, self.config
        self.status("starting", "devices to connect")
        for device in server.fleet.devices.values():
            device.catalog_size = 0  # a restarted server asks every device again what it holds
        self.wait_for_start()
        progress = Progress(config.rounds_per_task, [])
        idle_since: float | None = None
        with progress:
            while True:
                self.refresh(progress)
                plan = server.next_plan()
                if plan is None and (not server.live or server.stopped):
                    break  # a fixed stream is trained, or stop_after is reached
                if plan is None:
                    waiting = "a new task in the task list (fedpetah-server task add)" if server.live else \
                        "devices to hand the learned tasks to"
                    self.sync()
                else:
                    holding = server.fleet.eligible(plan.task)
                    eligible = server.trainable(holding)  # and whose memory budget fits a variant
                    if holding and not eligible and all(server.fleet.devices[c].simulated for c in holding):
                        raise RuntimeError(f"no simulated device of task {plan.task} can train: none of their budgets "
                                           "fits a variant (see the log; fleet.sized_for, assignment.margin)")
                    if len(eligible) >= config.min_devices:
                        self.sync()  # a device that joined gets the learned tasks before it trains
                        self.status("training", None)
                        progress.update(_round(self.exchange, server, plan, eligible))
                        idle_since = None
                        continue
                    waiting = (f"{config.min_devices} connected device(s) holding images of task {plan.task} "
                               f"({server.tasks[plan.task].name}); {len(eligible)} now (min_devices)"
                               + (f", {len(holding) - len(eligible)} more whose memory budget fits no variant"
                                  if len(holding) > len(eligible) else ""))
                if idle_since is None:
                    idle_since = time.monotonic()
                    log.info("waiting for %s", waiting)
                self.status("waiting", waiting)
                if config.exit_when_idle_s is not None and time.monotonic() - idle_since >= config.exit_when_idle_s:
                    log.info("nothing to train for %.0f s (exit_when_idle_s): stopping", config.exit_when_idle_s)
                    break
                time.sleep(IDLE_POLL_S)
        summary = server.finish({"clients": config.clients})
        self.status("finished", None)
        progress.final(summary)
        return summary

    def wait_for_start(self) -> None:
        """Until ``clients`` nodes are connected, or ``start_wait_s`` has passed (then the loop starts with the
        nodes it has, and rounds wait for ``min_devices``); says what it waits for every 10 s."""
        started, said = time.monotonic(), -math.inf
        while True:
            count, waited = len(list(self.grid.get_node_ids())), time.monotonic() - started
            if count >= self.config.clients or waited >= self.config.start_wait_s:
                if count < self.config.clients:
                    log.warning("starting with %d connected node(s) of the %d the config names (clients); rounds "
                                "start once %d hold a task's images (min_devices)", count, self.config.clients,
                                self.config.min_devices)
                return
            if waited - said >= 10.0:
                said = waited
                log.info("waiting for devices: %d of %d connected (clients=%d); starting with those connected "
                         "after %.0f s (start_wait_s)", count, self.config.clients, self.config.clients,
                         self.config.start_wait_s)
            time.sleep(1.0)

    def refresh(self, progress: Progress) -> None:
        """Read the task list again, learn who is connected, greet new nodes (and every node when the task list
        grew, for their images of the new tasks)."""
        server = self.server
        for task in server.refresh_tasks():
            log.info("task %d %r added (%d classes)", task.index, task.name, task.num_classes)
        progress.tasks([t.name for t in server.tasks])
        new, left = server.fleet.connect(self.grid.get_node_ids())
        self.refused &= {d.node for d in server.fleet.connected()} | set(new)
        for client in left:
            log.info("device %s left", client)
        now = time.monotonic()
        greet = {n for n in new if n not in self.refused} | set(server.fleet.stale(len(server.tasks)))
        greet = {n for n in greet if self.unanswered.get(n, (0, now))[1] <= now}  # a node that missed one: later
        if greet:
            self.hello(sorted(greet))

    def hello(self, nodes: list[int]) -> None:
        server = self.server
        tasks = task_infos(server.tasks)
        sections = {name: asdict(getattr(self.config, name)) for name in SENT_SECTIONS}  # a simulated client's shard
        content = HelloRequest(server.digest, tasks, self.config.seed, self.config.clients, sections,
                               profile=True).encode()
        replies, _ = self.exchange([Message(to_recorddict(content), node, HELLO) for node in nodes],
                                   self.config.reply_timeout_s, idle_s=HELLO_IDLE_S)
        for node in set(nodes) - set(replies):
            self.missed_hello(node)
        joined = 0
        for node, message in sorted(replies.items()):
            try:
                hello = HelloReply.decode(records_of(message, HelloReply.layout(tasks)), tasks)
            except ProtocolError as error:
                if error.reason in (Reason.UNAVAILABLE, Reason.CLIENT_ERROR):  # Flower's error reply: a device
                    log.info("node %s: no hello (%s); greeted again later", node, error)  # busy or restarting
                    self.missed_hello(node)
                else:
                    log.warning("node %s: bad hello reply (%s); it takes no part while connected", node, error)
                    self.refused.add(node)
                continue
            self.unanswered.pop(node, None)
            client = hello.partition if hello.partition >= 0 else node
            known = client in server.fleet.devices
            server.fleet.greeted(client, node, hello.has_backbone, hello.holdings, len(tasks), hello.profile)
            if not known:
                joined += 1
                if joined <= LISTED_NODES:
                    held = {server.tasks[t].name: int(v[:, 0].sum()) for t, v in hello.holdings.items()}
                    log.info("device %s joined%s", client, f": images {held}" if held else " (no images of any task)")
            _track_install(server, node, Status.NEEDS_BACKBONE if not hello.has_backbone else Status.OK)
        if joined > LISTED_NODES:
            log.info("%d more devices joined (%d connected)", joined - LISTED_NODES, len(server.fleet.connected()))

    def missed_hello(self, node: int) -> None:
        """Greet ``node`` again later, backing off: a lost hello must not stall the loop."""
        missed = self.unanswered.get(node, (0, 0.0))[0] + 1
        self.unanswered[node] = missed, time.monotonic() + min(HELLO_RETRY_S[0] * 2 ** (missed - 1), HELLO_RETRY_S[1])

    # ------------------------------------------------------------------------------------------- evaluation

    def learned(self) -> int:
        """How many tasks are completely trained (the first ones)."""
        return min(len(self.server.tasks), self.server.state.completed_rounds // self.config.rounds_per_task)

    def unsynced(self) -> list[int]:
        """Client ids of connected devices that do not keep the latest learned tasks yet."""
        version = self.learned() * self.config.rounds_per_task
        if not self.learned():
            return []
        return [d.client for d in self.server.fleet.connected()
                if d.kept_version < version and not d.simulated and self.offered.get(d.client, -1) < version]

    def sync(self) -> None:
        """Hand the learned tasks to each connected device that does not keep them yet (a late joiner)."""
        clients = self.unsynced()
        if clients:
            count = self.learned()
            self.send_snapshot(count - 1, count * self.config.rounds_per_task, clients, evaluate=False)

    def evaluate(self, plan: RoundPlan) -> dict[str, float]:
        """After a task's last round: every connected device evaluates every learned task on its held-out images
        and keeps them; the round's federated figures (the ContinualServer's hook)."""
        devices = [d.node for d in self.server.fleet.connected() if not d.simulated]
        if devices:  # their held-out images may have changed since they said (a simulated client's cannot)
            self.hello(devices)
        clients = [d.client for d in self.server.fleet.connected() if not d.simulated or d.images(plan.task, 1) or
                   any(d.images(t, 1) for t in range(plan.task))]  # simulated clients without a holdout: nothing to do
        return self.send_snapshot(plan.task, plan.round, clients, evaluate=True)

    def send_snapshot(self, upto: int, version: int, clients: list[int], evaluate: bool) -> dict[str, float]:
        server = self.server
        snapshot = self.snapshot(upto, version)
        if snapshot is None:
            return {}
        tasks = task_infos(server.tasks[: upto + 1])
        sections = {name: asdict(getattr(self.config, name)) for name in SENT_SECTIONS}
        messages, client_of, sent, backbone = [], {}, 0, 0
        for client in clients:
            device = server.fleet.devices[client]
            asks = evaluate and any(device.images(t.index, 1) > 0 for t in tasks)
            artifact = None if device.node in server.state.installed else server.artifact_payload
            request = EvaluateRequest(server.digest, version, tasks, *snapshot, keep=not device.simulated,
                                      evaluate=asks, seed=self.config.seed, clients=self.config.clients,
                                      sections=sections, artifact=artifact)
            messages.append(Message(to_recorddict(request.encode()), device.node, EVALUATE))
            self.offered[client] = version
            sent += len(snapshot[0]) + len(snapshot[1])
            backbone += sum(len(part) for part in artifact) if artifact else 0
            client_of[device.node] = client
        server.state.bytes_backbone += backbone  # committed with the next round (the round's row counts its own)
        answers, _ = self.exchange(messages, self.config.reply_timeout_s)
        tally = FederatedTally(tasks, self.config.evaluation_max_share)
        rejected: Counter[str] = Counter()
        for node, message in sorted(answers.items(), key=lambda item: client_of[item[0]]):
            client = client_of[node]
            try:
                reply = EvaluateReply.decode(records_of(message, EvaluateReply.layout(tasks)), tasks)
                tally.add(client, reply, server.fleet.devices[client].holdings)
            except ProtocolError as error:
                log.warning("round %d: rejected the evaluation of device %s: %s", version, client, error)
                server.fleet.count_round([], [(client, str(error.reason))])
                rejected[str(error.reason)] += 1
                continue
            _track_install(server, node, reply.status)
            if reply.kept:
                server.fleet.devices[client].kept_version = version
            elif reply.status is not Status.OK:
                log.warning("device %s did not keep the learned tasks: %s %s", client, reply.status, reply.reason)
        if not evaluate:
            return {}
        figures = {**tally.figures(), "bytes_snapshot_down": float(sent), "bytes_backbone_evaluation": float(backbone),
                   "federated_replies": float(len(answers)),
                   **{f"federated_rejected_{reason}": float(n) for reason, n in sorted(rejected.items())}}
        self.federated = {t: figures[f"federated_accuracy_{t}"] for t in range(upto + 1)
                          if f"federated_accuracy_{t}" in figures}
        self.task_free = figures.get("federated_task_free_accuracy")
        return figures

    def snapshot(self, upto: int, version: int) -> tuple[bytes, bytes] | None:
        """Tasks 0..upto as the devices keep them (None, logged, when they cannot be built: e.g. a task without
        router statistics)."""
        if version not in self.snapshots:
            server = self.server
            try:
                payload = snapshot(server.backbone, server.digest, self.config.adapter, server.bank,
                                   list(range(upto + 1)), server.router.config, version)
            except (ExportError, ValueError) as error:
                log.warning("cannot hand out the learned tasks: %s", error)
                return None
            self.snapshots = {version: payload}
        return self.snapshots[version]

    def status(self, state: str, waiting: str | None) -> None:
        """Rewrite status.json when something changed, and at least every :data:`STATUS_REFRESH_S` (its
        ``updated`` time tells a reader that the server is alive)."""
        status = build_status(self.server, state, waiting, self.federated, self.task_free)
        content = {**status, "updated": None,  # a device's last_seen moves on every poll: not a change by itself
                   "devices": [{**d, "last_seen": None} for d in status["devices"]]}
        if content != self.written[0] or time.monotonic() - self.written[1] >= STATUS_REFRESH_S:
            write_status(self.server.run_dir, status)
            self.written = (content, time.monotonic())


def task_infos(tasks: Sequence[Task]) -> tuple[TaskInfo, ...]:
    return tuple(TaskInfo(t.index, t.name, tuple(t.classes)) for t in tasks)


def _round(exchange: Exchange, server: ContinualServer, plan: RoundPlan, eligible: list[int]) -> RoundRecord:
    started = time.perf_counter()
    sampled = server.sample(eligible, plan)
    current = server.global_state(plan.task)
    messages, artifact_bytes, bytes_down = [], 0, 0
    client_of: dict[int, int] = {}
    asked: set[int] = set()  # nodes asked for the task-free router's statistics
    for client in sampled:
        node = server.fleet.node_of(client)
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
    expected_stats = server.router.specs(server.tasks[plan.task].num_classes)
    replies, bytes_up, bytes_stats = [], 0, 0
    for node, client in sorted(client_of.items(), key=lambda item: item[1]):  # a fixed order: reproducible sums
        if node not in answers:
            replies.append(ClientReply.refused(client, Reason.TIMEOUT))
            continue
        stats_specs = expected_stats if node in asked else None
        expected = specs({k: v.numpy() for k, v in server.reply_layout(client, current).items()})  # its variant's
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
