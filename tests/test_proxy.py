"""The Fleet-only nginx proxy in front of a real SuperLink: devices' address 127.0.0.2, SuperLink on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import email.message
import http.client
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.proto.run_pb2 import GetRunRequest
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import sign_message
from flwr.supercore.protobuf.client import ProtobufRequestContext
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from loopback import start_superlink

from flower_glue.launch import free_port, stop_tree, wait_for_port
from server import keycheck
from server.certificates import TlsFiles, make_node_key, make_tls, server_files
from server.proxy import (
    BURST,
    KEYLESS_BURST,
    REFUSAL,
    REFUSED,
    UNREGISTERED,
    FleetProxy,
    ProxyCertificate,
    ProxyError,
    ProxyMissing,
    find_nginx,
    flower_key_header,
    server_block,
)

DEVICES = "127.0.0.2"
STRANGER = "127.0.0.3"  # the address a stranger's requests come from (devices' requests come from 127.0.0.1)
CHUNK = 5 * 2**20  # Flower's FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE: the largest array piece a SuperNode pushes
FLOWER_REFUSAL = '{"detail":"Invalid SuperNode authentication"}'  # Flower's own 401: the request reached it


def require_nginx() -> str:
    """nginx, or a test failure that says what to install (CI installs it in .ci/run)."""
    try:
        return find_nginx()
    except ProxyMissing as err:
        pytest.fail(f"this test needs nginx: {err}")


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsFiles, int]]:
    """A SuperLink with TLS and node authentication on 127.0.0.1 (in-memory state); its certificate names 127.0.0.2."""
    root = tmp_path_factory.mktemp("superlink")
    link, certs, port = start_superlink(root, DEVICES, ":flwr-in-memory:")
    try:
        assert wait_for_port("127.0.0.1", port, link, 60.0), (root / "superlink.log").read_text()
        yield certs, port
    finally:
        stop_tree(link)


def superlink_log(certs: TlsFiles) -> Path:
    """The fixture SuperLink's log (beside its certs/): uvicorn writes an access line for every request it answers
    (Flower hides only successful routine ones, flwr/supercore/http_logging.py; every one here is refused)."""
    return certs.ca.parent.parent / "superlink.log"


def received(certs: TlsFiles, source: str, route: str) -> int:
    """How many ``route`` requests from ``source`` (nginx forwards the client's address) the SuperLink received."""
    return superlink_log(certs).read_text(errors="replace").count(f'{source}:0 - "POST /v1/fleet/{route} ')


def push_object(content: int) -> bytes:
    """A PushObjectRequest body carrying ``content`` bytes of object, as a SuperNode sends for one array chunk."""
    return PushObjectRequest(node=Node(node_id=1), run_id=1, object_id="0" * 64,
                             object_content=b"\x01" * content).SerializeToString()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registered devices' keys dir (STATE/nodes): one device, ``node`` (private) and ``node.pub``."""
    directory = tmp_path_factory.mktemp("nodes")
    make_node_key(directory / "node")
    return directory


@pytest.fixture(scope="module")
def node_key(nodes: Path) -> Path:
    """A registered device's public key (requests signed with its private key reach Flower)."""
    return nodes / "node.pub"


@pytest.fixture(scope="module")
def keycheck_port(tmp_path_factory: pytest.TempPathFactory, nodes: Path) -> Iterator[int]:
    """The proxy's signature check for ``nodes``, started as fedpetah-server starts it; its port on 127.0.0.1."""
    root = tmp_path_factory.mktemp("keycheck")
    port = free_port()
    process = FleetProxy("nginx", (DEVICES, 0), 0, TlsFiles(root, root, root), root, root / "logs" / "proxy.log",
                         port, nodes).start_keycheck(timeout=30.0)
    try:
        yield port
    finally:
        stop_tree(process)


def _proxy(tmp_path: Path, certs: TlsFiles, superlink_port: int, keycheck_port: int, nodes: Path,
           host: str = DEVICES) -> FleetProxy:
    return FleetProxy(require_nginx(), (host, free_port(host)), superlink_port, certs, tmp_path / "proxy",
                      tmp_path / "logs" / "proxy.log", keycheck_port, nodes)


def flower_signed(private_key: Path) -> dict[str, str]:
    """The headers Flower's own SuperNode (its NodeAuthHttpInterceptor) adds to a Fleet request signed now with this
    OpenSSH private key: flwr-public-key, flwr-timestamp, flwr-signature."""
    key = serialization.load_ssh_private_key(private_key.read_bytes(), password=None)
    request = httpx.Request("POST", "https://superlink/v1/fleet/get-run")
    NodeAuthHttpInterceptor(key, key.public_key()).intercept(
        ProtobufRequestContext("GetRun", GetRunRequest(), request), lambda context: httpx.Response(200))
    return {name: request.headers[name] for name in keycheck.HEADERS}


def _request(host: str, port: int, ca: Path, method: str, path: str, body: bytes = b"", key: Path | None = None,
             source: str = STRANGER, signed: dict[str, str] | None = None) -> tuple[int, str]:
    """One HTTPS request from ``source`` whose request line carries ``path`` exactly as written (no client-side
    normalisation); ``key``: it names that node key (as a SuperNode does) but carries no signature; ``signed``:
    these authentication headers (:func:`flower_signed`)."""
    connection = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=str(ca)),
                                             timeout=30, source_address=(source, 0))
    headers = {"Content-Type": "application/protobuf", **(signed or {})}
    if key is not None:
        headers["flwr-public-key"] = flower_key_header(key)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_only_the_fleet_api_reaches_the_superlink(tmp_path: Path, superlink: tuple[TlsFiles, int],
                                                  keycheck_port: int, nodes: Path, node_key: Path) -> None:
    # Prepare
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, keycheck_port, nodes)

    # Execute: requests a stranger could send to the devices' address, and the Control API on loopback
    process = proxy.start(timeout=30.0)
    try:
        inside = _request("127.0.0.1", superlink_port, certs.ca, "POST", "/v1/control/list-runs")
        named = _request(DEVICES, proxy.listen[1], certs.ca, "POST", "/v1/fleet/get-run", key=node_key)
        keyless = _request(DEVICES, proxy.listen[1], certs.ca, "POST", "/v1/fleet/activate-node")
        answers = {(method, path): _request(DEVICES, proxy.listen[1], certs.ca, method, path) for method, path in [
            ("POST", "/v1/fleet/get-run"), ("GET", "/v1/fleet/get-run"), ("POST", "/v1/control/list-runs"),
            ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
            ("POST", "/v1/fleet/../control/list-runs"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
            ("POST", "/v1/control/../fleet/get-run"), ("POST", "//v1/fleet/get-run"), ("POST", "/v1/fleet/get-run?a=b"),
            ("POST", "/v1/runtime/get-nodes"), ("GET", "/health"), ("GET", "/docs"), ("GET", "/openapi.json"),
        ]}
    finally:
        stop_tree(process)

    # Assert: Flower answers the Control API on loopback; through the proxy only signed Fleet requests (or the
    # keyless activate-node, which Flower's node authentication refuses unsigned) reach Flower; an unsigned Fleet
    # request is the proxy's 401, everything else the proxy's own 403
    assert inside[0] == 200
    assert keyless == (401, FLOWER_REFUSAL), keyless
    assert named == (401, f"{REFUSED}0 flwr-timestamp headers, not one: a SuperNode signs every Fleet request\n")
    assert answers.pop(("POST", "/v1/fleet/get-run")) == (401, f"{REFUSED}0 flwr-public-key headers, not one: a "
                                                               "SuperNode signs every Fleet request\n")
    assert answers.pop(("GET", "/v1/fleet/get-run"))[0] == 403  # the Fleet API is POST only
    assert {request: answer for request, answer in answers.items() if answer != (403, REFUSAL + "\n")} == {}
    assert "/v1/control/list-runs" in (tmp_path / "logs" / "proxy-refused.log").read_text()
    assert wait_for_port(DEVICES, proxy.listen[1], None, 0.1) is False  # stopped


def test_a_certificate_that_does_not_name_the_devices_address_is_refused(
    tmp_path: Path, superlink: tuple[TlsFiles, int], keycheck_port: int, nodes: Path
) -> None:
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, keycheck_port, nodes, host="127.0.0.3")  # server.pem: 127.0.0.2
    with pytest.raises(ProxyCertificate, match="does not verify for 127.0.0.3.*--host 127.0.0.3"):
        proxy.start(timeout=30.0)
    assert wait_for_port("127.0.0.3", proxy.listen[1], None, 0.1) is False  # start stopped it


