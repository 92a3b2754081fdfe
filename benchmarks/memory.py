"""Peak CPU training memory and step time of adapters (synqt vs lora, petah, full), one subprocess each.

Run: ``.venv/bin/python benchmarks/memory.py`` (writes benchmarks/results/memory.{json,md}).

Method: every (backbone, image size, adapter) runs in a fresh Python process, so no allocator
state or high-water mark leaks between configurations. The process builds the backbone (random
weights: memory and time do not depend on their values), the adapter, the optimizer and one
input batch, then records its resident set size (``idle``). It runs ``1 + steps`` inference
passes under ``torch.no_grad``, then ``1 + steps`` training steps (forward, backward, AdamW
step); after each phase, ``peak`` is ``ru_maxrss`` (the kernel's high-water mark of the resident
set) minus ``idle``: the working memory added on top of the loaded model. Inference runs first
because the mark only rises: a training step contains the same forward pass, so its peak is the
larger one. ``ru_maxrss`` reached while building is reported too, to show it stays below
``idle``. Step time is the median of the measured steps.

Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--glibc-default`` turns it off): glibc's
adaptive threshold keeps freed blocks in a fragmented heap, and three runs of one configuration
(efficientvit_b0, 224 px, synqt inference) gave 185, 185 and 301 MiB; with the fixed threshold
large blocks are mmapped and returned on free, so the mark follows live memory: 148.0, 147.7
and 148.1 MiB.

Variants: ``synqt`` runs the frozen forward 8 images at a time (its default ``frozen_batch``),
``synqt-unchunked`` over the whole batch at once, ``synqt-cached`` trains on features computed
beforehand (what fedpetah.train does across epochs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "synqt": ("synqt", {}),
    "synqt-unchunked": ("synqt", {"frozen_batch": 1024}),
    "synqt-cached": ("synqt", {}),
    "lora": ("lora", {}),
    "petah": ("petah", {}),
    "full": ("full", {}),
}
MIB = 2**20


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(backbone_name: str, img_size: int, method: str, batch: int, steps: int) -> list[dict[str, Any]]:
    """One configuration, in this process: per phase, idle RSS, peak above it, median step time."""
    import psutil
    import torch
    import torch.nn.functional as F

    from fedpetah.adapters import adapter_config, build_adapter
    from fedpetah.adapters.synqt import SynQTAdapter
    from fedpetah.backbone import build_backbone
    from fedpetah.config import BackboneConfig

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name=backbone_name, img_size=img_size, weights="random"))
    name, fields = VARIANTS[method]
    adapter = build_adapter(adapter_config(name, **fields), backbone, 10)
    model, params = adapter.model, list(adapter.trainable().values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x, y = torch.rand(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    cached = None
    if method == "synqt-cached":  # one image's features repeated: a step's cost ignores their values
        assert isinstance(adapter, SynQTAdapter)
        cached = [f.repeat(batch, *[1] * (f.ndim - 1)) for f in adapter.frozen_features(x[:1])]
    gc.collect()
    idle, before = psutil.Process().memory_info().rss, _maxrss_bytes()

    def train_step() -> None:
        if cached is not None:
            assert isinstance(adapter, SynQTAdapter)
            logits = adapter.forward_features(cached)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.no_grad():
            model(x)

    rows = []
    for phase in ("train",) if cached is not None else ("infer", "train"):
        model.train(phase == "train")
        step = train_step if phase == "train" else infer_step
        times = []
        for i in range(1 + steps):
            start = time.perf_counter()
            step()
            if i:
                times.append(time.perf_counter() - start)
        row: dict[str, Any] = {
            "backbone": backbone_name,
            "img_size": img_size,
            "method": method,
            "phase": phase,
            "batch": batch,
            "trainable_params": adapter.num_trainable(),
            "idle_mib": round(idle / MIB, 1),
            "build_peak_above_idle_mib": round((before - idle) / MIB, 1),
            "peak_above_idle_mib": round((_maxrss_bytes() - idle) / MIB, 1),
            "step_ms": round(1000 * statistics.median(times), 1),
        }
        if cached is not None:
            row["cache_bytes_per_image"] = sum(f[0].numel() * f.element_size() for f in cached)
        rows.append(row)
    return rows


def run_isolated(args: argparse.Namespace, backbone: str, img_size: int, method: str) -> list[dict[str, Any]]:
    """:func:`measure` in a fresh interpreter; its last stdout line is the JSON list of rows."""
    command = [
        sys.executable, __file__, "--worker", backbone, str(img_size), method,
        "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads),
    ]
    env = dict(os.environ) if args.glibc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{backbone} {img_size}px {method} failed:\n{done.stderr[-2000:]}")
    rows: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (backbone, size, synqt variant): its training peak over its inference peak, lora's over it."""
    peak = {(r["backbone"], r["img_size"], r["method"], r["phase"]): r["peak_above_idle_mib"] for r in rows}
    checks = []
    for backbone, size, method in dict.fromkeys((r["backbone"], r["img_size"], r["method"]) for r in rows):
        train, infer = peak.get((backbone, size, method, "train")), peak.get((backbone, size, method, "infer"))
        lora = peak.get((backbone, size, "lora", "train"))
        if method in ("synqt", "synqt-unchunked") and train and infer:
            check = {"backbone": backbone, "img_size": size, "method": method,
                     "train_over_infer": round(train / infer, 2)}
            if lora:
                check["lora_train_over_train"] = round(lora / train, 2)
            checks.append(check)
    return checks


