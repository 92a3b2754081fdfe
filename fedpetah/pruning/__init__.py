"""Structured pruning of hybrid backbones: per-family policies, JSON-replayable history, size reports."""

from fedpetah.pruning.core import clear_attention_caches, prune_backbone, replay_pruning
from fedpetah.pruning.policy import POLICIES, PrunePolicy, policy_of
from fedpetah.pruning.report import PruneReport, macs_and_params, prune_report
from fedpetah.pruning.structure import HEAD_LAYOUTS

__all__ = [
    "HEAD_LAYOUTS",
    "POLICIES",
    "PrunePolicy",
    "PruneReport",
    "clear_attention_caches",
    "macs_and_params",
    "policy_of",
    "prune_backbone",
    "prune_report",
    "replay_pruning",
]
