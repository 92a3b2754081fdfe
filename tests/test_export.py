"""Export for phones: ONNX matches PyTorch for every adapter kind; the torch form reloads; broken runs fail clearly."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpetah.adapters import ADAPTERS, adapter_config, build_adapter
from fedpetah.artifact import artifact_digest, pack_artifact
from fedpetah.backbone import Backbone
from fedpetah.bank import AdapterBank
from fedpetah.config import ROUTER_KEY, BackboneConfig, PruningConfig, RouterConfig
from fedpetah.experiment import ExperimentConfig
from fedpetah.routing.export import ExportError, load_export, main, write_export
from fedpetah.routing.features import feature_width
from fedpetah.routing.predict import build_predictor
from fedpetah.routing.stats import class_stats

ort = pytest.importorskip("onnxruntime")
ROUTER = RouterConfig(dim=16)


def _bank(backbone: Backbone, name: str, digest: str = "", router: RouterConfig = ROUTER) -> AdapterBank:
    """Two tasks (2 and 3 classes) whose adapters are moved away from their initial values, with statistics."""
    bank = AdapterBank({ROUTER_KEY: asdict(router)})
    width = router.width(feature_width(backbone, router.grid))
    g = torch.Generator().manual_seed(0)
    for task, classes in enumerate((2, 3)):
        adapter = build_adapter(adapter_config(name), backbone, classes)
        state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in adapter.state().items()}
        bank.add_task(task, name, classes, state, [f"c{task}{c}" for c in range(classes)],
                      {"task_name": f"t{task}", "backbone": digest})
        labels = torch.arange(classes).repeat(20)
        features = torch.randn(len(labels), width, generator=g) + 3 * torch.randn(classes, width, generator=g)[labels]
        bank.set_stats(task, class_stats(features, labels, classes).tensors())
    return bank


def _stats(bank: AdapterBank, backbone: Backbone) -> dict:
    from fedpetah.routing.export import bank_stats

    return bank_stats(bank, backbone, ROUTER)


@pytest.mark.slow
@pytest.mark.parametrize("name", ADAPTERS.names())
def test_onnx_and_torch_exports_match_pytorch(name: str, tiny_backbone: Callable[..., Backbone],
                                               tmp_path: Path) -> None:
    backbone = tiny_backbone("efficientvit_b0", 32)
    bank = _bank(backbone, name)
    predictor = build_predictor(backbone, adapter_config(name), bank, _stats(bank, backbone), router=ROUTER)
    info = write_export(predictor, backbone, adapter_config(name), tmp_path)
    assert json.loads((tmp_path / "labels.json").read_text()) == ["t0/c00", "t0/c01", "t1/c10", "t1/c11", "t1/c12"]
    assert info["shared"] == [name == "head"] * 2  # only a head adapter reads the router's features
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = predictor.model(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):  # the batch axis is dynamic
        scores = session.run(["scores"], {"images": batch.numpy()})[0]
        # atol 1e-4, plus float32's relative error on the large negative scores of improbable tasks (-130: 8 ulp)
        np.testing.assert_allclose(scores, expected[: len(batch)], atol=1e-4, rtol=1e-5)
        assert (scores.argmax(1) == expected[: len(batch)].argmax(1)).all()
    reloaded = load_export(tmp_path)
    assert reloaded.labels == predictor.labels
    torch.testing.assert_close(reloaded.model(x), predictor.model(x), rtol=0, atol=1e-6)
    # the weights an adapter leaves alone are stored once, not once per expert and once for the router's features
    state = predictor.model.state_dict()
    full = sum(v.numel() * v.element_size() for v in state.values())
    stored = (tmp_path / "model.safetensors").stat().st_size
    if name in ("lora", "dora", "bias", "synqt"):  # they change a few layers (or none) of each expert's backbone
        assert stored < 0.45 * full, (stored, full)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "synqt"])
def test_executorch_program_matches_pytorch(name: str, tiny_backbone: Callable[..., Backbone], tmp_path: Path) -> None:
    pytest.importorskip("executorch", reason="ExecuTorch is an optional extra: pip install 'fedpetah[executorch]'")
    from executorch.runtime import Runtime

    backbone = tiny_backbone("efficientvit_b0", 32)
    bank = _bank(backbone, name)
    predictor = build_predictor(backbone, adapter_config(name), bank, _stats(bank, backbone), router=ROUTER)
    info = write_export(predictor, backbone, adapter_config(name), tmp_path, onnx=False, pte=True)
    assert json.loads((tmp_path / "model.json").read_text())["pte"] == info["pte"]
    assert info["pte"]["input"] == [1, 3, 32, 32] and info["pte"]["torch"] == torch.__version__
    method = Runtime.get().load_program(str(tmp_path / "model.pte")).load_method("forward")
    for seed in range(2):
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        scores, expected = method.execute([x])[0].numpy(), predictor.model(x).numpy()
        np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=1e-5)
        assert scores.argmax() == expected.argmax()


def test_executorch_missing_is_a_clear_error(tiny_backbone: Callable[..., Backbone], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ["executorch", *(m for m in sys.modules if m.startswith("executorch."))]:
        monkeypatch.setitem(sys.modules, module, None)  # what an environment without the extra looks like
    backbone = tiny_backbone()
    bank = _bank(backbone, "head")
    predictor = build_predictor(backbone, adapter_config("head"), bank, _stats(bank, backbone), router=ROUTER)
    with pytest.raises(ExportError, match=r"pip install 'fedpetah\[executorch\]'"):
        write_export(predictor, backbone, adapter_config("head"), tmp_path, onnx=False, pte=True)
    assert not (tmp_path / "model.json").exists()  # no manifest for an export that did not complete


def _run_dir(root: Path, backbone: Backbone) -> Path:
    run = root / "run"
    pack_artifact(backbone, run / "backbone")
    config = ExperimentConfig(backbone=BackboneConfig(name=backbone.model_name, img_size=32, weights="random"),
                              pruning=PruningConfig(ratio=0.0), adapter=adapter_config("head"))
    (run / "config.json").write_text(json.dumps(asdict(config), default=str))
    _bank(backbone, "head", artifact_digest(run / "backbone")).save(run / "bank")
    return run


def test_cli_exports_a_run_and_refuses_broken_ones(tiny_backbone: Callable[..., Backbone], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    backbone = tiny_backbone()
    run = _run_dir(tmp_path, backbone)
    assert main([str(run), str(tmp_path / "out"), "--no-onnx"]) == 0
    predictor = load_export(tmp_path / "out")
    assert predictor.predict(torch.rand(2, 3, 32, 32))[0] in predictor.labels

    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ExportError, match="SHA-256"):
        load_export(tmp_path / "out")
    (tmp_path / "out" / "model.json").unlink()
    with pytest.raises(ExportError, match="model.json is missing"):
        load_export(tmp_path / "out")

    assert main([str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bank_file = next((run / "bank").glob("task-0001-*.safetensors"))
    bank_file.write_bytes(b"corrupt")
    assert main([str(run), str(tmp_path / "o3")]) == 2
    assert "adapter bank is unusable" in capsys.readouterr().err
    (run / "bank" / "bank.json").unlink()
    assert main([str(run), str(tmp_path / "o4")]) == 2
    assert "bank.json does not exist" in capsys.readouterr().err
    (run / "config.json").unlink()
    assert main([str(run), str(tmp_path / "o5")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_a_bank_without_statistics_is_a_clear_error(tiny_backbone: Callable[..., Backbone], tmp_path: Path) -> None:
    backbone = tiny_backbone()
    bank = _bank(backbone, "head")
    bank.set_stats(1, {})
    with pytest.raises(ExportError, match=r"tasks \[1\] have no router statistics"):
        _stats(bank, backbone)


def test_a_version_1_export_and_a_bank_from_before_grids_load_with_the_pooled_router(
        tiny_backbone: Callable[..., Backbone], tmp_path: Path) -> None:
    backbone = tiny_backbone()
    legacy = RouterConfig(dim=16, grid=0, joint=0.0, task_aware_mix=0.0)
    bank = _bank(backbone, "head", router=legacy)
    record = {k: v for k, v in asdict(legacy).items() if k not in ("grid", "joint", "task_aware_mix")}  # what such
    # a bank recorded
    bank.metadata[ROUTER_KEY] = record
    from fedpetah.routing.export import bank_stats, router_config

    assert router_config(bank) == legacy
    predictor = build_predictor(backbone, adapter_config("head"), bank, bank_stats(bank, backbone, legacy),
                                router=legacy)
    assert predictor.model.router.in_features == feature_width(backbone, 0)
    write_export(predictor, backbone, adapter_config("head"), tmp_path, onnx=False)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["format_version"] == 3 and info["router"] == {"grid": 0, "joint": 0.0}
    del info["router"]
    (tmp_path / "model.json").write_text(json.dumps({**info, "format_version": 1}))  # as version 1 wrote it
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(load_export(tmp_path).model(x), predictor.model(x), rtol=0, atol=1e-6)
    (tmp_path / "model.json").write_text(json.dumps({**info, "format_version": 7}))
    with pytest.raises(ExportError, match="version"):
        load_export(tmp_path)


def test_the_snapshot_payload_round_trips_and_is_what_write_export_writes(
        tiny_backbone: Callable[..., Backbone], tmp_path: Path) -> None:
    from fedpetah.routing.export import export_payload, snapshot

    backbone = tiny_backbone()
    bank = _bank(backbone, "lora")
    stats = _stats(bank, backbone)
    predictor = build_predictor(backbone, adapter_config("lora"), bank, stats, router=ROUTER)
    exported = tmp_path / "export"
    info = write_export(predictor, backbone, adapter_config("lora"), exported, onnx=False, version=7)
    digest = artifact_digest(exported / "backbone")
    model, manifest = export_payload(predictor, backbone, adapter_config("lora"), 7, digest)
    # one writer: the export's two files are the payload's bytes
    assert (exported / "model.safetensors").read_bytes() == model
    assert (exported / "model.json").read_bytes() == manifest and json.loads(manifest) == info
    assert (info["backbone"], info["version"], info["onnx"], info["pte"]) == (digest, 7, None, None)
    # the server's snapshot of the bank is the same payload
    assert snapshot(backbone, digest, adapter_config("lora"), bank, None, ROUTER, 7, stats) == (model, manifest)
    assert snapshot(backbone, digest, adapter_config("lora"), bank, [0, 1], ROUTER, 7) == (model, manifest)
    # a device rebuilds the predictor from the payload and a backbone artifact
    device = tmp_path / "device"
    device.mkdir()
    (device / "model.safetensors").write_bytes(model)
    (device / "model.json").write_bytes(manifest)
    pack_artifact(backbone, device / "backbone")
    reloaded = load_export(device)
    assert (reloaded.labels, reloaded.task_order) == (predictor.labels, predictor.task_order)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(reloaded.model(x), predictor.model(x), rtol=0, atol=1e-6)


def test_a_snapshot_of_a_task_without_statistics_is_an_export_error(tiny_backbone: Callable[..., Backbone]) -> None:
    from fedpetah.routing.export import snapshot

    backbone = tiny_backbone()
    bank = _bank(backbone, "head")
    stats = _stats(bank, backbone)
    _, manifest = snapshot(backbone, "d" * 64, adapter_config("head"), bank, [0], ROUTER, 1, stats)
    assert json.loads(manifest)["tasks"] == [0]  # only the chosen tasks
    with pytest.raises(ExportError, match=r"tasks \[1\] have no router statistics"):
        snapshot(backbone, "d" * 64, adapter_config("head"), bank, None, ROUTER, 1, {0: stats[0]})
    bank.set_stats(1, {})
    with pytest.raises(ExportError, match=r"tasks \[1\] have no router statistics"):
        snapshot(backbone, "d" * 64, adapter_config("head"), bank, None, ROUTER, 1)
    with pytest.raises(ExportError, match=r"not in the bank: \[5\]"):
        snapshot(backbone, "d" * 64, adapter_config("head"), bank, [0, 5], ROUTER, 1, stats)