def write_results(args: argparse.Namespace, rows: list[dict[str, Any]], seconds: float) -> None:
    import timm
    import torch

    meta = {
        "command": "benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "threads": args.threads, "batch": args.batch,
        "malloc_mmap_threshold": None if args.glibc_default else 65536,
        "measured_steps": args.steps, "seconds": round(seconds, 1),
        "targets": {"train_over_infer": "<= 1.3", "lora_train_over_train": ">= 3 at 224 px"},
    }
    checks = summarize(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({**meta, "summary": checks, "rows": rows}, indent=2))
    lines = [
        f"# Adapter memory on CPU (batch {args.batch}, {args.threads} thread(s), torch {torch.__version__})",
        "",
        "Peak = resident-set high-water mark minus the idle process (model, optimizer and batch loaded);",
        "one fresh process per row. Method and caveats: docs/synqt.md and benchmarks/memory.py.",
        "",
        "| backbone | px | method | trainable | train peak MiB | train step ms | infer peak MiB | infer ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["backbone"], r["img_size"], r["method"], r["phase"]): r for r in rows}
    for backbone, size, method in dict.fromkeys((r["backbone"], r["img_size"], r["method"]) for r in rows):
        train, infer = by_key.get((backbone, size, method, "train")), by_key.get((backbone, size, method, "infer"))
        cells = [f"{r['peak_above_idle_mib']} | {r['step_ms']}" if r else "- | -" for r in (train, infer)]
        trainable = (train or infer or {}).get("trainable_params", 0)
        lines.append(f"| {backbone} | {size} | {method} | {trainable:,} | {cells[0]} | {cells[1]} |")
    lines += ["", "| backbone | px | variant | train peak / own infer peak (target <= 1.3) "
              "| lora train peak / train peak (target >= 3 at 224 px) |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['backbone']} | {c['img_size']} | {c['method']} | {c['train_over_infer']} "
                     f"| {c.get('lora_train_over_train', '-')} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("BACKBONE", "SIZE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--backbones", nargs="+", default=["efficientvit_b0", "mobilevit_xxs"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 224])
    parser.add_argument("--methods", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on shared cores)")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's adaptive mmap threshold")
    parser.add_argument("--out", default="memory")
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        backbone, size, method = args.worker
        print(json.dumps(measure(backbone, int(size), method, args.batch, args.steps)), flush=True)
        return
    start, rows = time.perf_counter(), []
    for backbone in args.backbones:
        for size in args.sizes:
            for method in args.methods:
                for row in run_isolated(args, backbone, size, method):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    write_results(args, rows, time.perf_counter() - start)


if __name__ == "__main__":
    main()
