"""Task-free models from an adapter bank: build, evaluate without task ids, predict "<task>/<class>" labels."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpetah.adapters import AdapterConfig, build_adapter
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank
from fedpetah.config import RouterConfig
from fedpetah.routing.features import FrozenFeatures, feature_width
from fedpetah.routing.model import TaskFreeModel, predict_indices
from fedpetah.routing.router import fit_router
from fedpetah.routing.stats import FeatureStats
from fedpetah.tasks import Task, batches


def task_label(bank: AdapterBank, task: int, class_index: int) -> str:
    """``"<task name>/<class name>"`` from the bank entry (its index and class index when unnamed)."""
    entry = bank[task]
    name = str(task) if entry.record.task_name is None else entry.record.task_name
    cls = entry.class_names[class_index] if entry.class_names else str(class_index)
    return f"{name}/{cls}"


@dataclass
class TaskFreePredictor:
    """A :class:`TaskFreeModel` with its labels (task-major) and the tasks they come from."""

    model: TaskFreeModel
    labels: list[str]
    tasks: list[int]  # per label: the task it belongs to
    task_order: list[int]  # the tasks in score order (what TaskFreeModel.route indexes)
    class_names: list[str]  # per label: the class name without its task (what a domain-incremental label means)
    img_size: int
    in_chans: int

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[str]:
        """Global labels for float32 images (N, C, img_size, img_size) in [0, 1]."""
        if images.ndim != 4 or images.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"images must be (N, {self.in_chans}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(images.shape)}")
        return [self.labels[int(i)] for i in predict_indices(self.model, images.float(), batch_size)]


def build_predictor(backbone: Backbone, adapter: AdapterConfig, bank: AdapterBank,
                    stats: Mapping[int, FeatureStats], tasks: Sequence[int] | None = None,
                    router: RouterConfig | None = None) -> TaskFreePredictor:
    """Merge every task's adapter from ``bank`` and fit the router on the tasks' statistics."""
    chosen = list(bank.tasks() if tasks is None else tasks)
    missing = [t for t in chosen if t not in stats]
    if not chosen or missing:
        raise ValueError(f"task-free prediction needs statistics for every task; missing {missing or 'all'}")
    experts, widths, labels, owners, names = [], [], [], [], []
    for task in chosen:
        entry = bank[task]
        if stats[task].num_classes != entry.num_classes:
            raise ValueError(f"task {task}: statistics for {stats[task].num_classes} classes, "
                             f"adapter for {entry.num_classes}")
        trained = build_adapter(adapter, backbone, entry.num_classes)
        trained.load_state(entry.state)
        experts.append(trained.merge())
        widths.append(entry.num_classes)
        for c in range(entry.num_classes):
            labels.append(task_label(bank, task, c))
            owners.append(task)
            names.append(entry.class_names[c] if entry.class_names else str(c))
    router = router or RouterConfig()
    features = FrozenFeatures(backbone.module, backbone.mean, backbone.std, router.grid)
    layer = fit_router([stats[t] for t in chosen], feature_width(backbone, router.grid), router)
    model = TaskFreeModel(features, layer, experts, widths, joint=router.joint, task_aware_mix=router.task_aware_mix)
    return TaskFreePredictor(model, labels, owners, chosen, names, backbone.img_size, backbone.in_chans)


@dataclass
class TaskFreeResult:
    """Accuracy without task ids on each evaluated task's test images, and the router's share of right tasks.

    A prediction is right when its class name matches (on a domain-incremental stream the same digit learned
    in another task counts); ``routing`` counts the images whose true task the router alone picked.
    """

    per_task: list[float]
    routing: list[float]
    accuracy: float
    routing_accuracy: float
    seconds_per_image: float


@torch.no_grad()
def evaluate_task_free(predictor: TaskFreePredictor, tasks: Sequence[Task], batch_size: int = 256) -> TaskFreeResult:
    """Evaluate on the test split of every task in ``tasks`` (whose indices must be among the predictor's)."""
    per_task, routing, correct, routed, total, seconds = [], [], 0, 0, 0, 0.0
    model = predictor.model.eval()
    for task in tasks:
        if task.index not in predictor.tasks:
            raise ValueError(f"task {task.index} was not learned by this predictor ({sorted(set(predictor.tasks))})")
        right = picked = 0
        for x, y in batches(task.test, predictor.img_size, predictor.in_chans, batch_size):
            start = time.perf_counter()
            best = model(x).argmax(1)
            seconds += time.perf_counter() - start
            chosen = model.route(x)
            for b, label, r in zip(best.tolist(), y.tolist(), chosen.tolist(), strict=True):
                right += predictor.class_names[b] == task.classes[label]
                picked += predictor.task_order[r] == task.index
        per_task.append(right / len(task.test))
        routing.append(picked / len(task.test))
        correct, routed, total = correct + right, routed + picked, total + len(task.test)
    return TaskFreeResult(per_task, routing, correct / total, routed / total, seconds / total)
