"""The whole experiment's typed config (Hydra's schema) and its conversion from composed YAML.

``ExperimentConfig()`` is the default experiment: configs/ composes to it and states only what an option changes,
and pyproject.toml's ``[tool.flwr.app.config]`` is its flat form (``python -m fedpetah.experiment --pyproject``
rewrites that table; tests/test_configs.py checks both).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedpetah.adapters import ADAPTERS, AdapterConfig, adapter_config
from fedpetah.aggregation import AGGREGATORS, AggregatorConfig, BoundsConfig, MixedRankAggregator, aggregator_config
from fedpetah.assignment import LORA_RANKS, AssignmentConfig, run_variants
from fedpetah.attacks import AttackConfig
from fedpetah.config import BackboneConfig, FleetConfig, PruningConfig, RouterConfig, TrainConfig
from fedpetah.registry import Registry
from fedpetah.tasks import PartitionConfig, TaskStreamConfig
from fedpetah.wire.flatconfig import Scalar, build_dataclass, flatten

if TYPE_CHECKING:  # omegaconf and hydra come with the server extra; a device (fedpetah-export) has neither
    from omegaconf import DictConfig

T = TypeVar("T")


@dataclass
class StrategyConfig:
    """Per-round client sampling and per-task aggregation.

    ``aggregator``: the typed config of one aggregator (Hydra group ``strategy/aggregator``, one schema per
    registered aggregator; its options live under ``strategy.aggregator.*``). ``bounds``: the count caps and
    norm bounds applied to every round before the aggregator runs (``fedpetah.aggregation.bounds``).
    """

    aggregator: AggregatorConfig = field(default_factory=lambda: aggregator_config("fedavg"))
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    fraction: float = 0.2
    min_clients: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"strategy.fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ValueError(f"strategy.min_clients must be >= 1, got {self.min_clients}")


@dataclass
class SimulationConfig:
    """Flower simulation engine (Ray backend) resources, and optional byzantine clients.

    ``attack``: ``none`` or a name from ``fedpetah.attacks.ATTACKS``; ``attack_fraction`` of the partition
    ids (chosen from the run's seed) then send that attack's corruption of their honest reply.

    ``ray_address``: run on an existing Ray cluster (``auto``, ``host:port`` of the head's GCS, or
    ``ray://host:port`` for Ray Client) instead of a local Ray; unset, ``RAY_ADDRESS`` is used when set, as Ray
    does (docs/cluster.md). ``ray_memory_mb`` sizes a local Ray's object store only.
    """

    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    torch_threads: int = 1
    ray_memory_mb: int | None = None
    ray_address: str | None = None
    attack: str = "none"
    attack_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.cpus_per_client <= 0 or self.gpus_per_client < 0 or self.torch_threads < 1:
            raise ValueError("simulation.cpus_per_client > 0, gpus_per_client >= 0, torch_threads >= 1")
        if self.ray_address is not None:
            host, _, port = self.ray_address.removeprefix("ray://").rpartition(":")
            valid = bool(host) and "/" not in host and port.isdigit() and 0 < int(port) < 65536
            if self.ray_address != "auto" and not valid:
                raise ValueError(f"simulation.ray_address must be auto, host:port or ray://host:port, got "
                                 f"{self.ray_address!r}")
            if self.ray_memory_mb is not None:
                raise ValueError("simulation.ray_memory_mb sizes a local Ray only: with simulation.ray_address, "
                                 "give `ray start --object-store-memory` on each node instead")
        self.attack_config()  # validates both fields, naming them

    def attack_config(self) -> AttackConfig:
        return AttackConfig(self.attack, self.attack_fraction)


@dataclass
class ExperimentConfig:
    """Everything one federated continual run depends on.

    ``reply_timeout_s``: how long the server waits for a round's replies; the round goes on without later
    ones, which are counted as late when they arrive.

    ``stop_after``: end this invocation once that many rounds (counted over the whole run) are complete;
    the bank stays resumable, and ``resume=true`` with the same ``output_dir`` continues from there.

    ``output_dir``: relative to Hydra's run dir (``simulations/run.py``); fedpetah-server sets an absolute one.

    ``min_devices``: a round starts once at least this many connected devices hold images of its task (devices
    come and go; each round samples among those connected then). ``clients`` is how many the run expects: the
    simulation starts that many, and a deployment starts as soon as they are connected, or with the
    ``min_devices`` it has once ``start_wait_s`` has passed.

    ``exit_when_idle_s``: end the run cleanly after this long with nothing to train (every task trained, or too
    few devices). Unset, a live task list (``tasks=catalog``) waits for new tasks for ever, and a fixed stream
    ends once its last task is trained.

    ``evaluation_max_share``: in the devices' federated evaluation, the most of a figure's weight one device may
    carry (in (0, 1]); unset: twice an equal share of the devices behind the figure (``min(1, 2 / devices)``, see
    :func:`fedpetah.serving.federated.default_max_share`).
    """

    clients: int = 50
    rounds_per_task: int = 10
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None
    output_dir: str = "."
    evaluate_every_round: bool = True
    reply_timeout_s: float = 600.0
    min_devices: int = 1
    start_wait_s: float = 30.0
    exit_when_idle_s: float | None = None
    evaluation_max_share: float | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    adapter: AdapterConfig = field(default_factory=lambda: adapter_config("lora"))
    tasks: TaskStreamConfig = field(default_factory=TaskStreamConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    router: RouterConfig = field(default_factory=RouterConfig)  # task-free router (no YAML: router.dim=512 etc.)
    assignment: AssignmentConfig = field(default_factory=AssignmentConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)

    def __post_init__(self) -> None:
        if self.clients < 1 or self.rounds_per_task < 1:
            raise ValueError("clients and rounds_per_task must be >= 1")
        if not self.reply_timeout_s > 0:
            raise ValueError(f"reply_timeout_s must be positive, got {self.reply_timeout_s}")
        if self.min_devices < 1 or not self.start_wait_s >= 0:
            raise ValueError(f"min_devices must be >= 1 and start_wait_s >= 0, got {self.min_devices}, "
                             f"{self.start_wait_s}")
        if self.exit_when_idle_s is not None and not self.exit_when_idle_s >= 0:
            raise ValueError(f"exit_when_idle_s must be >= 0 when set, got {self.exit_when_idle_s}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 when set, got {self.stop_after}")
        if self.evaluation_max_share is not None and not 0 < self.evaluation_max_share <= 1:
            raise ValueError(f"evaluation_max_share must be in (0, 1] when set, got {self.evaluation_max_share}")
        self.check_assignment()

    def check_assignment(self) -> None:
        """A policy that can hand out several variants of a task's adapter needs an aggregator that combines them."""
        aggregator = AGGREGATORS.get(self.strategy.aggregator.name)
        rank = getattr(self.adapter, "rank", None)
        if self.assignment.name != "uniform" and len(run_variants(self.adapter)) > 1 and rank not in LORA_RANKS:
            raise ValueError(f"assignment={self.assignment.name} needs the memory model of every variant, which "
                             f"measures LoRA ranks {', '.join(map(str, LORA_RANKS))}: adapter.rank is {rank}")
        if (self.assignment.name == "budget" and len(run_variants(self.adapter)) > 1
                and not issubclass(aggregator, MixedRankAggregator)):
            mixed = [n for n in AGGREGATORS.names() if issubclass(AGGREGATORS.get(n), MixedRankAggregator)]
            raise ValueError(f"assignment=budget hands out variants of several ranks "
                             f"({', '.join(run_variants(self.adapter))}), which strategy.aggregator "
                             f"{self.strategy.aggregator.name!r} cannot combine: use strategy="
                             f"{' or strategy='.join(mixed)}")


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore: the root, one schema per adapter, one per aggregator.

    Aggregators need no YAML of their own: ``strategy/aggregator=<name>`` selects the registered schema
    directly (its defaults are the dataclass's), and ``strategy.aggregator.<option>=...`` is type-checked.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    schema = OmegaConf.structured(ExperimentConfig)
    schema.adapter = OmegaConf.structured(AdapterConfig)  # any adapter's schema merges in (a subclass of this)
    store.store(name="experiment_schema", node=schema)
    for name in ADAPTERS.names():
        store.store(group="adapter", name=f"{name}_schema", node=ADAPTERS.get(name).config_class(name=name))
    for name in AGGREGATORS.names():
        store.store(group="strategy/aggregator", name=name, node=AGGREGATORS.get(name).config_class(name=name))


def to_experiment(cfg: DictConfig | Mapping[str, Any]) -> ExperimentConfig:
    """Typed config from a composed Hydra config or a nested dict; every dataclass validates its fields."""
    omegaconf = sys.modules.get("omegaconf")  # a DictConfig exists only where omegaconf was imported
    if omegaconf is not None and omegaconf.OmegaConf.is_config(cfg):
        raw = omegaconf.OmegaConf.to_container(cfg, resolve=True)
    else:
        raw = dict(cfg)
    assert isinstance(raw, dict)
    raw = {str(k): v for k, v in raw.items() if k != "hydra"}
    adapter = raw.pop("adapter", None)
    strategy = dict(raw.pop("strategy", None) or {})
    aggregator = strategy.pop("aggregator", None)
    assignment = build_dataclass(AssignmentConfig, dict(raw.pop("assignment", None) or {}))  # checked with both
    config = build_dataclass(ExperimentConfig, raw)
    strategy_config = build_dataclass(StrategyConfig, strategy)
    if aggregator is not None:
        strategy_config = replace(strategy_config, aggregator=_named(
            AGGREGATORS, aggregator, strategy_config.aggregator.name, "strategy.aggregator"))
    if adapter is not None:
        config = replace(config, adapter=_named(ADAPTERS, adapter, config.adapter.name, "adapter"))
    return replace(config, strategy=strategy_config, assignment=assignment)


def _named(registry: Registry[Any], data: Mapping[str, Any], default: str, path: str) -> Any:
    """The typed config of the registered ``data["name"]`` (``default`` when unset: the dataclass default's)."""
    name = str(data.get("name", default))
    if name not in registry:
        raise ValueError(f"{path}.name: unknown {registry.kind} {name!r}; valid: {', '.join(registry)}")
    return _build(registry.get(name).config_class, {**data, "name": name}, path)


def _build(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    """``build_dataclass`` whose unknown-field error names the YAML path."""
    try:
        return build_dataclass(cls, data)
    except TypeError as error:
        raise TypeError(f"{path}: {error}") from None


APP_CONFIG = "[tool.flwr.app.config]"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def app_config() -> dict[str, Scalar]:
    """pyproject.toml's Flower run config (``flwr run .``): the default experiment, flattened, writing its
    outputs to ``outputs/flwr-run`` (fedpetah-server ships its own composed config with an absolute run dir)."""
    return flatten(replace(ExperimentConfig(), output_dir="outputs/flwr-run"))


def with_app_config(pyproject: str) -> str:
    """``pyproject`` with the body of its ``[tool.flwr.app.config]`` table rewritten from :func:`app_config`."""
    lines = pyproject.splitlines(keepends=True)
    start = lines.index(APP_CONFIG + "\n") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [f"{key} = {_toml(value)}\n" for key, value in app_config().items()]
    return "".join([*lines[:start], *body, *(["\n"] if end < len(lines) else []), *lines[end:]])


def _toml(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)  # a JSON string is a TOML basic string


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpetah.experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", nargs="?", const=str(PYPROJECT), metavar="PATH",
                        help=f"rewrite the {APP_CONFIG} table of PATH (default: this checkout's pyproject.toml)")
    args = parser.parse_args(argv)
    if args.pyproject is None:
        parser.print_help()
        return 2
    path = Path(args.pyproject)
    path.write_text(with_app_config(path.read_text()))
    print(f"{path}: {APP_CONFIG} rewritten from ExperimentConfig()")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
