"""Federated continual runs through Flower's simulation engine (Ray), and resume after a stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpetah.adapters import adapter_config
from fedpetah.bank import AdapterBank
from fedpetah.config import BackboneConfig, PruningConfig, TrainConfig, WarmupConfig
from fedpetah.experiment import ExperimentConfig, SimulationConfig, StrategyConfig
from fedpetah.tasks import PartitionConfig, TaskStreamConfig

pytestmark = pytest.mark.slow


def _config(**overrides: object) -> ExperimentConfig:
    base = dict(
        clients=2,
        rounds_per_task=1,
        backbone=BackboneConfig(name="efficientvit_b0", img_size=32, warmup=WarmupConfig(epochs=2)),
        pruning=PruningConfig(ratio=0.0),
        adapter=adapter_config("lora", rank=2),
        tasks=TaskStreamConfig(name="split_mnist", num_tasks=1),
        partition=PartitionConfig(name="iid"),
        train=TrainConfig(epochs=1, batch_size=32, max_steps=6, loss="cross_entropy"),
        strategy=StrategyConfig(fraction=1.0, min_clients=2),
        simulation=SimulationConfig(cpus_per_client=1.0),
    )
    base.update(overrides)
    return ExperimentConfig(**base)  # type: ignore[arg-type]


def test_two_clients_one_task_one_round(tmp_path: Path, cache_dir: Path) -> None:
    from simulations.engine import simulate

    summary = simulate(_config(), tmp_path / "run", cache_dir)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["num_clients"] == 2 and rows[0]["num_rejected"] == 0
    assert rows[0]["bytes_up"] > 0 and rows[0]["extra"]["bytes_backbone"] > 0
    assert summary["average_accuracy"] > 0.75  # digits 0 vs 1, well above chance after one short round
    bank = AdapterBank.load(tmp_path / "run" / "bank")
    assert bank.tasks() == [0] and bank[0].version == 1
    for name in ("accuracy_matrix.png", "summary.json"):
        assert (tmp_path / "run" / name).is_file()


def test_resume_matches_an_uninterrupted_run(tmp_path: Path, cache_dir: Path) -> None:
    from simulations.engine import simulate

    two_tasks = TaskStreamConfig(name="split_mnist", num_tasks=2)
    simulate(_config(tasks=two_tasks), tmp_path / "straight", cache_dir)
    simulate(_config(tasks=two_tasks, stop_after=1), tmp_path / "stopped", cache_dir)
    stopped = AdapterBank.load(tmp_path / "stopped" / "bank")
    assert stopped.tasks() == [0] and stopped.metadata["run"]["completed_rounds"] == 1
    simulate(_config(tasks=two_tasks, resume=True), tmp_path / "stopped", cache_dir)

    straight = AdapterBank.load(tmp_path / "straight" / "bank")
    resumed = AdapterBank.load(tmp_path / "stopped" / "bank")
    assert straight.tasks() == resumed.tasks() == [0, 1]
    for task in (0, 1):
        assert straight[task].version == resumed[task].version == 1
        for key, value in straight[task].state.items():
            torch.testing.assert_close(resumed[task].state[key], value, rtol=0, atol=0)
    straight_rows, resumed_rows = (_reproducible(tmp_path / name / "metrics.jsonl") for name in ("straight", "stopped"))
    assert [row["round"] for row in resumed_rows] == [1, 2]
    assert resumed_rows == straight_rows  # accuracies, losses, bytes, counts: exactly equal
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("straight", "stopped")]
    for key in ("accuracy_matrix", "average_accuracy", "bytes_up_total", "bytes_down_total", "rejected_total"):
        assert summaries[0][key] == summaries[1][key], key


MEASURED = ("round_time_s", "step_time_s", "peak_memory_mb")


def _reproducible(path: Path) -> list[dict[str, object]]:
    """The metrics rows without what is measured rather than computed (times, memory).

    ``bytes_backbone`` is left out too: the second run's clients find the backbone in the disk cache the first
    run filled (the same ``cache_dir``), so it is rightly not sent again.
    """
    rows = []
    for line in path.read_text().splitlines():
        row = {k: v for k, v in json.loads(line).items() if k not in MEASURED}
        row["extra"] = {k: v for k, v in row["extra"].items()
                        if not k.endswith(("_s", "_mb", "_s_per_image")) and k != "bytes_backbone"}
        rows.append(row)
    return rows


def test_console_shows_flower_lines_once_and_drops_known_chatter(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import warnings

    from flwr.common.logger import warn_deprecated_feature

    from simulations.engine import RAY_ACCELERATOR_TIP, _quiet_console

    flwr = logging.getLogger("flwr")
    seen: list[logging.LogRecord] = []
    counter = logging.Handler()
    counter.emit = seen.append  # type: ignore[method-assign]
    flwr.addHandler(counter)
    restore = _quiet_console()
    try:
        with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", message="some other FutureWarning")  # whatever pytest's defaults
            for _ in range(2):
                warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
            flwr.warning("a Flower warning we do want")
            logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
            warnings.warn(RAY_ACCELERATOR_TIP + " visible devices env var ...", FutureWarning, stacklevel=1)
            warnings.warn("some other FutureWarning", FutureWarning, stacklevel=1)
    finally:
        restore()
        flwr.removeHandler(counter)
    assert [r.getMessage() for r in seen] == ["a Flower warning we do want"]  # Flower's own handler: once
    ours = [r for r in caplog.records if "run_simulation" in r.getMessage()]
    assert len(ours) == 1 and ours[0].name == "fedpetah.simulation" and "typed config" in ours[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith(("flwr", "alembic"))]  # nothing twice, no chatter
    assert [str(w.message) for w in caught] == ["some other FutureWarning"]
    assert flwr.propagate and not flwr.filters  # restored
