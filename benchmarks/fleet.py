"""A fleet load test of the real server: K light devices against ``fedpetah-server`` (nginx proxy, TLS, node keys)
on loopback.

    python benchmarks/fleet.py --devices 10 25 50 --rounds 3
    python benchmarks/fleet.py --devices 50 --rounds 10 --dropout 0.1     # issue 20 item 4
    python benchmarks/fleet.py --devices 25 --database memory             # Flower's :flwr-in-memory: state

A light device (benchmarks/light_device.py) is a stock ``flower-supernode`` whose node config points
``worker-socket`` at a NumPy-only worker: well-formed hello, train and evaluate replies, no torch, so a device costs
a few small processes (SuperNode, its SuperExec, the worker, and a ``flwr-clientapp`` per message). Device i
connects from a loopback address of its own (tests/loopback_site/sitecustomize.py), as hosts of a real fleet do,
so nginx's per-address limits apply per device. The server trains one catalogue task of ``--rounds`` rounds on the
tiny test hybrid (``OVERRIDES``) with every device in every round, then every device evaluates it; it exits once
idle. The server runs through this file (``--serve``) so that nginx also writes an access log of every request
(the shipped proxy logs refusals only); everything else is ``server/cli.py`` as shipped.

Per K: round times (metrics.jsonl), replies lost (timeout rejections) and late, CPU seconds and peak RSS of the
SuperLink, the ServerApp and nginx (psutil, every 0.5 s), Fleet requests per second and their status codes
(the access log), and error lines in the SuperLink's and the proxy's logs; the load average beside each.
``--dropout F``: once ``--kill-after`` rounds are committed and the next round's messages are being answered,
SIGKILL a fraction F of the devices (their whole process trees), restart them after the round that follows the
killed one is committed, and report the killed round, the backbones each device received (``has-backbone``: a
restarted device must not be sent the artifact again) and the committed rounds (none lost).

Writes benchmarks/results/fleet.json (one entry per run, replaced by K, database and dropout) and fleet.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from fedpetah.atomic import atomic_write_text  # noqa: E402
from fedpetah.tasks.catalog import CatalogTask, catalog_path, format_catalog  # noqa: E402
from flower_glue.launch import child_env, executable, free_port, start, stop_tree  # noqa: E402
from server.certificates import make_node_key, make_tls  # noqa: E402

SERVER_HOST = "127.0.0.2"
SOURCE_SITE = REPO / "tests" / "loopback_site"
OVERRIDES = ["tasks=catalog", "backbone.name=test_efficientvit", "backbone.img_size=32", "backbone.weights=random",
             "pruning=none", "adapter=lora", "strategy.fraction=1.0", "router.dim=16", "start_wait_s=600"]
TASK = CatalogTask("digits_0_1", ("0", "1"))
DATABASES = {"file": None, "memory": ":flwr-in-memory:"}
DATABASE_ENV = "FEDPETAH_FLEET_DATABASE"  # set in the served server's environment: the SuperLink's --database
ACCESS_LOG = "fleet-access.log"
ACCESS_LINE = re.compile(r'^(\S+) \[([0-9.]+)\] "POST /v1/fleet/([a-z-]+) [^"]*" (\d{3}) ')
ERROR_LINE = re.compile(r'ERROR|Traceback|OperationalError|database is locked|" 5\d\d\b')
SAMPLE_S = 0.5
IDLE_GUARD_S = 300
GUARD_S, MIN_AVAILABLE_MB = 5.0, 1536  # every 5 s: fewer than 1.5 GiB available ends the run (not the OOM killer)
DEVICE_MB = 300  # a light device's resident memory measured here (SuperNode, SuperExec, worker, a ClientApp)


def source(i: int) -> str:
    """Device i's own loopback address (127.0.1.10 onwards; 127.0.0.x is the server's)."""
    return f"127.0.{1 + i // 200}.{10 + i % 200}"


# ---------------------------------------------------------------------------------------------- the server


def serve(argv: list[str]) -> int:
    """fedpetah-server as shipped, with nginx writing every request to logs/fleet-access.log and the SuperLink's
    --database from the environment (for measurement only)."""
    from server import cli, proxy

    render = proxy.FleetProxy.render

    def with_access_log(self: proxy.FleetProxy) -> str:
        line = (f"    log_format fleet '$remote_addr [$msec] \"$request\" $status $request_time';\n"
                f"    access_log {self.log.with_name(ACCESS_LOG)} fleet;\n}}\n")
        return render(self).rstrip().removesuffix("}") + line

    proxy.FleetProxy.render = with_access_log  # type: ignore[method-assign]
    database = os.environ.pop(DATABASE_ENV, "")
    if database:
        command = cli._superlink_command

        def superlink_command(args: argparse.Namespace, state: Path, certs: Any) -> list[str]:
            made = command(args, state, certs)
            made[made.index("--database") + 1] = database
            return made

        cli._superlink_command = superlink_command  # type: ignore[assignment]
    return cli.main(argv)


class Monitor:
    """CPU seconds and RSS of the server's processes (SuperLink, ServerApp, nginx master and workers) every
    :data:`SAMPLE_S`; the last CPU reading of a process that exits is kept."""

    ROLES = {"superlink": "flower-superlink", "serverapp": "flwr-serverapp", "nginx": "nginx"}

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.cpu: dict[int, tuple[str, float]] = {}
        self.peak: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def role(self, process: psutil.Process) -> str | None:
        try:
            line = process.cmdline()
        except psutil.Error:
            return None
        for role, marker in self.ROLES.items():
            if any(Path(part).name == marker for part in line[:2]) or (role == "superlink" and "server.superlink" in
                                                                        line[:3]) or \
                    (role == "nginx" and process.name() == "nginx"):
                return role
        return None

    def sample(self) -> None:
        rss: Counter[str] = Counter()
        try:
            tree = self.root.children(recursive=True)
        except psutil.Error:
            return
        for process in tree:
            role = self.role(process)
            if role is None:
                continue
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                self.cpu[process.pid] = (role, times.user + times.system + times.children_user +
                                         times.children_system)
                rss[role] += process.memory_info().rss
        for role, value in rss.items():
            self.peak[role] = max(self.peak[role], value)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> dict[str, dict[str, float]]:
        seconds: Counter[str] = Counter()
        for role, value in self.cpu.values():
            seconds[role] += value
        return {role: {"cpu_s": round(seconds[role], 1), "peak_rss_mb": round(self.peak[role] / 2**20, 1)}
                for role in self.ROLES}


# ---------------------------------------------------------------------------------------------- the devices


class Fleet:
    """K light devices (keys registered in the server's nodes/), each a process pair in ``root/dev<i>``."""

    def __init__(self, root: Path, state: Path, devices: int, port: int) -> None:
        self.root, self.state, self.port = root, state, port
        self.keys = [make_node_key(root / "keys" / f"node{i}")[0] for i in range(devices)]
        (state / "nodes").mkdir(parents=True, exist_ok=True)
        for key in self.keys:
            shutil.copy(key.with_name(f"{key.name}.pub"), state / "nodes" / f"{key.name}.pub")
        self.processes: dict[int, list[subprocess.Popen[bytes]]] = {}
        self.starts: Counter[int] = Counter()

    def folder(self, i: int) -> Path:
        return self.root / f"dev{i}"

    def start(self, i: int) -> None:
        folder = self.folder(i)
        sockets = folder / "sock"
        sockets.mkdir(parents=True, exist_ok=True)
        sockets.chmod(0o700)
        env = child_env({"PYTHONPATH": f"{SOURCE_SITE}:{REPO}", "OMP_NUM_THREADS": "1",
                         "FEDPETAH_LOOPBACK_SOURCE": f"{source(i)} {SERVER_HOST} {self.port}",
                         "FLWR_HOME": str(folder / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                         "FLWR_TELEMETRY_ENABLED": "0"})
        worker = start([sys.executable, "-m", "benchmarks.light_device", "--socket", str(sockets / "worker.sock"),
                        "--state", str(folder / "state"), "--seed", str(i)], env, folder / "worker.log")
        config = f"worker-socket='{sockets / 'worker.sock'}' worker-timeout-s=30.0 worker-connect-s=20.0"
        node = start([executable("flower-supernode"), "--superlink", f"{SERVER_HOST}:{self.port}",
                      "--port", str(free_port()), "--node-config", config,
                      "--root-certificates", str(self.state / "certs" / "ca.pem"),
                      "--auth-supernode-private-key", str(self.keys[i])], env, folder / "supernode.log")
        self.processes[i] = [node, worker]
        self.starts[i] += 1

    def clientapps(self) -> int:
        """How many ``flwr-clientapp`` processes the devices' SuperNodes have running now (one per message)."""
        count = 0
        for process in [p for tree in self.processes.values() for p in tree]:
            with contextlib.suppress(psutil.Error):
                count += sum("flwr-clientapp" in " ".join(child.cmdline()[:3])
                             for child in psutil.Process(process.pid).children(recursive=True))
        return count

    def kill(self, i: int) -> None:
        """SIGKILL device i's processes and their children at once (a power cut)."""
        tree: list[psutil.Process] = []
        for process in self.processes.pop(i, []):
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(process.pid)
                tree += [root, *root.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.wait(5.0)

    def stop(self) -> None:
        for processes in self.processes.values():
            for process in processes:
                stop_tree(process, grace=5.0)
        self.processes.clear()

    def log(self, i: int, name: str) -> str:
        path = self.folder(i) / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def answered(self, i: int) -> int:
        return self.log(i, "worker").count("answered train")

    def artifacts(self, i: int) -> int:
        return self.log(i, "worker").count("received backbone")

    def memory_mb(self) -> dict[str, float]:
        """The devices' resident memory (RSS, shared pages counted per process) and unique memory (USS), MB."""
        rss = uss = 0
        for processes in self.processes.values():
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(process.pid)
                    for member in [root, *root.children(recursive=True)]:
                        info = member.memory_full_info()
                        rss, uss = rss + info.rss, uss + info.uss
        return {"rss": round(rss / 2**20, 1), "uss": round(uss / 2**20, 1)}


# ---------------------------------------------------------------------------------------------- one run


def rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.is_file() else []


def access(log: Path, since: float) -> dict[str, Any]:
    """Requests per route and status from the access log, and requests per second over the run."""
    routes: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    times = []
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        match = ACCESS_LINE.match(line)
        if match and float(match[2]) >= since and not match[1].startswith("127.0.0."):  # devices only
            routes[match[3]] += 1
            statuses[match[4]] += 1
            times.append(float(match[2]))
    span = max(times) - min(times) if len(times) > 1 else 0.0
    return {"requests": len(times), "span_s": round(span, 1),
            "requests_per_s": round(len(times) / span, 1) if span else 0.0,
            "statuses": dict(sorted(statuses.items())), "routes": dict(routes.most_common())}


def errors(path: Path) -> list[str]:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return [line[:300] for line in lines if ERROR_LINE.search(line)]


def error_kinds(lines: list[str]) -> dict[str, int]:
    """Error lines by kind: the route and error class of a SuperLink error, else the line without its time."""
    kinds: Counter[str] = Counter()
    for line in lines:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
        found = re.findall(r"\[[^\]]+\]", plain)
        kinds[" ".join(found[:2]) if len(found) >= 2 else re.sub(r"^\S+ ", "", plain)[:120]] += 1
    return dict(kinds.most_common())


def run_fleet(devices: int, rounds: int, database: str, reply_timeout: float, dropout: float, kill_after: int,
              timeout: float, keep: Path | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"fleet{devices}-"))
    state, port = root / "state", free_port(SERVER_HOST)
    make_tls(state / "certs", [SERVER_HOST])
    atomic_write_text(catalog_path(state), format_catalog([TASK]))
    fleet = Fleet(root, state, devices, port)
    # with dropouts the rounds between the kill and the restart go on with the devices left; the server ends with
    # its last round (stop_after), and --exit-when-idle only guards against a run that can no longer train (it
    # outlasts the back-off of a device whose hello was missed, 60 s, and the wait for it)
    overrides = [*OVERRIDES, f"clients={devices}", f"min_devices={devices - round(dropout * devices)}",
                 f"rounds_per_task={rounds}", f"stop_after={rounds}",
                 f"reply_timeout_s={reply_timeout}"]
    env = child_env({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "FLWR_TELEMETRY_ENABLED": "0", **({DATABASE_ENV: DATABASES[database]}
                                                       if DATABASES[database] else {})})
    load_start, started = os.getloadavg(), time.time()
    server = start([sys.executable, str(Path(__file__).resolve()), "--serve", "--state-dir", str(state),
                    "--host", SERVER_HOST, "--port", str(port), "--superlink-port", str(free_port()),
                    "--exit-when-idle", str(IDLE_GUARD_S), *overrides], env, root / "server.log")
    report: dict[str, Any] = {"devices": devices, "rounds": rounds, "database": database,
                              "reply_timeout_s": reply_timeout, "dropout": dropout}
    try:
        wait_for_run(server, root / "server.log", timeout)  # the device keys are registered then
        for i in range(devices):
            fleet.start(i)
        report["devices_started_s"] = round(time.time() - started, 1)
        with Monitor(psutil.Process(server.pid)) as monitor:
            report["dropout_events"] = watch(server, fleet, state / "run", rounds, dropout, kill_after, timeout)
            report["device_memory_mb"] = fleet.memory_mb()
            try:
                code: int | None = server.wait(timeout=0.0 if "aborted" in report["dropout_events"] else 120.0)
            except subprocess.TimeoutExpired:
                code = None
        report["server_exit"] = code
        report["processes"] = monitor.figures()
    finally:
        fleet.stop()
        stop_tree(server)
    report["wall_s"] = round(time.time() - started, 1)
    report["loadavg_start"] = [round(x, 2) for x in load_start]
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    metrics = rows(state / "run")
    report["round_s"] = [round(r["round_time_s"], 1) for r in metrics]
    report["committed"] = [r["round"] for r in metrics]
    report["aggregated"] = [r["num_clients"] for r in metrics]
    report["lost"] = [int(r["rejections"].get("timeout", 0)) for r in metrics]
    report["rejections"] = [r["rejections"] for r in metrics]
    report["late"] = [int(r["extra"].get("late_replies", 0)) for r in metrics]
    report["artifact_bytes"] = [int(r.get("bytes_backbone", r["extra"].get("bytes_backbone", 0))) for r in metrics]
    report["artifacts_per_device"] = dict(Counter(fleet.artifacts(i) for i in range(devices)))
    report["train_answers_per_device"] = dict(Counter(fleet.answered(i) for i in range(devices)))
    bank = state / "run" / "bank" / "bank.json"
    report["bank_completed_rounds"] = (json.loads(bank.read_text())["metadata"]["run"]["completed_rounds"]
                                       if bank.is_file() else 0)
    report["fleet"] = access(state / "logs" / ACCESS_LOG, started)
    superlink_errors, proxy_errors = errors(state / "logs" / "superlink.log"), errors(state / "logs" / "proxy.log")
    report["superlink_errors"], report["proxy_errors"] = superlink_errors[:20], proxy_errors[:20]
    report["error_counts"] = {"superlink": len(superlink_errors), "proxy": len(proxy_errors)}
    report["superlink_error_kinds"] = error_kinds(superlink_errors)
    report["server_log_warnings"] = [line[:300] for line in (root / "server.log").read_text(errors="replace")
                                     .splitlines() if "WARNING" in line or "did not answer" in line][:20]
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        report["kept"] = str(root)
    return report


def wait_for_run(server: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until fedpetah-server has registered the device keys and submitted its run (a SuperNode whose key is not
    registered yet is refused and exits)."""
    deadline = time.monotonic() + timeout
    while "fedpetah-server: run " not in (log.read_text(errors="replace") if log.is_file() else ""):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not submit its run:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)


def watch(server: subprocess.Popen[bytes], fleet: Fleet, run_dir: Path, rounds: int, dropout: float,
          kill_after: int, timeout: float) -> dict[str, Any]:
    """Wait until ``rounds`` rounds are committed (and the server exits); with ``dropout``, kill and restart."""
    deadline = time.monotonic() + timeout
    victims = list(range(0, len(fleet.keys), max(1, round(1 / dropout))))[: round(dropout * len(fleet.keys))] \
        if dropout else []
    events: dict[str, Any] = {"victims": victims, "clientapps_peak": 0}
    phase, checked = "before" if victims else "done", 0.0
    while server.poll() is None and time.monotonic() < deadline:
        if time.monotonic() - checked >= GUARD_S:  # a machine that can no longer carry the fleet: stop, say why
            checked, clientapps = time.monotonic(), fleet.clientapps()
            events["clientapps_peak"] = max(events["clientapps_peak"], clientapps)
            available = psutil.virtual_memory().available / 2**20
            if available < MIN_AVAILABLE_MB:
                events["aborted"] = (f"{available:.0f} MB of memory left with {clientapps} flwr-clientapp processes "
                                     f"running for {len(fleet.keys)} devices")
                break
        committed = len(rows(run_dir))
        if phase == "before" and committed >= kill_after:
            others = [i for i in range(len(fleet.keys)) if i not in victims]
            if any(fleet.answered(i) > kill_after for i in others):  # the next round's replies are coming in
                events["answered_before_kill"] = [i for i in victims if fleet.answered(i) > kill_after]
                for i in victims:
                    fleet.kill(i)
                events["killed_at"], events["killed_in_round"], phase = time.time(), committed + 1, "killed"
        elif phase == "killed" and committed >= events["killed_in_round"] + 1:
            for i in victims:
                fleet.start(i)
            events["restarted_at"], events["restarted_after_round"], phase = time.time(), committed, "done"
        time.sleep(0.2)
    if server.poll() is None:
        events["timed_out"] = True
    return events


# ---------------------------------------------------------------------------------------------- report


def _error_lines(run: dict[str, Any]) -> str:
    counts = run.get("error_counts") or {"superlink": len(run["superlink_errors"]),  # runs before all were counted
                                         "proxy": len(run["proxy_errors"])}
    return f"{counts['superlink']} / {counts['proxy']}"


def _uss(memory: Any) -> str:
    return f"{memory['uss']}" if isinstance(memory, dict) else f"{memory} (RSS)"  # runs before USS was recorded


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Fleet load test: K light devices against fedpetah-server (benchmarks/fleet.py)", "",
             f"{report['machine']}; commands and commits per row. Each device: stock flower-supernode + NumPy "
             "worker (benchmarks/light_device.py), its own 127.0.x.y source address, through nginx + TLS + node "
             "keys. One catalogue task on the tiny test hybrid, every device in every round, then a federated "
             "evaluation. Lost: timeout rejections; late: replies after their round. CPU s / peak RSS MB over the "
             "whole run. Fleet req/s: nginx access log over the run.", "",
             "| K | db | dropout | rounds | round s (median, max) | lost | late | SuperLink CPU s / MB | ServerApp "
             "CPU s / MB | nginx CPU s / MB | Fleet req/s (requests) | non-2xx | SuperLink / proxy error lines | "
             "devices' USS MB | load start / end | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        if "failed" in run:
            lines.append(f"| {run['devices']} | {run['database']} | {run['dropout']} | failed: "
                         f"`{run['failed'][:200]}` | | | | | | | | | | | | {run.get('commit', '')} |")
            continue
        times = sorted(run["round_s"]) or [0.0]
        p = run["processes"]
        bad = {k: v for k, v in run["fleet"]["statuses"].items() if not k.startswith("2")}
        lines.append(
            f"| {run['devices']} | {run['database']} | {run['dropout']} | {len(run['committed'])}/{run['rounds']} | "
            f"{times[len(times) // 2]}, {times[-1]} | {sum(run['lost'])} | {sum(run['late'])} | "
            f"{p['superlink']['cpu_s']} / {p['superlink']['peak_rss_mb']} | "
            f"{p['serverapp']['cpu_s']} / {p['serverapp']['peak_rss_mb']} | "
            f"{p['nginx']['cpu_s']} / {p['nginx']['peak_rss_mb']} | "
            f"{run['fleet']['requests_per_s']} ({run['fleet']['requests']}) | {bad or 'none'} | "
            f"{_error_lines(run)} | {_uss(run['device_memory_mb'])} | "
            f"{' '.join(map(str, run['loadavg_start']))} / {' '.join(map(str, run['loadavg_end']))} | "
            f"{run.get('commit', '')} |")
    lines += ["", "Round times per run (s): " + "; ".join(
        f"K={r['devices']} {r['database']}{' dropout' if r['dropout'] else ''}: {r.get('round_s')}"
        for r in report["runs"])]
    for run in report["runs"]:
        if run.get("dropout") and "failed" not in run:
            events = run["dropout_events"]
            lines += ["", f"Dropout (K={run['devices']}): devices {events['victims']} SIGKILLed in round "
                      f"{events.get('killed_in_round')} (already answered: {events.get('answered_before_kill')}), "
                      f"restarted after round {events.get('restarted_after_round')}; lost per round {run['lost']}; "
                      f"aggregated per round {run['aggregated']}; backbones received per device "
                      f"{run['artifacts_per_device']} (count: devices); committed {run['committed']}, bank "
                      f"{run['bank_completed_rounds']}; rejections per round {run['rejections']}."]
    for run in report["runs"]:
        events = run.get("dropout_events", {})
        if "aborted" in events:
            lines += ["", f"K={run['devices']}{' dropout' if run['dropout'] else ''}: stopped by the benchmark after "
                      f"{len(run['committed'])} committed round(s): {events['aborted']} (peak "
                      f"{events.get('clientapps_peak')})."]
    for run in report["runs"]:
        if run.get("superlink_error_kinds"):
            lines += ["", f"SuperLink error lines (K={run['devices']}{' dropout' if run['dropout'] else ''}), by "
                      f"kind: {run['superlink_error_kinds']}."]
    if report.get("reading"):
        lines += ["", "## Reading (written by hand, from the runs above and their kept logs)", "",
                  *[f"- {paragraph}" for paragraph in report["reading"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", choices=sorted(DATABASES), default="file")
    parser.add_argument("--reply-timeout", type=float, default=600.0, help="reply_timeout_s (the server's default)")
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction of devices killed mid-round")
    parser.add_argument("--kill-after", type=int, default=3, help="rounds committed before the kill")
    parser.add_argument("--timeout", type=float, default=1800.0, help="a guard per run, not a measurement")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (logs) and print its path")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fleet")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md page from the .json")
    args = parser.parse_args(argv)
    command = "python benchmarks/fleet.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    path = args.out.with_suffix(".json")
    report = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    report["machine"] = (f"{platform.machine()}, {psutil.cpu_count()} cores, "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB")
    for devices in [] if args.render else args.devices:
        need, available = devices * DEVICE_MB, psutil.virtual_memory().available / 2**20
        if need > 0.8 * available:  # never push a shared machine into the OOM killer
            run = {"devices": devices, "database": args.database, "dropout": args.dropout,
                   "failed": f"not run: {devices} light devices need about {need / 1024:.0f} GiB "
                             f"({DEVICE_MB} MB each), {available / 1024:.0f} GiB available"}
            print(json.dumps(run), flush=True)
            report["runs"] = [r for r in report["runs"] if (r["devices"], r["database"], r["dropout"]) !=
                              (devices, args.database, args.dropout)] + [run]
            continue
        try:
            run = run_fleet(devices, args.rounds, args.database, args.reply_timeout, args.dropout, args.kill_after,
                            args.timeout, Path() if args.keep else None)
        except Exception as error:  # a run that cannot start is a result too (e.g. out of memory)
            run = {"devices": devices, "database": args.database, "dropout": args.dropout,
                   "failed": f"{type(error).__name__}: {error}"}
        run.update(command=command, commit=commit)
        print(json.dumps(run), flush=True)
        key = (devices, args.database, args.dropout)
        report["runs"] = [r for r in report["runs"] if (r["devices"], r["database"], r["dropout"]) != key] + [run]
        report["runs"].sort(key=lambda r: (r["dropout"], r["database"], r["devices"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        raise SystemExit(serve(sys.argv[2:]))
    raise SystemExit(main())
