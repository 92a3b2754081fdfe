"""fedpetah-server / fedpetah-client on Flower's deployment engine, on loopback only: devices on 127.0.0.2 reach the
SuperLink on 127.0.0.1 through the Fleet-only nginx proxy, TLS from our private CA, registered node keys, a stop and
``--resume`` in the middle of the run; plus the CLIs' error paths."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli
from loopback import Loopback

from clients import cli as client_cli
from flower_glue.launch import free_port, wait_for_port
from server import cli as server_cli
from server.bundle import REPO, compose_experiment, flat_config, stage_app
from server.certificates import make_node_key, make_tls, node_keys, server_files
from server.proxy import REFUSAL, ProxyMissing, find_nginx, probe

OVERRIDES = ["rounds_per_task=1", "tasks.num_tasks=2", "backbone=edgenext_xx_small", "backbone.img_size=32",
             "backbone.weights=random", "pruning=none", "adapter=lora", "partition=iid", "train.epochs=4",
             "train.batch_size=16", "train.max_steps=10", "strategy.fraction=1.0"]
TIMEOUT = 360.0  # a guard, not a measurement: under load ~25 on 2 cores a resume needed 255 s from start to exit


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[Loopback]:
    """Two registered devices and one unregistered; every process stopped and every port freed at the end."""
    try:
        find_nginx()
    except ProxyMissing as err:
        pytest.fail(f"this test needs nginx (the server's Fleet-only proxy): {err}")
    federation = Loopback(tmp_path, devices=3, registered=2)
    try:
        yield federation
    finally:
        assert federation.stop(), f"a port of {federation.ports} is still taken after the test"


def _completed_rounds(run_dir: Path) -> int:
    bank = run_dir / "bank" / "bank.json"
    return int(json.loads(bank.read_text())["metadata"]["run"]["completed_rounds"]) if bank.is_file() else 0


def _exit_code(federation: Loopback, name: str, timeout: float = TIMEOUT) -> int:
    code = federation.wait(name, timeout)
    if code is None:
        pytest.fail(f"{name} still runs after {timeout:.0f} s; its log:\n{federation.log(name)[-4000:]}")
    return code


@pytest.mark.slow
def test_two_devices_tls_node_auth_stop_and_resume(loopback: Loopback) -> None:
    # Prepare: one corrupt image on device 0; devices start before the server (they retry with backoff)
    (loopback.data[0] / "mnist_0_1" / "0" / "broken.png").write_bytes(b"not a png")
    for device in range(2):
        loopback.start_client(device)
    loopback.start_client(2, "--key-retries", "1")  # its refusals must end while round 1 still runs
    server = loopback.start_server("server", [*OVERRIDES, "stop_after=1"])
    ca, control = loopback.state / "certs" / "ca.pem", "/v1/control/list-runs"
    assert wait_for_port(loopback.host, loopback.port, server, TIMEOUT), loopback.log("server")[-4000:]
    refused = probe(loopback.host, loopback.port, ca, control)  # a stranger on the devices' address, mid-run
    inside = probe("127.0.0.1", loopback.superlink_port, ca, control)

    # Execute: the unregistered device is refused; the server stops after round 1 (stop_after: a SIGTERM could
    # land after round 2 on a fast machine), device 1's cached backbone is tampered with, and the server resumes
    assert _exit_code(loopback, "client2") == client_cli.EXIT_NODE_KEY, loopback.log("client2")[-3000:]
    assert loopback.log("client2").count("refused this device's key (not registered yet?); retry") == 1
    deadline = time.monotonic() + TIMEOUT
    while _completed_rounds(loopback.run_dir) < 1:
        assert server.poll() is None or _completed_rounds(loopback.run_dir) >= 1, loopback.log("server")[-4000:]
        assert time.monotonic() < deadline, f"round 1 did not complete:\n{loopback.log('server')[-4000:]}"
        time.sleep(1.0)
    assert _exit_code(loopback, "server", 120) == 0, loopback.log("server")[-4000:]
    [cached] = [p for p in loopback.cache(1).iterdir() if (p / "manifest.json").is_file()]  # not the kept bank/
    weights = (cached / "weights.safetensors").read_bytes()
    (cached / "weights.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    loopback.start_server("resumed", OVERRIDES, "--resume")
    assert _exit_code(loopback, "resumed") == 0, loopback.log("resumed")[-4000:]

    # Assert: the Control API answers on loopback only; both tasks in the bank, above chance, one backbone install
    # per device, the tampered copy refused
    assert refused == (403, REFUSAL + "\n") and inside[0] == 200, (refused, inside)
    assert f"devices connect to {loopback.host}:{loopback.port}" in loopback.log("server")
    from fedpetah.bank import AdapterBank
    from fedpetah.serving.metrics import read_rounds

    run_dir = loopback.run_dir
    bank, rounds = AdapterBank.load(run_dir / "bank"), read_rounds(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert bank.tasks() == [0, 1] and [r.round for r in rounds] == [1, 2]
    assert rounds[1].accuracy[0] > 0.6 and rounds[1].accuracy[1] > 0.6, rounds[1].accuracy
    assert rounds[0].num_clients == 2 and rounds[0].extra["bytes_backbone"] == 2 * summary["backbone_artifact_bytes"]
    assert rounds[1].extra["bytes_backbone"] == 0
    assert rounds[1].extra["bytes_backbone_evaluation"] == summary["backbone_artifact_bytes"]  # device 1 again,
    # with the learned tasks after round 2 (it refused its tampered copy in round 2's training)
    assert summary["bytes_backbone_total"] == rounds[0].extra["bytes_backbone"] + summary["backbone_artifact_bytes"]
    assert rounds[1].num_clients == 1 and rounds[1].extra["status_needs_backbone"] == 1  # device 1 refused its
    # tampered backbone (its worker held a verified copy in memory, and re-verified the changed file)
    for device in range(2):  # every message went through the device worker that fedpetah-client started
        log = loopback.log(f"client{device}")
        assert "device worker ready on" in log and log.count("answered train") >= 2  # rounds 1 and 2 (resumed)
    assert (loopback.cache(0) / summary["artifact_digest"] / "manifest.json").is_file()
    assert cached.name == summary["artifact_digest"] and "discarding cache entry" in loopback.log("client1")
    # the bad cache entry was discarded (query.evaluate after the last task may have carried the backbone again)
    assert not cached.exists() or (cached / "weights.safetensors").read_bytes() == weights
    assert "skipped 1 unreadable image" in loopback.log("client0")
    assert "registered node0.pub" in loopback.log("server") and "not reachable" in loopback.log("client0")


def _client(args: list[str], tmp_path: Path) -> int:
    data = tmp_path / "data" / "task" / "a"
    data.mkdir(parents=True, exist_ok=True)
    (data / "x.png").write_bytes(b"")
    return client_cli.main(["--data", str(tmp_path / "data"), "--cache", str(tmp_path / "cache"), *args])


def test_client_refuses_missing_or_empty_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--server", "127.0.0.1:1", "--cache", str(tmp_path / "cache"), "--insecure"]
    assert client_cli.main([*base, "--data", str(tmp_path / "nowhere")]) == client_cli.EXIT_DATA
    (tmp_path / "empty" / "task" / "class").mkdir(parents=True)
    (tmp_path / "empty" / "task" / "class" / "notes.txt").write_text("no images")
    assert client_cli.main([*base, "--data", str(tmp_path / "empty")]) == client_cli.EXIT_DATA
    assert "holds no images" in capsys.readouterr().err


def test_client_bad_certificate_disk_and_key_files(tmp_path: Path) -> None:
    server = ["--server", "127.0.0.1:1"]
    for negative in (["--key-retries", "-1"], ["--retries", "-2"], ["--backoff", "-0.5"]):
        assert _client([*server, "--insecure", *negative], tmp_path) == client_cli.EXIT_USAGE
    assert _client([*server, "--root-certificates", str(tmp_path / "ca.pem")], tmp_path) == client_cli.EXIT_CERTIFICATE
    (tmp_path / "key").write_text("not a key")
    assert _client([*server, "--insecure", "--auth-key", str(tmp_path / "key")], tmp_path) == client_cli.EXIT_NODE_KEY
    assert _client([*server, "--insecure", "--min-free-mb", str(2**40)], tmp_path) == client_cli.EXIT_DISK


def test_client_gives_up_on_unreachable_server_after_bounded_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    started = time.monotonic()
    code = _client(["--server", f"127.0.0.1:{port}", "--insecure", "--retries", "2", "--backoff", "0.05"], tmp_path)
    assert code == client_cli.EXIT_UNREACHABLE and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "retry 2/2" in err and "after 3 attempts" in err


def test_client_rejects_a_certificate_from_another_ca(tmp_path: Path) -> None:
    make_tls(tmp_path / "server", ["127.0.0.1"])
    make_tls(tmp_path / "other", ["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server" / "server.pem", tmp_path / "server" / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()  # the reachability probe
        conn.close()
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        code = _client(["--server", f"127.0.0.1:{port}", "--root-certificates",
                        str(tmp_path / "other" / "ca.pem"), "--check"], tmp_path)
    finally:
        listener.close()
        thread.join(5)
    assert code == client_cli.EXIT_CERTIFICATE


def test_client_image_suffixes_match_the_folder_reader() -> None:
    from fedpetah.tasks.folder import IMAGE_SUFFIXES

    assert client_cli.IMAGE_SUFFIXES == IMAGE_SUFFIXES


def test_client_cache_bounds_are_the_library_defaults() -> None:
    from fedpetah.device.keep import BANK_MAX_BYTES
    from fedpetah.device.local import CACHE_KEEP, CACHE_MAX_BYTES

    assert (client_cli.CACHE_KEEP, client_cli.CACHE_MAX_MB * 2**20) == (CACHE_KEEP, CACHE_MAX_BYTES)
    assert client_cli.BANK_MAX_MB * 2**20 == BANK_MAX_BYTES
    args = client_cli.parse_args(["--server", "h:1", "--data", "d"])
    assert (args.cache_keep, args.cache_max_mb, args.bank_max_mb) == (CACHE_KEEP, CACHE_MAX_BYTES >> 20,
                                                                       BANK_MAX_BYTES >> 20)


def test_certificates_chain_and_node_keys(tmp_path: Path) -> None:
    make_tls(tmp_path / "certs", ["fl.lab.example", "10.0.0.5"])
    files = server_files(tmp_path / "certs")
    context = ssl.create_default_context(cafile=str(files.ca))
    assert context.get_ca_certs()[0]["subject"][0][0][1] == "fedpetah lab CA"
    with pytest.raises(ValueError, match="no device keys"):
        node_keys(tmp_path / "nodes")
    make_node_key(tmp_path / "nodes" / "pi")
    assert [p.name for p in node_keys(tmp_path / "nodes")] == ["pi.pub"]
    make_tls(tmp_path / "other", [])
    (tmp_path / "certs" / "ca.pem").write_bytes((tmp_path / "other" / "ca.pem").read_bytes())
    with pytest.raises(ValueError, match="not signed by"):
        server_files(tmp_path / "certs")


def test_server_refuses_unsafe_or_inconsistent_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path)]
    assert server_cli.main([*state, "clients=2"]) == server_cli.EXIT_TLS  # no certificates yet
    make_tls(tmp_path / "certs", ["127.0.0.1"])
    assert server_cli.main([*state, "clients=2"]) == server_cli.EXIT_NODES  # no device keys yet
    assert server_cli.main([*state, "--insecure", "--host", "0.0.0.0", "clients=2"]) == server_cli.EXIT_TLS
    make_node_key(tmp_path / "nodes" / "pi")
    no_nginx = ["--host", "127.0.0.2", "--nginx", str(tmp_path / "nginx"), "clients=1"]
    assert server_cli.main([*state, *no_nginx]) == server_cli.EXIT_NO_PROXY
    assert "apt-get install nginx-light" in capsys.readouterr().err
    assert server_cli.main([*state, "--expose-control-api", "adapter=nonsense"]) == server_cli.EXIT_CONFIG
    assert "CONTROL API EXPOSED on 0.0.0.0:8000" in capsys.readouterr().err
    exposed_insecure = ["--insecure", "--host", "127.0.0.1", "--expose-control-api", "clients=1"]
    assert server_cli.main([*state, *exposed_insecure]) == server_cli.EXIT_TLS
    assert server_cli.main([*state, "adapter=nonsense"]) == server_cli.EXIT_CONFIG
    run = tmp_path / "run"
    (run / "bank").mkdir(parents=True)
    (run / "bank" / "bank.json").write_text("{}")
    assert server_cli.main([*state, "clients=1"]) == server_cli.EXIT_RUN_DIR  # a previous run, no --resume
    (run / "config.json").write_text(json.dumps({"clients": 2}))
    assert server_cli.main([*state, "--resume", "clients=1"]) == server_cli.EXIT_RUN_DIR  # changed config


def test_app_bundle_carries_the_composed_config(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    config = compose_experiment([*OVERRIDES, f"output_dir={tmp_path / 'run'}"])
    fab = build_fab_from_disk(stage_app(config, tmp_path / "app"))
    staged = tomli.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert staged["tool"]["flwr"]["app"]["config"] == flat_config(config)
    assert len(fab) < 1_000_000


def test_pyproject_app_config_is_the_flattened_default() -> None:
    from flwr.common.config import flatten_dict

    declared = tomli.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert declared["components"] == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
    config = flatten_dict(declared["config"])
    assert config.pop("output_dir") == "outputs/flwr-run"
    expected = flat_config(compose_experiment([]))
    assert config == {k: v for k, v in expected.items() if k != "output_dir"}
