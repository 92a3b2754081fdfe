"""Per-family pruning rules as data: which blocks may be removed, how attention heads are slimmed."""

from __future__ import annotations

from dataclasses import dataclass

from fedpetah.backbone import BackboneFamily
from fedpetah.registry import Registry


@dataclass(frozen=True)
class PrunePolicy:
    """What structured pruning may touch in one backbone family.

    Layers inside the family's attention modules are always kept out of the channel-pruning
    groups: torch-pruning cannot rewrite the head bookkeeping of timm's hybrid attention blocks
    (measured: IndexError / split_with_sizes / reshape failures on every family otherwise).

    - ``removable_blocks``: class names of residual blocks that may be replaced by ``Identity``
      (only where they sit in an ``nn.Sequential`` and keep their input shape);
    - ``head_layout``: a key of :data:`fedpetah.pruning.structure.HEAD_LAYOUTS` naming how
      whole heads are cut from this family's attention, or ``None`` with ``head_skip_reason``;
    - ``prune_ports``: the attention's input and output channels join the channel groups of the
      stream around it (needs a pruner in :data:`fedpetah.pruning.ports.PORT_PRUNERS`); otherwise
      the attention module keeps them, and so does the residual stream it sits on;
    - ``depth_ratio``: at pruning ratio ``r``, ``floor(r * depth_ratio * n)`` of the ``n`` removable
      blocks are removed too (least important first), on top of ``PruningConfig.remove_blocks``.
    """

    removable_blocks: tuple[str, ...] = ()
    head_layout: str | None = None
    head_skip_reason: str = "no head-slimming rule for this family"
    prune_ports: bool = False
    depth_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.head_layout is None and not self.head_skip_reason:
            raise ValueError("a policy without head_layout must say why (head_skip_reason)")
        if not 0.0 <= self.depth_ratio <= 1.0:
            raise ValueError(f"depth_ratio must be in [0, 1], got {self.depth_ratio}")

    def blocks_to_remove(self, ratio: float, candidates: int) -> int:
        """How many of ``candidates`` removable blocks the depth rule removes at ``ratio``."""
        return int(ratio * self.depth_ratio * candidates)


POLICIES: Registry[PrunePolicy] = Registry("pruning policy")

POLICIES.add(
    "efficientvit",
    PrunePolicy(
        removable_blocks=("ResidualBlock", "EfficientVitBlock", "EfficientVitLargeBlock"),
        head_layout="lite",
        prune_ports=True,
        depth_ratio=0.9,
    ),
)
POLICIES.add(
    "edgenext",
    PrunePolicy(
        removable_blocks=("ConvBlock", "SplitTransposeBlock"),
        head_skip_reason="CrossCovarianceAttn reshapes its output back to the input width, so every "
        "head is needed to fill it",
    ),
)
POLICIES.add(
    "mobilevit",
    PrunePolicy(removable_blocks=("BottleneckBlock", "Block"), head_layout="vit"),
)
POLICIES.add(
    "mobilevitv2",
    PrunePolicy(
        removable_blocks=("BottleneckBlock", "LinearTransformerBlock"),
        head_skip_reason="LinearSelfAttention has a single linear-attention head",
    ),
)
POLICIES.add(
    "mobilenetv4_hybrid",
    PrunePolicy(
        removable_blocks=("UniversalInvertedResidual", "MobileAttention"),
        head_layout="mqa",
    ),
)
POLICIES.add(
    "efficientformerv2",
    PrunePolicy(
        removable_blocks=("EfficientFormerV2Block",),
        head_skip_reason="Attention2d mixes heads through talking-head convolutions and per-head "
        "position biases sized at construction",
    ),
)

DEFAULT_POLICY = PrunePolicy(head_skip_reason="family has no registered pruning policy")


def policy_of(family: BackboneFamily) -> PrunePolicy:
    """The family's policy, or a conservative default (channels only) for unregistered families."""
    return POLICIES.get(family.name) if family.name in POLICIES else DEFAULT_POLICY
