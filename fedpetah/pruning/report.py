"""Size and compute of a backbone before and after pruning (parameters, MACs by torch-pruning's counter)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch_pruning.utils import count_ops_and_params

from fedpetah.backbone import Backbone


@dataclass(frozen=True)
class PruneReport:
    """Parameters and multiply-accumulates of one forward pass at the backbone's input size.

    MACs are those of the layers torch-pruning's counter knows (convolutions, linear layers,
    normalizations); the attention matrix products are not included.
    """

    model_name: str
    img_size: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def mac_ratio(self) -> float:
        return self.macs_after / self.macs_before

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "param_ratio": self.param_ratio, "mac_ratio": self.mac_ratio}


@torch.no_grad()
def macs_and_params(backbone: Backbone) -> tuple[int, int]:
    """(MACs, parameters) of one image at ``backbone.img_size``."""
    example = torch.zeros(1, backbone.in_chans, backbone.img_size, backbone.img_size)
    macs, params = count_ops_and_params(backbone.module.eval(), example)
    return int(macs), int(params)


def prune_report(before: Backbone, after: Backbone) -> PruneReport:
    """Compare an unpruned backbone with its pruned copy; both must share model and input size."""
    if (before.model_name, before.img_size) != (after.model_name, after.img_size):
        raise ValueError(
            f"cannot compare {before.model_name}@{before.img_size} with {after.model_name}@{after.img_size}"
        )
    macs_before, params_before = macs_and_params(before)
    macs_after, params_after = macs_and_params(after)
    return PruneReport(before.model_name, before.img_size, params_before, params_after, macs_before, macs_after)
