"""A light device for load tests of the server (benchmarks/fleet.py): answers hello, train and evaluate with
well-formed replies, NumPy only (no torch), behind a stock ``flower-supernode``. Never part of the shipped client.

    python -m benchmarks.light_device --socket DIR/worker.sock --state DIR/state --images 20

It is served by :func:`clients.worker.serve` (the real worker's socket, peer check and frames) with a runtime of
its own: a hello claims ``--images`` training and ``--held-out`` held-out images per class of every catalogue task
(and a profile when asked); a train reply sends the received adapter state back with its image count and, when
asked, router statistics of random features of the asked width; an evaluation counts its held-out images (90%
correct). Like a real device it "installs" a backbone that a request carries (it records the digest in
``--state``, so it survives a restart) and answers ``needs-backbone`` to a train request without one before that:
the server's ``has-backbone`` tracking and artifact sends work as with real devices.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from clients.worker import listen, serve_until_stopped, stop_on_sigterm
from fedpetah.wire.evaluation import MAX_CONFUSION_CLASSES, EvaluateReply, EvaluateRequest
from fedpetah.wire.profile import DeviceProfile
from fedpetah.wire.protocol import NO_PARTITION, HelloReply, HelloRequest, Status, TaskInfo, TrainReply, TrainRequest

log = logging.getLogger("fedpetah.light")


class LightRuntime:
    """What :func:`clients.worker.answer` calls on a device runtime, answered without a model."""

    def __init__(self, state: Path, images: int, held_out: int, seed: int) -> None:
        self.state, self.images, self.held_out = state, images, held_out
        self.rng = np.random.default_rng(seed)
        self.state.mkdir(parents=True, exist_ok=True)
        self.artifacts = 0  # backbones received since this process started

    @property
    def installed(self) -> str:
        path = self.state / "backbone.sha256"
        return path.read_text().strip() if path.is_file() else ""

    def hello(self, request: HelloRequest, holdings: Any) -> HelloReply:
        held = {t.index: np.array([[self.images, self.held_out]] * t.num_classes, np.int64) for t in request.tasks}
        profile = DeviceProfile(memory_budget_mb=1024.0, cores=1, free_disk_mb=4096.0) if request.profile else None
        return HelloReply(NO_PARTITION, self.installed == request.digest, held, profile)

    def _install(self, digest: str, artifact: tuple[bytes, ...] | None) -> bool:
        """Keep the backbone a request carries (its digest, written atomically); whether one is installed now."""
        if artifact is not None:
            self.artifacts += 1
            log.info("received backbone %s (%d B, artifact %d)", digest[:12], sum(map(len, artifact)), self.artifacts)
            temporary = self.state / f"backbone.sha256.{os.getpid()}"
            temporary.write_text(digest)
            temporary.replace(self.state / "backbone.sha256")
        return self.installed == digest

    def train(self, request: TrainRequest, data: Any) -> TrainReply:
        if not self._install(request.digest, request.artifact):
            return TrainReply(Status.NEEDS_BACKBONE, "no backbone cached")
        started = time.perf_counter()
        count = self.images * request.task.num_classes
        state = {k: v + np.asarray(self.rng.normal(0.0, 1e-3, v.shape), v.dtype) if v.dtype.kind == "f" else v.copy()
                 for k, v in request.state.items()}
        stats = None if request.stats is None else self.stats(request.task, request.stats[0])
        return TrainReply(Status.OK, "", state, count, {"train-seconds": time.perf_counter() - started}, stats)

    def stats(self, task: TaskInfo, dim: int) -> dict[str, np.ndarray]:
        """Router statistics of ``self.images`` random features per class: count, sum, packed within-class scatter."""
        classes = task.num_classes
        features = self.rng.normal(size=(classes, self.images, dim)) + np.arange(classes)[:, None, None]
        centred = features - features.mean(axis=1, keepdims=True)
        scatter = np.einsum("cni,cnj->ij", centred, centred)
        rows, cols = np.triu_indices(dim)
        return {"count": np.full(classes, self.images, np.int64), "sum": features.sum(axis=1),
                "within": scatter[rows, cols].astype(np.float32)}

    def evaluate(self, request: EvaluateRequest, holdout: Any) -> EvaluateReply:
        if not self._install(request.digest, request.artifact):
            return EvaluateReply(Status.NEEDS_BACKBONE, "no backbone cached")
        counts, confusion = {}, {}
        for task in request.tasks if request.evaluate else ():
            images = np.full(task.num_classes, self.held_out, np.int64)
            correct = images * 9 // 10
            counts[task.index] = np.stack([images, correct, correct], axis=1)
            if task.num_classes <= MAX_CONFUSION_CLASSES:
                grid = np.diag(correct)
                grid[np.arange(task.num_classes), (np.arange(task.num_classes) + 1) % task.num_classes] += \
                    images - correct
                confusion[task.index] = grid
        return EvaluateReply(Status.OK, "", counts, confusion, kept=request.keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.light_device", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True, help="socket path (its directory must be 0700)")
    parser.add_argument("--state", type=Path, required=True, help="where the installed backbone's digest is kept")
    parser.add_argument("--images", type=int, default=20, help="training images claimed per class")
    parser.add_argument("--held-out", type=int, default=5, help="held-out images claimed per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="light-device %(levelname)s: %(message)s")
    stop_on_sigterm()
    runtime = LightRuntime(args.state, args.images, args.held_out, args.seed)
    listener = listen(args.socket)
    log.info("ready on %s (pid %d, torch imported: %s)", args.socket, os.getpid(), "torch" in sys.modules)
    serve_until_stopped(listener, args.socket, cast(Any, runtime),
                        cast(Any, SimpleNamespace(train=None, holdout=None, holdings=None)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
