"""Local training and evaluation of one task's adapter: deterministic, measured, device-agnostic."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedpetah.adapters import Adapter
from fedpetah.config import TrainConfig
from fedpetah.tasks import ImageSet, batches


@runtime_checkable
class FeatureCachingAdapter(Protocol):
    """Adapters whose frozen backbone features can be computed once and reused across epochs."""

    def frozen_features(self, x: torch.Tensor) -> Any: ...

    def forward_features(self, features: Any) -> torch.Tensor: ...


@dataclass
class TrainResult:
    examples: int
    steps: int
    loss: float
    accuracy: float
    step_time_ms: float
    seconds: float
    peak_memory_mb: float


@dataclass
class EvalResult:
    examples: int
    loss: float
    accuracy: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA allocation on GPUs; the process's peak resident set size on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _cached_features(adapter: FeatureCachingAdapter, data: ImageSet, img_size: int, in_chans: int,
                     device: torch.device, batch_size: int) -> Any:
    """The frozen features of every image, computed ``batch_size`` at a time (the training batch: its memory is
    then within what training itself needs, whatever the number of images)."""
    chunks = [adapter.frozen_features(x.to(device)) for x, _ in batches(data, img_size, in_chans, batch_size)]
    if isinstance(chunks[0], torch.Tensor):
        return torch.cat(chunks)
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


def _select(features: Any, index: torch.Tensor) -> Any:
    if isinstance(features, torch.Tensor):
        return features[index]
    return [f[index] for f in features]


def label_log_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) log of each class's share of ``labels``; ``-inf`` for a class that is absent."""
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    counts = torch.bincount(labels.to(torch.int64), minlength=num_classes).to(torch.float32)
    return torch.log(counts / counts.sum())


def proximal_term(params: list[nn.Parameter], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020):
    ``(mu / 2) * sum_p ||p - anchor_p||^2``, differentiable in ``params``, on their device."""
    total = params[0].new_zeros(()) if params else torch.zeros(())
    for param, start in zip(params, anchor, strict=True):
        total = total + (param - start).square().sum()
    return 0.5 * mu * total


def train_adapter(adapter: Adapter[Any], data: ImageSet, config: TrainConfig,
                  step_hook: Callable[[], None] | None = None) -> TrainResult:
    """Train ``adapter`` on ``data`` in place; returns examples, mean loss/accuracy, time and memory.

    Deterministic for a given ``config.seed``: the batch order comes from a generator seeded with it, and
    whatever draws from torch's own RNG during training (dropout) draws from a fork seeded with it, so the
    caller's RNG state is left as it was.

    With ``config.prox_mu > 0`` the loss gains FedProx's :func:`proximal_term` towards the trainable tensors as
    they are when the call starts (a client loads the global state just before): the reported loss is the
    data loss alone.

    ``step_hook`` runs after every step (and after the frozen features are cached): what it raises stops
    training there (a device's memory guard).
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty data set")
    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        return _train(adapter, data, config, device, step_hook or _no_hook)


def _no_hook() -> None:
    pass


def _train(adapter: Adapter[Any], data: ImageSet, config: TrainConfig, device: torch.device,
           step_hook: Callable[[], None]) -> TrainResult:
    model, backbone = adapter.model.to(device), adapter.backbone
    generator = torch.Generator().manual_seed(config.seed)
    params = list(adapter.trainable().values())
    optimizer = _optimizer(params, config)
    anchor = [p.detach().clone() for p in params] if config.prox_mu > 0 else None  # FedProx: the round's start
    cached = adapter if config.cache_features and isinstance(adapter, FeatureCachingAdapter) else None
    start = time.perf_counter()
    model.train()
    features = None
    if cached is not None:
        features = _cached_features(cached, data, backbone.img_size, backbone.in_chans, device, config.batch_size)
        labels = data.labels.to(device)
        step_hook()
    log_prior: torch.Tensor | None = None  # balanced loss: log of the local label frequencies, per class
    steps, seen, loss_sum, correct, step_seconds = 0, 0, 0.0, 0, 0.0
    for _ in range(config.epochs):
        if features is not None:
            order = torch.randperm(len(data), generator=generator).to(device)
            stream: Any = ((None, i) for i in order.split(config.batch_size))
        else:
            stream = batches(data, backbone.img_size, backbone.in_chans, config.batch_size, True, generator)
        for x, y in stream:
            step_start = time.perf_counter()
            if features is not None:
                index, y = y, labels[y]
                logits = cached.forward_features(_select(features, index))  # type: ignore[union-attr]
            else:
                x, y = x.to(device), y.to(device)
                logits = model(x)
            if config.loss == "balanced":
                if log_prior is None:
                    log_prior = label_log_prior(data.labels, logits.shape[1]).to(device)
                loss = F.cross_entropy(logits + log_prior, y)
            else:
                loss = F.cross_entropy(logits, y)
            objective = loss if anchor is None else loss + proximal_term(params, anchor, config.prox_mu)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            step_seconds += time.perf_counter() - step_start
            step_hook()
            if not math.isfinite(objective.item()):
                raise FloatingPointError(f"training loss became {objective.item()} at step {steps}")
            steps += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            if config.max_steps is not None and steps >= config.max_steps:
                break
        if config.max_steps is not None and steps >= config.max_steps:
            break
    model.eval()
    return TrainResult(
        examples=len(data),
        steps=steps,
        loss=loss_sum / seen,
        accuracy=correct / seen,
        step_time_ms=1000 * step_seconds / steps,
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, img_size: int, in_chans: int = 3,
             batch_size: int = 256, device: str = "cpu") -> EvalResult:
    """Loss and accuracy of ``model`` (a TaskModel or merged model) on ``data``."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    target = resolve_device(device)
    model = model.to(target).eval()
    loss_sum, correct = 0.0, 0
    for x, y in batches(data, img_size, in_chans, batch_size):
        x, y = x.to(target), y.to(target)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return EvalResult(examples=len(data), loss=loss_sum / len(data), accuracy=correct / len(data))
