"""``fedpetah-server``: Flower's SuperLink with TLS, SuperNode authentication, a persistent state database and no
runtime dependency installation, plus our ServerApp run submitted to it and followed to the end. The SuperLink binds
127.0.0.1; devices reach only its Fleet API, through nginx on ``--host`` (server/proxy.py).

    fedpetah-server --state-dir /srv/fedpetah adapter=petah rounds_per_task=5
    fedpetah-server --state-dir /srv/fedpetah --resume          # after a stop: continue from the bank

Everything lives under the state dir: ``certs/`` (ca.pem, server.pem, server.key), ``nodes/*.pub`` (the device
keys to register), ``superlink.db``, ``logs/``, ``cache/`` (backbone artifacts), ``run/`` (metrics, bank),
``proxy/`` (the generated nginx.conf, its pid and temp files).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedpetah.atomic import atomic_write_text
from fedpetah.bank import BankError
from fedpetah.experiment import ExperimentConfig
from fedpetah.serving.collect import drop_stats
from fedpetah.tasks.catalog import CatalogError, catalog_path, check_extends, format_catalog, read_catalog
from flower_glue.launch import (
    LOOPBACK_HOSTS,
    child_env,
    executable,
    port_is_free,
    signals_ignored,
    sigterm_interrupts,
    start,
    stop_tree,
    wait_for_port,
    warn_insecure,
)
from server.bundle import REPO, compose_experiment, config_json, stage_app
from server.certificates import TlsFiles, node_keys, server_files
from server.proxy import FleetProxy, ProxyCertificate, ProxyError, ProxyMissing, find_nginx, warn_control_exposed

EXIT_CONFIG, EXIT_TLS, EXIT_NODES, EXIT_SUPERLINK, EXIT_RUN, EXIT_RUN_DIR = 2, 3, 4, 5, 6, 7
EXIT_NO_PROXY, EXIT_PROXY = 8, 9
CONNECTION = "fedpetah"
RESUMABLE = frozenset({"resume", "stop_after", "exit_when_idle_s", "min_devices", "start_wait_s"})
"""Settings that may change between a stop and its resume (the task list may grow: it lives in tasks.yaml)."""


class ServerError(Exception):
    """A failure the operator can fix; ``code`` is the process exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedpetah-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/, e.g. adapter=lora clients=4")
    parser.add_argument("--state-dir", type=Path, default=Path("fedpetah-state"))
    parser.add_argument("--run-dir", type=Path, help="metrics, plots and the adapter bank (default STATE/run)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address devices connect to (default all interfaces); nginx listens there and forwards "
                             "only the Fleet API to the SuperLink on 127.0.0.1. A loopback host (127.0.0.1, "
                             "localhost, ::1) needs no proxy: the SuperLink listens there itself")
    parser.add_argument("--port", type=int, default=8000, help="the one HTTPS port devices connect to")
    parser.add_argument("--superlink-port", type=int,
                        help="the SuperLink's own port on 127.0.0.1 behind the proxy (default PORT+1)")
    parser.add_argument("--keycheck-port", type=int,
                        help="the proxy's signature check on 127.0.0.1 (server/keycheck.py; default SUPERLINK_PORT+1)")
    parser.add_argument("--nginx", help="the nginx binary (default: found on PATH or in /usr/sbin)")
    parser.add_argument("--expose-control-api", action="store_true",
                        help="DANGEROUS: no proxy; the SuperLink itself listens on --host, so its Control API "
                             "(submit runs = run code on this server and every device; register node keys), which "
                             "open-source Flower does not authenticate, is open to anyone who reaches the port")
    parser.add_argument("--certificates", type=Path, help="dir with ca.pem, server.pem, server.key (STATE/certs)")
    parser.add_argument("--nodes", type=Path, help="dir whose *.pub device keys are registered (STATE/nodes)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run dir from its bank")
    parser.add_argument("--drop-stats", type=int, action="append", default=[], metavar="TASK",
                        help="with --resume: first drop task TASK's router statistics from the bank (repeatable), "
                             "e.g. when the bank refuses to load them; its devices are asked again in the task's "
                             "remaining rounds")
    parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                        help="end cleanly (exit 0) after SECONDS with nothing to train; without it a server on a "
                             "task list (tasks=catalog) waits for new tasks for ever")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: loopback demo only")
    parser.add_argument("--config-dir", type=Path, default=REPO / "configs")
    parser.add_argument("--config-name", default="config")
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


