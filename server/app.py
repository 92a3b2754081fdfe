"""Flower ServerApp: drive the continual schedule over Flower's Grid (messages in, fedpetah calls, messages out)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.wire import (
    HELLO,
    INSTALL,
    TRAIN,
    bytes_to_record,
    record_bytes,
    record_to_state,
    state_to_record,
    train_config_record,
)
from fedpetah.continual import ClientReply, ContinualServer, RoundPlan
from fedpetah.experiment import ExperimentConfig, to_experiment
from fedpetah.flatconfig import unflatten
from fedpetah.metrics import RoundRecord
from server.progress import Progress

log = logging.getLogger("fedpetah.server")


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


def run(grid: Grid, config: ExperimentConfig, run_dir: Path, cache_dir: Path | None = None) -> dict:
    """The whole federated continual run; returns the summary."""
    server = ContinualServer(config, run_dir, cache_dir)
    nodes = _wait_for_nodes(grid, config.clients)
    clients = _hello(grid, server, nodes)
    progress = Progress(len(server.tasks) * config.rounds_per_task, [t.name for t in server.tasks])
    with progress:
        for plan in server.schedule():
            progress.update(_round(grid, server, plan, clients))
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


def _hello(grid: Grid, server: ContinualServer, nodes: list[int]) -> dict[int, int]:
    """Map each client id (partition id in simulation, node id on devices) to its Flower node id."""
    content = RecordDict({"config": ConfigRecord({"digest": server.digest})})
    replies = grid.send_and_receive([Message(content, node, HELLO) for node in nodes])
    clients: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            log.warning("node %s failed hello: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        partition = int(reply.content["config"]["partition-id"])
        node = reply.metadata.src_node_id
        clients[partition if partition >= 0 else node] = node
    return clients


def _install(grid: Grid, server: ContinualServer, nodes: list[int]) -> int:
    """Ship the backbone artifact once to each node that has not received it in this run."""
    pending = [n for n in nodes if n not in set(server.state.installed)]
    if not pending:
        return 0
    weights = (server.artifact_dir / "weights.safetensors").read_bytes()
    manifest = (server.artifact_dir / "manifest.json").read_bytes()
    sent = 0
    messages = []
    for node in pending:
        content = RecordDict({"config": ConfigRecord({"digest": server.digest}),
                              "weights": bytes_to_record(weights), "manifest": bytes_to_record(manifest)})
        messages.append(Message(content, node, INSTALL))
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            log.error("node %s refused the backbone: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        server.state.installed.append(reply.metadata.src_node_id)
        sent += len(weights) + len(manifest)
    return sent  # counted into the run state by ContinualServer.complete_round


def _round(grid: Grid, server: ContinualServer, plan: RoundPlan, clients: dict[int, int]) -> RoundRecord:
    started = time.perf_counter()
    sampled = server.sample(list(clients), plan)
    node_of = {c: clients[c] for c in sampled}
    backbone_bytes = _install(grid, server, list(node_of.values()))
    current = server.global_state(plan.task)
    cfg = server.config
    adapter_record = state_to_record(current)
    messages, bytes_down = [], 0
    for client, node in node_of.items():
        config = train_config_record(server.task_info(plan.task), cfg.adapter, cfg.train, cfg.tasks, cfg.partition,
                                     digest=server.digest, round=plan.round, clients=cfg.clients, seed=cfg.seed,
                                     client=client)
        messages.append(Message(RecordDict({"config": config, "adapter": adapter_record}), node, TRAIN))
        bytes_down += record_bytes(adapter_record)
    client_of = {node: client for client, node in node_of.items()}
    replies, bytes_up = [], 0
    for reply in grid.send_and_receive(messages):
        client = client_of.get(reply.metadata.src_node_id, -1)
        if reply.has_error():
            replies.append(ClientReply(client, None, 0, status="error", reason=reply.error.reason))
            if "ArtifactError" in reply.error.reason and reply.metadata.src_node_id in server.state.installed:
                server.state.installed.remove(reply.metadata.src_node_id)  # its copy was discarded: re-send
            continue
        content = reply.content
        status = content["status"]
        metrics = {k: float(v) for k, v in content["metrics"].items()}  # type: ignore[arg-type]
        state = None
        if "adapter" in content:
            state = record_to_state(content["adapter"])
            bytes_up += record_bytes(content["adapter"])
        replies.append(ClientReply(client, state, int(metrics.get("num-examples", 0)), metrics,
                                   str(status["status"]), str(status["reason"])))
    return server.complete_round(plan, current, replies, bytes_down, bytes_up, started, backbone_bytes)
