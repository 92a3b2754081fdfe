"""Test helpers: a tiny backbone's learned-tasks snapshot (as a server sends it), a device cache holding the
backbone, and device folders of random images for the snapshot's tasks."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedpetah.adapters import AdapterConfig, adapter_config, build_adapter
from fedpetah.artifact import MANIFEST, WEIGHTS
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank
from fedpetah.config import ROUTER_KEY, RouterConfig
from fedpetah.device.local import BackboneCache
from fedpetah.routing.export import MODEL_FILE, WEIGHTS_FILE, bank_stats, write_export
from fedpetah.routing.features import feature_width
from fedpetah.routing.predict import TaskFreePredictor, build_predictor
from fedpetah.routing.stats import class_stats
from fedpetah.wire.protocol import TaskInfo

ROUTER = RouterConfig(dim=16, task_aware_mix=0.0)  # the adapters alone: tests that mix say so
TASKS = (TaskInfo(0, "t0", ("c00", "c01")), TaskInfo(1, "t1", ("c10", "c11", "c12")))


@dataclass
class Learned:
    """A snapshot of ``tasks``: the predictor it was built from, its bank, and what a server sends."""

    backbone: Backbone
    digest: str
    adapter: AdapterConfig
    bank: AdapterBank
    predictor: TaskFreePredictor
    model: bytes
    manifest: bytes
    artifact: tuple[bytes, bytes]
    tasks: tuple[TaskInfo, ...] = TASKS


def learned(backbone: Backbone, seed: int = 0, version: int = 1, tasks: tuple[TaskInfo, ...] = TASKS,
            router: RouterConfig = ROUTER) -> Learned:
    """LoRA adapters moved away from their initial values and router statistics for ``tasks`` (``router``: the
    config the snapshot is built with; the tensors depend only on its dim, seed and grid)."""
    adapter = adapter_config("lora", rank=2)
    bank = AdapterBank({ROUTER_KEY: asdict(router)})
    width = router.width(feature_width(backbone, router.grid))
    g = torch.Generator().manual_seed(seed)
    for task in tasks:
        size = task.num_classes
        initial = build_adapter(adapter, backbone, size).state()
        state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in initial.items()}
        bank.add_task(task.index, "lora", size, state, list(task.classes), {"task_name": task.name})
        labels = torch.arange(size).repeat(20)
        features = torch.randn(len(labels), width, generator=g) + 3 * torch.randn(size, width, generator=g)[labels]
        bank.set_stats(task.index, class_stats(features, labels, size).tensors())
    predictor = build_predictor(backbone, adapter, bank, bank_stats(bank, backbone, router), router=router)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_export(predictor, backbone, adapter, out, onnx=False)
        artifact = ((out / "backbone" / WEIGHTS).read_bytes(), (out / "backbone" / MANIFEST).read_bytes())
        digest = json.loads(artifact[1])["manifest_sha256"]
        info = json.loads((out / MODEL_FILE).read_text())
        info |= {"backbone": digest, "version": version}  # what the server's export_payload writes
        model = (out / WEIGHTS_FILE).read_bytes()
    return Learned(backbone, digest, adapter, bank, predictor, model, json.dumps(info).encode(), artifact, tasks)


def device_cache(root: Path, snapshot: Learned) -> BackboneCache:
    """A device's backbone cache in ``root`` holding the snapshot's backbone."""
    cache = BackboneCache(root)
    cache.install(snapshot.digest, *snapshot.artifact)
    return cache


def write_images(root: Path, tasks: tuple[TaskInfo, ...], per_class: int, seed: int = 0, start: int = 0,
                 size: int = 12) -> list[Path]:
    """``root/<task>/<class>/<n>.png`` random RGB images (distinct content: distinct hashes); the paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for task in tasks:
        for name in task.classes:
            folder = root / task.name / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(start, start + per_class):
                path = folder / f"{n}.png"
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
                paths.append(path)
    return paths