def test_a_proxy_that_cannot_reach_the_superlink_is_an_error(tmp_path: Path, superlink: tuple[TlsFiles, int],
                                                             keycheck_port: int, nodes: Path) -> None:
    certs, _ = superlink
    proxy = _proxy(tmp_path, certs, free_port(), keycheck_port, nodes)  # nothing listens there
    with pytest.raises(ProxyError, match="does not reach the SuperLink"):
        proxy.start(timeout=2.0)


def test_a_proxy_whose_signature_check_does_not_answer_is_an_error(tmp_path: Path, superlink: tuple[TlsFiles, int],
                                                                   nodes: Path) -> None:
    # Prepare: nothing listens on the signature check's port
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, free_port(), nodes)

    # Execute / Assert: the start-up check fails, and meanwhile a device's request was a 503 (which it retries)
    with pytest.raises(ProxyError, match="signature check on 127.0.0.1:[0-9]+ does not answer .HTTP 503"):
        proxy.start(timeout=2.0)


def test_missing_nginx_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(ProxyMissing, match="apt-get install nginx-light.*brew install nginx"):
        find_nginx(str(tmp_path / "nginx"))


def test_rendered_config_is_valid_and_keeps_its_files_in_the_prefix(tmp_path: Path) -> None:
    make_tls(tmp_path / "certs", [DEVICES])
    proxy = FleetProxy(require_nginx(), (DEVICES, 8443), 8001, server_files(tmp_path / "certs"), tmp_path / "proxy",
                       tmp_path / "logs" / "proxy.log", 8002, tmp_path / "nodes")
    proxy.write()
    checked = subprocess.run([proxy.nginx, "-t", "-e", "stderr", "-p", str(proxy.prefix), "-c", str(proxy.conf)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    directives = "\n".join(line.partition("#")[0] for line in proxy.render().splitlines())
    paths = [word.strip('";') for word in directives.split() if word.startswith('"/')]
    assert paths and all(Path(p).is_relative_to(tmp_path) for p in paths), paths
    with pytest.raises(ProxyError, match="cannot safely name"):
        server_block((DEVICES, 8443), 8001, tmp_path / "a$b" / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem", 8002)


def test_bodies_larger_than_flower_sends_are_refused_by_nginx(tmp_path: Path, superlink: tuple[TlsFiles, int],
                                                              keycheck_port: int, nodes: Path) -> None:
    # Prepare: bodies above each route's cap, and a whole array chunk, signed by a registered key (so only the size
    # decides)
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, keycheck_port, nodes)
    chunk = push_object(CHUNK + 64)
    sizes = {("push-object", len(chunk)): 401, ("push-object", 6 * 2**20 + 1): 413,
             ("push-messages", 2**20 + 1): 413, ("pull-messages", 64 * 2**10 + 1): 413,
             ("send-node-heartbeat", 2**20): 413, ("activate-node", 64 * 2**10 + 1): 413}

    # Execute
    process = proxy.start(timeout=30.0)
    try:
        answers = {(route, size): _request(DEVICES, proxy.listen[1], certs.ca, "POST", f"/v1/fleet/{route}",
                                           body=chunk if size == len(chunk) else b"\x00" * size,
                                           signed=flower_signed(nodes / "node"))
                   for route, size in sizes}
    finally:
        stop_tree(process)

    # Assert: a 5 MiB array chunk still reaches Flower (its 401: this node id is not the key's); larger bodies are
    # nginx's 413
    assert {request: status for request, (status, _) in answers.items()} == sizes, answers
    assert answers["push-object", len(chunk)][1] == FLOWER_REFUSAL
    assert all("Request Entity Too Large" in body for (status, body) in answers.values() if status == 413)


def test_a_burst_beyond_the_limit_from_one_address_is_refused_with_503(
    tmp_path: Path, superlink: tuple[TlsFiles, int], keycheck_port: int, nodes: Path, node_key: Path
) -> None:
    # Prepare: one keep-alive connection per thread from the stranger's address, empty bodies naming a registered
    # key (the signature check refuses each: no signature); a device's address polls at an honest rate meanwhile
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, keycheck_port, nodes)
    context = ssl.create_default_context(cafile=str(certs.ca))
    headers = {"Content-Type": "application/protobuf", "flwr-public-key": flower_key_header(node_key)}

    def burst(count: int, source: str, pause: float) -> list[int]:
        connection = http.client.HTTPSConnection(DEVICES, proxy.listen[1], context=context, timeout=30,
                                                 source_address=(source, 0))
        statuses = []
        try:
            for _ in range(count):
                connection.request("POST", "/v1/fleet/pull-messages", body=b"", headers=headers)
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
                time.sleep(pause)
        finally:
            connection.close()
        return statuses

    # Execute
    process = proxy.start(timeout=30.0)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            floods = [pool.submit(burst, BURST // 2, STRANGER, 0.0) for _ in range(4)]
            honest = pool.submit(burst, 10, "127.0.0.4", 0.3)
            flood = [status for future in floods for status in future.result()]
            polls = honest.result()
        elapsed = time.monotonic() - started
    finally:
        stop_tree(process)

    # Assert: the stranger's requests beyond the burst (plus 20 per second of refill) are nginx's 503 (which a
    # SuperNode retries); every other one reached the signature check; the honest address was never limited
    assert set(flood) <= {401, 503}, set(flood)
    assert BURST <= flood.count(401) <= BURST + 20 * elapsed + 4, (flood.count(401), elapsed)
    assert flood.count(503) > 0 and polls == [401] * 10, (flood.count(503), polls)


def test_activations_without_a_registered_key_are_limited_harder(tmp_path: Path, superlink: tuple[TlsFiles, int],
                                                                 keycheck_port: int, nodes: Path) -> None:
    # Prepare: activate-node passes without a registered key (Flower refuses an unknown one, and logs it)
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, keycheck_port, nodes)

    # Execute
    process = proxy.start(timeout=30.0)  # its start-up check activates once from 127.0.0.1
    try:
        statuses = [_request(DEVICES, proxy.listen[1], certs.ca, "POST", "/v1/fleet/activate-node")[0]
                    for _ in range(KEYLESS_BURST + 5)]
        device = _request(DEVICES, proxy.listen[1], certs.ca, "POST", "/v1/fleet/activate-node", source="127.0.0.4")
    finally:
        stop_tree(process)

    # Assert: the burst (plus at most one refill) reaches Flower, the rest is nginx's 503; other addresses pass
    assert set(statuses) == {401, 503} and KEYLESS_BURST <= statuses.count(401) <= KEYLESS_BURST + 2, statuses
    assert device[0] == 401, device


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run nginx's workers as another user")
def test_as_root_the_workers_do_not_run_as_root(tmp_path: Path, superlink: tuple[TlsFiles, int],
                                                keycheck_port: int, nodes: Path) -> None:
    # Prepare: the proxy's files in an owner-only (0700) dir, as a state dir under /root would be
    certs, superlink_port = superlink
    tmp_path.chmod(0o700)
    proxy = _proxy(tmp_path, certs, superlink_port, keycheck_port, nodes)

    # Execute: the workers forward a whole array chunk (nothing of the prefix is theirs to read or write)
    process = proxy.start(timeout=30.0)
    try:
        workers = [child for child in psutil.Process(process.pid).children() if "worker" in " ".join(child.cmdline())]
        uids = {worker.uids().effective for worker in workers}
        pushed = _request(DEVICES, proxy.listen[1], certs.ca, "POST", "/v1/fleet/push-object",
                          body=push_object(CHUNK + 64), signed=flower_signed(nodes / "node"))
    finally:
        stop_tree(process)

    # Assert
    assert workers and 0 not in uids, uids
    assert pushed == (401, FLOWER_REFUSAL), pushed


def test_requests_not_signed_by_a_registered_key_never_reach_the_superlink(
    tmp_path: Path, superlink: tuple[TlsFiles, int], keycheck_port: int, nodes: Path, node_key: Path
) -> None:
    # Prepare: 5 MiB array chunks from an address of their own, each naming the registered device's public key
    # (which is not secret) with a missing, forged or stale signature; one signed by an unregistered key; and one
    # signed now by the registered key with Flower's own SuperNode code
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, keycheck_port, nodes)
    source = "127.0.0.5"
    device = serialization.load_ssh_private_key((nodes / "node").read_bytes(), password=None)
    stranger = make_node_key(tmp_path / "stranger")[0]
    honest = flower_signed(nodes / "node")
    forged = {**flower_signed(stranger), "flwr-public-key": honest["flwr-public-key"]}
    stale = (now() - datetime.timedelta(seconds=400)).isoformat()
    ahead = (now() + datetime.timedelta(seconds=60)).isoformat()
    signed_at = {when: {**honest, "flwr-timestamp": when,
                        "flwr-signature": base64.b64encode(sign_message(device, when.encode())).decode()}
                 for when in (stale, ahead)}
    attempts = {
        "key only": {"flwr-public-key": honest["flwr-public-key"]},
        "forged": forged,
        "garbage": {**honest, "flwr-signature": base64.b64encode(b"\x30" * 100).decode()},
        "not base64": {**honest, "flwr-signature": honest["flwr-signature"] + "!"},
        "naive time": {**honest, "flwr-timestamp": honest["flwr-timestamp"].replace("+00:00", "")},
        "stale": signed_at[stale],
        "ahead": signed_at[ahead],
        "unregistered": flower_signed(stranger),
    }
    body = push_object(CHUNK)

    # Execute
    process = proxy.start(timeout=30.0)
    try:
        refused = {name: _request(DEVICES, proxy.listen[1], certs.ca, "POST", "/v1/fleet/push-object", body=body,
                                  source=source, signed=headers) for name, headers in attempts.items()}
        before = received(certs, source, "push-object")
        passed = _request(DEVICES, proxy.listen[1], certs.ca, "POST", "/v1/fleet/push-object", body=body,
                          source=source, signed=flower_signed(nodes / "node"))
        deadline = time.monotonic() + 5.0
        while received(certs, source, "push-object") == before and time.monotonic() < deadline:
            time.sleep(0.1)  # uvicorn logs the request right after answering it
        after = received(certs, source, "push-object")
    finally:
        stop_tree(process)

    # Assert: nginx refused each with the signature check's reason before forwarding a byte (the SuperLink's access
    # log has none of them); the request Flower's SuperNode signs reached Flower (whose 401 says the node id in
    # this made-up body is not that key's)
    reasons = {name: body.removeprefix(REFUSED) for name, (status, body) in refused.items()
               if status == 401 and body.startswith(REFUSED)}
    assert reasons.keys() == attempts.keys(), refused
    assert "not this key's signature" in reasons["forged"] and "not this key's signature" in reasons["garbage"]
    assert reasons["stale"] == reasons["ahead"] == keycheck.STALE + "\n"
    assert reasons["unregistered"] == keycheck.UNREGISTERED + "\n"
    assert "malformed" in reasons["not base64"] and "malformed" in reasons["naive time"], reasons
    assert before == 0 and passed == (401, FLOWER_REFUSAL) and after == 1, (before, passed, after)


def test_a_key_added_to_nodes_while_running_passes_and_a_removed_one_is_refused(
    tmp_path: Path, superlink: tuple[TlsFiles, int], keycheck_port: int, nodes: Path
) -> None:
    # Prepare: a new device's key pair, not yet in nodes/
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, keycheck_port, nodes)
    private, public = make_node_key(tmp_path / "newcomer")

    def get_run() -> tuple[int, str]:
        return _request(DEVICES, proxy.listen[1], certs.ca, "POST", "/v1/fleet/get-run",
                        signed=flower_signed(private))

    # Execute: before, right after the operator copies the key into nodes/, and right after removing it
    process = proxy.start(timeout=30.0)
    try:
        unknown = get_run()
        shutil.copy(public, nodes / public.name)
        try:
            added = get_run()
        finally:
            (nodes / public.name).unlink()
        removed = get_run()
    finally:
        stop_tree(process)

    # Assert: neither nginx nor the signature check was restarted
    assert unknown == removed == (401, UNREGISTERED + "\n"), (unknown, removed)
    assert added == (401, FLOWER_REFUSAL), added  # Flower's: the key is not registered with the SuperLink yet


