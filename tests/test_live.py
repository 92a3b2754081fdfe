"""The ServerApp's live loop on a task list, in one process: tasks added while it runs, devices that join late, a
resumed server, federated evaluation from the devices' own held-out images, and hostile evaluation replies.

Nodes are real ClientApp handlers over device folders (the transport is the only stand-in: see ScriptedGrid in
tests/test_server_app.py); the processes, proxy and TLS are tests/test_deployment.py's."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from grids import AnsweringGrid, answer_honestly

import clients.app as client_app
import server.app as server_app
from fedpetah.adapters import adapter_config
from fedpetah.bank import AdapterBank
from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig
from fedpetah.experiment import ExperimentConfig, StrategyConfig
from fedpetah.tasks import PartitionConfig, TaskStreamConfig, build_stream
from fedpetah.tasks.catalog import add_task
from fedpetah.wire.evaluation import EVALUATE, EvaluateReply, EvaluateRequest
from fedpetah.wire.protocol import HELLO, HelloReply, HelloRequest, Status, task_key
from fedpetah.wire.reasons import Reason
from flower_glue.records import records_of, to_recorddict
from server import status as status_cli
from server.app import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("server_app_identity")]
Answer = Callable[[Message], "Message | None"]


class LiveGrid(AnsweringGrid):
    """Flower's Grid answered in this process: ``devices`` (node id -> Context) run the real ClientApp handlers,
    ``scripts`` (node id -> answer) anything else; ``present(node)`` says whether a node is connected now."""

    def __init__(self, devices: dict[int, Context], scripts: dict[int, Answer] | None = None,
                 present: Callable[[int], bool] = lambda node: True, on_poll: Callable[[], None] = lambda: None
                 ) -> None:
        self.devices, self.scripts, self.present, self.on_poll = devices, scripts or {}, present, on_poll
        self.outbox: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        self.on_poll()
        return [n for n in [*self.devices, *self.scripts] if self.present(n)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            ids.append(self.stamp(message))
            node = message.metadata.dst_node_id
            if node in self.scripts:
                answer = self.scripts[node](message)
                if answer is not None:
                    self.outbox.append(answer)
            else:
                self.outbox.append(answer_honestly(message, self.devices[node]))
        return ids




def _config(catalog: Path, **changes: Any) -> ExperimentConfig:
    values: dict[str, Any] = dict(
        clients=3, rounds_per_task=2, reply_timeout_s=30.0, start_wait_s=0.0, exit_when_idle_s=2.5,
        backbone=BackboneConfig(name="edgenext_xx_small", img_size=32, weights="random"),  # the tiny test hybrid's
        # random features barely differ between images: its adapters stay at chance
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("lora", rank=2),
        tasks=TaskStreamConfig(name="catalog", root=str(catalog)), partition=PartitionConfig(name="iid"),
        train=TrainConfig(epochs=4, batch_size=8, max_steps=12, loss="cross_entropy"),
        strategy=StrategyConfig(fraction=1.0, min_clients=1))
    values.update(changes)
    return ExperimentConfig(**values)


def _devices(root: Path, data: list[Path]) -> dict[int, Context]:
    return {101 + i: Context(run_id=1, node_id=101 + i, state=RecordDict(), run_config={},
                             node_config={"data-dir": str(d), "cache-dir": str(root / f"cache{i}")})
            for i, d in enumerate(data)}


def _completed(run_dir: Path) -> int:
    path = run_dir / "bank" / "bank.json"
    return int(json.loads(path.read_text())["metadata"]["run"]["completed_rounds"]) if path.is_file() else 0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from loopback import write_device_data

    root = tmp_path_factory.mktemp("live")
    data = write_device_data(root / "data", clients=4, per_class=15, num_tasks=2)
    names = [(t.name, t.classes) for t in build_stream(TaskStreamConfig(name="split_mnist", num_tasks=2))]
    return {"root": root, "data": data, "tasks": names}


def test_a_task_added_while_running_and_a_late_device_are_trained_resumed_and_kept(
        world: dict[str, Any], cache_dir: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, data, names = world["root"] / "run1", world["data"], world["tasks"]
    catalog = root / "tasks.yaml"
    add_task(catalog, *names[0])
    run_dir = root / "run"
    devices = _devices(root, data)

    def on_poll() -> None:  # task B arrives while task A trains; the 4th device joins in task B
        if _completed(run_dir) >= 1 and len(catalog.read_text().split("name:")) < 3:
            add_task(catalog, *names[1])

    grid = LiveGrid(devices, present=lambda node: node != 104 or _completed(run_dir) >= 3, on_poll=on_poll)
    stopped = run(grid, _config(catalog, stop_after=3), run_dir, cache_dir)  # stopped in task B's first round
    assert _completed(run_dir) == 3 and stopped["federated_accuracy_matrix"][0][0] is not None
    caplog.set_level(logging.INFO)
    summary = run(grid, _config(catalog, resume=True), run_dir, cache_dir)  # resumed: the rest of task B

    assert _completed(run_dir) == 4
    matrix = summary["federated_accuracy_matrix"]
    assert len(matrix) == 2 and all(v is not None and v > 0.5 for v in (matrix[0][0], matrix[1][0], matrix[1][1]))
    assert summary["federated_task_free_accuracy"] > 0.25  # four classes: chance is 0.25
    assert "accuracy_matrix" not in summary or not any(v is not None for row in summary["accuracy_matrix"] for v in row)

    bank = AdapterBank.load(run_dir / "bank")
    assert bank.tasks() == [0, 1] and bank[1].record.task_name == names[1][0]
    status = json.loads((run_dir / "status.json").read_text())
    by_client = {d["client"]: d for d in status["devices"]}
    assert set(by_client) == set(devices)
    assert by_client[104]["rounds_trained"] >= 1  # joined during task B, trained in it
    assert all(d["kept_version"] == 4 for d in by_client.values())  # every device keeps both tasks
    assert all(d["profile"]["memory_budget_mb"] > 0 and d["profile"]["cores"] >= 1 and d["no_budget"] == 0
               for d in by_client.values())  # the device profile each hello carried, in the ledger
    assert [t["state"] for t in status["tasks"]] == ["learned", "learned"]
    assert any("device 104 joined" in r.getMessage() for r in caplog.records)
    assert status_cli.main(["--run-dir", str(run_dir)]) == 0  # the operator's table, on a stopped server
    table = capsys.readouterr().out
    assert "server: finished" in table and names[1][0] in table and "104" in table and "; budget " in table
    assert status_cli.main(["--run-dir", str(root / "nowhere")]) == status_cli.EXIT_NO_STATUS
    images = {p.name for d in data for p in d.rglob("*.png")}
    assert images and not [p for p in root.rglob("*") if p.name in images]  # the server's dirs hold no image


def _hostile_evaluator(change: str, context: Context) -> Answer:
    """A device that trains honestly but lies in its evaluation reply as ``change`` says."""

    def answer(message: Message) -> Message | None:
        kind = message.metadata.message_type
        if kind != EVALUATE:
            return answer_honestly(message, context)
        request = EvaluateRequest.decode(records_of(message))
        if not request.evaluate:
            return client_app.evaluate(message, context)
        honest = EvaluateReply.decode(records_of(client_app.evaluate(message, context),
                                                 EvaluateReply.layout(request.tasks)), request.tasks)
        counts = {t: v.copy() for t, v in honest.counts.items()}
        confusion = {t: v.copy() for t, v in honest.confusion.items()}
        records = EvaluateReply(Status.OK, "", counts, confusion, True).encode()
        key = task_key(next(iter(counts)))
        table = records.arrays["counts"][key]
        if change == "above-holdout":
            table[:, 0] += 1000
            table[:, 1] += 1000
            records.arrays["confusion"][key] = records.arrays["confusion"][key] + np.diag(np.full(len(table), 1000))
        elif change == "negative":
            table[0, 2] = -1
        elif change == "nan":
            records.arrays["counts"][key] = np.full(table.shape, np.nan)
        elif change == "huge-confusion":
            records.arrays["confusion"][key] = np.zeros((len(table), 100_000), np.int64)
        elif change == "correct-above-total":
            table[:, 1] = table[:, 0] + 1
        return Message(to_recorddict(records), reply_to=message)

    return answer


CHANGES = ["above-holdout", "negative", "nan", "huge-confusion", "correct-above-total"]


def test_hostile_evaluation_replies_are_rejected_counted_and_change_no_figure(
        world: dict[str, Any], cache_dir: Path) -> None:
    root, data, names = world["root"] / "hostile", world["data"], world["tasks"]
    catalog = root / "tasks.yaml"
    add_task(catalog, *names[0])
    honest = _devices(root, data[:2])
    liars = {200 + i: _hostile_evaluator(change, Context(run_id=1, node_id=200 + i, node_config={
        "data-dir": str(data[2]), "cache-dir": str(root / f"liar{i}")}, state=RecordDict(), run_config={}))
        for i, change in enumerate(CHANGES)}
    summary = run(LiveGrid(honest, liars), _config(catalog, exit_when_idle_s=0.0), root / "attacked", cache_dir)
    [row] = [json.loads(line) for line in (root / "attacked" / "metrics.jsonl").read_text().splitlines()
             if "federated_replies" in line]  # the task's last round: its row counts the rejected evaluations
    assert row["extra"]["federated_replies"] == len(honest) + len(liars)
    assert row["extra"]["federated_rejected_evaluation"] == len(liars) - 1
    assert row["extra"]["federated_rejected_size"] == 1
    status = json.loads((root / "attacked" / "status.json").read_text())
    rejected = {d["client"]: d["rejections"] for d in status["devices"]}
    for node, change in zip(liars, CHANGES, strict=True):  # each lie rejected once; an oversized one as "size"
        assert rejected[node] == {str(Reason.SIZE if change == "huge-confusion" else Reason.EVALUATION): 1}
    assert not any(rejected[node] for node in honest)

    clean = run(LiveGrid(honest, {n: _quiet(data[2], root / f"q{n}", n) for n in liars}),
                _config(catalog, exit_when_idle_s=0.0), root / "clean", cache_dir)
    assert summary["federated_accuracy_matrix"] == clean["federated_accuracy_matrix"]


def _quiet(data: Path, cache: Path, node: int) -> Answer:
    """A device with the same images as a liar whose evaluation reply holds no counts at all."""
    context = Context(run_id=1, node_id=node, node_config={"data-dir": str(data), "cache-dir": str(cache)},
                      state=RecordDict(), run_config={})

    def answer(message: Message) -> Message | None:
        kind = message.metadata.message_type
        if kind == EVALUATE:
            return Message(to_recorddict(EvaluateReply(Status.OK, "", kept=True).encode()), reply_to=message)
        return answer_honestly(message, context)

    return answer


def test_a_fixed_run_starts_with_the_nodes_it_has_and_says_what_it_waits_for(
        world: dict[str, Any], cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`flwr run .` with Flower's 2 local nodes and clients=50 in the run config: no silent 10-minute wait."""
    caplog.set_level(logging.INFO)
    root = world["root"] / "fixed"
    nodes = {300 + p: Context(run_id=1, node_id=300 + p, node_config={"partition-id": p, "cache-dir": str(root / "c")},
                              state=RecordDict(), run_config={}) for p in (0, 1)}
    config = _config(root, clients=50, start_wait_s=1.0, exit_when_idle_s=None, rounds_per_task=1,
                     tasks=TaskStreamConfig(name="split_mnist", num_tasks=1))
    summary = run(LiveGrid(nodes), config, root / "run", cache_dir)
    assert summary["accuracy_matrix"][0][0] is not None
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "starting with 2 connected node(s) of the 50" in said


