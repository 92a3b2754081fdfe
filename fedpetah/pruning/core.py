"""Structured pruning of a hybrid backbone, recorded as a JSON history that replays on a fresh timm model.

A history is a list of steps, applied in order:

- ``{"op": "remove_block", "module": NAME}``: residual block replaced by ``nn.Identity``;
- ``{"op": "slim_heads", "module": NAME, "layout": "vit"|"mqa", "heads": [INT, ...]}``: whole
  attention heads cut and the module's head count rewritten;
- ``{"op": "width", "groups": [[LAYER, IS_OUT, [INT, ...]], ...]}``: torch-pruning's own pruning
  history, replayed through a dependency graph built on the model as it is at that step.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from fedpetah.backbone import Backbone, BackboneFamily
from fedpetah.config import PruningConfig
from fedpetah.pruning.policy import PrunePolicy, policy_of
from fedpetah.pruning.ports import PORT_PRUNERS, has_ports, opaque
from fedpetah.pruning.structure import (
    block_candidates,
    block_scores,
    head_layout,
    head_scores,
    least_important_blocks,
    remove_block,
    remove_heads,
)

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
"""Images per proxy calibration batch when the caller passes no calibration data."""


def prune_backbone(
    backbone: Backbone,
    config: PruningConfig,
    calibration: Iterable[torch.Tensor] | None = None,
    policy: PrunePolicy | None = None,
) -> Backbone:
    """A new, physically pruned and frozen copy of ``backbone``; the input is left untouched.

    ``policy`` (default: the family's) says what may be cut. Order: remove
    ``config.remove_blocks`` residual blocks plus those of the policy's depth rule, slim attention
    heads (a fraction ``config.ratio`` of each attention's heads, at least one kept), then prune a
    fraction ``config.ratio`` of the channels of every group outside attention modules (and of the
    attention's input/output channels where the policy opens them), rounded to
    ``config.round_to``. Block importance is the relative change a block makes to its input on
    the calibration batches. Taylor importance (``config.importance == "taylor"``) uses the
    gradient of the mean squared pooled feature (the backbone's feature energy) on those batches.
    ``calibration`` yields float images in [0, 1] shaped (N, C, S, S); without it, scikit-learn's
    digits (the warm-up proxy) are used. ``config.ratio == 0`` returns an unmodified copy.
    """
    module = copy.deepcopy(backbone.module).eval()
    history: list[Any] = copy.deepcopy(backbone.pruning_history)
    if config.ratio == 0:
        return _with(backbone, module.requires_grad_(False), history)
    taylor = config.importance == "taylor"
    policy = policy or policy_of(backbone.family)
    by_depth = policy.depth_ratio > 0 and config.ratio > 0
    batches = (
        _calibration_batches(backbone, config, calibration)
        if taylor or config.remove_blocks or by_depth
        else []
    )
    example = torch.zeros(1, backbone.in_chans, backbone.img_size, backbone.img_size)
    with _trainable(module):
        if config.remove_blocks or by_depth:
            scores = block_scores(module, block_candidates(module, policy.removable_blocks), batches)
            count = config.remove_blocks + policy.blocks_to_remove(config.ratio, len(scores))
            for name in least_important_blocks(scores, count):
                remove_block(module, name)
                history.append({"op": "remove_block", "module": name})
        if taylor:  # one-shot: every score below comes from these gradients (pruning slices them)
            _accumulate_gradients(module, batches)
        if config.prune_heads and policy.head_layout is None:
            log.info("%s: attention heads kept: %s", backbone.model_name, policy.head_skip_reason)
        elif config.prune_heads and policy.head_layout is not None:
            history += _slim_heads(module, backbone.family, policy.head_layout, config.ratio, taylor)
        importance = tp.importance.TaylorImportance() if taylor else tp.importance.MagnitudeImportance()
        attention = _attention_modules(module, backbone.family)
        opened = [m for m in attention if policy.prune_ports and has_ports(m)]
        with _quiet_unwrapped(), opaque(opened) as customized:
            pruner = tp.pruner.MetaPruner(
                module,
                example,
                importance,
                pruning_ratio=config.ratio,
                ignored_layers=[m for m in attention if m not in opened],
                customized_pruners=customized,
                round_to=config.round_to,
            )
        pruner.step()
        groups = [[str(n), bool(out), [int(i) for i in idx]] for n, out, idx in pruner.pruning_history()]
        history.append({"op": "width", "groups": groups, "opaque": sorted({type(m).__name__ for m in opened})})
    _check_output(module, example)
    clear_attention_caches(module)
    return _with(backbone, module, history)


def replay_pruning(
    module: nn.Module, family: BackboneFamily, history: list[Any], img_size: int, in_chans: int = 3
) -> None:
    """Rebuild the pruned module tree on a fresh timm model in place; load the weights afterwards.

    Every step is validated first-hand (names must be submodules, indices integers, layouts the
    family's own); a malformed history raises ``ValueError``.
    """
    if not isinstance(history, list):
        raise ValueError(f"pruning history must be a list, got {type(history).__name__}")
    policy = policy_of(family)
    module.eval()
    for number, step in enumerate(history):
        if not isinstance(step, dict) or not isinstance(step.get("op"), str):
            raise ValueError(f"pruning step {number} is not an object with an 'op'")
        op = step["op"]
        if op == "remove_block":
            remove_block(module, _submodule_name(module, step.get("module")))
        elif op == "slim_heads":
            layout = step.get("layout")
            if not isinstance(layout, str) or layout != policy.head_layout:
                raise ValueError(f"step {number}: head layout {layout!r} does not belong to {family.name}")
            attn = module.get_submodule(_submodule_name(module, step.get("module")))
            remove_heads(attn, head_layout(layout), _int_list(step.get("heads")))
        elif op == "width":
            groups = _width_groups(module, step.get("groups"))
            classes = _opaque_classes(step.get("opaque", []))
            opened = [m for m in module.modules() if family.is_attention(m) and type(m).__name__ in classes]
            example = torch.zeros(1, in_chans, img_size, img_size)
            with _trainable(module), _quiet_unwrapped():
                with opaque(opened) as customized:
                    graph = tp.DependencyGraph().build_dependency(
                        module, example_inputs=example, customized_pruners=customized
                    )
                graph.load_pruning_history(groups)
        else:
            raise ValueError(f"pruning step {number}: unknown op {op!r}")
    clear_attention_caches(module)


def clear_attention_caches(module: nn.Module) -> None:
    """Drop timm's eval-mode attention-bias caches (EfficientFormerV2, LeViT, ...).

    They are filled on the first eval forward and only cleared by ``.train()``: after pruning
    they hold tensors attached to the tracing graph (which breaks ``deepcopy``), and after
    ``load_state_dict`` they would silently keep the old biases.
    """
    for sub in module.modules():
        if isinstance(getattr(sub, "attention_bias_cache", None), dict):
            setattr(sub, "attention_bias_cache", {})  # noqa: B010  (a plain attribute, not a submodule)


def _with(backbone: Backbone, module: nn.Module, history: list[Any]) -> Backbone:
    return replace(
        backbone,
        module=module,
        pruning_history=history,
        create_kwargs=dict(backbone.create_kwargs),
        pretraining=dict(backbone.pretraining),
    )


def _attention_modules(module: nn.Module, family: BackboneFamily) -> list[nn.Module]:
    return [m for m in module.modules() if family.is_attention(m)]


def _slim_heads(
    module: nn.Module,
    family: BackboneFamily,
    layout_name: str,
    ratio: float,
    taylor: bool,
) -> list[dict[str, Any]]:
    layout = head_layout(layout_name)
    steps: list[dict[str, Any]] = []
    for name, attn in list(module.named_modules()):
        if not family.is_attention(attn) or type(attn).__name__ != layout.attention_class:
            continue
        total = layout.num_heads(attn)
        count = min(int(ratio * total), total - 1)
        if count == 0:
            continue
        heads = sorted(int(h) for h in torch.argsort(head_scores(attn, layout, taylor))[:count])
        remove_heads(attn, layout, heads)
        steps.append({"op": "slim_heads", "module": name, "layout": layout_name, "heads": heads})
    return steps


def _calibration_batches(
    backbone: Backbone, config: PruningConfig, calibration: Iterable[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Up to ``config.calibration_batches`` validated batches, normalized as the backbone expects."""
    shape = (backbone.in_chans, backbone.img_size, backbone.img_size)
    source = calibration if calibration is not None else _proxy_batches(backbone, config.calibration_batches)
    batches: list[torch.Tensor] = []
    for batch in source:
        if len(batches) == config.calibration_batches:
            break
        if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.ndim != 4:
            raise ValueError("calibration batches must be float tensors shaped (N, C, S, S)")
        if tuple(batch.shape[1:]) != shape:
            raise ValueError(f"calibration batch shape {tuple(batch.shape)} does not match (N, *{shape})")
        mean = torch.tensor(backbone.mean).view(1, -1, 1, 1)
        std = torch.tensor(backbone.std).view(1, -1, 1, 1)
        batches.append((batch.float() - mean) / std)
    if not batches:
        raise ValueError("calibration yielded no batches")
    return batches


def _proxy_batches(backbone: Backbone, count: int) -> Iterator[torch.Tensor]:
    """scikit-learn's 8x8 digits, resized to the backbone's input: the offline warm-up proxy."""
    from sklearn.datasets import load_digits  # imported on use: a device never calibrates pruning

    images = torch.tensor(load_digits().images[: count * CALIBRATION_BATCH], dtype=torch.float32) / 16.0
    for chunk in images.unsqueeze(1).split(CALIBRATION_BATCH):
        resized = F.interpolate(chunk, size=(backbone.img_size,) * 2, mode="bilinear", align_corners=False)
        yield resized.clamp(0, 1).expand(-1, backbone.in_chans, -1, -1).contiguous()


def _accumulate_gradients(module: nn.Module, batches: list[torch.Tensor]) -> None:
    """Fill ``.grad`` with d(mean squared pooled feature)/dw summed over the batches (eval mode)."""
    module.zero_grad(set_to_none=True)
    for batch in batches:
        module(batch).pow(2).mean().backward()


@contextmanager
def _trainable(module: nn.Module) -> Iterator[None]:
    """Tracing and Taylor scores need autograd; the result is frozen again, gradients dropped."""
    module.requires_grad_(True)
    try:
        yield
    finally:
        module.zero_grad(set_to_none=True)
        module.requires_grad_(False)


@contextmanager
def _quiet_unwrapped() -> Iterator[None]:
    """torch-pruning warns about bare parameters (layer scales, temperatures) on every hybrid."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        yield


@torch.no_grad()
def _check_output(module: nn.Module, example: torch.Tensor) -> None:
    out = module(example)
    if out.ndim != 2:
        raise RuntimeError(f"pruned backbone returns shape {tuple(out.shape)}, not pooled (N, C) features")
    if not torch.isfinite(out).all():
        raise RuntimeError("pruned backbone returns non-finite features")


def _submodule_name(module: nn.Module, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"pruning step names no module: {name!r}")
    try:
        module.get_submodule(name)
    except AttributeError:
        raise ValueError(f"pruning step names {name!r}, which is not a submodule") from None
    return name


def _int_list(values: object) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise ValueError(f"expected a list of integers, got {str(values)[:80]}")
    return values


def _opaque_classes(names: object) -> set[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) and n in PORT_PRUNERS for n in names):
        raise ValueError(f"width step: 'opaque' must list attention classes of {sorted(PORT_PRUNERS)}")
    return set(names)


def _width_groups(module: nn.Module, groups: object) -> list[list[Any]]:
    if not isinstance(groups, list):
        raise ValueError("width step needs a list of groups")
    checked: list[list[Any]] = []
    for group in groups:
        if not isinstance(group, list) or len(group) != 3 or not isinstance(group[1], bool):
            raise ValueError(f"malformed width group {str(group)[:80]}")
        checked.append([_submodule_name(module, group[0]), group[1], _int_list(group[2])])
    return checked
