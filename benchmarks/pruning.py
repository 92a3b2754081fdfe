"""Pruning benchmark: parameters, MACs, pruning time and one-thread CPU latency of hybrid backbones.

Run: ``.venv/bin/python benchmarks/pruning.py`` (writes benchmarks/results/pruning.{json,md}).
Weights are random: size, MACs and latency do not depend on their values (which blocks the depth rule
removes does, through the calibration scores). Latency is the median wall time of eval forwards of a
batch of 1 (``--repeats``) and of 32 (``--repeats-b32``), after a warm-up pass, with ``--threads`` torch
threads; the ratios of one model take turns within each repeat, and the 1-minute load average is
recorded beside every figure. The minimum (least disturbed by other jobs) is recorded beside the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedpetah.backbone import Backbone, build_backbone, create_timm_model, family_of
from fedpetah.backbone.proxy import calibration_batches, load_proxy
from fedpetah.config import BackboneConfig, PruningConfig
from fedpetah.model import feature_dim
from fedpetah.pruning import prune_backbone, prune_report, replay_pruning

RESULTS = Path(__file__).parent / "results"
ROWS = [
    "efficientvit_b0:64",
    "efficientvit_b0:224",
    "mobilevit_xxs:224",
    "mobilevitv2_050:224",
    "mobilenetv4_hybrid_medium:64",
]


@torch.no_grad()
def latencies_ms(modules: list[torch.nn.Module], batch: int, size: int, repeats: int) -> list[tuple[float, float]]:
    """(median, minimum) milliseconds of one eval forward of ``batch`` random images, per module.

    The modules take turns within each repeat, so load from other jobs on a shared CPU hits
    every variant alike instead of skewing whichever happened to run during a busy spell; the
    minimum is the forward least disturbed by other jobs.
    """
    x = torch.rand(batch, 3, size, size)
    times: list[list[float]] = [[] for _ in modules]
    for module in modules:
        module.eval()
        module(x)
    for _ in range(repeats):
        for module, record in zip(modules, times, strict=True):
            start = time.perf_counter()
            module(x)
            record.append(time.perf_counter() - start)
    return [(1000 * statistics.median(record), 1000 * min(record)) for record in times]


def shipped_structure(name: str, size: int, ratio: float, warmup_size: int) -> Backbone:
    """The tree the server ships: pruned from the cached warm-up backbone on the proxy calibration
    batches (as fedpetah.serving.pipeline does; recovery only changes weights), replayed at ``size`` on random
    weights."""
    config, pruning = BackboneConfig(name=name, img_size=warmup_size), PruningConfig(ratio=ratio)
    warm = build_backbone(config)
    calibration = calibration_batches(load_proxy(config.warmup.dataset), warmup_size, warm.in_chans,
                                      pruning.calibration_batches)
    history = prune_backbone(warm, pruning, calibration=calibration).pruning_history
    torch.manual_seed(0)
    module, kwargs = create_timm_model(name, size)
    replay_pruning(module, warm.family, history, size)
    module.eval().requires_grad_(False)
    return Backbone(module, name, warm.family, size, create_kwargs=kwargs, pruning_history=history)


def measure(
    name: str, size: int, ratios: list[float], repeats: int, repeats_b32: int, warmup_size: int | None = None
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    module, kwargs = create_timm_model(name, size)
    base = Backbone(module.eval().requires_grad_(False), name, family_of(name), size, create_kwargs=kwargs)
    rows, modules = [], []
    for ratio in ratios:
        start = time.perf_counter()
        if warmup_size is None or ratio == 0:
            pruned = prune_backbone(base, PruningConfig(ratio=ratio))
        else:
            pruned = shipped_structure(name, size, ratio, warmup_size)
        seconds = time.perf_counter() - start
        report = prune_report(base, pruned)
        modules.append(pruned.module)
        rows.append(
            {
                "model": name,
                "img_size": size,
                "ratio": ratio,
                "params": report.params_after,
                "param_ratio": round(report.param_ratio, 3),
                "mmacs": round(report.macs_after / 1e6, 2),
                "mac_ratio": round(report.mac_ratio, 3),
                "features": feature_dim(pruned.module, size),
                "heads_slimmed": sum(s["op"] == "slim_heads" for s in pruned.pruning_history),
                "blocks_removed": sum(s["op"] == "remove_block" for s in pruned.pruning_history),
                "prune_seconds": round(seconds, 2),
            }
        )
    for batch, count in ((1, repeats), (32, repeats_b32)):
        times = latencies_ms(modules, batch, size, count)
        load = round(os.getloadavg()[0], 1)
        for row, (median, least) in zip(rows, times, strict=True):
            row[f"latency_b{batch}_ms"], row[f"min_b{batch}_ms"] = round(median, 2), round(least, 2)
            row[f"load_b{batch}"] = load
            if ratios[0] == 0:
                row[f"speedup_b{batch}"] = round(times[0][0] / median, 2)
                row[f"min_speedup_b{batch}"] = round(times[0][1] / least, 2)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Pruning benchmark",
        "",
        f"`{meta['command']}` on {meta['machine']} ({meta['threads']} torch thread(s); 1-minute load average "
        f"{meta['load_before']} before, {meta['load_after']} after, and beside each latency; other jobs shared "
        "the CPU, so absolute times are noisy and only the ratios measured side by side (x) compare). Random "
        f"weights ({meta['structure']}), magnitude importance, each family's policy (heads slimmed, blocks removed "
        "where it allows). "
        "MACs count convolutions, linear layers and norms (torch-pruning's counter), not attention products.",
        "",
        "| model | px | ratio | params | x | MMACs | x | heads cut in | blocks removed | prune s "
        "| b1 ms median / min | b1 x median / min | load | b32 ms median / min | b32 x median / min | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['img_size']} | {r['ratio']} | {r['params']:,} | {r['param_ratio']} | "
            f"{r['mmacs']} | {r['mac_ratio']} | {r['heads_slimmed']} | {r['blocks_removed']} | "
            f"{r['prune_seconds']} | {r['latency_b1_ms']} / {r['min_b1_ms']} | "
            f"{r.get('speedup_b1')} / {r.get('min_speedup_b1')} | {r['load_b1']} | "
            f"{r['latency_b32_ms']} / {r['min_b32_ms']} | {r.get('speedup_b32')} / {r.get('min_speedup_b32')} | "
            f"{r['load_b32']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", nargs="*", default=ROWS, help="MODEL:PX pairs")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.0, 0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=100, help="batch-1 forwards per ratio")
    parser.add_argument("--repeats-b32", type=int, default=5, help="batch-32 forwards per ratio")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--warmup-size", type=int, default=None,
        help="prune the cached warm-up backbone built at this size (the shipped structure) instead of random weights",
    )
    parser.add_argument("--out", default="pruning")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {
        "command": "python benchmarks/pruning.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads,
        "load_before": round(os.getloadavg()[0], 1),
        "structure": "pruned on random weights" if args.warmup_size is None
        else f"the tree pruned from the {args.warmup_size} px warm-up backbone, as shipped, replayed",
    }
    rows = []
    RESULTS.mkdir(exist_ok=True)
    for spec in args.rows:  # results rewritten after every model, so an interrupted run keeps what it measured
        name, _, size = spec.partition(":")
        rows += measure(name, int(size), args.ratios, args.repeats, args.repeats_b32, args.warmup_size)
        meta["load_after"] = round(os.getloadavg()[0], 1)
        (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS / f"{args.out}.md").write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()
