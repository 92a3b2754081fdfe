"""What fedpetah-server submits: the experiment composed from configs/ (Hydra's compose API, the same YAML tree as
simulations) and a Flower app directory whose default run config is that experiment, flattened.

Flower fuses a run's overrides into the app's default config and rejects keys the default lacks, so switching
e.g. the adapter (whose fields differ) cannot be expressed as overrides of one fixed default; the staged app
carries the whole composed config as its default instead, and the run needs no overrides.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from fedpetah.experiment import ExperimentConfig, register_configs, to_experiment
from fedpetah.wire.flatconfig import flatten

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fedpetah", "server", "clients", "flower_glue")
PUBLISHER = "fedpetah"
COMPONENTS = {"serverapp": "server.app:app", "clientapp": "clients.app:app"}


def compose_experiment(overrides: list[str], config_dir: Path = REPO / "configs",
                       config_name: str = "config") -> ExperimentConfig:
    """The typed experiment for ``overrides`` (``group=option`` / ``key=value``), validated like a simulation's."""
    from hydra import compose, initialize_config_dir

    if not (config_dir / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no {config_name}.yaml in {config_dir} (pass --config-dir)")
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
        composed = compose(config_name=config_name, overrides=overrides)
    return to_experiment(composed)


def flat_config(config: ExperimentConfig) -> dict[str, Any]:
    """Flower's flat run config for ``config`` (see fedpetah.wire.flatconfig for the encoding)."""
    return flatten(asdict(config))


def config_json(config: ExperimentConfig) -> str:
    return json.dumps(asdict(config), indent=2, sort_keys=True, default=str)


def _dependencies() -> list[str]:
    """This package's runtime requirements (no extras): installed on devices beforehand, never at run time."""
    try:
        requires = metadata.requires("fedpetah") or []
    except metadata.PackageNotFoundError:
        return []
    return [r for r in requires if "extra ==" not in r]


def app_pyproject(config: ExperimentConfig) -> dict[str, Any]:
    try:
        version = metadata.version("fedpetah")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    return {
        "project": {"name": "fedpetah", "version": version, "dependencies": _dependencies()},
        "tool": {"flwr": {"app": {"publisher": PUBLISHER, "components": dict(COMPONENTS),
                                  "config": flat_config(config)}}},
    }


def stage_app(config: ExperimentConfig, dest: Path) -> Path:
    """A fresh Flower app in ``dest``: our packages' Python sources and a pyproject.toml whose default run
    config is ``config``. The same config gives byte-identical files, hence the same FAB hash."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for package in PACKAGES:
        source = REPO / package
        for path in sorted(source.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            target = dest / package / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(config)))
    return dest