def test_hello_reports_the_images_a_device_holds_per_class(world: dict[str, Any]) -> None:
    data, names = world["data"], world["tasks"]
    from fedpetah.wire.protocol import TaskInfo

    tasks = (TaskInfo(0, names[0][0], tuple(names[0][1])), TaskInfo(1, "absent", ("x", "y")))
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data-dir": str(data[0]), "cache-dir": str(world["root"] / "h")})
    message = Message(to_recorddict(HelloRequest("0" * 64, tasks).encode()), 1, HELLO)
    message.metadata.__dict__["_message_id"] = "m1"
    hello = HelloReply.decode(records_of(client_app.hello(message, context), HelloReply.layout(tasks)), tasks)
    assert set(hello.holdings) == {0}
    assert hello.holdings[0].sum() == 30 and (hello.holdings[0][:, 1] > 0).all()  # 15 images per class, some held out


def test_a_device_whose_hello_came_back_unavailable_is_greeted_again_and_trains(
        world: dict[str, Any], cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load a SuperNode may miss its heartbeats just as it is greeted: Flower then answers the hello for it
    ("Node Unavailable"). That device is not a liar: it is greeted again and takes part."""
    monkeypatch.setattr(server_app, "HELLO_RETRY_S", (0.5, 1.0))
    root, data, names = world["root"] / "flaky", world["data"], world["tasks"]
    catalog = root / "tasks.yaml"
    add_task(catalog, *names[0])
    devices = _devices(root, data[:3])
    flaky, hellos = 103, []
    context = devices.pop(flaky)

    def answer(message: Message) -> Message | None:
        if message.metadata.message_type == HELLO:
            hellos.append(message)
            if len(hellos) == 1:
                return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=message)
        return answer_honestly(message, context)

    run_dir = root / "run"
    summary = run(LiveGrid(devices, {flaky: answer}), _config(catalog, min_devices=3, exit_when_idle_s=5.0),
                  run_dir, cache_dir)
    assert summary["rounds"] == 2 and len(hellos) >= 2
    status = json.loads((run_dir / "status.json").read_text())
    assert {d["client"]: d["rounds_trained"] for d in status["devices"]}[flaky] == 2


def test_a_server_stopped_before_its_first_round_writes_an_empty_summary(world: dict[str, Any],
                                                                          cache_dir: Path) -> None:
    root = world["root"] / "idle"
    catalog = root / "tasks.yaml"
    add_task(catalog, *world["tasks"][0])
    summary = run(LiveGrid({}), _config(catalog, exit_when_idle_s=0.0), root / "run", cache_dir)
    assert summary["rounds"] == 0 and summary["tasks_learned"] == 0 and summary["average_accuracy"] is None
    assert json.loads((root / "run" / "summary.json").read_text())["rounds"] == 0
