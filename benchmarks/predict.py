"""Batch-1 latency and peak memory of ``fedpetah-client predict`` with 5 learned tasks on the default backbone.

The parent process builds a 5-task snapshot on the pruned backbone the server ships (LoRA adapters moved away from
their initial values and a router fitted on synthetic statistics: random-but-valid, accuracy is not the point),
exports it as the server does (``export_payload``) and keeps it through the device code path
(``ClientRuntime.evaluate`` with ``keep``). A fresh child process then does what ``fedpetah-client predict`` does:
load and verify the kept snapshot, then label images one at a time on one torch thread (median of ``--repeats``
warm calls, image decoding and resizing included, and the forward pass alone); its own peak RSS (``ru_maxrss``) is
reported, and the load average beside every figure. With onnxruntime importable, the kept model is also exported to
ONNX once and timed the same way.

Run: ``.venv/bin/python benchmarks/predict.py`` (writes benchmarks/results/predict.{json,md}).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent


def build(cache_root: Path, tasks: int) -> dict[str, Any]:
    """Keep a ``tasks``-task snapshot in a device cache at ``cache_root``; what was built."""
    import torch

    from fedpetah.adapters import build_adapter
    from fedpetah.artifact import MANIFEST, WEIGHTS, artifact_digest, load_artifact
    from fedpetah.bank import AdapterBank
    from fedpetah.config import ROUTER_KEY
    from fedpetah.device.client import ClientRuntime
    from fedpetah.device.local import BackboneCache
    from fedpetah.routing.export import bank_stats, export_payload
    from fedpetah.routing.features import feature_width
    from fedpetah.routing.predict import build_predictor
    from fedpetah.routing.stats import class_stats
    from fedpetah.serving.pipeline import prepare_artifact
    from fedpetah.wire.evaluation import EvaluateRequest
    from fedpetah.wire.protocol import TaskInfo
    from server.bundle import compose_experiment

    config = compose_experiment([])  # the default experiment: its pruned backbone and its adapter
    artifact = prepare_artifact(config)
    backbone, digest = load_artifact(artifact), artifact_digest(artifact)
    router = config.router
    bank = AdapterBank({ROUTER_KEY: asdict(router)})
    width = router.width(feature_width(backbone, router.grid))
    g = torch.Generator().manual_seed(0)
    infos = []
    for t in range(tasks):
        classes = (str(2 * t), str(2 * t + 1))
        state = {k: v + 0.05 * torch.randn(v.shape, generator=g)
                 for k, v in build_adapter(config.adapter, backbone, 2).state().items()}
        bank.add_task(t, config.adapter.name, 2, state, list(classes), {"task_name": f"task{t}", "backbone": digest})
        labels = torch.arange(2).repeat(50)
        features = torch.randn(len(labels), width, generator=g) + 3 * torch.randn(2, width, generator=g)[labels]
        bank.set_stats(t, class_stats(features, labels, 2).tensors())
        infos.append(TaskInfo(t, f"task{t}", classes))
    predictor = build_predictor(backbone, config.adapter, bank, bank_stats(bank, backbone, router), router=router)
    model, manifest = export_payload(predictor, backbone, config.adapter, 1, digest)
    cache = BackboneCache(cache_root)
    cache.install(digest, (artifact / WEIGHTS).read_bytes(), (artifact / MANIFEST).read_bytes())
    sections = {"adapter": asdict(config.adapter), "train": {}, "tasks": {}, "partition": {}}
    request = EvaluateRequest(digest, 1, tuple(infos), model, manifest, keep=True, evaluate=False, seed=0, clients=1,
                              sections=sections)
    reply = ClientRuntime(cache).evaluate(request, lambda settings, task: None)
    if not reply.kept:
        raise SystemExit(f"the device did not keep the snapshot: {reply.reason}")
    return {"backbone": config.backbone.name, "pruning": config.pruning.ratio, "img_size": backbone.img_size,
            "digest": digest, "adapter": asdict(config.adapter),
            "labels": len(predictor.labels), "snapshot_bytes": len(model) + len(manifest)}


def _timed(predictor: Any, images: list[Path], xs: list[Any], repeats: int) -> dict[str, Any]:
    """Median ms of labelling one image (read, resize, forward, softmax) and of the forward pass alone."""
    for image in images[:10]:  # warm-up
        predictor.predict(image)
    total, forward, load = [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        predictor.predict(images[i % len(images)])
        t1 = time.perf_counter()
        predictor.probabilities(xs[i % len(xs)])
        t2 = time.perf_counter()
        total.append(t1 - t0)
        forward.append(t2 - t1)
        load.append(os.getloadavg()[0])
    return {"predict_ms_median": 1000 * statistics.median(total),
            "forward_ms_median": 1000 * statistics.median(forward), "load_average": [min(load), max(load)]}


def child(cache_root: Path, images: list[Path], repeats: int, onnx: bool) -> dict[str, Any]:
    """What ``fedpetah-client predict`` does, timed: load the kept snapshot, label images one at a time, with
    PyTorch and (``onnx``) with ONNX Runtime (the first run exports and caches the model, timed apart)."""
    start = time.perf_counter()
    import torch

    from clients.predict import Predictor
    from fedpetah.device.keep import load_kept
    from fedpetah.device.local import BackboneCache

    torch.set_num_threads(1)
    imports_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    snapshot = load_kept(BackboneCache(cache_root))
    eager = Predictor(snapshot, backend="torch")
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - start, "torch": torch.__version__,
                              "peak_rss_mb_imports": imports_mb}
    xs = [eager.tensor(p) for p in images]
    result["torch_form"] = _timed(eager, images, xs, repeats)
    result["peak_rss_mb_torch"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if onnx:
        import onnxruntime as ort

        t0 = time.perf_counter()
        Predictor(snapshot, backend="onnx")  # exports once and caches predict.onnx beside the snapshot
        result["onnx_export_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = Predictor(snapshot, backend="onnx")  # what every later run does: the cached, verified file
        result["onnx_session_seconds"] = time.perf_counter() - t0
        result["onnx_form"] = _timed(fast, images, xs, repeats)
        with torch.no_grad():  # on the raw scores (log-probabilities of magnitude up to hundreds)
            result["onnx_max_abs_diff"] = max(
                float(abs(fast.session.run(None, {"images": x.numpy()})[0][:, : fast.width]
                          - eager.model(x).numpy()).max()) for x in xs[:5])
        result["onnxruntime"] = ort.__version__
        result["peak_rss_mb_with_onnx"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def write_images(folder: Path, count: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="predict")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # cache root: run the timed device side
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        images = sorted(args.images.glob("*.png"))
        print(json.dumps(child(args.child, images, args.repeats, not args.no_onnx)))
        return
    onnx = not args.no_onnx and all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))
    with tempfile.TemporaryDirectory() as tmp:
        cache_root = Path(tmp) / "backbones"
        built = build(cache_root, args.tasks)
        folder = Path(tmp) / "images"
        write_images(folder, 20)
        command = [sys.executable, __file__, "--child", str(cache_root), "--images", str(folder),
                   "--repeats", str(args.repeats), *(["--no-onnx"] if not onnx else [])]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        image = str(next(folder.glob("*.png")))
        t0 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "clients.cli", "predict", "--cache", str(cache_root), image],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             check=False)
        cli_s = time.perf_counter() - t0
        cli_load = os.getloadavg()[0]
    result = {**built, "tasks": args.tasks, "repeats": args.repeats, **measured, "cli_one_image_seconds": cli_s,
              "cli_load_average": cli_load, "cli_ok": cli.returncode == 0, "cpu": os.cpu_count()}
    print(json.dumps(result), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    rows = [("PyTorch", measured["torch_form"])]
    if "onnx_form" in measured:
        rows.append(("ONNX Runtime", measured["onnx_form"]))
    lines = [f"# fedpetah-client predict: {args.tasks} learned tasks on the default backbone", "",
             "Command: `.venv/bin/python benchmarks/predict.py`: a random-but-valid 5-task LoRA snapshot "
             f"({result['labels']} labels, {result['snapshot_bytes']:,} B) on the pruned efficientvit_b0 "
             f"({result['img_size']} px) the default experiment ships, kept through `ClientRuntime.evaluate`; a "
             "fresh process then loads it as `fedpetah-client predict` does and labels 96 px PNGs one at a time, "
             f"batch 1, one thread (median of {args.repeats} warm calls); a {result['cpu']}-core x86_64 machine "
             "shared with other work (the load average beside each figure).", "",
             "| form | one image (read, resize, forward, softmax) | forward alone | load average |",
             "|---|---|---|---|",
             *[f"| {name} | {t['predict_ms_median']:.1f} ms | {t['forward_ms_median']:.1f} ms | "
               f"{t['load_average'][0]:.2f}-{t['load_average'][1]:.2f} |" for name, t in rows], ""]
    if "onnx_form" in measured:
        lines.append(f"ONNX Runtime: exported once from the kept model and cached beside it "
                     f"({measured['onnx_export_seconds']:.1f} s, first run only; a later run opens the cached, "
                     f"digest-checked file in {measured['onnx_session_seconds']:.2f} s); its scores are within "
                     f"{measured['onnx_max_abs_diff']:.1e} of PyTorch's.")
    lines += [f"Loading and verifying the kept snapshot (torch import included): {measured['load_seconds']:.1f} s. "
              f"Peak RSS of the predicting process: {measured['peak_rss_mb_torch']:.0f} MB with PyTorch "
              f"({measured['peak_rss_mb_imports']:.0f} MB of it after the imports alone, before any model: this "
              "torch is a CUDA build)"
              + (f", {measured['peak_rss_mb_with_onnx']:.0f} MB after the ONNX export and sessions"
                 if "peak_rss_mb_with_onnx" in measured else "") + ".",
              f"`fedpetah-client predict` on one image, process start to exit: {cli_s:.1f} s (load {cli_load:.2f}).",
              f"torch {measured['torch']}" + (f", onnxruntime {measured['onnxruntime']}" if "onnxruntime" in measured
                                              else "") + "."]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
