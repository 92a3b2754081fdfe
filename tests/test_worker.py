"""The device worker over a real Unix socket: frames, permissions, hostile input, a hung or dead worker, the same
result as the in-process ClientApp, and the imports of the thin path and the worker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from flwr.app import Context, RecordDict

from clients import cli as client_cli
from clients.app import handle
from clients.worker import PING, WorkerUnavailable, call, listen, peer_uid
from fedpetah.wire import frames
from fedpetah.wire.protocol import (
    HELLO,
    TRAIN,
    HelloReply,
    HelloRequest,
    Records,
    Status,
    TrainReply,
    TrainRequest,
    specs,
    stats_specs,
)
from flower_glue.launch import child_env
from server.bundle import REPO

BANNED = ("ray", "hydra", "matplotlib", "sklearn", "mlxtend")


def _records() -> Records:
    return Records(
        arrays={"adapter": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, dtype=np.int64),
                            "empty": np.zeros((0, 4), np.float16)}, "other": {"b": np.array([True, False])}},
        metrics={"metrics": {"num-examples": 3, "loss": 0.25, "hist": [1.0, 2.0]}},
        configs={"config": {"name": "task/0", "flag": False, "classes": ["a", "b"], "big": 2**62},
                 "artifact": {"weights": b"\x00\xffweights", "manifest": b"{}"}})


def test_frames_round_trip_every_kind_of_value() -> None:
    original = _records()
    kind, back = frames.decode(frames.encode(TRAIN, original))
    assert kind == TRAIN
    assert back.metrics == original.metrics and back.configs == original.configs
    assert {n: set(r) for n, r in back.arrays.items()} == {n: set(r) for n, r in original.arrays.items()}
    for name, record in original.arrays.items():
        for key, array in record.items():
            assert back.arrays[name][key].dtype == array.dtype
            np.testing.assert_array_equal(back.arrays[name][key], array)
    assert frames.decode(frames.encode(PING, Records()))[1] == Records()


def _payload(header: dict[str, Any], *segments: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return frames.HEADER_LENGTH.pack(len(raw)) + raw + b"".join(segments)


def _framed(payload: bytes) -> bytes:
    return frames.PREFIX.pack(frames.MAGIC, len(payload)) + payload


HOSTILE = {
    "wrong magic": b"XXXX" + frames.encode(TRAIN, Records())[4:],
    "bad json": _framed(frames.HEADER_LENGTH.pack(5) + b"{nope"),
    "header not an object": _framed(_payload([1, 2])),  # type: ignore[arg-type]
    "type not a string": _framed(_payload({"type": 3, "segments": [0]})),
    "no segments": _framed(_payload({"type": TRAIN})),
    "segment too long": _framed(_payload({"type": TRAIN, "segments": [10]}, b"abc")),
    "negative segment": _framed(_payload({"type": TRAIN, "segments": [-1]})),
    "header longer than payload": _framed(frames.HEADER_LENGTH.pack(1000) + b"{}"),
    "metric is an object": _framed(_payload({"type": TRAIN, "segments": [0], "metrics": {"m": {"x": {"a": 1}}}})),
    "mixed list": _framed(_payload({"type": TRAIN, "segments": [0], "configs": {"c": {"x": [1, "a"]}}})),
    "bytes out of range": _framed(_payload({"type": TRAIN, "segments": [0], "configs": {"c": {"x": {"$bytes": 1}}}})),
    "bytes in metrics": _framed(_payload({"type": TRAIN, "segments": [0, 1], "metrics": {"c": {"x": {"$bytes": 1}}}},
                                         b"z")),
    "record not an object": _framed(_payload({"type": TRAIN, "segments": [0], "configs": {"c": 5}})),
    "unknown tensor": _framed(_payload({"type": TRAIN, "segments": [0], "arrays": {"a": {"k": "0"}}})),
    "deeply nested header": _framed(frames.HEADER_LENGTH.pack(200_000) + b"[" * 100_000 + b"]" * 100_000),
    "corrupt tensor blob": _framed(_payload({"type": TRAIN, "segments": [9], "arrays": {"a": {"k": "0"}}},
                                            b"\x08" + b"\x00" * 7 + b"{")),
}


REFUSALS = {  # what each refusal says
    "wrong magic": "not a fedpetah frame", "bad json": "header is not JSON",
    "header not an object": "header must be an object", "type not a string": "with a string type",
    "no segments": "segments must list", "segment too long": "do not fill", "negative segment": "segments must list",
    "header longer than payload": "does not fit", "metric is an object": "dict is not a record value",
    "mixed list": "a list mixes value types", "bytes out of range": "a bytes reference must be",
    "bytes in metrics": "dict is not a record value", "record not an object": "must map record names to records",
    "unknown tensor": "no such tensor", "deeply nested header": "nests too deeply", "corrupt tensor blob": "array blob",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frames_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(frames.FrameError, match=REFUSALS[name]) as error:
        frames.decode(HOSTILE[name])
    assert error.value.reason == "malformed"


def test_truncated_and_oversized_frames_are_refused() -> None:
    frame = frames.encode(TRAIN, _records())
    for cut in (0, 5, frames.PREFIX.size, frames.PREFIX.size + 3, len(frame) // 2, len(frame) - 1):
        with pytest.raises(frames.FrameError, match="truncated frame prefix|its prefix announces"):
            frames.decode(frame[:cut])
    with pytest.raises(frames.FrameError) as error:
        frames.decode(frame, limit=len(frame) // 2)
    assert error.value.reason == "size" and "exceeds the limit" in str(error.value)
    a, b = socket.socketpair()
    with a, b:  # announced, not sent: refused from the prefix alone, nothing more is read
        a.sendall(frames.PREFIX.pack(frames.MAGIC, frames.MAX_FRAME_BYTES + 1))
        b.settimeout(5.0)
        with pytest.raises(frames.FrameError, match="exceeds the limit"):
            frames.receive(b)


def test_listen_refuses_a_shared_directory_and_makes_an_owner_only_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="fp-") as tmp:
        shared = Path(tmp) / "shared"
        shared.mkdir(mode=0o755)
        os.chmod(shared, 0o755)
        with pytest.raises(ValueError, match="mode 0700"):
            listen(shared / "w.sock")
        private = Path(tmp) / "private"
        private.mkdir(mode=0o700)
        listener = listen(private / "w.sock")
        with listener, socket.socket(socket.AF_UNIX) as conn:
            assert stat.S_IMODE((private / "w.sock").stat().st_mode) == 0o600
            conn.connect(str(private / "w.sock"))
            server_side, _ = listener.accept()
            with server_side:
                assert peer_uid(server_side) in (os.getuid(), None)


# ---------------------------------------------------------------------------------------------- a real worker


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    """A tiny random-weight backbone's first train request (artifact attached) and one device's images."""
    from loopback import write_device_data

    from fedpetah.adapters import adapter_config
    from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig
    from fedpetah.experiment import ExperimentConfig, StrategyConfig
    from fedpetah.serving.continual import ContinualServer
    from fedpetah.tasks import PartitionConfig, TaskStreamConfig

    root = tmp_path_factory.mktemp("worker")
    config = ExperimentConfig(
        clients=2, rounds_per_task=1, backbone=BackboneConfig(name="test_efficientvit", img_size=32, weights="random"),
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("lora", rank=2),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=1), partition=PartitionConfig(name="iid"),
        train=TrainConfig(epochs=1, batch_size=8, max_steps=3, loss="cross_entropy"),
        strategy=StrategyConfig(fraction=1.0, min_clients=1))
    server = ContinualServer(config, root / "run", cache_dir)
    plan = next(server.schedule())
    request = server.train_request(plan, 12345, server.global_state(plan.task), with_artifact=True)
    [data] = write_device_data(root / "data", clients=1, per_class=6, num_tasks=1)
    return {"request": request, "data": data, "root": root}


@pytest.fixture(scope="module")
def worker(setup: dict[str, Any]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``python -m clients.worker`` on a socket in a fresh 0700 dir, as fedpetah-client starts it."""
    directory = Path(tempfile.mkdtemp(prefix="fp-w-"))
    path = directory / "worker.sock"
    command = [sys.executable, "-m", "clients.worker", "--socket", str(path), "--data", str(setup["data"]),
               "--cache", str(setup["root"] / "worker-cache"), "--threads", "1"]
    process = subprocess.Popen(command, env=child_env({"PYTHONPATH": str(REPO)}), cwd=REPO)
    try:
        call(path, PING, Records(), timeout_s=10.0, connect_s=300.0)
        yield process, path
    finally:
        process.kill()
        process.wait()
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


