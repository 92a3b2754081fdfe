"""Typed configuration dataclasses: one per Hydra group, validated on construction; their defaults are the
default experiment's (configs/ states only what an option changes)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from fedpetah.backbone.config import BackboneConfig, WarmupConfig
from fedpetah.wire.protocol import MAX_STATS_GRID

__all__ = ["ROUTER_KEY", "BackboneConfig", "PruningConfig", "RouterConfig", "TrainConfig", "WarmupConfig"]

MAX_EPOCHS, MAX_BATCH = 1000, 4096
"""Upper bounds of local training: a device rebuilds its train config from a server's request."""


@dataclass
class PruningConfig:
    """Structured pruning through torch-pruning; ratio 0 disables it.

    The default halves the channels, and where the family policy allows the attention heads and some blocks
    (``fedpetah/pruning/policy.py``), by magnitude importance.

    ``recovery_epochs``: after pruning, the server fine-tunes the pruned backbone for that many epochs on
    the warm-up proxy data (prune, then recover), before freezing and shipping it; 0 ships it as pruned.
    """

    ratio: float = 0.5
    importance: str = "magnitude"
    prune_heads: bool = True
    remove_blocks: int = 0
    calibration_batches: int = 4
    round_to: int = 8
    recovery_epochs: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"pruning.ratio must be in [0, 1), got {self.ratio}")
        if self.importance not in {"magnitude", "taylor"}:
            raise ValueError(f"pruning.importance must be magnitude|taylor, got {self.importance!r}")
        if self.remove_blocks < 0 or self.calibration_batches < 1 or self.round_to < 1 or self.recovery_epochs < 0:
            raise ValueError(
                "pruning: remove_blocks >= 0, calibration_batches >= 1, round_to >= 1, recovery_epochs >= 0"
            )


