"""The SuperLink's memory under a stranger's flood through the devices' proxy, on loopback.

A SuperLink (TLS, node authentication, SQLite state, as fedpetah-server starts it) on 127.0.0.1 behind the nginx
proxy that server/proxy.py generates on 127.0.0.2, one registered device key, and a stranger on 127.0.0.3 who sends
bounded loops (a request count and a deadline per scenario) of:

- ``large_unsigned``: 60 MiB PushObjectRequests without any key (the issue's repro);
- ``chunk_unsigned``: PushObjectRequests of one array chunk (5 MiB) without any key;
- ``chunk_known_key``: the same, naming a registered device's public key (which is not secret) but unsigned;
- ``chunk_forged``: the same, naming that key with a fresh flwr-timestamp signed by the stranger's own key;
- ``small``: empty pull-messages requests on keep-alive connections, as fast as they are answered.

Each scenario runs on a fresh SuperLink + proxy; the SuperLink's resident memory is sampled every 0.1 s from before
the flood until 10 s after it. ``--before REV`` runs the same scenarios behind the proxy of commit REV
(``git show REV:server/proxy.py``, loaded as a module) too. The proxy's signature check (server/keycheck.py, since
it exists) runs beside nginx as fedpetah-server runs it.

    python benchmarks/flood.py --before 6d1fd9f
    python benchmarks/flood.py --scenarios small --quick

Writes benchmarks/results/flood.json and flood.md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import inspect
import json
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from flwr.proto.message_pb2 import PushObjectRequest  # noqa: E402
from flwr.proto.node_pb2 import Node  # noqa: E402
from flwr.supercore.date import now  # noqa: E402
from flwr.supercore.primitives.asymmetric import sign_message  # noqa: E402

from flower_glue.launch import child_env, executable, free_port, start, stop_tree, wait_for_port  # noqa: E402
from server import proxy as current_proxy  # noqa: E402
from server.certificates import make_node_key, make_tls, server_files  # noqa: E402

DEVICES, STRANGER = "127.0.0.2", "127.0.0.3"
TARGET_GROWTH_MB = 100.0  # issue 15: the SuperLink's RSS grows by at most this much under the flood
SETTLE_S = 10.0


@dataclass(frozen=True)
class Scenario:
    name: str
    route: str
    body_bytes: int  # object content per request (0: an empty body)
    requests: int
    threads: int
    key: bool  # the request names the registered device's public key
    forged: bool = False  # and carries a fresh timestamp signed by another key
    deadline_s: float = 120.0


SCENARIOS = {s.name: s for s in [
    Scenario("large_unsigned", "push-object", 60 * 2**20, 8, 2, key=False),
    Scenario("chunk_unsigned", "push-object", 5 * 2**20, 200, 4, key=False),
    Scenario("chunk_known_key", "push-object", 5 * 2**20, 200, 4, key=True),
    Scenario("chunk_forged", "push-object", 5 * 2**20, 200, 4, key=True, forged=True),
    Scenario("small", "pull-messages", 0, 4000, 4, key=False),
]}


def load_proxy(rev: str) -> ModuleType:
    """server/proxy.py as it was at commit ``rev``, as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:server/proxy.py"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="proxy-before-")) / "proxy_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("proxy_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@contextmanager
def stack(root: Path, proxy_module: ModuleType) -> Iterator[tuple[psutil.Process, int, Path, Path]]:
    """SuperLink + proxy on loopback; (SuperLink process, proxy port, ca.pem, the registered key); all stopped."""
    make_tls(root / "certs", [DEVICES])
    key = make_node_key(root / "nodes" / "node")[1]
    certs, port = server_files(root / "certs"), free_port()
    env = child_env({"FLWR_HOME": str(root / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "FLWR_TELEMETRY_ENABLED": "0"})
    link = start([executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--database",
                  str(root / "superlink.db"), "--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert),
                  "--ssl-keyfile", str(certs.key), "--enable-supernode-auth",
                  "--disable-runtime-dependency-installation"], env, root / "superlink.log")
    front = []
    try:
        if not wait_for_port("127.0.0.1", port, link, 60.0):
            raise RuntimeError(f"the SuperLink did not start: {(root / 'superlink.log').read_text()[-2000:]}")
        fields = inspect.signature(proxy_module.FleetProxy).parameters
        extra: dict[str, Any] = {"keys": (key,)} if "keys" in fields else {}
        if "keycheck_port" in fields:
            extra.update(keycheck_port=free_port(), nodes=key.parent)
        proxy = proxy_module.FleetProxy(proxy_module.find_nginx(), (DEVICES, free_port(DEVICES)), port, certs,
                                        root / "proxy", root / "logs" / "proxy.log", **extra)
        if "keycheck_port" in fields:
            front.append(proxy.start_keycheck(timeout=30.0))
        front.append(proxy.start(timeout=30.0))
        yield psutil.Process(link.pid), proxy.listen[1], certs.ca, key
    finally:
        for process in reversed(front):
            stop_tree(process)
        stop_tree(link)


def flood(scenario: Scenario, port: int, ca: Path, key: Path) -> tuple[Counter[str], float]:
    """Send the scenario's requests from the stranger's address; (status or error name: count, seconds)."""
    body = b"" if scenario.body_bytes == 0 else PushObjectRequest(
        node=Node(node_id=1), run_id=1, object_id="0" * 64, object_content=b"\x01" * scenario.body_bytes,
    ).SerializeToString()
    headers = {"Content-Type": "application/protobuf"}
    if scenario.key:
        headers["flwr-public-key"] = current_proxy.flower_key_header(key)
    if scenario.forged:  # valid for 305 s, longer than the deadline
        timestamp = now().isoformat()
        signature = sign_message(ec.generate_private_key(ec.SECP384R1()), timestamp.encode("ascii"))
        headers.update({"flwr-timestamp": timestamp, "flwr-signature": base64.b64encode(signature).decode()})
    context = ssl.create_default_context(cafile=str(ca))
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + scenario.deadline_s

    def loop(count: int) -> None:
        connection: http.client.HTTPSConnection | None = None
        for _ in range(count):
            if time.monotonic() > deadline:
                return
            if connection is None:
                connection = http.client.HTTPSConnection(DEVICES, port, context=context, timeout=60,
                                                         source_address=(STRANGER, 0))
            current = connection
            try:
                current.request("POST", f"/v1/fleet/{scenario.route}", body=body, headers=headers)
                response = current.getresponse()
                response.read()
                outcome = str(response.status)
                if response.will_close:
                    current.close()
                    connection = None
            except (OSError, http.client.HTTPException) as err:
                outcome = type(err).__name__
                current.close()
                connection = None
            with lock:
                outcomes[outcome] += 1
        if connection is not None:
            connection.close()

    share = [scenario.requests // scenario.threads + (i < scenario.requests % scenario.threads)
             for i in range(scenario.threads)]
    threads = [threading.Thread(target=loop, args=(n,)) for n in share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.monotonic() - started


def measure(scenario: Scenario, proxy_module: ModuleType) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp, stack(Path(tmp), proxy_module) as (link, port, ca, key):
        mb = lambda: link.memory_info().rss / 2**20  # noqa: E731
        time.sleep(3.0)
        idle = mb()
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(mb())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            load_before = os.getloadavg()
            outcomes, seconds = flood(scenario, port, ca, key)
            time.sleep(SETTLE_S)
        finally:
            done.set()
            sampler.join()
        settled = mb()
    return {"scenario": scenario.__dict__, "idle_mb": round(idle, 1), "peak_mb": round(max(samples, default=idle), 1),
            "settled_mb": round(settled, 1), "growth_peak_mb": round(max(samples, default=idle) - idle, 1),
            "growth_settled_mb": round(settled - idle, 1), "flood_s": round(seconds, 1),
            "requests_per_s": round(sum(outcomes.values()) / seconds, 1), "outcomes": dict(sorted(outcomes.items())),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# The SuperLink's memory under a stranger's flood (benchmarks/flood.py)", "",
        f"`{report['command']}` at commit {report['commit']} on {report['machine']}; the SuperLink's RSS sampled every "
        f"0.1 s from 3 s before the flood until {SETTLE_S:.0f} s after it, a fresh SuperLink + proxy per row. Target "
        f"(issue 15): growth at most {TARGET_GROWTH_MB:.0f} MB.", "",
        "| proxy | scenario | requests x body | answers | req/s | idle MB | peak growth MB | after 10 s MB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        s = row["scenario"]
        answers = ", ".join(f"{k}: {v}" for k, v in row["outcomes"].items())
        lines.append(f"| {row['proxy']} | {s['name']} | {s['requests']} x {s['body_bytes'] / 2**20:.0f} MiB | "
                     f"{answers} | {row['requests_per_s']} | {row['idle_mb']} | {row['growth_peak_mb']} | "
                     f"{row['growth_settled_mb']:+} | {' '.join(map(str, row['loadavg_after']))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", action="append", default=[],
                        help="also measure the proxy of this commit (repeatable)")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "flood")
    args = parser.parse_args(argv)
    proxies: list[tuple[str, ModuleType]] = []
    for rev in args.before:
        proxies.append((f"before ({rev})", load_proxy(rev)))
    proxies.append(("after (server/proxy.py)", current_proxy))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    rows = []
    for label, module in proxies:
        for name in args.scenarios:
            row = {"proxy": label, **measure(SCENARIOS[name], module)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"command": "python benchmarks/flood.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": commit, "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                                           f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
              "target_growth_mb": TARGET_GROWTH_MB, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
