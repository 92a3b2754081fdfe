"""AdapterBank: versioning, atomic save/resume, digest checks, single-task export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import fedpetah.bank as bank_module
from fedpetah.aggregation import InvalidUpdate
from fedpetah.bank import AdapterBank, BankError, read_export


def _state(value: float, classes: int = 2) -> dict[str, torch.Tensor]:
    return {
        "head.weight": torch.full((classes, 4), value),
        "head.bias": torch.full((classes,), value),
        "blocks.0.attn.qkv.lora_A.default.weight": torch.full((2, 4), value, dtype=torch.float16),
    }


def _bank() -> AdapterBank:
    bank = AdapterBank(metadata={"run": "test", "next_round": 3})
    bank.add_task(0, "lora", 2, _state(0.0), class_names=["zero", "one"], metadata={"seen": True})
    bank.add_task(1, "lora", 3, _state(1.0, classes=3))
    bank.update(0, _state(0.5), server_round=2, opt_state={"step": torch.tensor(1)}, metadata={"acc": 0.9})
    return bank


def test_update_versions_copies_and_validates() -> None:
    bank = _bank()
    entry = bank[0]
    assert (entry.version, entry.last_round, entry.metadata) == (1, 2, {"seen": True, "acc": 0.9})
    assert bank[1].version == 0 and bank[1].last_round == -1 and bank.tasks() == [0, 1]
    fresh = _state(2.0)
    bank.update(0, fresh, server_round=3)
    fresh["head.bias"].fill_(99.0)
    assert bank[0].state["head.bias"][0].item() == 2.0  # the bank holds its own copy
    assert bank[0].opt_state["step"].item() == 1  # opt_state=None keeps the previous one
    with pytest.raises(InvalidUpdate, match=r"head\.weight: \(3, 4\) != \(2, 4\)"):
        bank.update(0, _state(2.0, classes=3), server_round=4)
    with pytest.raises(ValueError, match="older"):
        bank.update(0, _state(2.0), server_round=1)
    with pytest.raises(ValueError, match="already"):
        bank.add_task(0, "lora", 2, _state(0.0))
    with pytest.raises(ValueError, match="class names"):
        bank.add_task(5, "lora", 2, _state(0.0), class_names=["a"])
    with pytest.raises(ValueError, match="not JSON compliant"):
        bank.add_task(6, "lora", 2, _state(0.0), metadata={"bad": float("nan")})
    with pytest.raises(KeyError, match="not in the bank"):
        bank[7]


def test_save_load_round_trip(tmp_path: Path) -> None:
    bank = _bank()
    bank.save(tmp_path)
    loaded = AdapterBank.load(tmp_path)
    assert loaded.metadata == bank.metadata and loaded.tasks() == [0, 1]
    for task in bank.tasks():
        a, b = bank[task], loaded[task]
        assert a.describe() == b.describe()
        assert a.state.keys() == b.state.keys() and a.opt_state.keys() == b.opt_state.keys()
        assert all(
            torch.equal(a.state[k], b.state[k]) and a.state[k].dtype == b.state[k].dtype for k in a.state
        )
    assert loaded[0].opt_state["step"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("task-")) == ["bank.json"]


def test_a_crash_before_the_commit_leaves_the_old_bank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bank = _bank()
    bank.save(tmp_path)
    bank.update(1, _state(7.0, classes=3), server_round=5)
    real_replace = os.replace

    def crash_on_commit(src: str, dst: str | Path) -> None:
        if Path(dst).name == "bank.json":
            raise KeyboardInterrupt  # the server is killed between tensor files and manifest
        real_replace(src, dst)

    monkeypatch.setattr(bank_module.os, "replace", crash_on_commit)
    with pytest.raises(KeyboardInterrupt):
        bank.save(tmp_path)
    monkeypatch.undo()
    survived = AdapterBank.load(tmp_path)
    assert survived[1].version == 0 and survived[1].state["head.bias"][0].item() == 1.0
    assert len(list(tmp_path.glob("task-0001-*"))) == 2 and not list(tmp_path.glob(".tmp-*"))
    bank.save(tmp_path)  # resumed server saves again: new version committed, orphan removed
    assert AdapterBank.load(tmp_path)[1].version == 1
    assert len(list(tmp_path.glob("task-*.safetensors"))) == 2


def test_a_bank_refuses_adapters_of_another_backbone_naming_both(tmp_path: Path) -> None:
    old, new = "a" * 64, "b" * 64
    bank = AdapterBank()
    bank.add_task(0, "lora", 2, _state(0.0), metadata={"backbone": old})
    bank.add_task(1, "lora", 2, _state(1.0))  # a task from an older bank, without the digest: not checked
    bank.save(tmp_path)
    loaded = AdapterBank.load(tmp_path)
    loaded.check_backbone(old)
    with pytest.raises(BankError, match=f"task 0 was trained on backbone {old}, but this run's backbone is {new}"):
        loaded.check_backbone(new)


def test_load_detects_tampering_and_missing_files(tmp_path: Path) -> None:
    _bank().save(tmp_path)
    victim = sorted(tmp_path.glob("task-0000-*"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(BankError, match="SHA-256"):
        AdapterBank.load(tmp_path)
    victim.unlink()
    with pytest.raises(BankError, match="missing"):
        AdapterBank.load(tmp_path)
    manifest = tmp_path / "bank.json"
    manifest.write_text(manifest.read_text()[:-10])
    with pytest.raises(BankError, match="unreadable"):
        AdapterBank.load(tmp_path)
    manifest.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BankError, match="not a"):
        AdapterBank.load(tmp_path)
    with pytest.raises(BankError, match="does not exist"):
        AdapterBank.load(tmp_path / "nowhere")


def test_export_task_round_trip_and_digest(tmp_path: Path) -> None:
    bank = _bank()
    manifest_path = bank.export_task(0, tmp_path / "export")
    manifest = json.loads(manifest_path.read_text())
    assert (
        manifest["adapter"] == "lora"
        and manifest["class_names"] == ["zero", "one"]
        and manifest["version"] == 1
    )
    entry = read_export(tmp_path / "export")
    assert entry.opt_state == {} and entry.describe() == bank[0].describe()
    assert all(torch.equal(entry.state[k], bank[0].state[k]) for k in bank[0].state)
    weights = tmp_path / "export" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(BankError, match="SHA-256"):
        read_export(tmp_path / "export")
