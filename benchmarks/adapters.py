"""Adapter sizes per backbone: trainable parameters and bytes of one update, against the pruned backbone.

Run: ``.venv/bin/python benchmarks/adapters.py`` (writes benchmarks/results/adapters.{json,md}).
Step time and training memory per adapter: benchmarks/memory.py; CPU latency per pruning ratio:
benchmarks/pruning.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpetah.adapters import ADAPTERS, adapter_config, build_adapter
from fedpetah.backbone import build_backbone
from fedpetah.config import BackboneConfig, PruningConfig
from fedpetah.pruning import prune_backbone
from fedpetah.serving.metrics import tensor_bytes

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+",
                        default=["efficientvit_b0", "edgenext_xx_small", "mobilevit_xxs", "mobilevitv2_050"])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--classes", type=int, default=2, help="classes of the task head")
    args = parser.parse_args()
    rows = []
    for name in args.backbones:
        full = build_backbone(BackboneConfig(name=name, img_size=args.img_size, weights="random"))
        pruned = prune_backbone(full, PruningConfig(ratio=args.ratio))
        backbone_bytes = tensor_bytes(pruned.module.state_dict())
        for adapter in ADAPTERS.names():
            state = build_adapter(adapter_config(adapter), pruned, args.classes).state()
            update = tensor_bytes(state)
            rows.append({
                "backbone": name, "pruning_ratio": args.ratio, "adapter": adapter,
                "backbone_params": pruned.num_params(), "backbone_bytes": backbone_bytes,
                "trainable_params": sum(t.numel() for t in state.values()),
                "update_bytes": update, "update_over_backbone": round(update / backbone_bytes, 4),
            })
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adapters.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"# Adapter update size ({args.img_size} px, backbones pruned at {args.ratio}, {args.classes}-class head)",
        "",
        "| backbone | backbone params | adapter | trainable params | update bytes | update / backbone bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['backbone_params']:,} | {r['adapter']} | {r['trainable_params']:,} "
                     f"| {r['update_bytes']:,} | {100 * r['update_over_backbone']:.2f}% |")
    (RESULTS / "adapters.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
