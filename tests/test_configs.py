"""Every YAML in configs/ composes into a valid typed ExperimentConfig; typos fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from fedpetah.adapters import ADAPTERS
from fedpetah.aggregation import AGGREGATORS, BoundsConfig
from fedpetah.experiment import ExperimentConfig, register_configs, to_experiment
from fedpetah.routing import RouterConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
register_configs()


def _compose(*overrides: str) -> ExperimentConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return to_experiment(compose(config_name="config", overrides=list(overrides)))


def test_default_config_is_the_documented_offline_default() -> None:
    cfg = _compose()
    assert cfg.backbone.name == "efficientvit_b0" and cfg.backbone.weights == "warmup"
    assert cfg.tasks.name == "split_mnist" and cfg.clients == 50
    assert cfg.partition.name == "dirichlet" and cfg.partition.alpha == 0.5


@pytest.mark.parametrize(
    "group_option",
    sorted(f"{p.parent.name}={p.stem}" for p in CONFIGS.glob("*/*.yaml")),
)
def test_every_yaml_composes(group_option: str) -> None:
    group, option = group_option.split("=")
    cfg = _compose(group_option)
    if group == "adapter":
        assert isinstance(cfg.adapter, ADAPTERS.get(cfg.adapter.name).config_class)
    elif group == "strategy":
        assert type(cfg.strategy.aggregator) is AGGREGATORS.get(option).config_class
        assert cfg.strategy.bounds == BoundsConfig()  # every strategy is bounded by default
    else:
        assert getattr(cfg, group) is not None


def test_the_default_aggregation_is_bounded_fedavg() -> None:
    strategy = _compose().strategy
    assert strategy.aggregator.name == "fedavg" and strategy.bounds.weight_cap and strategy.bounds.clip_multiple


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_registered_aggregator_is_a_typed_group_option(name: str) -> None:
    cfg = _compose(f"strategy/aggregator={name}")
    assert type(cfg.strategy.aggregator) is AGGREGATORS.get(name).config_class
    assert cfg.strategy.aggregator.name == name


def test_aggregator_options_and_bounds_reach_the_typed_config() -> None:
    cfg = _compose("strategy=fedadam", "strategy.aggregator.eta=0.05", "strategy.bounds.clip_multiple=3",
                   "strategy.bounds.weight_cap=null", "simulation.attack=mix")
    assert cfg.strategy.aggregator.eta == 0.05  # type: ignore[attr-defined]
    assert cfg.strategy.bounds.clip_multiple == 3.0 and cfg.strategy.bounds.weight_cap is None
    assert cfg.simulation.attack_config().name == "mix" and cfg.simulation.attack_fraction == 0.2


@pytest.mark.parametrize(
    "overrides",
    [["strategy.aggregator.etaa=1"], ["strategy.aggregator.eta=0.1"], ["strategy.bounds.clip=2"],
     ["strategy.aggregator.etaa=1", "strategy=fedadam"], ["strategy/aggregator=fedsgd"],
     ["strategy.aggregator.beta1=high", "strategy=fedyogi"]],
)
def test_aggregator_typos_fail_at_compose_time_naming_the_path(overrides: list[str]) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        _compose(*overrides)
    key = overrides[0].split("=")[0]  # the offending override comes first
    assert key in str(caught.value) or key in str(caught.value.__cause__)


def test_adapter_fields_reach_the_typed_config() -> None:
    cfg = _compose("adapter=lora", "adapter.rank=2", "clients=3")
    assert cfg.adapter.name == "lora" and cfg.adapter.rank == 2 and cfg.clients == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("override", ["clientz=3", "adapter.rnak=2", "train.learning_rate=0.1", "backbone=nope"])
def test_typos_fail(override: str) -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(override)


@pytest.mark.parametrize(
    ("override", "path"),
    [("pruning.ratio=1.5", "pruning.ratio"), ("backbone.name=resnet50", "resnet50"),
     ("strategy.fraction=0", "strategy.fraction"), ("strategy.bounds.reject_multiple=0.5", "strategy.bounds"),
     ("simulation.attack=nope", "simulation.attack"), ("simulation.attack_fraction=2", "simulation.attack_fraction")],
)
def test_invalid_values_fail_with_a_message(override: str, path: str) -> None:
    with pytest.raises(ValueError, match=path):
        _compose(override)


def test_invalid_aggregator_values_name_the_yaml_path() -> None:
    with pytest.raises(ValueError, match="strategy.aggregator.eta must be positive"):
        _compose("strategy=fedadam", "strategy.aggregator.eta=-1")
    with pytest.raises(ValueError, match="strategy.aggregator.trim_ratio"):
        _compose("strategy=trimmed_mean", "strategy.aggregator.trim_ratio=0.5")


def test_router_keys_reach_the_run_and_typos_fail() -> None:
    assert _compose().router == RouterConfig()
    cfg = _compose("router.dim=512", "router.joint=0.5", "router.grid=0")
    assert (cfg.router.dim, cfg.router.joint, cfg.router.grid) == (512, 0.5, 0)
    with pytest.raises(ConfigCompositionException):
        _compose("router.dimm=512")
    with pytest.raises(ValueError, match="router.grid"):
        _compose("router.grid=99")
