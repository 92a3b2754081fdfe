"""The one interface every adapter implements: attach, trainable tensors, state, merge."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.nn as nn

from fedpetah.adapters.registry import ADAPTERS
from fedpetah.backbone import Backbone
from fedpetah.model import TaskModel
from fedpetah.registry import type_argument


@dataclass
class AdapterConfig:
    """Base of every adapter's typed config; ``name`` selects the adapter in the registry.

    A registered ``name`` must be an adapter whose config class is exactly this one (build it with
    :func:`~fedpetah.adapters.adapter_config`).
    """

    name: str

    def __post_init__(self) -> None:
        expected = ADAPTERS.get(self.name).config_class if self.name in ADAPTERS else AdapterConfig
        if type(self) is not expected:
            raise ValueError(f"adapter {self.name!r} takes {expected.__name__}, not {type(self).__name__}")


C = TypeVar("C", bound=AdapterConfig)

MAX_RANK = 1024
"""The largest low-rank factor an adapter config may ask for: configs also arrive from a server, and a device
builds what they say before it can compare the result with the state it was sent."""


class Adapter(ABC, Generic[C]):
    """One task's trainable part on a private copy of a frozen backbone.

    ``model`` is the :class:`TaskModel` to train and evaluate; only the tensors returned by
    :meth:`trainable` require gradients, and exactly those travel in :meth:`state`.

    A subclass names its config type once, as the type argument (``class SynQTAdapter(Adapter[SynQTConfig])``):
    that sets ``config_class`` and types ``self.config``; ``@ADAPTERS.register(name)`` sets ``name``.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    config: C

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.config_class = type_argument(cls, AdapterConfig) or cls.config_class

    def __init__(self, backbone: Backbone, num_classes: int, config: C) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs {self.config_class.__name__}")
        self.config = config
        self.backbone = backbone
        module = copy.deepcopy(backbone.module)
        module.requires_grad_(False)
        self.model = TaskModel(module, num_classes, backbone.img_size, backbone.mean, backbone.std)
        self.attach()
        if not self.trainable():
            raise ValueError(f"adapter {self.name!r} attached with zero trainable parameters")

    @abstractmethod
    def attach(self) -> None:
        """Modify ``self.model`` in place and mark the adapter's tensors trainable."""

    def trainable(self) -> dict[str, nn.Parameter]:
        """Trainable tensors by stable qualified name (the head's included)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def state(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the trainable tensors: what an update carries."""
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.trainable().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load exactly the trainable tensors; missing, unexpected or misshapen ones raise."""
        params = self.trainable()
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(
                f"adapter state does not match {self.name!r}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for key, param in params.items():
            value = state[key]
            if value.shape != param.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(param.shape)}")
            if not value.dtype.is_floating_point:
                raise ValueError(f"{key}: dtype {value.dtype} is not floating point")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(state[key])

    def merge(self) -> nn.Module:
        """A plain inference model (no adapter modules) whose logits match :attr:`model`."""
        merged = copy.deepcopy(self.model).eval()
        merged.requires_grad_(False)
        return merged
