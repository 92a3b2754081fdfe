"""Size and batch-1 CPU latency of the exported task-free model (ONNX Runtime; ExecuTorch when installed) against
the unmerged PyTorch one.

A bank of ``--tasks`` split_mnist LoRA adapters is trained briefly on the backbone the server ships, with router
statistics from the tasks' training data; the forms are timed interleaved (one call of each, repeated), and the
load average is recorded beside every timing.

Run: ``.venv/bin/python benchmarks/export.py`` (writes benchmarks/results/export.{json,md}).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.artifact import load_artifact
from fedpetah.bank import AdapterBank
from fedpetah.config import RouterConfig, TrainConfig
from fedpetah.routing.export import write_export
from fedpetah.routing.features import FrozenFeatures, data_stats
from fedpetah.routing.model import TaskFreeModel
from fedpetah.routing.predict import build_predictor
from fedpetah.serving.pipeline import prepare_artifact
from fedpetah.tasks import TaskStreamConfig, batches, build_stream
from fedpetah.train import train_adapter
from server.bundle import compose_experiment

RESULTS = Path(__file__).parent / "results"
NAMES = {"onnx": "ONNX Runtime", "pytorch_unmerged": "unmerged PyTorch", "executorch": "ExecuTorch (XNNPACK)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapter", default="lora")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="training steps per task (accuracy is not the point)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="export")
    parser.add_argument("--no-executorch", action="store_true", help="skip model.pte even if executorch is installed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = load_artifact(prepare_artifact(compose_experiment([])))  # the pruned backbone the server ships
    tasks = build_stream(TaskStreamConfig(name="split_mnist"))[: args.tasks]
    config, router = adapter_config(args.adapter), RouterConfig()
    bank, stats, unmerged = AdapterBank(), {}, []
    for task in tasks:
        adapter = build_adapter(config, backbone, task.num_classes)
        train_adapter(adapter, task.train,
                      TrainConfig(epochs=1, max_steps=args.steps, batch_size=32, loss="cross_entropy"))
        bank.add_task(task.index, args.adapter, task.num_classes, adapter.state(), task.classes,
                      {"task_name": task.name})
        stats[task.index] = data_stats(backbone, task.train, task.num_classes, router)
        unmerged.append(adapter.model.eval())
    predictor = build_predictor(backbone, config, bank, stats, router=router)
    features = FrozenFeatures(backbone.module, backbone.mean, backbone.std, router.grid)
    pytorch = TaskFreeModel(features, predictor.model.router, unmerged, predictor.model.widths,
                            shared=[False] * len(unmerged), joint=router.joint)  # peft layers as trained, not merged
    pte = importlib.util.find_spec("executorch") is not None and not args.no_executorch
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_export(predictor, backbone, config, Path(tmp), pte=pte)
        export_s = time.perf_counter() - start
        sizes = {p.name: p.stat().st_size for p in Path(tmp).iterdir() if p.is_file()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(Path(tmp) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        x = next(batches(tasks[0].test, backbone.img_size, backbone.in_chans, 1))[0]
        forms: dict[str, Callable[[], torch.Tensor]] = {
            "onnx": lambda: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
            "pytorch_unmerged": lambda: pytorch(x),
        }
        if pte:
            from executorch.runtime import Runtime

            method = Runtime.get().load_program(str(Path(tmp) / "model.pte")).load_method("forward")
            forms["executorch"] = lambda: method.execute([x])[0]
    timings: dict[str, list[float]] = {name: [] for name in forms}
    load = []
    with torch.no_grad():
        for _ in range(3):  # warm-up
            for call in forms.values():
                call()
        for _ in range(args.repeats):
            for name, call in forms.items():
                start = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - start)
            load.append(os.getloadavg()[0])
        reference = pytorch(x)  # the forms agree (the check the tests make on a tiny backbone)
        max_abs_diff = {name: float((call() - reference).abs().max()) for name, call in forms.items()
                        if name != "pytorch_unmerged"}
    median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    adapter_bytes = sum(t.numel() * t.element_size() for e in bank.tasks() for t in bank[e].state.values())
    versions = {"torch": torch.__version__, "onnxruntime": ort.__version__,
                **({"executorch": importlib.metadata.version("executorch")} if pte else {})}
    result = {"adapter": args.adapter, "tasks": args.tasks, "labels": len(predictor.labels), "sizes": sizes,
              "adapter_state_bytes": adapter_bytes, "export_seconds": export_s, "batch1_median_s": median,
              "speedup": {k: median["pytorch_unmerged"] / v for k, v in median.items() if k != "pytorch_unmerged"},
              "max_abs_diff": max_abs_diff, "load_average": load, **versions}
    print(json.dumps({k: v for k, v in result.items() if k != "load_average"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    latency = ", ".join(f"{NAMES[k]} {1000 * v:.1f} ms" + (f" ({result['speedup'][k]:.2f}x)" if k in result["speedup"]
                                                          else "") for k, v in median.items())
    lines = [f"# Export of {args.tasks} {args.adapter} tasks (efficientvit_b0, 64 px, pruned 0.5)", "",
             "| file | bytes |", "|---|---|", *[f"| {k} | {v:,} |" for k, v in sorted(sizes.items())], "",
             f"Batch-1 CPU latency, 1 thread, median of {args.repeats} interleaved calls (load average "
             f"{min(load):.1f}-{max(load):.1f}; speed-up against the unmerged PyTorch model): {latency}.",
             "Largest difference from the unmerged PyTorch model's scores: "
             + ", ".join(f"{NAMES[k]} {v:.2e}" for k, v in max_abs_diff.items()) + ".",
             f"Export took {export_s:.1f} s" + (" (most of it ExecuTorch's lowering)" if pte else "") + ". "
             + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
