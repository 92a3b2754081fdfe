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

``--with-devices N`` floods a real deployment instead (tests/loopback.py, as the deployment test starts it): a
``fedpetah-server`` run (proxy, TLS, registered node keys; with ``--before REV``, the same server behind REV's proxy)
and N ``fedpetah-client`` devices training the tiny test hybrid at 32 px, one round after another. Once two rounds
are complete and a third has been watched, each scenario floods for ``--flood-s`` seconds (at most its
``sustained`` request count), then 10 s of quiet; two more rounds after the last one. Sampled every 0.2 s: the
SuperLink's and the ServerApp's RSS, and when each round's row reaches metrics.jsonl; afterwards, per scenario, the
rounds that overlapped the flood, their replies aggregated vs sampled and rejections, and the proxy's refusals of
any address but the stranger's (proxy-refused.log). The benchmark stops the server after the last round it needs.

    python benchmarks/flood.py --before dd29534^
    python benchmarks/flood.py --with-devices 2 --before dd29534^

Writes benchmarks/results/flood.json (flood-devices.json with devices) and its section of flood.md.
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
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from flwr.proto.message_pb2 import PushObjectRequest  # noqa: E402
from flwr.proto.node_pb2 import Node  # noqa: E402
from flwr.supercore.date import now  # noqa: E402
from flwr.supercore.primitives.asymmetric import sign_message  # noqa: E402
from loopback import Loopback, start_superlink  # noqa: E402  (tests/loopback.py: the deployment test's harness)

from flower_glue.launch import free_port, stop_tree, wait_for_port  # noqa: E402
from server import proxy as current_proxy  # noqa: E402
from server.certificates import make_node_key, node_keys  # noqa: E402

DEVICES, STRANGER = "127.0.0.2", "127.0.0.3"
TARGET_GROWTH_MB = 100.0  # issue 15: the SuperLink's RSS grows by at most this much under the flood
SETTLE_S = 10.0
# With devices: the deployment test's small experiment on the tiny test hybrid, one task of many rounds (the benchmark
# stops the server once it has what it needs); a reply lost to the flood shows up as a timeout rejection within 60 s.
DEVICE_OVERRIDES = ["tasks.num_tasks=1", "rounds_per_task=200", "backbone.name=test_efficientvit",
                    "backbone.img_size=32", "backbone.weights=random", "pruning=none", "adapter=lora", "partition=iid",
                    "train.epochs=1", "train.batch_size=16", "train.max_steps=4", "strategy.fraction=1.0",
                    "reply_timeout_s=60"]
WARM_ROUNDS, AFTER_ROUNDS, SAMPLE_S = 2, 2, 0.2
PROXY_REV_ENV = "FEDPETAH_FLOOD_PROXY_REV"  # set in the server's environment: serve behind that commit's proxy
REFUSED_LINE = re.compile(r'^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+)[^"]*" (\d{3}) ')


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
    sustained: int = 0  # with devices: the request bound of a flood that lasts --flood-s seconds


SCENARIOS = {s.name: s for s in [
    Scenario("large_unsigned", "push-object", 60 * 2**20, 8, 2, key=False, sustained=16),  # ~1 GB/8 before
    Scenario("chunk_unsigned", "push-object", 5 * 2**20, 200, 4, key=False, sustained=2000),
    Scenario("chunk_known_key", "push-object", 5 * 2**20, 200, 4, key=True, sustained=2000),
    Scenario("chunk_forged", "push-object", 5 * 2**20, 200, 4, key=True, forged=True, sustained=2000),
    Scenario("small", "pull-messages", 0, 4000, 4, key=False, sustained=40000),
]}


def head_commit() -> str:
    """The checkout's short commit id, for a report's provenance ('' outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.strip()


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
    key = make_node_key(root / "nodes" / "node")[1]
    link, certs, port = start_superlink(root, DEVICES, str(root / "superlink.db"))
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


def serve_behind(rev: str, argv: list[str]) -> int:
    """fedpetah-server (server/cli.py as it is) with the proxy of commit ``rev`` in front of the SuperLink."""
    from server import cli

    old, current = load_proxy(rev), cli._proxy

    def proxy(args: argparse.Namespace, state: Path, certs: Any) -> Any:
        made = current(args, state, certs)
        if made is None:
            return None
        fields = inspect.signature(old.FleetProxy).parameters
        extra: dict[str, Any] = {name: getattr(made, name) for name in ("keycheck_port", "nodes") if name in fields}
        if "keys" in fields:
            extra["keys"] = tuple(node_keys(made.nodes))
        missing = {name: getattr(made, name) for name in ("keycheck_port", "nodes") if name not in fields}
        kind = type("FleetProxyBefore", (old.FleetProxy,), missing)  # serve() reads keycheck_port
        return kind(made.nginx, made.listen, made.superlink_port, made.tls, made.prefix, made.log, **extra)

    def start_proxy(proxy: Any, timeout: float, started: list[subprocess.Popen[bytes]]) -> None:
        if hasattr(proxy, "start_keycheck"):
            started.append(proxy.start_keycheck(timeout))
        started.append(proxy.start(timeout))

    cli._proxy, cli._start_proxy = proxy, start_proxy  # type: ignore[assignment]
    return cli.main(argv)


class Watch:
    """Every ``SAMPLE_S``: the wall time, the SuperLink's and the ServerApp's RSS (MB), and each new row of the run's
    metrics.jsonl with the time it was seen (``rounds``)."""

    def __init__(self, link: psutil.Process, app: psutil.Process, metrics: Path) -> None:
        self.link, self.app, self.metrics = link, app, metrics
        self.samples: list[tuple[float, float, float]] = []
        self.rounds: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        try:
            sample = (time.time(), self.link.memory_info().rss / 2**20, self.app.memory_info().rss / 2**20)
        except psutil.Error:
            return
        self.samples.append(sample)
        lines = self.metrics.read_text().split("\n")[:-1] if self.metrics.is_file() else []  # complete rows only
        for line in lines[len(self.rounds):]:
            self.rounds.append({"seen": sample[0], **json.loads(line)})

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._poll()

    def wait_rounds(self, count: int, server: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.rounds) < count:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.rounds)} of {count} rounds complete, the server "
                                   f"{'exited' if server.poll() is not None else 'still runs'}")
            time.sleep(0.5)


def _process(root: psutil.Process, marker: str, timeout: float) -> psutil.Process:
    """The first process of ``root``'s tree whose command line names ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in [root, *root.children(recursive=True)]:
            try:
                if any(part.endswith(marker) for part in process.cmdline()):
                    return process
            except psutil.Error:
                continue
        time.sleep(0.5)
    raise RuntimeError(f"no {marker} process under fedpetah-server")


def refusals(log: Path) -> list[tuple[str, float, str, int]]:
    """(address, wall time, path, status) of every request the proxy refused (proxy-refused.log, nginx's combined
    format, 1 s resolution)."""
    found = []
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        match = REFUSED_LINE.match(line)
        if match:
            at = datetime.strptime(match[2], "%d/%b/%Y:%H:%M:%S %z").timestamp()
            found.append((match[1], at, match[4], int(match[5])))
    return found


def _rounds_in(rounds: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """Rounds whose run (seen minus round time, to seen) overlaps [start, end]."""
    return [r for r in rounds if r["seen"] - r["round_time_s"] <= end and r["seen"] >= start]


def _replies(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    rejections: Counter[str] = Counter()
    for r in rounds:
        rejections.update(r["rejections"])
    return {"rounds": [r["round"] for r in rounds], "aggregated": sum(r["num_clients"] for r in rounds),
            "sampled": int(sum(r["extra"]["sampled"] for r in rounds)), "rejections": dict(rejections),
            "round_s": [round(r["round_time_s"], 1) for r in rounds]}


def _device_refusals(found: list[tuple[str, float, str, int]], start: float, end: float) -> dict[str, int]:
    """'status path' counts of the refusals of any address but the stranger's within [start, end] (whole s)."""
    return dict(Counter(f"{status} {path}" for address, at, path, status in found
                        if address != STRANGER and int(start) <= at <= end))


def with_devices(label: str, rev: str | None, devices: int, names: list[str], flood_s: float,
                 timeout: float) -> dict[str, Any]:
    """One deployment flooded scenario after scenario while its devices train (see the module's docstring)."""
    with tempfile.TemporaryDirectory(prefix="flood-devices-") as tmp, \
            Loopback(Path(tmp), devices=devices, per_class=20, num_tasks=1) as federation:
        load_start = os.getloadavg()
        for device in range(devices):
            federation.start_client(device)
        server = federation.start_server("server", [f"clients={devices}", *DEVICE_OVERRIDES],
                                         module="benchmarks.flood" if rev else "server.cli",
                                         **({PROXY_REV_ENV: rev} if rev else {}))
        root = psutil.Process(server.pid)
        ca, key = federation.state / "certs" / "ca.pem", federation.state / "nodes" / f"{federation.keys[0].name}.pub"
        try:
            link = _process(root, "superlink", 120.0)  # flower-superlink, or python -m server.superlink
            app = _process(root, "flwr-serverapp", timeout)
            with Watch(link, app, federation.run_dir / "metrics.jsonl") as watch:
                watch.wait_rounds(WARM_ROUNDS, server, timeout)  # the backbone installed, the devices warm
                watched = time.time()
                watch.wait_rounds(len(watch.rounds) + 1, server, timeout)  # one whole round before the flood
                rows, windows = [], []
                for name in names:
                    scenario = replace(SCENARIOS[name], requests=SCENARIOS[name].sustained, deadline_s=flood_s)
                    load_before, started = os.getloadavg(), time.time()
                    outcomes, seconds = flood(scenario, federation.port, ca, key)
                    flooded = time.time()
                    time.sleep(SETTLE_S)
                    windows.append((started, flooded, time.time()))
                    rows.append({"scenario": scenario.__dict__, "flood_s": round(seconds, 1),
                                 "requests_per_s": round(sum(outcomes.values()) / seconds, 1),
                                 "outcomes": dict(sorted(outcomes.items())),
                                 "loadavg_before": [round(x, 2) for x in load_before],
                                 "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
                    print(json.dumps({"proxy": label, **rows[-1]}), flush=True)
                quiet = time.time()
                watch.wait_rounds(len(watch.rounds) + AFTER_ROUNDS, server, timeout)
                ended = time.time()
            alive = server.poll() is None
        except RuntimeError as err:
            raise RuntimeError(f"{err}; the server's log:\n{federation.log('server')[-3000:]}") from None
        found = refusals(federation.state / "logs" / "proxy-refused.log")
        answered = [federation.log(f"client{d}").count("answered train") for d in range(devices)]
    before = [s for s in watch.samples if watched <= s[0] < windows[0][0]]
    base_link, base_app = max(s[1] for s in before), max(s[2] for s in before)
    for row, (started, flooded, settled) in zip(rows, windows, strict=True):
        inside = [s for s in watch.samples if started <= s[0] <= settled]
        row.update({
            "link_peak_growth_mb": round(max(s[1] for s in inside) - base_link, 1),
            "link_after_mb": round(inside[-1][1] - base_link, 1),
            "app_peak_growth_mb": round(max(s[2] for s in inside) - base_app, 1),
            "app_after_mb": round(inside[-1][2] - base_app, 1),
            "under_flood": _replies(_rounds_in(watch.rounds, started, flooded)),
            "device_refusals": _device_refusals(found, started, settled),
        })
    return {
        "proxy": label, "devices": devices, "flood_s": flood_s, "settle_s": SETTLE_S,
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "link_before_mb": round(base_link, 1), "app_before_mb": round(base_app, 1),
        "link_final_growth_mb": round(watch.samples[-1][1] - base_link, 1),
        "app_final_growth_mb": round(watch.samples[-1][2] - base_app, 1),
        "server_alive_at_stop": alive, "answered_train": answered,
        "before_flood": _replies([r for r in watch.rounds if r["seen"] < windows[0][0]]),
        "after_flood": _replies([r for r in watch.rounds if r["seen"] > quiet]),
        "all_rounds": _replies(watch.rounds),
        "device_refusals_watched": _device_refusals(found, watched, ended),
        "device_refusals_run": _device_refusals(found, 0.0, ended),
        "rows": rows,
    }


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


DEVICES_HEADING = "## While devices train (--with-devices)"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"


def markdown_devices(report: dict[str, Any]) -> str:
    lines = [
        DEVICES_HEADING, "",
        f"`{report['command']}` at commit {report['commit']} on {report['machine']}: a fedpetah-server run (proxy, "
        f"TLS, registered node keys) and {report['devices']} fedpetah-client devices on loopback (tests/loopback.py) "
        f"training `{' '.join(DEVICE_OVERRIDES)}` round after round; from 127.0.0.3 each scenario floods for "
        f"{report['flood_s']:.0f} s (at most its request bound), then {SETTLE_S:.0f} s of quiet. Growth: RSS above "
        "the process's peak over one whole training round before the first flood (sampled every "
        f"{SAMPLE_S} s). Rounds under flood: rounds that ran at any moment of the scenario's flood; replies: their "
        "devices' replies aggregated / sampled; devices' refusals: the proxy's non-2xx answers to any address but "
        "the stranger's, from the flood until 10 s after it (proxy-refused.log).", "",
        "| proxy | scenario | requests x body | answers | req/s | SuperLink peak growth MB | after 10 s MB | "
        "ServerApp peak growth MB | rounds under flood | replies aggregated / sampled | rejections | devices' "
        "refusals | load after |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        for row in run.get("rows", []):
            s, under = row["scenario"], row["under_flood"]
            lines.append(
                f"| {run['proxy']} | {s['name']} | {sum(row['outcomes'].values())} x "
                f"{s['body_bytes'] / 2**20:.0f} MiB | {_counts(row['outcomes'])} | {row['requests_per_s']} | "
                f"{row['link_peak_growth_mb']} | {row['link_after_mb']:+} | {row['app_peak_growth_mb']} | "
                f"{len(under['rounds'])} ({', '.join(map(str, under['round_s']))} s) | {under['aggregated']} / "
                f"{under['sampled']} | {_counts(under['rejections'])} | {_counts(row['device_refusals'])} | "
                f"{' '.join(map(str, row['loadavg_after']))} |")
    lines += ["", "| proxy | SuperLink / ServerApp before MB | final growth MB | rounds before / after the floods "
              "(aggregated / sampled) | all rounds: rejections | refusals of 127.0.0.1, whole run (the proxy's "
              "start-up check is 403 list-runs, 401 get-run, 401 activate-node) | train answers per "
              "device | load start / end |", "|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        if "failed" in run:
            lines.append(f"| {run['proxy']} | failed: `{run['failed'].splitlines()[0][:300]}` | | | | | | "
                         f"{' '.join(map(str, run['loadavg_end']))} |")
            continue
        b, a = run["before_flood"], run["after_flood"]
        lines.append(
            f"| {run['proxy']} | {run['link_before_mb']} / {run['app_before_mb']} | {run['link_final_growth_mb']:+} / "
            f"{run['app_final_growth_mb']:+} | {len(b['rounds'])} ({b['aggregated']} / {b['sampled']}) / "
            f"{len(a['rounds'])} ({a['aggregated']} / {a['sampled']}) | {_counts(run['all_rounds']['rejections'])} | "
            f"{_counts(run['device_refusals_run'])} | {', '.join(map(str, run['answered_train']))} | "
            f"{' '.join(map(str, run['loadavg_start']))} / {' '.join(map(str, run['loadavg_end']))} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, heading: str | None, text: str) -> None:
    """Replace the section of markdown file ``path`` that starts with line ``heading`` (None: the part before the
    first ``## `` section) by ``text``, keeping the others."""
    parts = re.split(r"(?m)^(?=## )", path.read_text() if path.is_file() else "")
    head, sections = parts[0], {part.splitlines()[0]: part for part in parts[1:]}
    if heading is None:
        head = text
    else:
        sections[heading] = text
    path.write_text(head.rstrip("\n") + "\n" + "".join(f"\n{part.rstrip()}\n" for part in sections.values()))


def main_devices(args: argparse.Namespace, command: str, commit: str, machine: str) -> int:
    runs = []
    for rev in [*args.before, None]:
        label = f"before ({rev})" if rev else "after (server/proxy.py)"
        try:
            runs.append(with_devices(label, rev, args.with_devices, args.scenarios, args.flood_s, args.timeout))
        except RuntimeError as err:
            runs.append({"proxy": label, "failed": str(err)[-3000:],
                         "loadavg_end": [round(x, 2) for x in os.getloadavg()]})
        print(json.dumps(runs[-1]), flush=True)
    report = {"command": command, "commit": commit, "machine": machine, "devices": args.with_devices,
              "flood_s": args.flood_s, "overrides": DEVICE_OVERRIDES, "target_growth_mb": TARGET_GROWTH_MB,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + "-devices.json").write_text(json.dumps(report, indent=1) + "\n")
    write_section(args.out.with_suffix(".md"), DEVICES_HEADING, markdown_devices(report))
    print(markdown_devices(report))
    return 0 if all("failed" not in run for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", action="append", default=[],
                        help="also measure the proxy of this commit (repeatable)")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "flood")
    parser.add_argument("--with-devices", type=int, metavar="N", default=0,
                        help="flood a fedpetah-server run while N fedpetah-client devices train")
    parser.add_argument("--flood-s", type=float, default=15.0, help="with devices: seconds per scenario's flood")
    parser.add_argument("--timeout", type=float, default=600.0, help="with devices: seconds to wait for rounds")
    args = parser.parse_args(argv)
    command = "python benchmarks/flood.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = head_commit()
    machine = f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    if args.with_devices:
        return main_devices(args, command, commit, machine)
    proxies: list[tuple[str, ModuleType]] = []
    for rev in args.before:
        proxies.append((f"before ({rev})", load_proxy(rev)))
    proxies.append(("after (server/proxy.py)", current_proxy))
    rows = []
    for label, module in proxies:
        for name in args.scenarios:
            row = {"proxy": label, **measure(SCENARIOS[name], module)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"command": command, "commit": commit, "machine": machine, "target_growth_mb": TARGET_GROWTH_MB,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_section(args.out.with_suffix(".md"), None, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    if PROXY_REV_ENV in os.environ:  # started by with_devices as the server: fedpetah-server behind an old proxy
        raise SystemExit(serve_behind(os.environ.pop(PROXY_REV_ENV), sys.argv[1:]))
    raise SystemExit(main())
