"""The measured memory model: validation, the fitting rule, a real measurement, memory.json reused or re-measured."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedpetah.adapters import adapter_config
from fedpetah.adapters.lora import LoraConfig
from fedpetah.artifact import artifact_digest, pack_artifact
from fedpetah.backbone import Backbone
from fedpetah.serving import memory_model as mm
from fedpetah.serving.memory_model import (
    VARIANTS,
    MemoryModel,
    MemoryModelError,
    build_variant,
    measure_variant,
    memory_model,
    reset_high_water_mark,
    stored_path,
    variant_config,
)

DIGEST = "ab" * 32


def make_model(**changes: Any) -> MemoryModel:
    fields: dict[str, Any] = {
        "digest": DIGEST, "img_size": 32, "batch_size": 16, "num_classes": 4,
        "adapter": json.loads(json.dumps(dataclasses.asdict(adapter_config("lora")))), "device": "cpu",
        "torch": mm.torch.__version__, "method": "vmhwm", "measured_at": "2025-01-01T00:00:00+00:00",
        "resting_mb": 800.0, "variants": {"head": 10.0, "synqt": 12.0, "lora-1": 20.0, "lora-4": 30.0, "lora-16": 50.0},
    }
    return MemoryModel(**{**fields, **changes})


def _path(artifact: Path, batch_size: int = 16) -> Path:
    """Where the model of batch ``batch_size``, 4 classes, the default LoRA on the CPU is stored."""
    return stored_path(artifact, batch_size, 4, adapter_config("lora"), "cpu")


@pytest.fixture
def artifact(tiny_backbone: Callable[..., Backbone], tmp_path: Path) -> Path:
    directory = tmp_path / "artifact"
    pack_artifact(tiny_backbone(), directory)
    return directory


def test_json_round_trip_is_exact() -> None:
    model = make_model()
    assert MemoryModel.from_json(model.to_json()) == model
    assert MemoryModel.from_json(model.to_json().encode()) == model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"digest": "AB" * 32}, "digest"),
        ({"digest": "ab"}, "digest"),
        ({"img_size": 8}, "img_size"),
        ({"img_size": True}, "img_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 16.0}, "batch_size"),
        ({"num_classes": 10_001}, "num_classes"),
        ({"adapter": {"name": "nope"}}, "adapter"),
        ({"adapter": {"name": "lora", "rank": 0}}, "adapter"),
        ({"adapter": {"name": "lora", "colour": 1}}, "adapter"),
        ({"adapter": {"name": "lora", "target_regex": "x" * 5000}}, "adapter"),
        ({"adapter": []}, "adapter"),
        ({"device": "tpu"}, "device"),
        ({"torch": ""}, "torch"),
        ({"torch": 2}, "torch"),
        ({"method": "guess"}, "method"),
        ({"measured_at": "yesterday"}, "measured_at"),
        ({"measured_at": "2025-01-01T00:00:00"}, "time zone"),
        ({"resting_mb": 0.0}, "resting_mb"),
        ({"variants": {}}, "variants"),
        ({"variants": {"lora-3": 5.0}}, "lora-3"),
        ({"variants": {"head": float("nan")}}, "head"),
        ({"variants": {"head": float("inf")}}, "head"),
        ({"variants": {"head": -1.0}}, "head"),
        ({"variants": {"head": 0}}, "head"),
        ({"variants": {"head": 2.0**21}}, "head"),
        ({"variants": {"head": True}}, "head"),
        ({"variants": {"head": "5"}}, "head"),
        ({"format_version": 1}, "format_version"),
    ],
)
def test_every_malformed_field_is_refused(change: dict[str, Any], message: str) -> None:
    raw = {**json.loads(make_model().to_json()), **change}
    with pytest.raises(MemoryModelError, match=message):
        MemoryModel.from_json(json.dumps(raw))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ("NaN", "JSON object"),
        (" " * (mm.MAX_FILE_BYTES + 1), "exceeds"),
        ("[" * 100_000, "exceeds"),
        ("[" * 50_000, "not valid JSON"),
    ],
)
def test_unparseable_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(MemoryModelError, match=message):
        MemoryModel.from_json(text)


def test_missing_and_extra_fields_are_named() -> None:
    raw = json.loads(make_model().to_json())
    del raw["variants"]
    raw["colour"] = "blue"
    with pytest.raises(MemoryModelError, match=r"missing \['variants'\], extra \['colour'\]"):
        MemoryModel.from_json(json.dumps(raw))


def test_richest_fitting_follows_the_richness_order_within_the_budget() -> None:
    model = make_model()  # head 10, synqt 12, lora-1 20, lora-4 30, lora-16 50
    assert model.fits(29) == ["head", "synqt", "lora-1"]
    assert model.richest_fitting(29) == "lora-1"
    assert model.richest_fitting(30) == "lora-4"
    assert model.richest_fitting(30, margin=0.5) == "lora-1"  # needs 15, 18, 30, 45, 75
    assert model.richest_fitting(9.99) is None
    assert model.richest_fitting(100, allowed=["lora-4", "head", "lora-1"]) == "lora-4"
    assert model.richest_fitting(100, allowed=["head", "synqt"]) == "synqt"
    assert model.richest_fitting(11, allowed=["head", "synqt"]) == "head"
    assert model.smallest_need_mb() == 10.0
    assert model.smallest_need_mb(margin=0.5) == 15.0
    assert model.smallest_need_mb(allowed=["lora-1", "lora-4"]) == 20.0


def test_richest_fitting_skips_a_richer_variant_that_needs_less() -> None:
    model = make_model(variants={"head": 13.0, "synqt": 9.0})  # measured so at 64 px: synqt's chunked forward
    assert model.fits(10) == ["synqt"]
    assert model.richest_fitting(10) == "synqt"
    assert model.richest_fitting(14) == "synqt"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.fits(-1), "budget"),
        (lambda m: m.fits(float("nan")), "budget"),
        (lambda m: m.fits(10, margin=-0.1), "margin"),
        (lambda m: m.fits(10, margin=float("inf")), "margin"),
        (lambda m: m.fits(10, allowed=[]), "must not be empty"),
        (lambda m: m.richest_fitting(100, allowed=["lora-8"]), "not measured"),
        (lambda m: m.smallest_need_mb(allowed=["lora-2"]), "not measured"),
    ],
)
def test_bad_budget_margin_or_allowed_raise(call: Callable[[MemoryModel], object], message: str) -> None:
    with pytest.raises(MemoryModelError, match=message):
        call(make_model())


def test_variant_configs_keep_alpha_over_rank_and_head_trains_only_the_head(
    tiny_backbone: Callable[..., Backbone],
) -> None:
    run = adapter_config("lora", rank=8, alpha=4.0)
    view = variant_config(run, "lora-2")
    assert isinstance(view, LoraConfig) and (view.rank, view.alpha) == (2, 1.0)
    assert variant_config(run, "synqt").name == "synqt"
    assert variant_config(run, "head") == dataclasses.replace(run, train_lora=False)
    with pytest.raises(MemoryModelError, match="unknown variant"):
        variant_config(run, "lora-3")
    head = build_variant(tiny_backbone(), run, "head", 4)
    names = {n for n, p in head.model.named_parameters() if p.requires_grad}
    assert names == {"head.weight", "head.bias"}
    assert any(".lora_A." in n for n, _ in head.model.named_parameters())  # the rank-8 model, LoRA frozen


def test_a_matching_stored_model_is_reused_without_measuring(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = make_model(digest=artifact_digest(artifact), variants={"head": 3.0, "lora-4": 5.0})
    _path(artifact).write_text(stored.to_json())

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured although memory.json matched")

    monkeypatch.setattr(mm.subprocess, "run", no_subprocess)
    assert memory_model(artifact, batch_size=16, num_classes=4, variants=["head", "lora-4"]) == stored
    assert memory_model(artifact, batch_size=16, num_classes=4, variants=["lora-4"]) == stored


@pytest.mark.parametrize(
    ("stored_change", "call_change"),
    [
        ({}, {"batch_size": 8}),
        ({}, {"num_classes": 5}),
        ({}, {"variants": ["head", "lora-8"]}),
        ({}, {"adapter": adapter_config("lora", rank=8)}),
        ({"digest": "cd" * 32}, {}),
        ({"torch": "0.0.1"}, {}),
        ({"resting_mb": "lots"}, {}),  # unreadable: measured again, not trusted
    ],
)
def test_a_stale_or_broken_stored_model_is_measured_again(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, stored_change: dict[str, Any], call_change: dict[str, Any]
) -> None:
    raw = {**json.loads(make_model(digest=artifact_digest(artifact)).to_json()), **stored_change}
    _path(artifact).write_text(json.dumps(raw))
    calls: list[object] = []

    def record(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise RuntimeError("measuring")

    monkeypatch.setattr(mm.subprocess, "run", record)
    settings: dict[str, Any] = {"batch_size": 16, "num_classes": 4, "variants": ["head"], **call_change}
    with pytest.raises(RuntimeError, match="measuring"):
        memory_model(artifact, **settings)
    assert len(calls) == 1


def test_the_reset_high_water_mark_forgets_an_earlier_peak() -> None:
    if not reset_high_water_mark():
        pytest.skip("no /proc/self/clear_refs here")
    block = b"x" * (256 * 2**20)  # a build-time peak, every page written
    del block
    assert reset_high_water_mark()
    vmhwm = mm._status_mb("VmHWM")
    assert vmhwm is not None and vmhwm - psutil.Process().memory_info().rss / 2**20 < 64


def test_a_timeout_or_bad_request_names_the_variant(artifact: Path) -> None:
    with pytest.raises(MemoryModelError, match="variant 'lora-4' took longer than"):
        measure_variant(artifact, "lora-4", 4, 8, timeout_s=0.01)
    with pytest.raises(MemoryModelError, match="unknown variant"):
        measure_variant(artifact, "lora-32", 4, 8)
    with pytest.raises(MemoryModelError, match="batch_size"):
        measure_variant(artifact, "head", 4, 0)


@pytest.mark.slow  # four subprocesses: 23 s at load 1.3, 57 s at load 4.5 (2 shared cores)
def test_real_measurement_is_stored_reused_and_redone_for_another_batch(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ru_maxrss survives execve: a worker started by a process that once held this block would read its peak
    block = b"x" * (512 * 2**20)
    model = memory_model(artifact, batch_size=32, num_classes=4, variants=["lora-4", "head"])
    del block
    assert model.method == "vmhwm" and model.variants["lora-4"] < 256
    assert set(model.variants) == {"head", "lora-4"}
    assert model.variants["head"] > 0 and model.variants["lora-4"] > 0
    # backward through the backbone's attention layers holds their activations; head-only training does not
    assert model.variants["lora-4"] > model.variants["head"]
    assert model.resting_mb > model.variants["lora-4"]  # torch alone is hundreds of MB
    assert (model.digest, model.batch_size, model.img_size) == (artifact_digest(artifact), 32, 32)
    assert MemoryModel.from_json(_path(artifact, 32).read_text()) == model

    real_run, calls = subprocess.run, []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(mm.subprocess, "run", counting)
    assert memory_model(artifact, batch_size=32, num_classes=4, variants=["head", "lora-4"]) == model
    assert calls == []
    again = memory_model(artifact, batch_size=8, num_classes=4, variants=["head"])
    assert len(calls) == 1 and again.batch_size == 8 and set(again.variants) == {"head"}
    assert 0 < again.variants["head"] < model.variants["lora-4"]
    assert MemoryModel.from_json(_path(artifact, 8).read_text()) == again
    assert MemoryModel.from_json(_path(artifact, 32).read_text()) == model  # each setting keeps its own

    with pytest.raises(MemoryModelError, match=r"variant 'head' failed \(exit 1\)"):
        measure_variant(artifact.parent / "nowhere", "head", 4, 8)


def test_variant_names_are_ordered_and_unique() -> None:
    assert VARIANTS == ("head", "synqt", "lora-1", "lora-2", "lora-4", "lora-8", "lora-16")
