"""Hydra entry point: one federated continual experiment on Flower's simulation engine.

    python simulations/run.py clients=50 adapter=petah pruning=none
    python simulations/run.py -m adapter=lora,petah,synqt
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedpetah.experiment import register_configs, to_experiment  # noqa: E402

register_configs()
log = logging.getLogger("fedpetah")


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the experiment; returns the final average accuracy (for sweepers)."""
    from simulations.engine import simulate

    experiment = to_experiment(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir) / experiment.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(experiment), indent=2, default=str))
    summary = simulate(experiment, run_dir)
    log.info("run dir: %s", run_dir)
    return float(summary["average_accuracy"])


if __name__ == "__main__":
    main()
