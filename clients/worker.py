"""The device worker: one long-lived process with torch, the verified backbone and the data index, on a Unix socket.

    python -m clients.worker --socket /run/user/1000/fedpetah/worker.sock --data ~/fedpetah-data --cache DIR

``fedpetah-client`` starts it beside Flower's SuperNode and supervises it; the ClientApp that Flower starts per
message forwards its request here with :func:`call` and returns the reply, so a message costs a small process
(flwr and the protocol) instead of importing torch, timm and peft every time. The socket lives in an owner-only
directory (0700), is itself 0600, and each peer's uid is checked (``SO_PEERCRED``) where the OS reports it; frames
are JSON + safetensors (:mod:`fedpetah.wire.frames`), never pickle, and bounded in size. :func:`answer` is what both
this worker and the ClientApp's in-process path run for a request, so both give the same result for the same seed.

Module-level imports stay light (no torch): the thin ClientApp imports :func:`call` from here.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fedpetah.wire import frames
from fedpetah.wire.evaluation import EVALUATE, EvaluateReply, EvaluateRequest
from fedpetah.wire.protocol import HELLO, TRAIN, HelloRequest, ProtocolError, Records, Status, TrainReply, TrainRequest

if TYPE_CHECKING:
    from fedpetah.device.client import ClientRuntime, Sources

log = logging.getLogger("fedpetah.worker")

PING, REPLY = "ping", "reply"
"""Frame types besides the protocol's message names: a readiness probe, and every answer."""
REQUEST_TIMEOUT_S = 30.0  # a peer has this long for each read and write of a frame
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 104-108 bytes depending on the OS


class WorkerUnavailable(Exception):
    """No answer from the worker: nothing listens, the peer is not ours, or it did not answer in time."""


def answer(runtime: ClientRuntime, sources: Sources, kind: str, records: Records) -> Records:
    """The reply records to request ``records`` of type ``kind``; a bad request becomes an error reply."""
    if kind == PING:
        return Records()
    if kind == HELLO:
        return runtime.hello(HelloRequest.decode(records), sources.holdings).encode()
    if kind == EVALUATE:
        try:
            evaluation = EvaluateRequest.decode(records)
        except ProtocolError as error:
            log.warning("refusing a malformed evaluate request: %s", error)
            return EvaluateReply(Status.ERROR, f"malformed request: {error}").encode()
        return runtime.evaluate(evaluation, sources.holdout).encode()
    if kind != TRAIN:
        return TrainReply(Status.ERROR, f"unknown message type {kind!r:.60}").encode()
    try:
        request = TrainRequest.decode(records)
    except ProtocolError as error:
        log.warning("refusing a malformed train request: %s", error)
        return TrainReply(Status.ERROR, f"malformed request: {error}").encode()
    return runtime.train(request, sources.train).encode()


def error_reply(kind: str, reason: str) -> Records:
    """An error reply of the kind a ``kind`` request expects (its decoder reads the status and the reason)."""
    if kind == EVALUATE:
        return EvaluateReply(Status.ERROR, reason).encode()
    return TrainReply(Status.ERROR, reason).encode()


def device_sources(root: Path) -> Sources:
    """A device's own images under ``root`` (``<task>/<class>/*.png``), read once per task and kept: training
    images, held-out images, and their counts per class (a hello's holdings)."""
    from clients.device_data import device_holdings, device_holdout_data, device_task_data
    from fedpetah.device.client import Sources

    return Sources(
        lambda settings: device_task_data(root, settings.request.task.name, list(settings.request.task.classes)),
        lambda settings, task: device_holdout_data(root, task.name, list(task.classes)),
        lambda request, task: device_holdings(root, task.name, list(task.classes)))