def test_the_signature_check_keeps_flowers_window_and_refuses_repeated_headers(nodes: Path) -> None:
    # Prepare: the check's own function on headers as an HTTP server parses them
    keys = keycheck.Keyring(nodes)
    honest = flower_signed(nodes / "node")
    signed = datetime.datetime.fromisoformat(honest["flwr-timestamp"])

    def headers(*pairs: tuple[str, str]) -> email.message.Message:
        message = email.message.Message()
        for name, value in pairs:
            message[name] = value
        return message

    # Execute
    fresh = keycheck.refusal(headers(*honest.items()), keys)
    repeated = keycheck.refusal(headers(*honest.items(), ("flwr-public-key", honest["flwr-public-key"])), keys)
    edges = {age: keycheck.refusal(headers(*honest.items()), keys, at=signed + datetime.timedelta(seconds=age))
             for age in (-5.0, -4.9, 304.9, 305.0)}

    # Assert: Flower's window is -5 s < age < 305 s, both ends open (flwr/superlink/routers/fleet/node_auth.py)
    assert fresh is None
    assert repeated is not None and repeated.startswith("2 flwr-public-key headers"), repeated
    assert edges == {-5.0: keycheck.STALE, -4.9: None, 304.9: None, 305.0: keycheck.STALE}, edges