def _context(**node_config: Any) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


IN_PROCESS = """
import json, sys
from pathlib import Path
from flwr.app import Context, RecordDict
from clients.app import handle
from fedpetah.wire import frames
kind, records = frames.decode(Path(sys.argv[1]).read_bytes())
config = {"data-dir": sys.argv[3], "cache-dir": sys.argv[4]}
reply = handle(kind, records, Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={}))
Path(sys.argv[2]).write_bytes(frames.encode("reply", reply))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {BANNED})))
"""


@pytest.mark.slow
def test_worker_answers_like_the_in_process_client_app(setup: dict[str, Any],
                                                       worker: tuple[subprocess.Popen[bytes], Path]) -> None:
    # Execute: the same first train request (with the artifact) through the thin ClientApp path to the worker, and
    # through a fresh process that answers it in-process (a stock SuperNode), both with one torch thread
    request: TrainRequest = setup["request"]
    process, path = worker
    assert HelloReply.decode(handle(HELLO, HelloRequest(request.digest).encode(),
                                    _context(**{"worker-socket": str(path)}))).has_backbone is False
    via_worker = handle(TRAIN, request.encode(), _context(**{"worker-socket": str(path)}))
    root = setup["root"]
    (root / "request.frame").write_bytes(frames.encode(TRAIN, request.encode()))
    env = child_env({"PYTHONPATH": str(REPO), "FEDPETAH_TORCH_THREADS": "1"})
    imported = subprocess.run([sys.executable, "-c", IN_PROCESS.replace("{BANNED}", repr(set(BANNED))),
                               str(root / "request.frame"), str(root / "reply.frame"), str(setup["data"]),
                               str(root / "in-process-cache")], env=env, cwd=REPO, check=True, capture_output=True,
                              text=True).stdout

    # Assert: identical arrays and counts, the backbone now held by the worker, no Ray/Hydra/plotting/sklearn
    # on the device path, and the worker holds no TCP socket
    expected = specs(request.state)
    asked = request.stats  # the server asks a client for its router statistics with its first update of a task
    expected_stats = None if asked is None else stats_specs(request.task.num_classes, asked[0])
    worker_reply = TrainReply.decode(via_worker, expected, expected_stats)
    local_reply = TrainReply.decode(frames.decode((root / "reply.frame").read_bytes())[1], expected, expected_stats)
    assert worker_reply.status is Status.OK, worker_reply.reason
    assert worker_reply.num_examples == local_reply.num_examples == 12
    assert worker_reply.state is not None and local_reply.state is not None
    for key, value in local_reply.state.items():
        np.testing.assert_allclose(worker_reply.state[key], value, rtol=0, atol=0)
    if worker_reply.stats is not None and local_reply.stats is not None:
        for key, value in local_reply.stats.items():
            np.testing.assert_allclose(worker_reply.stats[key], value, rtol=0, atol=0)
    assert any(not np.array_equal(worker_reply.state[k], v) for k, v in request.state.items())  # it trained
    assert json.loads(imported.splitlines()[-1]) == []
    assert HelloReply.decode(handle(HELLO, HelloRequest(request.digest).encode(),
                                    _context(**{"worker-socket": str(path)}))).has_backbone is True
    assert psutil.Process(process.pid).net_connections(kind="inet") == []


