"""The Fleet-only nginx proxy in front of a real SuperLink: devices' address 127.0.0.2, SuperLink on 127.0.0.1."""

from __future__ import annotations

import http.client
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flower_glue.launch import child_env, executable, free_port, start, stop_tree, wait_for_port
from server.certificates import TlsFiles, make_tls, server_files
from server.proxy import REFUSAL, FleetProxy, ProxyCertificate, ProxyError, ProxyMissing, find_nginx, server_block

DEVICES = "127.0.0.2"


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
    make_tls(root / "certs", [DEVICES])
    certs, port = server_files(root / "certs"), free_port()
    env = child_env({"FLWR_HOME": str(root / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "FLWR_TELEMETRY_ENABLED": "0"})
    link = start([executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--database",
                  ":flwr-in-memory:", "--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert),
                  "--ssl-keyfile", str(certs.key), "--enable-supernode-auth",
                  "--disable-runtime-dependency-installation"], env, root / "superlink.log")
    try:
        assert wait_for_port("127.0.0.1", port, link, 60.0), (root / "superlink.log").read_text()
        yield certs, port
    finally:
        stop_tree(link)


def _proxy(tmp_path: Path, certs: TlsFiles, superlink_port: int, host: str = DEVICES) -> FleetProxy:
    return FleetProxy(require_nginx(), (host, free_port(host)), superlink_port, certs, tmp_path / "proxy",
                      tmp_path / "logs" / "proxy.log")


def _request(host: str, port: int, ca: Path, method: str, path: str) -> tuple[int, str]:
    """One HTTPS request whose request line carries ``path`` exactly as written (no client-side normalisation)."""
    connection = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=str(ca)),
                                             timeout=10)
    try:
        connection.request(method, path, body=b"", headers={"Content-Type": "application/protobuf"})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_only_the_fleet_api_reaches_the_superlink(tmp_path: Path, superlink: tuple[TlsFiles, int]) -> None:
    # Prepare
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port)

    # Execute: requests a stranger could send to the devices' address, and the Control API on loopback
    process = proxy.start(timeout=30.0)
    try:
        inside = _request("127.0.0.1", superlink_port, certs.ca, "POST", "/v1/control/list-runs")
        answers = {(method, path): _request(DEVICES, proxy.listen[1], certs.ca, method, path) for method, path in [
            ("POST", "/v1/fleet/get-run"), ("GET", "/v1/fleet/get-run"), ("POST", "/v1/control/list-runs"),
            ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
            ("POST", "/v1/fleet/../control/list-runs"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
            ("POST", "/v1/control/../fleet/get-run"), ("POST", "//v1/fleet/get-run"), ("POST", "/v1/fleet/get-run?a=b"),
            ("POST", "/v1/runtime/get-nodes"), ("GET", "/health"), ("GET", "/docs"), ("GET", "/openapi.json"),
        ]}
    finally:
        stop_tree(process)

    # Assert: Flower answers the Control API on loopback; through the proxy only the Fleet API reaches Flower
    # (its node authentication refuses this unsigned request), everything else is the proxy's own 403
    assert inside[0] == 200
    fleet = answers.pop(("POST", "/v1/fleet/get-run"))
    assert fleet == (401, '{"detail":"Invalid SuperNode authentication"}'), fleet
    assert answers.pop(("GET", "/v1/fleet/get-run"))[0] == 403  # the Fleet API is POST only
    assert {request: answer for request, answer in answers.items() if answer != (403, REFUSAL + "\n")} == {}
    assert "/v1/control/list-runs" in (tmp_path / "logs" / "proxy-refused.log").read_text()
    assert wait_for_port(DEVICES, proxy.listen[1], None, 0.1) is False  # stopped


def test_a_certificate_that_does_not_name_the_devices_address_is_refused(
    tmp_path: Path, superlink: tuple[TlsFiles, int]
) -> None:
    certs, superlink_port = superlink
    proxy = _proxy(tmp_path, certs, superlink_port, host="127.0.0.3")  # server.pem names 127.0.0.2 only
    with pytest.raises(ProxyCertificate, match="does not verify for 127.0.0.3.*--host 127.0.0.3"):
        proxy.start(timeout=30.0)
    assert wait_for_port("127.0.0.3", proxy.listen[1], None, 0.1) is False  # start stopped it


def test_a_proxy_that_cannot_reach_the_superlink_is_an_error(tmp_path: Path, superlink: tuple[TlsFiles, int]) -> None:
    certs, _ = superlink
    proxy = _proxy(tmp_path, certs, free_port())  # nothing listens there
    with pytest.raises(ProxyError, match="does not reach the SuperLink"):
        proxy.start(timeout=2.0)


def test_missing_nginx_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(ProxyMissing, match="apt-get install nginx-light.*brew install nginx"):
        find_nginx(str(tmp_path / "nginx"))


def test_rendered_config_is_valid_and_keeps_its_files_in_the_prefix(tmp_path: Path) -> None:
    make_tls(tmp_path / "certs", [DEVICES])
    proxy = FleetProxy(require_nginx(), (DEVICES, 8443), 8001, server_files(tmp_path / "certs"), tmp_path / "proxy",
                       tmp_path / "logs" / "proxy.log")
    proxy.write()
    checked = subprocess.run([proxy.nginx, "-t", "-e", "stderr", "-p", str(proxy.prefix), "-c", str(proxy.conf)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    directives = "\n".join(line.partition("#")[0] for line in proxy.render().splitlines())
    paths = [word.strip('";') for word in directives.split() if word.startswith('"/')]
    assert paths and all(Path(p).is_relative_to(tmp_path) for p in paths), paths
    with pytest.raises(ProxyError, match="cannot safely name"):
        server_block((DEVICES, 8443), 8001, tmp_path / "a$b" / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
