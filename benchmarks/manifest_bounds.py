"""How far real backbones are from the manifest bounds of fedpetah.artifact (image size, tensors, parameters,
pruning steps, manifest bytes).

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/manifest_bounds.py`` (writes
benchmarks/results/manifest_bounds.{json,md}). Every supported timm hybrid is built at ``--size`` px with random
weights (sizes do not depend on the values); the largest model of each family is also pruned (``--ratio``, heads
and channels) at ``--prune-size`` px, since a pruning history names channels, not pixels. Every manifest passes
``check_manifest_bounds`` (the script stops otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedpetah import artifact
from fedpetah.backbone import Backbone, create_timm_model, family_of
from fedpetah.backbone.families import supported_models
from fedpetah.config import PruningConfig
from fedpetah.pruning import prune_backbone

RESULTS = Path(__file__).parent / "results"


def tensor_specs(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in module.state_dict().items()}


def manifest_body(backbone: Backbone) -> dict[str, Any]:
    """What ``pack_artifact`` writes into manifest.json, with placeholder digests (the weights are not serialised)."""
    return {
        "format_version": artifact.FORMAT_VERSION, "model_name": backbone.model_name, "family": backbone.family.name,
        "create_kwargs": dict(backbone.create_kwargs), "img_size": backbone.img_size, "in_chans": backbone.in_chans,
        "mean": list(backbone.mean), "std": list(backbone.std), "pruning_history": backbone.pruning_history,
        "pretraining": {}, "num_params": backbone.num_params(), "weights_sha256": "0" * 64,
        "tensors": tensor_specs(backbone.module), "manifest_sha256": "0" * 64,
    }


def build(name: str, size: int) -> Backbone:
    torch.manual_seed(0)
    module, kwargs = create_timm_model(name, size)
    module.eval().requires_grad_(False)
    return Backbone(module, name, family_of(name), size, create_kwargs=kwargs)


def measure(name: str, size: int) -> dict[str, Any]:
    body = manifest_body(build(name, size))
    artifact.check_manifest_bounds(body)  # raises if a real model is outside the bounds
    specs = body["tensors"]
    return {
        "model": name,
        "family": family_of(name).name,
        "tensors": len(specs),
        "elements": sum(math.prod(s["shape"]) for s in specs.values()),
        "max_dims": max(len(s["shape"]) for s in specs.values()),
    }


def pruned_manifest(name: str, size: int, ratio: float) -> dict[str, Any]:
    """The manifest ``pack_artifact`` would write for ``name`` pruned at ``ratio``, checked against the bounds."""
    backbone = build(name, size)
    started = time.perf_counter()
    pruned = prune_backbone(backbone, PruningConfig(ratio=ratio))
    seconds = time.perf_counter() - started
    body = manifest_body(pruned)
    artifact.check_manifest_bounds(body)
    history = pruned.pruning_history
    return {
        "model": name,
        "manifest_bytes": len(json.dumps(body, indent=1, sort_keys=True)),
        "pruning_steps": len(history),
        "width_steps": sum(1 for step in history if step["op"] == "width"),
        "pruned_indices": sum(len(g[2]) for step in history if step["op"] == "width" for g in step["groups"]),
        "prune_seconds": round(seconds, 1),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--prune-size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    models = [measure(name, args.size) for name in supported_models()]
    largest: dict[str, dict[str, Any]] = {}
    for row in models:
        if row["elements"] > largest.get(row["family"], {"elements": -1})["elements"]:
            largest[row["family"]] = row
    pruned = [pruned_manifest(row["model"], args.prune_size, args.ratio) for row in largest.values()]
    limits = {name: getattr(artifact, name) for name in dir(artifact) if name.startswith(("MAX_", "MIN_"))}
    result = {"size": args.size, "prune_size": args.prune_size, "ratio": args.ratio, "limits": limits,
              "models": models, "pruned": pruned}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "manifest_bounds.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Manifest bounds against real backbones\n\nCommand: `python benchmarks/manifest_bounds.py "
             f"--size {args.size} --prune-size {args.prune_size} --ratio {args.ratio}`. Every manifest below is within "
             "the limits of fedpetah/artifact.py: " + ", ".join(f"`{k}` = {v}" for k, v in limits.items()) + ".\n",
             f"\n## Every supported model at {args.size} px\n", "| model | tensors | elements | max dims |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['tensors']} | {r['elements']:,} | {r['max_dims']} |" for r in models]
    lines += [f"\n## Largest model per family, pruned at ratio {args.ratio}\n",
              "| model | manifest bytes | pruning steps | width steps | pruned indices | prune s | load avg |",
              "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['manifest_bytes']:,} | {r['pruning_steps']} | {r['width_steps']} | "
              f"{r['pruned_indices']:,} | {r['prune_seconds']} | {', '.join(f'{x:.1f}' for x in r['load_average'])} |"
              for r in pruned]
    (RESULTS / "manifest_bounds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
