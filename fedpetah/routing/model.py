"""The exported model: the router and every task's adapter as one module scoring every learned class
(:class:`TaskFreeModel`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from fedpetah.model import TaskModel
from fedpetah.routing.features import FrozenFeatures


def joint_scores(router_scores: torch.Tensor, expert_logits: Sequence[torch.Tensor], joint: float = 0.0
                 ) -> torch.Tensor:
    """``(1 - joint) log p(t | x) + joint log p(t, c | x) + log softmax(expert_t)_c``: (N, K) scores over every
    (task, class) pair (log-probabilities when ``joint`` is 0).

    ``router_scores`` are (N, K) task-major; expert ``t`` gives (N, C_t) and ``sum C_t == K``.
    """
    widths = [int(e.shape[1]) for e in expert_logits]
    if sum(widths) != router_scores.shape[1]:
        raise ValueError(f"router scores {router_scores.shape[1]} classes, experts {widths}")
    log_joint = torch.log_softmax(router_scores, dim=1)
    parts, start = [], 0
    for logits, width in zip(expert_logits, widths, strict=True):
        own = log_joint[:, start : start + width]
        log_task = torch.logsumexp(own, dim=1, keepdim=True)
        router = log_task if joint == 0.0 else (1.0 - joint) * log_task + joint * own
        parts.append(router + torch.log_softmax(logits, dim=1))
        start += width
    return torch.cat(parts, dim=1)


def task_aware_scores(expert_logits: torch.Tensor, router_scores: torch.Tensor, mix: float = 0.0) -> torch.Tensor:
    """One task's task-aware scores over its C classes: ``log softmax(expert) + mix * log softmax(router)``.

    ``expert_logits``: (N, C) the task's adapter; ``router_scores``: (N, C) the router's rows of the task's
    classes (its LDA restricted to them: a within-task Gaussian classifier; see ``RouterConfig.task_aware_mix``).
    ``mix`` 0 returns ``expert_logits`` themselves, so the prediction is the adapter's, bit for bit.
    """
    if expert_logits.shape != router_scores.shape:
        raise ValueError(f"expert logits {tuple(expert_logits.shape)}, router scores {tuple(router_scores.shape)}")
    if not (math.isfinite(mix) and mix >= 0.0):
        raise ValueError(f"mix must be finite and >= 0, got {mix}")
    if mix == 0.0:
        return expert_logits
    return torch.log_softmax(expert_logits, dim=1) + mix * torch.log_softmax(router_scores, dim=1)


def shares_frozen_backbone(expert: nn.Module, backbone: nn.Module) -> bool:
    """True for a plain :class:`TaskModel` whose backbone tensors equal the frozen backbone's (a head adapter)."""
    if type(expert) is not TaskModel:
        return False
    mine, frozen = expert.backbone.state_dict(), backbone.state_dict()
    return mine.keys() == frozen.keys() and all(
        mine[k].shape == frozen[k].shape and torch.equal(mine[k], frozen[k]) for k in mine
    )


class TaskFreeModel(nn.Module):
    """One model for every learned task: images in [0, 1] -> (N, K) scores over every learned class.

    ``experts[t]`` is task ``t``'s inference model (merged where the adapter allows); an expert that is a
    plain head on the frozen backbone reuses the router's backbone pass instead of running the backbone again.
    ``joint``: see :func:`joint_scores`; ``task_aware_mix``: see :func:`task_aware_scores`.
    """

    def __init__(self, features: FrozenFeatures, router: nn.Linear, experts: Sequence[nn.Module],
                 widths: Sequence[int], shared: Sequence[bool] | None = None, joint: float = 0.0,
                 task_aware_mix: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= joint <= 1.0:
            raise ValueError(f"joint must be in [0, 1], got {joint}")
        if not (math.isfinite(task_aware_mix) and task_aware_mix >= 0.0):
            raise ValueError(f"task_aware_mix must be finite and >= 0, got {task_aware_mix}")
        self.joint = float(joint)
        self.task_aware_mix = float(task_aware_mix)
        if len(experts) != len(widths) or sum(widths) != router.out_features:
            raise ValueError(f"{len(experts)} experts with widths {list(widths)} for {router.out_features} scores")
        self.features = features
        self.router = router
        self.widths = [int(w) for w in widths]
        if shared is None:
            shared = [shares_frozen_backbone(e, features.backbone) for e in experts]
        if len(shared) != len(experts) or any(s and not isinstance(e, TaskModel) for e, s in zip(experts, shared,
                                                                                                    strict=True)):
            raise ValueError("shared: one flag per expert, True only for a TaskModel on the frozen backbone")
        self.shared = [bool(s) for s in shared]
        self.experts = nn.ModuleList(
            [e.head if shared else e for e, shared in zip(experts, self.shared, strict=True)]  # type: ignore[misc]
        )
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The (N, K) scores and each task's (N, C_t) task-aware scores (:func:`task_aware_scores`: the expert's
        own logits when ``task_aware_mix`` is 0), in one pass."""
        pooled, routed = self.features.routed(x)
        logits = [expert(pooled) if shared else expert(x)
                  for expert, shared in zip(self.experts, self.shared, strict=True)]
        router = self.router(routed)
        aware = [task_aware_scores(own, rows, self.task_aware_mix)
                 for own, rows in zip(logits, router.split(self.widths, dim=1), strict=True)]
        return joint_scores(router, logits, self.joint), aware

    def task_scores(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """(N, C_t) task-aware scores of the task at ``position`` (in model order), running only its expert."""
        pooled, routed = self.features.routed(x)
        expert = self.experts[position]
        own = expert(pooled) if self.shared[position] else expert(x)
        start = sum(self.widths[:position])
        rows = self.router(routed)[:, start : start + self.widths[position]]
        return task_aware_scores(own, rows, self.task_aware_mix)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) the task the router alone picks for each image."""
        scores = torch.log_softmax(self.router(self.features.routed(x)[1]), dim=1)
        per_task = torch.stack([s.logsumexp(1) for s in scores.split(self.widths, dim=1)], dim=1)
        return per_task.argmax(1)


class TaskAwareModel(nn.Module):
    """One task's task-aware prediction with a router fitted elsewhere (the server's evaluation of each seen
    task): ``expert``'s logits combined with rows ``start:start + width`` of ``router`` on ``features``
    (:func:`task_aware_scores`). Runs the expert and the frozen features: with ``mix`` 0, the expert alone."""

    def __init__(self, expert: nn.Module, features: FrozenFeatures, router: nn.Linear, start: int, width: int,
                 mix: float) -> None:
        super().__init__()
        if not (start >= 0 and width >= 1 and start + width <= router.out_features):
            raise ValueError(f"rows {start}:{start + width} of a router scoring {router.out_features} classes")
        self.expert, self.features, self.router = expert, features, router
        self.start, self.width, self.mix = int(start), int(width), float(mix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.expert(x)
        if self.mix == 0.0:
            return logits
        rows = self.router(self.features.routed(x)[1])[:, self.start : self.start + self.width]
        return task_aware_scores(logits, rows, self.mix)


@torch.no_grad()
def predict_indices(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N,) index of the best-scoring learned class for float32 images (N, C, H, W) in [0, 1]."""
    model.eval()
    out = [model(chunk).argmax(1) for chunk in images.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
