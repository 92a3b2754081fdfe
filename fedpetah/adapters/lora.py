"""LoRA and DoRA adapters through peft: low-rank updates of a frozen backbone's dense layers.

Target layers are chosen by layer kind (``attention``, ``mlp``, ``pointwise``, ``conv``; see
:mod:`fedpetah.backbone.families`) resolved per backbone family, or by a regex full-matched against the
qualified names of the backbone's adaptable (dense ``Linear``/``Conv2d``) layers. peft wraps each target
in place, so the trainable tensors carry stable names that depend only on the backbone's module tree::

    backbone.<layer>.lora_A.default.weight            (rank x in [x k x k])
    backbone.<layer>.lora_B.default.weight            (out x rank [x 1 x 1]), zero at init
    backbone.<layer>.lora_magnitude_vector.default.weight   (DoRA only)
    head.weight, head.bias

Construction is reproducible: the adapter tensors and the head are drawn from ``init_seed`` inside a forked
RNG, so the global torch RNG is neither read nor advanced. ``freeze_a`` is FFA-LoRA (Sun et al., ICLR 2024):
every party builds the same A from ``init_seed`` and freezes it; only B (and the head) train and travel.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
import torch.nn as nn

from fedpetah.adapters.base import MAX_RANK, Adapter, AdapterConfig
from fedpetah.adapters.registry import ADAPTERS
from fedpetah.backbone import Backbone
from fedpetah.backbone.families import LAYER_KINDS, BackboneFamily, compile_targets

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

# peft is imported where it is used: it pulls in transformers (seconds of start-up), and on a device every
# Flower message starts a fresh process, most of which (hello, install, head/synqt training) never need it.

PEFT_ADAPTER = "default"
"""The peft adapter name; it appears in every trainable tensor's name."""


@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank adaptation: ``W + (alpha / rank) * B @ A`` on the selected layers, plus the head.

    ``train_lora`` False is the ``head`` variant of a mixed fleet (``assignment=budget``): the LoRA tensors come
    with the state and are loaded, then frozen, so only the head trains (no backward through the backbone:
    training memory near inference memory) and the state from then on, the update, is the head alone."""

    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention",)
    target_regex: str | None = None
    freeze_a: bool = False
    init_seed: int = 0
    train_lora: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"{self.name}.rank must be in [1, {MAX_RANK}], got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"{self.name}.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.name}.dropout must be in [0, 1), got {self.dropout}")
        self.targets = tuple(self.targets)  # YAML lists arrive as lists
        unknown = sorted(set(self.targets) - set(LAYER_KINDS))
        if not self.targets or unknown:
            raise ValueError(
                f"{self.name}.targets must be a non-empty subset of {list(LAYER_KINDS)}, "
                f"got {list(self.targets)}"
            )
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as err:
                raise ValueError(f"{self.name}.target_regex {self.target_regex!r}: {err}") from None


@dataclass
class DoraConfig(LoraConfig):
    """DoRA (Liu et al., ICML 2024): LoRA on the direction plus a trainable per-output magnitude."""


def select_layers(
    module: nn.Module, family: BackboneFamily, kinds: tuple[str, ...], regex: str | None
) -> dict[str, str]:
    """Adaptable layers of ``module`` selected by ``regex`` (full match) or else by ``kinds``: name -> kind.

    Selecting nothing raises, listing the adaptable layer names by kind.
    """
    layers = family.classify_layers(module)
    if regex is not None:
        pattern = re.compile(regex)
        selected = {n: k for n, k in layers.items() if pattern.fullmatch(n)}
        what = f"target_regex {regex!r}"
    else:
        selected = {n: k for n, k in layers.items() if k in kinds}
        what = f"targets {list(kinds)}"
    if not selected:
        by_kind = "\n".join(
            f"  {kind}: {', '.join(n for n, k in layers.items() if k == kind) or '(none)'}"
            for kind in LAYER_KINDS
        )
        raise ValueError(f"{what} select no adaptable layer of this {family.name} backbone:\n{by_kind}")
    return selected


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from a fresh CPU RNG seeded with ``seed``; the global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def inject_lora(
    module: nn.Module, ranks: dict[str, int], scaling: float, dropout: float, use_dora: bool
) -> None:
    """Wrap each layer ``name`` of ``ranks`` in place with a peft LoRA/DoRA layer of rank ``ranks[name]``.

    Every layer gets the same scaling ``alpha / rank`` (peft's ``lora_alpha`` is set per rank group).
    Initialization draws from the global RNG: call this inside :func:`seeded` for reproducible tensors.
    """
    groups: dict[int, list[str]] = {}
    for name, rank in ranks.items():
        groups.setdefault(rank, []).append(name)
    base = max(groups, key=lambda r: len(groups[r]))
    # peft matches pattern keys as ``(.*\.)?(KEY)$``; the leading ``^`` turns that into an exact match.
    patterns = {f"^(?:{compile_targets(names)})": rank for rank, names in groups.items() if rank != base}
    import peft

    config = peft.LoraConfig(
        r=base,
        lora_alpha=scaling * base,  # type: ignore[arg-type]  # annotated int, used as a float
        lora_dropout=dropout,
        target_modules=compile_targets(list(ranks)),
        rank_pattern=patterns,
        alpha_pattern={key: scaling * rank for key, rank in patterns.items()},
        use_dora=use_dora,
        bias="none",
        init_lora_weights=True,
    )
    peft.inject_adapter_in_model(config, module, adapter_name=PEFT_ADAPTER)


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers inside ``module`` by qualified name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def merge_lora(module: nn.Module) -> None:
    """Fold every peft layer inside ``module`` into its base layer, which takes its place again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, layer.get_base_layer())
    for sub in module.modules():
        if "peft_config" in sub.__dict__:
            del sub.peft_config


L = TypeVar("L", bound=LoraConfig)


@ADAPTERS.register("lora")
class LoraAdapter(Adapter[L]):
    """LoRA through peft on the layers that ``targets`` or ``target_regex`` select, plus the head.

    Its config is exactly ``LoraConfig``; a variant names its own (``class DoraAdapter(LoraAdapter[DoraConfig])``).
    """

    use_dora: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, num_classes: int, config: L) -> None:
        if type(config) is not self.config_class:
            raise TypeError(
                f"{type(self).__name__} needs {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.targets: dict[str, str] = {}
        with seeded(config.init_seed):  # the head and the adapter tensors
            super().__init__(backbone, num_classes, config)

    def rank_of(self, kind: str) -> int:
        """The LoRA rank of a layer of this kind."""
        return self.config.rank

    def attach(self) -> None:
        config, module = self.config, self.model.backbone
        self.targets = select_layers(module, self.backbone.family, config.targets, config.target_regex)
        ranks = {name: self.rank_of(kind) for name, kind in self.targets.items()}
        inject_lora(module, ranks, config.alpha / config.rank, config.dropout, self.use_dora)
        self.model.head.requires_grad_(True)
        if config.freeze_a:
            for layer in lora_layers(module).values():
                layer.lora_A[PEFT_ADAPTER].requires_grad_(False)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load the state; with ``train_lora`` False, then freeze everything but the head (see :class:`LoraConfig`)."""
        super().load_state(state)
        if not self.config.train_lora:
            self.model.backbone.requires_grad_(False)

    def merge(self) -> nn.Module:
        merged = super().merge()
        merge_lora(merged)
        return merged


@ADAPTERS.register("dora")
class DoraAdapter(LoraAdapter[DoraConfig]):
    """DoRA through peft (``use_dora=True``): LoRA plus a trainable magnitude per output channel."""

    use_dora: ClassVar[bool] = True