@pytest.mark.slow
def test_worker_refuses_garbage_and_oversized_frames_and_keeps_serving(
        worker: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, path = worker
    for raw in (b"garbage that is no frame at all", frames.PREFIX.pack(frames.MAGIC, frames.MAX_FRAME_BYTES + 1),
                HOSTILE["bad json"], HOSTILE["deeply nested header"]):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(30.0)
            conn.connect(str(path))
            conn.sendall(raw)
            kind, records = frames.receive(conn)
        reply = TrainReply.decode(records, {})
        assert kind == "reply" and reply.status is Status.ERROR and "bad request frame" in reply.reason
    bad_request = handle(TRAIN, Records(configs={"config": {"digest": "x"}}), _context(**{"worker-socket": str(path)}))
    assert TrainReply.decode(bad_request, {}).status is Status.ERROR
    assert call(path, PING, Records(), timeout_s=10.0) == Records()


@pytest.mark.slow
def test_a_hung_then_dead_worker_gets_an_error_reply_within_the_bound(
        setup: dict[str, Any], worker: tuple[subprocess.Popen[bytes], Path]) -> None:
    process, path = worker
    node_config = {"worker-socket": str(path), "worker-timeout-s": 2.0, "worker-connect-s": 1.0}
    os.kill(process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        hung = TrainReply.decode(handle(TRAIN, setup["request"].encode(), _context(**node_config)), {})
        assert time.monotonic() - started < 6.0
        assert hung.status is Status.ERROR and "did not answer within 2 s" in hung.reason
    finally:
        process.kill()
        process.wait()
    started = time.monotonic()
    dead = TrainReply.decode(handle(TRAIN, setup["request"].encode(), _context(**node_config)), {})
    assert time.monotonic() - started < 4.0
    assert dead.status is Status.ERROR and "no device worker" in dead.reason
    hello = HelloReply.decode(handle(HELLO, HelloRequest(setup["request"].digest).encode(), _context(**node_config)))
    assert hello.has_backbone is False  # it still takes part: the backbone comes with the next request
    with pytest.raises(WorkerUnavailable, match="no device worker at"):
        call(path, PING, Records(), timeout_s=1.0)


@pytest.mark.slow
def test_supervisor_restarts_a_dead_worker_and_stops_it(setup: dict[str, Any]) -> None:
    directory = Path(tempfile.mkdtemp(prefix="fp-s-"))
    path = directory / "worker.sock"
    args = client_cli.parse_args(["--server", "127.0.0.1:1", "--data", str(setup["data"]),
                                  "--cache", str(setup["root"] / "supervised-cache"), "--threads", "1"])
    supervisor = client_cli.Supervisor(client_cli.worker_command(args, path), path, ready_s=300.0)
    try:
        supervisor.start()
        assert supervisor.process is not None
        first = supervisor.process.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 300.0
        while supervisor.restarts == 0 or not supervisor.ready(5.0):
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.5)
        assert supervisor.process.pid != first
    finally:
        supervisor.stop()
    assert supervisor.process is not None and supervisor.process.poll() is not None
    assert not path.exists()  # the worker removed its socket on SIGTERM
    directory.rmdir()


def test_thin_client_app_imports_no_torch_and_no_server_libraries() -> None:
    code = ("import sys, json, clients.app; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:]))))")
    out = subprocess.run([sys.executable, "-c", code, *BANNED, "torch", "timm", "peft", "transformers"],
                         env=child_env({"PYTHONPATH": str(REPO)}), cwd=REPO, check=True, capture_output=True,
                         text=True).stdout
    assert json.loads(out) == []


def test_device_dependencies_leave_out_server_libraries() -> None:
    import tomli

    project = tomli.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\[<>=!~ ]", d)[0].lower() for d in project["dependencies"]}
    assert not names & {"ray", "hydra-core", "matplotlib", "scikit-learn", "mlxtend", "rich"}
    assert all("[simulation]" not in d for d in project["dependencies"])
    server = project["optional-dependencies"]["server"]
    assert any(d.startswith("flwr[simulation]") for d in server) and "fedpetah[server]" in \
        project["optional-dependencies"]["dev"]
