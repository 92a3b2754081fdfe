"""Devices protect themselves from their server, keys stay private, and a resumed run stays consistent."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from clients import cli as client_cli
from clients.device_data import device_task_data
from fedpetah.tasks.folder import MAX_NAME_BYTES, UnsafeNameError
from flower_glue.launch import child_env, free_port, port_is_free, start, stop_tree, wait_for_port
from server import certificates
from server.bundle import REPO
from server.certificates import default_ca_dir, make_node_key, make_tls, server_files


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)




@pytest.fixture
def device(tmp_path: Path) -> Path:
    """``data/digits/{a,b}/*.png`` on the device, and a readable image set outside the data dir."""
    _png(tmp_path / "data" / "digits" / "a" / "0.png", 10)
    _png(tmp_path / "data" / "digits" / "b" / "0.png", 200)
    _png(tmp_path / "outside" / "secret" / "cls" / "private.png", 77)
    (tmp_path / "data" / "escape").symlink_to(tmp_path / "outside" / "secret")
    (tmp_path / "data" / "loop").symlink_to(tmp_path / "data" / "loop")
    return tmp_path / "data"


def test_device_reads_its_own_task(device: Path) -> None:
    data = device_task_data(device, "digits", ["a", "b"], store_size=8, channels=1)
    assert data is not None and data.labels.tolist() == [0, 1]
    assert data.images[0].max().item() == 10 and data.images[1].min().item() == 200


@pytest.mark.parametrize(
    ("task", "classes"),
    [
        ("../outside/secret", ["cls"]),  # relative escape through the task name
        ("digits", ["../../outside/secret/cls"]),  # through a class name
        ("SECRET", ["cls"]),  # an absolute path (filled in below)
        ("..", ["outside"]),
        (".", ["digits"]),
        ("digits", ["a\x00b"]),
        ("digits", ["a\\..\\b"]),
        ("d" * (MAX_NAME_BYTES + 1), ["a"]),
        ("", ["a"]),
        ("escape", ["cls"]),  # a symbolic link leading out of the data dir
        ("loop", ["a"]),  # a symbolic link loop
        ("digits", [3]),  # not a string
    ],
)
def test_device_refuses_names_that_leave_its_data_dir(device: Path, task: str, classes: list[object]) -> None:
    if task == "SECRET":
        task = str(device.parent / "outside" / "secret")
    with pytest.raises(UnsafeNameError) as error:
        device_task_data(device, task, classes, store_size=8, channels=1)  # type: ignore[arg-type]
    assert "private.png" not in str(error.value)


def test_device_reads_no_image_file_that_leads_out_of_its_data_dir_or_is_not_a_file(device: Path) -> None:
    # Arrange: in class a, a link to an image outside the data dir, a link to /dev/zero and a FIFO (reading either
    # could hang); in class b, a link to another image inside the data dir (allowed)
    outside = device.parent / "outside" / "secret" / "cls" / "private.png"
    (device / "digits" / "a" / "1.png").symlink_to(outside)
    (device / "digits" / "a" / "2.png").symlink_to("/dev/zero")
    os.mkfifo(device / "digits" / "a" / "3.png")
    (device / "digits" / "b" / "1.png").symlink_to(device / "digits" / "b" / "0.png")

    # Act
    data = device_task_data(device, "digits", ["a", "b"], store_size=8, channels=1)

    # Assert: class a is its own image only (no 77 from outside), class b its image twice; fedpetah-client's
    # start-up summary counts the same files, and no task or class reached through a link out of the data dir
    assert data is not None and data.labels.tolist() == [0, 1, 1]
    assert data.images[0].unique().tolist() == [10] and data.images[1:].unique().tolist() == [200]
    assert client_cli.scan_data(device) == {"digits": {"a": 1, "b": 2}}


def test_flower_processes_inherit_no_flwr_variable_that_opens_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: a shell or unit that sets Flower's internal switches (the first starts the SuperLink's gRPC
    # Control API outside the proxy), beside ones we keep
    for name in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API", "FLWR_OIDC_ENABLED"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("FLWR_HOME", "/var/lib/fedpetah/flwr")
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")

    # Act
    env = child_env({"FLWR_DISABLE_UPDATE_CHECK": "1"})

    # Assert
    assert {k: v for k, v in env.items() if k.startswith("FLWR_")} == {
        "FLWR_HOME": "/var/lib/fedpetah/flwr", "FLWR_LOG_LEVEL": "DEBUG", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _acquire_as(uid: int | None, url: str) -> int:
    """The HTTP status of an empty AcquireTask request to ``url`` from a forked process running as ``uid``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, ask, report the status, exit without running pytest's cleanup
        status = -1
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            request = urllib.request.Request(url + "/v1/runtime/acquire-task", data=b"", method="POST",
                                             headers={"content-type": "application/protobuf"})
            try:
                status = urllib.request.urlopen(request, timeout=20).status
            except urllib.error.HTTPError as error:
                status = error.code
        finally:
            os.write(write, str(status).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        status = int(answer.read() or "-1")
    os.waitpid(pid, 0)
    return status


def test_another_local_user_cannot_take_the_devices_tasks(device: Path, tmp_path: Path) -> None:
    # Arrange: fedpetah-client (no worker: the app API does not depend on it) for a "server" that accepts TCP and
    # closes, so the SuperNode keeps retrying while its local app API is up
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def refuse() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                listener.accept()[0].close()

    threading.Thread(target=refuse, daemon=True).start()
    port = free_port()
    client = start([sys.executable, "-m", "clients.cli", "--server", f"127.0.0.1:{listener.getsockname()[1]}",
                    "--insecure", "--data", str(device), "--cache", str(tmp_path / "cache"), "--no-worker",
                    "--runtime-port", str(port), "--retries", "0"], child_env({"PYTHONPATH": str(REPO),
                    "FLWR_HOME": str(tmp_path / "flwr")}), tmp_path / "client.log")
    try:
        assert wait_for_port("127.0.0.1", port, client, 120.0), (tmp_path / "client.log").read_text()[-3000:]

        # Act: ask for the device's next task as uid 65534 (as ourselves where we cannot change uid)
        asked = _acquire_as(65534 if os.getuid() == 0 else None, f"http://127.0.0.1:{port}")
        runners = [p.cmdline() for p in psutil.Process(client.pid).children(recursive=True)
                   if "clients.superexec" in " ".join(p.cmdline())]
    finally:
        stop_tree(client)
        stop.set()
        listener.close()

    # Assert: refused (401, no signature with the secret); our own SuperExec runs, with the secret file
    assert asked == 401
    assert len(runners) == 1 and "--superexec-auth-secret-file" in runners[0]
    assert port_is_free("127.0.0.1", port)


def test_a_client_app_gets_its_task_token_in_an_owner_only_file_not_on_its_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec

    from clients.superexec import TokenFileExecutor

    # Arrange: a task for a ClientApp whose app API is closed (it keeps retrying, so it stays to be looked at)
    token = "5e" * 32
    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address=f"127.0.0.1:{free_port()}", token=token,
                         insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                         parent_pid=os.getpid(), suppress_output=True, task_id=1)
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("PATH", child_env()["PATH"])  # Flower starts flwr-clientapp by name, as our SuperExec does

    # Act
    TokenFileExecutor(directory).launch(spec)
    apps = [p for p in psutil.Process().children() if "flwr-clientapp" in " ".join(p.cmdline())]
    commands = [p.cmdline() for p in apps]
    for app in apps:
        app.kill()
    psutil.wait_procs(apps, timeout=10)

    # Assert: the token is in no command line, only in a 0600 file the app was pointed at
    [command] = commands
    [file] = directory.glob("token-*")
    assert not any(token in part for part in command) and command[command.index("--token-file") + 1] == str(file)
    assert file.read_text() == token and stat.S_IMODE(file.stat().st_mode) == 0o600


def test_client_refuses_insecure_for_a_remote_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _png(tmp_path / "data" / "task" / "a" / "0.png", 1)
    for server in ("192.168.1.10:8000", "fl.lab.example:8000", "[2001:db8::1]:8000"):
        code = client_cli.main(["--server", server, "--data", str(tmp_path / "data"), "--insecure", "--check"])
        assert code == client_cli.EXIT_USAGE
        assert "--insecure only for a server on this machine" in capsys.readouterr().err


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_owner_only_even_when_forced_over_a_readable_file(tmp_path: Path) -> None:
    private, public = make_node_key(tmp_path / "node")
    before = private.read_bytes()
    private.chmod(0o644)
    assert certificates.main(["node-key", str(private), "--force"]) == 0
    assert _mode(private) == 0o600 and private.read_bytes() != before and _mode(public) == 0o644

    certs = tmp_path / "certs"
    make_tls(certs, ["127.0.0.1"])
    (certs / "server.key").chmod(0o644)
    ca_pem = (certs / "ca.pem").read_bytes()
    assert certificates.main(["tls", str(certs), "--force", "--host", "127.0.0.1"]) == 0
    assert _mode(certs / "server.key") == 0o600 and _mode(default_ca_dir(certs) / "ca.key") == 0o600
    assert (certs / "ca.pem").read_bytes() == ca_pem  # --force: a new server certificate from the same CA
    server_files(certs)
    assert not [p.name for p in tmp_path.rglob(".tmp-*")]


def test_ca_key_is_kept_out_of_the_certs_dir_and_used_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs, offline = tmp_path / "state" / "certs", tmp_path / "usb-stick"
    assert certificates.main(["tls", str(certs), "--host", "fl.lab.example"]) == 0
    assert sorted(p.name for p in certs.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    ca_dir = default_ca_dir(certs)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem"] and _mode(ca_dir) == 0o700
    assert "keep" in capsys.readouterr().out

    # The operator takes the CA offline; renewing without it fails clearly, with it (--ca-dir) succeeds
    ca_dir.rename(offline)
    old_cert = (certs / "server.pem").read_bytes()
    assert certificates.main(["tls", str(certs), "--force", "--host", "fl.lab.example"]) == 2
    assert "pass --ca-dir" in capsys.readouterr().err
    assert certificates.main(["tls", str(certs), "--ca-dir", str(offline), "--force", "--host", "x.example"]) == 0
    assert (certs / "server.pem").read_bytes() != old_cert and not (certs / "ca.key").exists()
    server_files(certs)

    # A CA key left in the certs dir by an older version is refused by the server, then moved by `tls`
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("ca.pem", "server.pem", "server.key"):
        (legacy / name).write_bytes((certs / name).read_bytes())
    (legacy / "ca.key").write_bytes((offline / "ca.key").read_bytes())
    with pytest.raises(ValueError, match="must not be where the running server reads"):
        server_files(legacy)
    assert certificates.main(["tls", str(legacy)]) == 0
    assert not (legacy / "ca.key").exists() and (default_ca_dir(legacy) / "ca.key").is_file()
    server_files(legacy)


def _experiment(output: Path, resume: bool, img_size: int = 32):  # type: ignore[no-untyped-def]
    from fedpetah.adapters import adapter_config
    from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig
    from fedpetah.experiment import ExperimentConfig
    from fedpetah.tasks import TaskStreamConfig

    return ExperimentConfig(
        clients=2, rounds_per_task=2, output_dir=str(output), resume=resume, evaluate_every_round=False,
        backbone=BackboneConfig(name="test_efficientvit", img_size=img_size, weights="random"),
        pruning=PruningConfig(ratio=0.0), adapter=adapter_config("lora", rank=2),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=1),
        train=TrainConfig(epochs=1, batch_size=32, max_steps=1, loss="cross_entropy"),
    )


def test_resume_keeps_one_row_per_committed_round_and_refuses_another_backbone(
    tmp_path: Path, cache_dir: Path
) -> None:
    from fedpetah.bank import BankError
    from fedpetah.serving.continual import ContinualServer
    from fedpetah.serving.metrics import RoundRecord

    run = tmp_path / "run"
    # Prepare: round 1 committed; round 2 logged, then the server is killed before the bank commit
    server = ContinualServer(_experiment(run, resume=False), run, cache_dir)
    plan = next(server.schedule())
    server.complete_round(plan, server.global_state(plan.task), [], 0, 0, time.perf_counter())
    server.log.log(RoundRecord(round=2, task=0, accuracy={0: 0.5}))
    server.log.close()
    digest = server.digest

    # Execute: resume with the same settings and finish; then try to resume on another backbone
    resumed = ContinualServer(_experiment(run, resume=True), run, cache_dir)
    [plan] = list(resumed.schedule())
    assert plan.round == 2
    resumed.complete_round(plan, resumed.global_state(plan.task), [], 0, 0, time.perf_counter())
    resumed.log.close()
    with pytest.raises(BankError) as error:
        ContinualServer(_experiment(run, resume=True, img_size=64), run, cache_dir)

    # Assert: each committed round has exactly one row, and the refusal names both digests
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[1]["extra"]["round_in_task"] == 2.0  # the re-run round's row, not the uncommitted one
    message = str(error.value)
    assert digest in message and "this run's backbone is" in message
    other = message.rsplit("this run's backbone is ", 1)[1].split(":")[0]
    assert len(other) == 64 and other != digest