def _experiment(args: argparse.Namespace, run_dir: Path, node_keys: int) -> ExperimentConfig:
    overrides = list(args.overrides)
    if not any(o.lstrip("+~").split("=")[0] == "clients" for o in overrides):
        if node_keys == 0:
            raise ServerError(EXIT_CONFIG, "say how many devices to wait for: add the override clients=N")
        overrides.append(f"clients={node_keys}")
    overrides += [f"output_dir={run_dir}", f"resume={str(args.resume).lower()}"]
    if args.exit_when_idle is not None:
        overrides.append(f"exit_when_idle_s={args.exit_when_idle}")
    if "tasks=catalog" in overrides and not any(o.startswith("tasks.root=") for o in overrides):
        overrides.append(f"tasks.root={catalog_path(args.state_dir.expanduser().resolve())}")
    try:
        return compose_experiment(overrides, args.config_dir, args.config_name)
    except Exception as err:  # Hydra's and our dataclasses' validation errors, shown as they are
        raise ServerError(EXIT_CONFIG, f"bad experiment config: {err}") from None


def _check_run_dir(run_dir: Path, config_text: str, resume: bool) -> None:
    saved = run_dir / "config.json"
    has_bank = (run_dir / "bank" / "bank.json").is_file()
    if not resume and has_bank:
        raise ServerError(EXIT_RUN_DIR, f"{run_dir} holds a previous run: pass --resume to continue it, "
                                        "or choose another --run-dir")
    if resume and saved.is_file():
        before = {k: v for k, v in json.loads(saved.read_text()).items() if k not in RESUMABLE}
        now = {k: v for k, v in json.loads(config_text).items() if k not in RESUMABLE}
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            raise ServerError(EXIT_RUN_DIR, f"--resume needs the same config as the stopped run; these differ: "
                                            f"{', '.join(changed)} (see {saved})")
    if resume and not has_bank:
        print(f"fedpetah-server: nothing to resume in {run_dir}; starting the run from its first round",
              file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, config_text)


def _check_catalog(config: ExperimentConfig, run_dir: Path) -> None:
    """``tasks=catalog``: the task list must read, and on ``--resume`` start with the bank's learned tasks (it may
    only grow). A missing one starts empty: the server then waits for ``fedpetah-server task add``."""
    if config.tasks.name != "catalog" or not config.tasks.root:
        return
    path = Path(config.tasks.root)
    if not path.exists():
        atomic_write_text(path, format_catalog([]))
        print(f"fedpetah-server: no task declared yet; the server waits for `fedpetah-server task add NAME "
              f"--classes a,b --state-dir {path.parent}` ({path})", file=sys.stderr)
    try:
        catalog = read_catalog(path)
    except CatalogError as err:
        raise ServerError(EXIT_CONFIG, f"the task list cannot be used: {err}") from None
    bank = run_dir / "bank" / "bank.json"
    if config.resume and bank.is_file():
        try:
            tasks = sorted(json.loads(bank.read_text()).get("tasks", []), key=lambda t: int(t["task"]))
            check_extends([(str(t["metadata"].get("task_name")), list(t["class_names"])) for t in tasks], catalog)
        except (CatalogError, OSError, ValueError, KeyError, TypeError) as err:
            raise ServerError(EXIT_RUN_DIR, f"--resume: the task list does not extend the run's: {err}") from None


def _drop_stats(args: argparse.Namespace, run_dir: Path) -> None:
    """``--drop-stats``: remove those tasks' router statistics from the bank before the run resumes."""
    if not args.drop_stats:
        return
    if not args.resume or not (run_dir / "bank" / "bank.json").is_file():
        raise ServerError(EXIT_RUN_DIR, f"--drop-stats needs --resume and a bank in {run_dir / 'bank'}")
    try:
        dropped = drop_stats(run_dir / "bank", args.drop_stats)
    except BankError as err:
        raise ServerError(EXIT_RUN_DIR, str(err)) from None
    print(f"fedpetah-server: dropped the router statistics of tasks {dropped}", file=sys.stderr)


def _proxied(args: argparse.Namespace) -> bool:
    """Devices reach the SuperLink through the Fleet-only proxy (unless it listens on loopback, or on request)."""
    return not (args.insecure or args.expose_control_api or args.host in LOOPBACK_HOSTS)


def _superlink_address(args: argparse.Namespace) -> tuple[str, int]:
    """Where the SuperLink (Fleet, Control and Runtime APIs) listens."""
    if _proxied(args):
        return "127.0.0.1", args.superlink_port or args.port + 1
    return args.host, args.port


