"""``fedpetah-client predict``: label images on this device with the learned tasks it keeps, offline.

    fedpetah-client predict --cache ~/.cache/fedpetah/backbones photo1.jpg photo2.png
    fedpetah-client predict --task flowers --top 3 photo.jpg

One JSON line per image: ``{"image", "label": "<task>/<class>", "task", "score", "top": [{"label", "score"}, ...]}``.
Task-free by default (scores: the softmax of the model's joint scores over every learned class); with ``--task``
task-aware (the softmax of that task's task-aware scores over its classes: its adapter's logits, combined with the
router's rows of its classes where the snapshot's ``router.task_aware_mix`` is above 0). The snapshot is the one
the device worker keeps in its cache dir after a finished task, verified on load (its digests and its
backbone's). Where onnxruntime is installed (and the first time, onnx + onnxscript to export it), the kept model
runs as ONNX: exported once and cached beside the snapshot with its digest (``predict.onnx``), many times faster
per image than eager PyTorch on a small CPU (benchmarks/results/predict.md); ``--backend torch`` forces PyTorch.
Nothing here contacts the server or imports Flower. Exit codes: 0 every image labelled, 1 some image unreadable
(its line has an ``"error"``), 2 no usable kept bank or a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fedpetah.device.keep import Snapshot

EXIT_UNREADABLE, EXIT_NO_BANK = 1, 2
ONNX_FILE, ONNX_RECORD = "predict.onnx", "predict.onnx.json"
"""The kept model as ONNX (images -> [scores | every task's task-aware scores]) and its record: the SHA-256 of the
ONNX file and of the ``model.json`` it was exported from (a stale or changed file is exported again)."""


def default_cache() -> Path:
    """The backbone cache dir ``fedpetah-client`` and its worker use (``$FEDPETAH_CACHE/backbones``, by default
    ``~/.cache/fedpetah/backbones``): the device keeps its snapshot there."""
    return Path(os.environ.get("FEDPETAH_CACHE", str(Path.home() / ".cache" / "fedpetah"))) / "backbones"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cache = default_cache()
    parser = argparse.ArgumentParser(prog="fedpetah-client predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (png, jpg)")
    parser.add_argument("--cache", type=Path, default=cache, help=f"the device's cache dir (default {cache})")
    parser.add_argument("--task", help="predict task-aware within this learned task (default: task-free)")
    parser.add_argument("--top", type=int, default=5, help="alternatives listed per image (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="threads (default 1; 0: the runtime's default)")
    parser.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto",
                        help="auto (default): ONNX Runtime where installed, else PyTorch")
    return parser.parse_args(argv)


class Predictor:
    """A kept snapshot ready to label images one at a time (task-free, or within one task)."""

    def __init__(self, snapshot: Snapshot, task: str | None = None, backend: str = "torch", threads: int = 1) -> None:
        predictor = snapshot.predictor
        self.snapshot = snapshot
        self.session = None if backend == "torch" else onnx_session(snapshot, threads, required=backend == "onnx")
        self.width = len(predictor.labels)
        self.model = predictor.model.eval()
        self.img_size, self.in_chans = predictor.img_size, predictor.in_chans
        self.task_names = [label.split("/", 1)[0] for label in predictor.labels]
        order = list(dict.fromkeys(self.task_names))  # the tasks in model order
        self.position: int | None = None
        self.labels = list(predictor.labels)
        if task is not None:
            if task not in order:
                raise ValueError(f"--task {task!r} is not a learned task; the kept bank holds {order}")
            self.position = order.index(task)
            self.labels = [label for label, owner in zip(predictor.labels, self.task_names, strict=True)
                           if owner == task]

    def tensor(self, path: Path) -> torch.Tensor:
        """One image as training reads a device's images: stored size, then resized to the backbone's input."""
        import torch

        from clients.device_data import CHANNELS, STORE_SIZE
        from fedpetah.tasks import ImageSet, batches
        from fedpetah.tasks.folder import load_image

        if not path.is_file():  # a FIFO or device could block the read
            raise OSError(f"{path} is not a regular file")
        pixels = load_image(path, CHANNELS, STORE_SIZE)
        data = ImageSet(torch.tensor(pixels[None]), torch.zeros(1, dtype=torch.int64))
        return next(batches(data, self.img_size, self.in_chans, 1))[0]

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(N, labels) probabilities of this predictor's labels for float32 images in [0, 1]."""
        import torch

        if self.session is not None:
            both = torch.from_numpy(self.session.run(None, {"images": x.numpy()})[0])
            scores = both[:, : self.width]
            aware = list(both[:, self.width :].split(self.model.widths, dim=1))
            chosen = scores if self.position is None else aware[self.position]
        else:
            with torch.no_grad():
                chosen = self.model(x) if self.position is None else self.model.task_scores(x, self.position)
        return torch.softmax(chosen, dim=1)

    def describe(self, image: Path, probabilities: torch.Tensor, top: int) -> dict[str, Any]:
        values, indices = probabilities.topk(min(max(top, 1), probabilities.shape[0]))
        best = int(indices[0])
        return {"image": str(image), "label": self.labels[best], "task": self.labels[best].split("/", 1)[0],
                "score": round(float(values[0]), 6),
                "top": [{"label": self.labels[int(i)], "score": round(float(v), 6)}
                        for v, i in zip(values.tolist(), indices.tolist(), strict=True)][:top]}

    def predict(self, image: Path, top: int = 5) -> dict[str, Any]:
        return self.describe(image, self.probabilities(self.tensor(image))[0], top)


def onnx_session(snapshot: Snapshot, threads: int, required: bool = False) -> Any:
    """An ONNX Runtime session of the kept model (scores and every task's task-aware scores in one output),
    exported once and cached beside the snapshot; None where onnxruntime (or, for a first export, onnx/onnxscript)
    is missing, unless ``required`` (then ``ValueError``)."""
    if importlib.util.find_spec("onnxruntime") is None:
        if required:
            raise ValueError("--backend onnx needs onnxruntime: pip install onnxruntime")
        return None
    import onnxruntime as ort  # type: ignore[import-untyped]

    model = _cached_onnx(snapshot) or _export_onnx(snapshot, required)
    if model is None:
        return None
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _model_json_sha256(snapshot: Snapshot) -> str:
    from fedpetah.routing.export import MODEL_FILE

    return hashlib.sha256((snapshot.directory / MODEL_FILE).read_bytes()).hexdigest()


def _cached_onnx(snapshot: Snapshot) -> bytes | None:
    """The cached ONNX model if its record matches it and the snapshot's ``model.json``."""
    try:
        record = json.loads((snapshot.directory / ONNX_RECORD).read_text())
        model = (snapshot.directory / ONNX_FILE).read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("onnx_sha256") != hashlib.sha256(model).hexdigest() or \
            record.get("model_json_sha256") != _model_json_sha256(snapshot):
        return None
    return model


def _export_onnx(snapshot: Snapshot, required: bool) -> bytes | None:
    """Export the kept model (scores and task-aware scores concatenated) and cache it beside the snapshot."""
    import tempfile

    import torch

    from fedpetah.atomic import atomic_write_bytes, atomic_write_text
    from fedpetah.routing.export import ExportError, export_onnx, require_onnx

    try:
        require_onnx()
    except ExportError as error:
        if required:
            raise ValueError(str(error)) from None
        return None
    model = snapshot.predictor.model

    class Joined(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores, logits = self.model.outputs(x)
            return torch.cat([scores, *logits], dim=1)

    predictor = snapshot.predictor
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ONNX_FILE
        try:
            export_onnx(Joined().eval(), torch.rand(2, predictor.in_chans, predictor.img_size, predictor.img_size),
                        path)
        except ExportError as error:
            if required:
                raise ValueError(str(error)) from None
            print(f"fedpetah-client predict: using PyTorch ({error})", file=sys.stderr)
            return None
        data = path.read_bytes()
    try:  # a cache only: a snapshot replaced meanwhile, or a read-only cache, just exports again next time
        atomic_write_bytes(snapshot.directory / ONNX_FILE, data)
        atomic_write_text(snapshot.directory / ONNX_RECORD, json.dumps(
            {"onnx_sha256": hashlib.sha256(data).hexdigest(), "model_json_sha256": _model_json_sha256(snapshot)}))
    except OSError:
        pass
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top < 0 or args.threads < 0:
        print("fedpetah-client predict: --top and --threads must not be negative", file=sys.stderr)
        return EXIT_NO_BANK
    import torch

    from fedpetah.device.keep import SnapshotError, load_kept
    from fedpetah.device.local import BackboneCache
    from fedpetah.tasks.folder import READ_ERRORS

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cache = args.cache.expanduser()
    try:
        predictor = Predictor(load_kept(BackboneCache(cache)), args.task, args.backend, args.threads)
    except (SnapshotError, ValueError) as error:
        print(f"fedpetah-client predict: {error}", file=sys.stderr)
        return EXIT_NO_BANK
    code = 0
    for image in args.images:
        try:
            line = predictor.predict(image, args.top)
        except READ_ERRORS as error:
            line, code = {"image": str(image), "error": f"{type(error).__name__}: {error}"}, EXIT_UNREADABLE
        print(json.dumps(line), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
