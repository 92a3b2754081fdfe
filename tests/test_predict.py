"""``fedpetah-client predict``: JSON lines from the kept snapshot, task-free and task-aware, the errors a device
owner meets, and no Flower."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from snapshots import TASKS, Learned, device_cache, learned, write_images

from clients.cli import main as client_main
from clients.predict import Predictor
from fedpetah.backbone import Backbone
from fedpetah.device.client import ClientRuntime
from fedpetah.device.keep import BANK_DIR, load_kept
from fedpetah.device.local import BackboneCache
from fedpetah.wire.evaluation import EvaluateRequest
from flower_glue.launch import child_env
from server.bundle import REPO

SECTIONS = {"adapter": {"name": "lora", "rank": 2}, "train": {}, "tasks": {}, "partition": {}}


@pytest.fixture(scope="module")
def kept(tiny_backbone: Callable[..., Backbone], tmp_path_factory: pytest.TempPathFactory) -> tuple[Learned, Path]:
    """A device cache whose worker kept a 2-task snapshot (through ClientRuntime.evaluate, as from a server)."""
    snapshot = learned(tiny_backbone())
    cache = device_cache(tmp_path_factory.mktemp("device") / "backbones", snapshot)
    request = EvaluateRequest(snapshot.digest, 1, snapshot.tasks, snapshot.model, snapshot.manifest, keep=True,
                              evaluate=False, seed=0, clients=1, sections=SECTIONS)
    assert ClientRuntime(cache).evaluate(request, lambda settings, task: None).kept
    return snapshot, cache.root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("photos"), TASKS[:1], per_class=3, size=40)


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_predict_prints_the_predictors_labels_task_free_and_task_aware(kept: tuple[Learned, Path], images: list[Path],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    snapshot, cache = kept
    # Act
    code = client_main(["predict", "--cache", str(cache), "--top", "3", "--backend", "torch", *map(str, images)])
    free = _lines(capsys.readouterr().out)
    aware_code = client_main(["predict", "--cache", str(cache), "--task", "t1", "--backend", "torch",
                              *map(str, images)])
    aware = _lines(capsys.readouterr().out)

    # Assert: one line per image, the label the snapshot's predictor gives the image as training would read it
    assert code == aware_code == 0 and len(free) == len(aware) == len(images)
    predictor = Predictor(load_kept(BackboneCache(cache)))
    x = torch.cat([predictor.tensor(p) for p in images])
    expected = snapshot.predictor.predict(x)
    assert [line["label"] for line in free] == expected
    for line, path in zip(free, images, strict=True):
        assert line["image"] == str(path) and line["task"] == str(line["label"]).split("/")[0]
        top = line["top"]
        assert isinstance(top, list) and len(top) == 3 and top[0]["label"] == line["label"]
        assert top[0]["score"] == line["score"] and sorted((t["score"] for t in top), reverse=True) == \
            [t["score"] for t in top]
    with torch.no_grad():
        t1 = snapshot.predictor.model.outputs(x)[1][1].argmax(1).tolist()
    assert [line["label"] for line in aware] == [f"t1/{TASKS[1].classes[i]}" for i in t1]
    assert all(len(line["top"]) == 3 for line in aware)  # t1 has 3 classes: all listed (default top 5)


def test_predict_reports_an_unreadable_image_and_goes_on(kept: tuple[Learned, Path], images: list[Path],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code = client_main(["predict", "--cache", str(kept[1]), str(broken), str(tmp_path / "missing.jpg"),
                        str(images[0])])
    lines = _lines(capsys.readouterr().out)
    assert code == 1 and [sorted(line) for line in lines[:2]] == [["error", "image"]] * 2
    assert "label" in lines[2]


def test_predict_without_a_kept_bank_or_with_a_tampered_one_says_so(kept: tuple[Learned, Path], images: list[Path],
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert client_main(["predict", "--cache", str(tmp_path / "empty"), str(images[0])]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "empty") in error and "after its first finished task" in error
    assert client_main(["predict", "--cache", str(kept[1]), "--task", "nope", str(images[0])]) == 2
    assert "not a learned task" in capsys.readouterr().err
    # a copy of the cache whose kept tensors were changed on disk
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(kept[1]), str(copy)], check=True)
    weights = (copy / BANK_DIR) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert client_main(["predict", "--cache", str(copy), str(images[0])]) == 2
    assert "SHA-256 does not match" in capsys.readouterr().err


def test_predict_imports_no_flower_and_contacts_nothing(kept: tuple[Learned, Path], images: list[Path]) -> None:
    script = ("import json, sys\nfrom clients.cli import main\ncode = main(sys.argv[1:])\n"
              "print(json.dumps({'code': code, 'flwr': sorted(m for m in sys.modules if m.split('.')[0] in "
              "('flwr', 'grpc', 'ray'))}), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script, "predict", "--cache", str(kept[1]), str(images[0])],
                          capture_output=True, text=True, env=child_env({"PYTHONPATH": str(REPO)}), cwd=REPO,
                          timeout=300)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "flwr": []}, done.stderr
    assert json.loads(done.stdout)["label"].startswith("t")


def test_predict_with_onnx_runtime_gives_the_torch_probabilities_and_caches_the_export(
        kept: tuple[Learned, Path], images: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(kept[1]), str(copy)], check=True)
    snapshot = load_kept(BackboneCache(copy))
    torch_form = Predictor(snapshot, "t1", "torch")
    onnx_form = Predictor(snapshot, "t1", "onnx")
    cached = snapshot.directory / "predict.onnx"
    assert onnx_form.session is not None and cached.is_file()
    x = torch.cat([torch_form.tensor(p) for p in images])
    for task in (None, "t1"):
        torch_form.position = onnx_form.position = None if task is None else 1
        torch.testing.assert_close(onnx_form.probabilities(x), torch_form.probabilities(x), atol=1e-4, rtol=1e-3)
    # a changed cached file is not used: exported again
    cached.write_bytes(b"garbage")
    assert Predictor(snapshot, None, "onnx").session is not None and cached.read_bytes() != b"garbage"