# ---------------------------------------------------------------------------------------------- the socket


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, where the OS reports it (Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return int(uid)


def check_private_dir(path: Path) -> None:
    """``path`` is a directory owned by us that nobody else may enter (mode 0700 or stricter)."""
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is not a directory")
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ValueError(f"{path} must be owned by uid {os.getuid()} with mode 0700 (it is uid {info.st_uid}, "
                         f"mode {stat.S_IMODE(info.st_mode):o}): `chmod 700 {path}`")


def listen(path: Path) -> socket.socket:
    """A listening socket at ``path`` (0600, in a checked 0700 dir); a stale socket left by a dead worker goes."""
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; pick a shorter one")
    check_private_dir(path.parent)
    if path.is_socket():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    listener.listen(8)
    return listener


def _own_peer(conn: socket.socket) -> bool:
    uid = peer_uid(conn)
    return uid is None or uid == os.getuid()


def serve(listener: socket.socket, runtime: ClientRuntime, sources: Sources) -> None:
    """Answer one connection at a time, forever: a request frame in, a reply frame out."""
    while True:
        conn, _ = listener.accept()
        with conn:
            if not _own_peer(conn):
                log.warning("refused a connection from uid %s", peer_uid(conn))
                continue
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                kind, records = frames.receive(conn)
            except (ProtocolError, OSError) as error:
                log.warning("refused a request: %s", error)
                _send_quietly(conn, error_reply(TRAIN, f"bad request frame: {error}"))
                continue
            started = time.perf_counter()
            try:
                reply = answer(runtime, sources, kind, records)
            except ProtocolError as error:
                reply = error_reply(kind, f"malformed request: {error}")
            except Exception as error:  # a bug must not take the device's worker down with it
                log.exception("request %s failed", kind)
                reply = error_reply(kind, f"worker error: {type(error).__name__}: {error}")
            if kind != PING:
                log.info("answered %s in %.2f s", kind, time.perf_counter() - started)
            _send_quietly(conn, reply)


def _send_quietly(conn: socket.socket, records: Records) -> None:
    try:
        frames.send(conn, REPLY, records)
    except OSError as error:  # the ClientApp gave up waiting (its timeout) or was stopped
        log.warning("could not send the reply: %s", error)


def call(path: str | Path, kind: str, records: Records, timeout_s: float, connect_s: float = 0.0) -> Records:
    """Send a request to the worker at ``path`` and return its reply records.

    Connection attempts are retried for ``connect_s`` seconds (a worker being restarted); every read and write
    then has ``timeout_s`` seconds. Raises :class:`WorkerUnavailable` with the reason otherwise.
    """
    deadline = time.monotonic() + connect_s
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(max(1.0, min(timeout_s, 10.0)))
        try:
            conn.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError) as error:
            conn.close()
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(f"no device worker at {path} ({error.strerror})") from None
            time.sleep(0.1)
        except OSError as error:
            conn.close()
            raise WorkerUnavailable(f"cannot connect to the device worker at {path}: {error}") from None
    with conn:
        if not _own_peer(conn):
            raise WorkerUnavailable(f"the process at {path} belongs to uid {peer_uid(conn)}, not to us")
        conn.settimeout(timeout_s)
        try:
            frames.send(conn, kind, records)
            kind, reply = frames.receive(conn)
        except TimeoutError:
            raise WorkerUnavailable(f"the device worker at {path} did not answer within {timeout_s:g} s") from None
        except (ProtocolError, OSError) as error:
            raise WorkerUnavailable(f"the device worker at {path} failed: {error}") from None
    if kind != REPLY:
        raise WorkerUnavailable(f"the device worker at {path} sent a {kind!r:.40} frame, not a reply")
    return reply


# ---------------------------------------------------------------------------------------------- the process


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def stop_on_sigterm() -> None:
    """SIGTERM ends the process as Ctrl-C does (so :func:`serve_until_stopped` removes its socket)."""
    signal.signal(signal.SIGTERM, _stop)


def serve_until_stopped(listener: socket.socket, path: Path, runtime: ClientRuntime, sources: Sources) -> None:
    """:func:`serve` until the process is stopped, then close and remove the socket at ``path``."""
    try:
        serve(listener, runtime, sources)
    except (KeyboardInterrupt, SystemExit):
        log.info("stopping")
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True, help="socket path (its directory must be 0700)")
    parser.add_argument("--data", type=Path, required=True, help="image folder DIR/<task>/<class>/*.png|jpg")
    parser.add_argument("--cache", type=Path, required=True, help="backbone cache dir")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache-keep", type=int, help="backbones the cache keeps, least recently used evicted")
    parser.add_argument("--cache-max-mb", type=int, help="disk the cached backbones may take")
    parser.add_argument("--bank-max-mb", type=int, help="the largest learned-tasks snapshot this device keeps "
                        "for fedpetah-client predict (default 256)")
    parser.add_argument("--memory-budget-mb", type=float, help="memory training may take above the resting "
                        "footprint (default: MemAvailable at each request)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="fedpetah-worker %(levelname)s: %(message)s")
    stop_on_sigterm()
    started = time.perf_counter()
    import torch

    from clients.device_data import data_dir
    from fedpetah.device.client import ClientRuntime
    from fedpetah.device.keep import BANK_MAX_BYTES
    from fedpetah.device.local import CACHE_KEEP, CACHE_MAX_BYTES, BackboneCache

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    root = data_dir(str(args.data))
    max_bytes = CACHE_MAX_BYTES if args.cache_max_mb is None else args.cache_max_mb * 2**20
    bank_bytes = BANK_MAX_BYTES if args.bank_max_mb is None else args.bank_max_mb * 2**20
    runtime = ClientRuntime(BackboneCache(args.cache.expanduser(), args.cache_keep or CACHE_KEEP, max_bytes),
                            bank_max_bytes=bank_bytes, memory_budget_mb=args.memory_budget_mb)
    try:
        listener = listen(args.socket)
    except (OSError, ValueError) as error:
        log.error("cannot listen on %s: %s", args.socket, error)
        return 2
    log.info("ready on %s after %.1f s (pid %d)", args.socket, time.perf_counter() - started, os.getpid())
    serve_until_stopped(listener, args.socket, runtime, device_sources(root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
