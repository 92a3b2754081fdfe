"""Every YAML in configs/ composes into a valid typed ExperimentConfig; typos fail loudly."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fedpetah.adapters import ADAPTERS, Adapter, AdapterConfig, adapter_config
from fedpetah.adapters.lora import LoraConfig
from fedpetah.aggregation import AGGREGATORS, BoundsConfig, aggregator_config
from fedpetah.aggregation.fedopt import FedAdamConfig
from fedpetah.config import RouterConfig
from fedpetah.experiment import (
    PYPROJECT,
    ExperimentConfig,
    app_config,
    register_configs,
    to_experiment,
    with_app_config,
)
from fedpetah.registry import Registry
from fedpetah.wire.flatconfig import flatten

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
register_configs()


def _compose(*overrides: str) -> ExperimentConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return to_experiment(compose(config_name="config", overrides=list(overrides)))


def test_the_default_composition_is_experiment_config() -> None:
    # the dataclasses hold the defaults: configs/config.yaml composes to ExperimentConfig() exactly
    assert _compose() == ExperimentConfig()
    assert to_experiment({}) == ExperimentConfig()


def _defaults_of(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """What ``path``'s keys would be without it: the dataclass defaults of its group (of the schema it names)."""
    selected = {k: v for entry in raw.get("defaults", []) if isinstance(entry, dict) for k, v in entry.items()}
    schemas = [e.removesuffix("_schema") for e in raw.get("defaults", []) if str(e).endswith("_schema")]
    group = path.parent.name
    if path == CONFIGS / "config.yaml":
        return asdict(ExperimentConfig())
    if group == "adapter":
        return asdict(adapter_config(schemas[0]))
    if group == "strategy":
        return asdict(replace(ExperimentConfig().strategy, aggregator=aggregator_config(selected["aggregator"])))
    return dict(asdict(ExperimentConfig())[group])


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_states_only_what_differs_from_the_dataclasses(path: Path) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(raw, dict)
    stated = _leaves({k: v for k, v in raw.items() if k not in ("defaults", "hydra")})
    defaults = _leaves(_defaults_of(path, raw))
    restated = {key: value for key, value in stated.items() if key in defaults and defaults[key] == value}
    assert not restated, f"{path.name} restates dataclass defaults {restated}: remove them"
    assert set(stated) <= set(defaults)


def _dotted(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML's dotted keys as parsed (nested tables) back to dotted keys; values as written."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        out.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_pyproject_app_config_is_generated_from_experiment_config() -> None:
    text = PYPROJECT.read_text()
    assert with_app_config(text) == text, "run `python -m fedpetah.experiment --pyproject`"
    table = _dotted(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])
    assert table == app_config() == {**flatten(ExperimentConfig()), "output_dir": "outputs/flwr-run"}
    assert list(table) == list(flatten(ExperimentConfig()))


def test_with_app_config_rewrites_only_that_table() -> None:
    stale = "[project]\nname = 'x'\n\n[tool.flwr.app.config]\nclients = 3\nold = 1\n\n[tool.ruff]\nline-length = 1\n"
    fresh = with_app_config(stale)
    assert fresh.startswith("[project]\nname = 'x'\n\n[tool.flwr.app.config]\nclients = 50\n")
    assert fresh.endswith("\n\n[tool.ruff]\nline-length = 1\n") and "old" not in fresh
    assert _dotted(tomllib.loads(fresh)["tool"]["flwr"]["app"]["config"]) == app_config()
    assert with_app_config(fresh) == fresh


def test_registered_names_are_written_once_by_the_decorator() -> None:
    assert all(ADAPTERS.get(name).name == name for name in ADAPTERS)
    assert all(AGGREGATORS.get(name).name == name for name in AGGREGATORS)
    registry: Registry[type[Adapter[AdapterConfig]]] = Registry("adapter")

    class Named(Adapter[AdapterConfig]):
        name = "named"

        def attach(self) -> None:
            self.model.head.requires_grad_(True)

    with pytest.raises(ValueError, match="sets its own name"):
        registry.register("named")(Named)
    assert "named" not in registry


def test_a_config_must_be_its_registered_adapters_or_aggregators() -> None:
    assert type(adapter_config("dora")).__name__ == "DoraConfig" and ADAPTERS.get("petah").config_class.__name__ == (
        "PetahConfig")
    with pytest.raises(ValueError, match="adapter 'dora' takes DoraConfig, not LoraConfig"):
        LoraConfig(name="dora")
    with pytest.raises(ValueError, match="adapter 'lora' takes LoraConfig, not AdapterConfig"):
        AdapterConfig(name="lora")
    with pytest.raises(ValueError, match="aggregator 'fedyogi' takes FedYogiConfig, not FedAdamConfig"):
        FedAdamConfig(name="fedyogi")


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
    else:  # a plain group: its dataclass defaults with the keys the YAML sets
        raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{option}.yaml")) or {}
        assert isinstance(raw, dict)
        raw.pop("defaults", None)  # what it selects in other groups (assignment=budget: a mixed-rank aggregator)
        assert getattr(cfg, group) == replace(getattr(ExperimentConfig(), group), **raw)


def test_a_budget_assignment_brings_a_mixed_rank_aggregator_and_refuses_one_that_is_not() -> None:
    assert _compose("assignment=budget").strategy.aggregator.name == "hetlora"
    assert _compose("assignment=budget", "strategy=flexlora").strategy.aggregator.name == "flexlora"
    with pytest.raises(ValueError, match="cannot combine: use strategy=flexlora or strategy=hetlora"):
        _compose("assignment=budget", "strategy=fedavg")
    assert _compose("assignment=budget", "strategy=fedavg", "adapter=synqt").assignment.name == "budget"  # one variant


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


@pytest.mark.parametrize(
    ("override", "message"),
    [("clientz=3", "override 'clientz'"), ("adapter.rnak=2", "override 'adapter.rnak'"),
     ("train.learning_rate=0.1", "override 'train.learning_rate'"), ("backbone=nope", "find 'backbone/nope'")],
)
def test_typos_fail(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException, match=f"Could not {message}"):
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
    cfg = _compose("router.dim=512", "router.joint=0.5", "router.grid=0", "router.task_aware_mix=0")
    assert (cfg.router.dim, cfg.router.joint, cfg.router.grid, cfg.router.task_aware_mix) == (512, 0.5, 0, 0.0)
    assert _compose().router.task_aware_mix == 1.0  # on by default: the adapter and the statistics classifier
    with pytest.raises(ValueError, match="router.task_aware_mix"):
        _compose("router.task_aware_mix=-1")
    with pytest.raises(ConfigCompositionException, match="Could not override 'router.dimm'"):
        _compose("router.dimm=512")
    with pytest.raises(ValueError, match="router.grid"):
        _compose("router.grid=99")
