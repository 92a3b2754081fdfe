"""Every YAML in configs/ composes into a valid typed ExperimentConfig; typos fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from fedpetah.adapters import ADAPTERS
from fedpetah.experiment import ExperimentConfig, register_configs, to_experiment

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
    else:
        assert getattr(cfg, group) is not None


def test_adapter_fields_reach_the_typed_config() -> None:
    cfg = _compose("adapter=lora", "adapter.rank=2", "clients=3")
    assert cfg.adapter.name == "lora" and cfg.adapter.rank == 2 and cfg.clients == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("override", ["clientz=3", "adapter.rnak=2", "train.learning_rate=0.1", "backbone=nope"])
def test_typos_fail(override: str) -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(override)


@pytest.mark.parametrize("override", ["pruning.ratio=1.5", "backbone.name=resnet50", "strategy.fraction=0"])
def test_invalid_values_fail_with_a_message(override: str) -> None:
    with pytest.raises(ValueError):
        _compose(override)