@dataclass
class TrainConfig:
    """Local training of one task's adapter.

    The defaults are the federated recipe (``benchmarks/quality.py`` measured it against centralized
    training): with 10 rounds per task, 4 local epochs with the balanced loss, which keeps Dirichlet label
    skew from pulling the shared head towards each client's few classes.

    ``cache_features``: adapters whose backbone features do not depend on trainable tensors
    (``synqt``) compute them once per call and reuse them across epochs.
    ``loss``: ``cross_entropy``, or ``balanced``: Balanced Softmax (Ren et al., NeurIPS 2020) with the local
    data's own label frequencies, ``cross_entropy(logits + log p_local(c))`` while training. Under label skew
    a client then fits its classes' share of the shared head instead of pulling it towards them, and a
    class it lacks gets no gradient (as in FedRS). Evaluation and inference use the plain logits.
    ``prox_mu``: FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks",
    MLSys 2020): ``(prox_mu / 2) * ||w - w_global||^2`` over the trainable tensors is added to the loss, with
    ``w_global`` the state the round started from, so a client's local steps stay near the global adapter
    under skew; 0 (off) trains exactly as without it.
    """

    epochs: int = 4
    lr: float = 5e-3
    batch_size: int = 16
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    max_steps: int | None = None
    cache_features: bool = True
    loss: str = "balanced"
    prox_mu: float = 0.0
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.device not in {"cpu", "cuda", "auto"}:
            raise ValueError(f"train.device must be cpu|cuda|auto, got {self.device!r}")
        if self.optimizer not in {"adamw", "sgd"}:
            raise ValueError(f"train.optimizer must be adamw|sgd, got {self.optimizer!r}")
        if self.loss not in {"cross_entropy", "balanced"}:
            raise ValueError(f"train.loss must be cross_entropy|balanced, got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("train.epochs, batch_size and lr must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("train.max_steps must be positive when set")
        if not (math.isfinite(self.prox_mu) and self.prox_mu >= 0):
            raise ValueError(f"train.prox_mu must be finite and >= 0, got {self.prox_mu}")
        if self.epochs > MAX_EPOCHS or self.batch_size > MAX_BATCH:  # a device rebuilds this from a server's request
            raise ValueError(f"train.epochs must be at most {MAX_EPOCHS} and batch_size at most {MAX_BATCH}")


ROUTER_KEY = "router"
"""Bank metadata key of the :class:`RouterConfig` the clients' statistics were taken with."""
ROUTER_HEADS = ("lda", "ccvr")
"""How the router's layer is solved from the statistics (``router.head``; see :class:`RouterConfig`)."""


@dataclass
class RouterConfig:
    """How the task-free router is built (``router.*`` in the experiment config); ``dim``, ``seed`` and ``grid``
    fix what clients compute and send. Not frozen, so Hydra can override its fields.

    ``grid``: features the router reads: every backbone stage's output average-pooled to at most
    ``grid x grid`` cells, concatenated (0: the final pooled features only); ``dim``: width they are
    randomly projected to before statistics are taken (0: no projection; the packed within-class
    scatter costs ``2 * dim * (dim + 1)`` bytes); ``seed``: the projection's seed; ``shrinkage``: weight of
    the scaled identity in the pooled covariance (0: plain LDA, 1: nearest mean); ``prior``: ``uniform``
    over (task, class) pairs or ``counts`` (the classes' share of the data); ``joint``: weight ``a`` of the
    router's own class posterior in the scores,
    ``(1 - a) log p(t | x) + a log p(t, c | x) + log softmax(adapter_t)_c`` (0: the task only).

    ``task_aware_mix``: weight ``m`` of the statistics classifier in task-aware prediction (a task given):
    ``log softmax(adapter_t(x)) + m log softmax(router_t(x))``, where ``router_t`` is the router's rows of task
    ``t``'s classes, i.e. the LDA of the federated statistics restricted to the task's classes (a within-task
    Gaussian classifier). The statistics sum exactly across clients, so this classifier does not drift under
    label skew the way a federated head does; using them for the classifier is the idea of CCVR (Luo et al.,
    "No Fear of Heterogeneity", NeurIPS 2021) and of RanPAC's class prototypes on random projections
    (McDonnell et al., NeurIPS 2023). 0: the adapter's own logits, bit for bit (task-free scores never use it).
    Default 1 (the two classifiers' log-posteriors added), from ``benchmarks/cross_device.py``: at 200 clients,
    5% per round, Dirichlet 0.1 it lifts rotated_mnist from 60.2% to 91.2% and split_mnist from 94.2% to 98.2%
    (2 seeds each), and in the default regime split_mnist from 96.9% to 98.2% (benchmarks/results/cross_device.md).

    ``head``: how the router's layer is solved from the statistics. ``lda``: in closed form, with one pooled
    within-class covariance for every task (:func:`~fedpetah.routing.router.fit_router`). ``ccvr``: classifier
    calibration with virtual representations (Luo et al., "No Fear of Heterogeneity: Classifier Calibration for
    Federated Learning with Non-IID Data", NeurIPS 2021): ``ccvr_samples`` virtual features per class are drawn
    from a Gaussian with the class's federated mean and its own task's within-class covariance, and the layer,
    started from the LDA solution, is re-fitted to them by at most ``ccvr_steps`` L-BFGS iterations of
    cross-entropy (seeded by ``seed``: the same statistics always give the same layer). Server-side only: no raw
    data and no new upload, from the statistics the bounds and count caps of the statistics path admitted, so a
    client pulls the calibrated layer no further than its capped share of the sums.
    """

    dim: int = 512
    seed: int = 0
    shrinkage: float = 0.01
    prior: str = "uniform"
    grid: int = 4
    joint: float = 1.0
    task_aware_mix: float = 1.0
    head: str = "lda"
    ccvr_samples: int = 128
    ccvr_steps: int = 50

    def __post_init__(self) -> None:
        if self.dim < 0 or self.seed < 0:
            raise ValueError(f"router.dim and router.seed must be >= 0, got {self.dim}, {self.seed}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"router.shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.prior not in ("uniform", "counts"):
            raise ValueError(f"router.prior must be 'uniform' or 'counts', got {self.prior!r}")
        if not 0 <= self.grid <= MAX_STATS_GRID:
            raise ValueError(f"router.grid must be in 0..{MAX_STATS_GRID} (0: final pooled features), "
                             f"got {self.grid}")
        if not 0.0 <= self.joint <= 1.0:
            raise ValueError(f"router.joint must be in [0, 1], got {self.joint}")
        if not (math.isfinite(self.task_aware_mix) and self.task_aware_mix >= 0.0):
            raise ValueError(f"router.task_aware_mix must be finite and >= 0, got {self.task_aware_mix}")
        if self.head not in ROUTER_HEADS:
            raise ValueError(f"router.head must be one of {', '.join(ROUTER_HEADS)}, got {self.head!r}")
        if not (1 <= self.ccvr_samples <= 4096 and 1 <= self.ccvr_steps <= 1000):
            raise ValueError(f"router.ccvr_samples must be in 1..4096 and router.ccvr_steps in 1..1000, got "
                             f"{self.ccvr_samples}, {self.ccvr_steps}")

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RouterConfig:
        """The config recorded in a bank's metadata. A record without ``grid`` comes from before the grid
        features: its statistics are of the final pooled features, scored by the task marginal only. One without
        ``task_aware_mix`` predates it: the adapter's own logits (0), whatever the default is now; one without
        ``head``, the closed-form ``lda``."""
        legacy: dict[str, object] = {"grid": 0, "joint": 0.0} if "grid" not in record else {}
        legacy["task_aware_mix"] = 0.0
        legacy["head"] = "lda"
        return cls(**{**legacy, **record})  # type: ignore[arg-type]

    def width(self, features: int) -> int:
        """Width of the statistics for router features of width ``features``."""
        return features if self.dim == 0 or self.dim >= features else self.dim


FLEETS = ("uniform", "mixed")
"""Simulated fleets (``fleet.name``; see :class:`FleetConfig`)."""


@dataclass
class FleetConfig:
    """The simulated devices' memory (Hydra group ``fleet``; a real device reports its own budget in its hello).

    ``uniform``: every simulated device as today, with no budget. ``mixed``: the partitions fall into tiers, a
    seeded share ``shares[i]`` of them in tier ``i`` (``names[i]``), and a device of tier ``i`` has the budget in
    which ``sized_for[i]`` fits with ``assignment.margin`` (``fleet`` budgets count training memory above the
    runtime's resting footprint, as the memory model measures it). The server fills ``budgets_mb`` from the measured
    memory model of the run's backbone, resolution and batch size at start (:func:`~fedpetah.serving.assignment.
    size_fleet`); the simulated devices read them from their requests.
    """

    name: str = "uniform"
    names: tuple[str, ...] = ("small", "middle", "large")
    shares: tuple[float, ...] = (0.2, 0.5, 0.3)
    sized_for: tuple[str, ...] = ("head", "lora-2", "lora-16")
    budgets_mb: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.names, self.shares = tuple(self.names), tuple(float(s) for s in self.shares)
        self.sized_for, self.budgets_mb = tuple(self.sized_for), tuple(float(b) for b in self.budgets_mb)
        if self.name not in FLEETS:
            raise ValueError(f"fleet.name must be one of {', '.join(FLEETS)}, got {self.name!r}")
        if not (len(self.names) == len(self.shares) == len(self.sized_for) >= 1) or len(set(self.names)) < len(
                self.names):
            raise ValueError("fleet.names, fleet.shares and fleet.sized_for must be equally long and names distinct")
        if not (all(math.isfinite(s) and s > 0 for s in self.shares) and abs(sum(self.shares) - 1) < 1e-9):
            raise ValueError(f"fleet.shares must be positive and add up to 1, got {list(self.shares)}")
        if self.budgets_mb and (len(self.budgets_mb) != len(self.names)
                                or not all(math.isfinite(b) and b > 0 for b in self.budgets_mb)):
            raise ValueError(f"fleet.budgets_mb must hold one positive budget per tier, got {list(self.budgets_mb)}")

    def tier(self, seed: int, partition: int, clients: int) -> int | None:
        """The tier of simulated ``partition`` (None in a ``uniform`` fleet): the first ``shares[0] * clients``
        partitions of a seeded permutation are tier 0, and so on (rounded so every partition has a tier)."""
        if self.name == "uniform":
            return None
        if not 0 <= partition < clients:
            raise ValueError(f"partition {partition} is not one of {clients}")
        order = _permutation(seed, clients)
        position = order.index(partition)
        bounds = [round(clients * sum(self.shares[: i + 1])) for i in range(len(self.shares))]
        return next(i for i, bound in enumerate(bounds) if position < bound) if position < bounds[-1] else len(
            bounds) - 1

    def budget_mb(self, seed: int, partition: int, clients: int) -> float | None:
        """Simulated ``partition``'s budget (None: uniform fleet, or budgets not sized yet)."""
        tier = self.tier(seed, partition, clients)
        return None if tier is None or not self.budgets_mb else self.budgets_mb[tier]


def _permutation(seed: int, n: int) -> list[int]:
    """A permutation of ``range(n)`` from ``seed`` alone (the same for the server and every simulated device)."""
    import random

    order = list(range(n))
    random.Random(f"fleet:{seed}").shuffle(order)
    return order