def _superlink_command(args: argparse.Namespace, state: Path, certs: TlsFiles | None) -> list[str]:
    host, port = _superlink_address(args)
    command = [sys.executable, "-m", "server.superlink", "--host", host, "--port", str(port),  # a longer busy wait
               "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if certs is None:
        return [*command, "--insecure"]
    return [*command, "--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert),
            "--ssl-keyfile", str(certs.key), "--enable-supernode-auth"]


def _flwr(env: dict[str, str], *arguments: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([executable("flwr"), *arguments], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _flwr_json(env: dict[str, str], *arguments: str) -> dict[str, Any]:
    done = _flwr(env, *arguments, "--format", "json")
    try:
        reply: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        raise ServerError(EXIT_SUPERLINK, f"flwr {' '.join(arguments)} failed:\n{done.stdout}{done.stderr}") from None
    return reply


def _register(env: dict[str, str], keys: list[Path]) -> None:
    for key in keys:
        reply = _flwr_json(env, "supernode", "register", str(key), CONNECTION)
        error = str(reply.get("error-message", ""))
        if reply.get("success"):
            print(f"fedpetah-server: registered {key.name} as node {reply['node-id']}", file=sys.stderr)
        elif "already in use" not in error:  # registered before: the state database keeps it
            raise ServerError(EXIT_NODES, f"could not register {key}: {error}")


def _follow(env: dict[str, str], run_id: str, log_path: Path) -> dict[str, Any]:
    """Stream the run's log (ServerApp output) to stdout and ``log_path``; the run's final row from ``flwr ls``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stream = subprocess.Popen([executable("flwr"), "log", run_id, CONNECTION, "--stream"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with log_path.open("a") as log:
            assert stream.stdout is not None
            for line in stream.stdout:
                sys.stdout.write(line)
                log.write(line)
    finally:
        stream.kill()
        stream.wait()
    while True:
        runs = _flwr_json(env, "ls", "--run-id", run_id, CONNECTION).get("runs", [])
        if runs and str(runs[0]["status"]).startswith("finished"):
            return dict(runs[0])
        time.sleep(2.0)


def _security(args: argparse.Namespace, state: Path) -> tuple[TlsFiles | None, list[Path]]:
    """The SuperLink's certificate files and the device keys to register (none for ``--insecure``)."""
    if args.insecure:
        if args.host not in LOOPBACK_HOSTS:
            raise ServerError(EXIT_TLS, f"--insecure only on a loopback host (127.0.0.1), not {args.host}")
        warn_insecure("fedpetah-server")
        return None, []
    try:
        certs = server_files((args.certificates or state / "certs").expanduser().resolve())
    except ValueError as err:
        raise ServerError(EXIT_TLS, str(err)) from None
    try:
        return certs, node_keys((args.nodes or state / "nodes").expanduser().resolve())
    except ValueError as err:
        raise ServerError(EXIT_NODES, str(err)) from None


def _flower_env(state: Path, address: str, certs: TlsFiles | None) -> dict[str, str]:
    """Environment of our Flower processes, with a Flower home whose default connection is this SuperLink."""
    env = child_env({"FLWR_HOME": str(state / "flwr"), "FLWR_DISABLE_UPDATE_CHECK": "1"})
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FEDPETAH_CACHE", str(state / "cache"))
    connection: dict[str, Any] = {"address": address}
    connection.update({"root-certificates": str(certs.ca)} if certs else {"insecure": True})
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))
    return env


def _proxy(args: argparse.Namespace, state: Path, certs: TlsFiles | None) -> FleetProxy | None:
    """The Fleet-only proxy to start in front of the SuperLink (None without one); a missing nginx fails here,
    before anything starts."""
    if args.expose_control_api:
        if certs is None:
            raise ServerError(EXIT_TLS, "--expose-control-api needs TLS (it is not a loopback demo)")
        warn_control_exposed(args.host, args.port)
    if not _proxied(args):
        return None
    assert certs is not None
    try:
        nginx = find_nginx(args.nginx)
    except ProxyMissing as err:
        raise ServerError(EXIT_NO_PROXY, str(err)) from None
    superlink_port = _superlink_address(args)[1]
    return FleetProxy(nginx, (args.host, args.port), superlink_port, certs, state / "proxy",
                      state / "logs" / "proxy.log", args.keycheck_port or superlink_port + 1,
                      (args.nodes or state / "nodes").expanduser().resolve())


def _start_proxy(proxy: FleetProxy, timeout: float, started: list[subprocess.Popen[bytes]]) -> None:
    """The signature check, then nginx, each appended to ``started`` (stop them in reverse order)."""
    try:
        started.append(proxy.start_keycheck(timeout))
        started.append(proxy.start(timeout))
    except ProxyCertificate as err:
        raise ServerError(EXIT_TLS, str(err)) from None
    except ProxyError as err:
        raise ServerError(EXIT_PROXY, str(err)) from None
    host, port = proxy.listen
    print(f"fedpetah-server: devices connect to {host}:{port}: nginx (log {proxy.log}) forwards only the Fleet API "
          f"to the SuperLink on 127.0.0.1:{proxy.superlink_port}, and only requests signed by a key in "
          f"{proxy.nodes} (checked on 127.0.0.1:{proxy.keycheck_port} before a body is read); checked: the Control "
          f"API and unsigned requests are refused there", file=sys.stderr)


def _operate(args: argparse.Namespace, state: Path, config: ExperimentConfig, certs: TlsFiles | None,
             keys: list[Path], proxy: FleetProxy | None) -> dict[str, Any]:
    """Start the SuperLink (and the proxy), register the keys, submit the run, follow it; stop everything;
    Flower's final row."""
    host, port = _superlink_address(args)
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    env = _flower_env(state, f"{local}:{port}", certs)
    link_log = state / "logs" / "superlink.log"
    link = start(_superlink_command(args, state, certs), env, link_log)
    front: list[subprocess.Popen[bytes]] = []  # the proxy's signature check and nginx
    run_id = ""
    try:
        if not wait_for_port(local, port, link, args.startup_timeout):
            tail = "".join(link_log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise ServerError(EXIT_SUPERLINK, f"the SuperLink did not start (log {link_log}):\n{tail}")
        print(f"fedpetah-server: SuperLink on {host}:{port} ({'TLS' if certs else 'INSECURE'}), "
              f"log {link_log}", file=sys.stderr)
        if proxy is not None:
            _start_proxy(proxy, args.startup_timeout, front)
        _register(env, keys)
        submitted = _flwr_json(env, "run", str(stage_app(config, state / "app")), CONNECTION)
        if not submitted.get("success"):
            raise ServerError(EXIT_RUN, f"the run was not accepted: {submitted.get('error-message')}")
        run_id = str(submitted["run-id"])
        print(f"fedpetah-server: run {run_id} ({config.clients} devices, output {config.output_dir})",
              file=sys.stderr)
        final = _follow(env, run_id, state / "logs" / f"run-{run_id}.log")
        run_id = ""
        return final
    finally:
        with signals_ignored():  # a second Ctrl-C must not leave the SuperLink running
            if run_id:  # interrupted: stop the run so no stale messages reach devices after a restart
                _flwr(env, "stop", run_id, CONNECTION, timeout=30.0)
            for process in reversed(front):
                stop_tree(process)
            stop_tree(link)


def serve(args: argparse.Namespace) -> int:
    state = args.state_dir.expanduser().resolve()
    run_dir = (args.run_dir or state / "run").expanduser().resolve()
    certs, keys = _security(args, state)
    proxy = _proxy(args, state, certs)
    config = _experiment(args, run_dir, len(keys))
    _check_run_dir(run_dir, config_json(config), args.resume)
    _check_catalog(config, run_dir)
    _drop_stats(args, run_dir)
    ports = [(args.host, args.port, "--port")]
    if _proxied(args):
        ports.append((*_superlink_address(args), "--superlink-port"))
        if proxy is not None:
            ports.append(("127.0.0.1", proxy.keycheck_port, "--keycheck-port"))
    for host, port, option in ports:
        if not port_is_free(host, port):
            raise ServerError(EXIT_SUPERLINK, f"port {port} on {host} is in use (another SuperLink?); "
                                              f"stop it or pass {option}")
    final = _operate(args, state, config, certs, keys, proxy)
    with (run_dir / "flower-runs.jsonl").open("a") as runs:  # Flower's view: status, times, network traffic
        runs.write(json.dumps(final) + "\n")
    if final["status"] != "finished:completed":
        raise ServerError(EXIT_RUN, f"run {final['run-id']} {final['status']}: {final.get('status-details', '')}")
    print(f"fedpetah-server: run completed; summary {run_dir / 'summary.json'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_interrupts():
            return serve(args)
    except ServerError as err:
        print(f"fedpetah-server: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("fedpetah-server: stopped; continue later with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    raise SystemExit(main())
