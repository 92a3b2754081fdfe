"""Backbone artifact: identical logits after a round trip, and every defect is an ArtifactError."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedpetah.artifact import (
    MANIFEST,
    MANIFEST_FIELD_TYPES,
    MAX_IMG_SIZE,
    MAX_MANIFEST_BYTES,
    MIN_IMG_SIZE,
    WEIGHTS,
    ArtifactError,
    Manifest,
    artifact_digest,
    artifact_size,
    load_artifact,
    manifest_digest,
    pack_artifact,
    read_manifest,
)
from fedpetah.backbone import Backbone, create_timm_model, family_of
from fedpetah.config import PruningConfig
from fedpetah.device.local import BackboneCache
from fedpetah.pruning import prune_backbone

SIZE = 32
NAME = "mobilevit_xxs"  # its history has head slimming as well as channel pruning


@pytest.fixture(scope="module")
def unpruned() -> Backbone:
    torch.manual_seed(0)
    module, kwargs = create_timm_model(NAME, SIZE)
    module.eval().requires_grad_(False)
    return Backbone(module, NAME, family_of(NAME), SIZE, create_kwargs=kwargs, pretraining={"source": "random"})


@pytest.fixture(scope="module")
def pruned(unpruned: Backbone) -> Backbone:
    return prune_backbone(unpruned, PruningConfig(ratio=0.5))


@pytest.fixture(scope="module")
def packed(pruned: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("artifacts") / "pruned"
    pack_artifact(pruned, directory)
    return directory


def features(backbone: Backbone) -> torch.Tensor:
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return backbone.module(x)


@pytest.mark.parametrize("which", ["unpruned", "pruned"])
def test_round_trip_gives_identical_features(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    backbone: Backbone = request.getfixturevalue(which)
    manifest = pack_artifact(backbone, tmp_path / "artifact")
    loaded = load_artifact(tmp_path / "artifact", expected_digest=manifest.manifest_sha256)
    assert torch.equal(features(loaded), features(backbone))
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    assert (loaded.pruning_history, loaded.pretraining) == (backbone.pruning_history, backbone.pretraining)
    assert loaded.num_params() == backbone.num_params() == manifest.num_params
    assert artifact_digest(tmp_path / "artifact") == manifest.manifest_sha256
    files = [tmp_path / "artifact" / WEIGHTS, tmp_path / "artifact" / MANIFEST]
    assert artifact_size(tmp_path / "artifact") == sum(f.stat().st_size for f in files)


def test_slimmed_efficientvit_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    """LiteMLA heads cut, its ports pruned and blocks removed: all rebuilt from timm and the JSON history."""
    torch.manual_seed(0)
    module, kwargs = create_timm_model("efficientvit_b0", SIZE)
    module.eval().requires_grad_(False)
    backbone = Backbone(module, "efficientvit_b0", family_of("efficientvit_b0"), SIZE, create_kwargs=kwargs)
    pruned = prune_backbone(backbone, PruningConfig(ratio=0.5))
    assert {"remove_block", "slim_heads", "width"} <= {s["op"] for s in pruned.pruning_history}
    pack_artifact(pruned, tmp_path / "artifact")
    loaded = load_artifact(tmp_path / "artifact")
    assert torch.equal(features(loaded), features(pruned))
    assert loaded.num_params() == pruned.num_params() < backbone.num_params()


def test_repacking_replaces_the_artifact_atomically(unpruned: Backbone, pruned: Backbone, tmp_path: Path) -> None:
    first = pack_artifact(unpruned, tmp_path / "artifact")
    second = pack_artifact(pruned, tmp_path / "artifact")
    assert first.manifest_sha256 != second.manifest_sha256
    assert artifact_digest(tmp_path / "artifact") == second.manifest_sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no staging leftovers


def test_manifest_field_types_cover_every_field() -> None:
    assert set(MANIFEST_FIELD_TYPES) == {f.name for f in fields(Manifest)}


def copy_of(packed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "copy"))


def edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None], resign: bool) -> None:
    """Change the manifest; with ``resign`` also recompute its digest (a consistent but wrong artifact)."""
    raw = json.loads((directory / MANIFEST).read_text())
    edit(raw)
    if resign:
        raw["manifest_sha256"] = manifest_digest(raw)
    (directory / MANIFEST).write_text(json.dumps(raw))


def test_missing_files_raise(packed: Path, tmp_path: Path) -> None:
    for name, message in ((WEIGHTS, "no weights"), (MANIFEST, "no manifest")):
        directory = copy_of(packed, tmp_path)
        (directory / name).unlink()
        with pytest.raises(ArtifactError, match=message):
            load_artifact(directory)
        shutil.rmtree(directory)


def test_tampered_weights_raise(packed: Path, tmp_path: Path) -> None:
    directory = copy_of(packed, tmp_path)
    data = bytearray((directory / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (directory / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights were modified"):
        load_artifact(directory)


@pytest.mark.parametrize(
    ("edit", "resign", "message"),
    [
        (lambda m: m.update(format_version=2), False, "unsupported artifact format version 2"),
        (lambda m: m.update(img_size=64), False, "the manifest was modified"),
        (lambda m: m.pop("tensors"), True, "missing \\['tensors'\\]"),
        (lambda m: m.update(in_chans="3"), True, "in_chans must be int"),
        (lambda m: m.update(model_name="resnet18"), True, "unsupported backbone"),
        (lambda m: m["pruning_history"].append({"op": "explode"}), True, "cannot replay"),
        (lambda m: m.update(pruning_history=[]), True, "do not fit"),
    ],
)
def test_bad_manifests_raise(
    packed: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], resign: bool, message: str
) -> None:
    directory = copy_of(packed, tmp_path)
    edit_manifest(directory, edit, resign)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(directory)


def test_digest_mismatch_raises(packed: Path) -> None:
    with pytest.raises(ArtifactError, match="!= expected"):
        load_artifact(packed, expected_digest="0" * 64)


def test_wrong_tensor_shapes_raise_even_when_consistently_signed(packed: Path, tmp_path: Path) -> None:
    directory = copy_of(packed, tmp_path)
    state = load_file(str(directory / WEIGHTS))
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    save_file(state, str(directory / WEIGHTS))
    digest = hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()

    def edit(raw: dict[str, Any]) -> None:
        raw["weights_sha256"] = digest
        raw["tensors"][key]["shape"] = list(state[key].shape)

    edit_manifest(directory, edit, resign=True)
    with pytest.raises(ArtifactError, match="do not fit"):
        load_artifact(directory)
    edit_manifest(directory, lambda raw: raw["tensors"].pop(key), resign=True)
    with pytest.raises(ArtifactError, match="differ from the manifest"):
        load_artifact(directory)


def _steps(count: int, op: str = "remove_block") -> list[dict[str, Any]]:
    return [{"op": op, "module": "stages.0"} for _ in range(count)]


def _huge_tensor(raw: dict[str, Any]) -> None:
    key = next(iter(raw["tensors"]))
    raw["tensors"][key]["shape"] = [2**20, 2**20, 2**20]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(img_size=1_000_000), "img_size = 1000000 is outside the limits \\[16, 768\\]"),
        (lambda m: m.update(img_size=4), "img_size = 4 is outside"),
        (lambda m: m.update(in_chans=100_000, mean=[0.5] * 100_000, std=[0.5] * 100_000), "in_chans = 100000"),
        (lambda m: m.update(pruning_history=_steps(5000)), "len\\(pruning_history\\) = 5000"),
        (lambda m: m.update(pruning_history=_steps(9, "width")), "pruning_history width steps = 9 is outside"),
        (lambda m: m.update(num_params=10**12), "num_params = 1000000000000"),
        (_huge_tensor, "total elements of tensors"),
        (lambda m: m.update(model_name="x" * 500), "len\\(model_name\\) = 500"),
    ],
)
@pytest.mark.parametrize("resign", [True, False], ids=["signed-by-the-server", "tampered"])
def test_manifest_bounds_are_checked_before_anything_is_built(
    packed: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str, resign: bool
) -> None:
    # A manifest is covered by its own digest, which the server computes: a hostile server signs its own
    # manifest, so the bounds must hold whether or not the digest matches. read_manifest builds nothing.
    directory = copy_of(packed, tmp_path)
    edit_manifest(directory, edit, resign)
    with pytest.raises(ArtifactError, match=f"manifest field {message}"):
        read_manifest(directory)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(directory)


def test_oversized_or_deeply_nested_manifests_are_refused_unparsed(packed: Path, tmp_path: Path) -> None:
    directory = copy_of(packed, tmp_path)
    (directory / MANIFEST).write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ArtifactError, match=f"exceeds the limit of {MAX_MANIFEST_BYTES} bytes"):
        read_manifest(directory)
    (directory / MANIFEST).write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(directory)
    cache = BackboneCache(tmp_path / "device-cache")
    with pytest.raises(ArtifactError, match="exceeds the limit"):
        cache.install("ab" * 32, b"weights", b"{" + b" " * MAX_MANIFEST_BYTES + b"}")
    assert not (tmp_path / "device-cache").exists()  # refused before anything was written


def _renamed(packed: Path, note: int) -> tuple[str, bytes, bytes]:
    """The same weights under a manifest whose free-form ``pretraining`` differs: a new, valid digest."""
    raw = json.loads((packed / MANIFEST).read_text())
    raw["pretraining"] = {**raw["pretraining"], "note": note}
    raw["manifest_sha256"] = manifest_digest(raw)
    return raw["manifest_sha256"], (packed / WEIGHTS).read_bytes(), json.dumps(raw).encode()


def test_device_cache_evicts_the_least_recently_used_backbones(packed: Path, tmp_path: Path) -> None:
    # Arrange: a server that sends the same weights under a new digest each time, to a cache that keeps 3
    artifacts = [_renamed(packed, note) for note in range(6)]
    size = len(artifacts[0][1]) + len(artifacts[0][2])
    cache = BackboneCache(tmp_path / "cache", keep=3, max_bytes=100 * size)

    # Act: install 0, 1, 2; use 0 again; install 3, 4
    for digest, weights, manifest in artifacts[:3]:
        cache.install(digest, weights, manifest)
    cache.get(artifacts[0][0])
    for digest, weights, manifest in artifacts[3:5]:
        cache.install(digest, weights, manifest)

    # Assert: the newest three by use are left (0 was used after 1 and 2), and each one kept still verifies
    digests = [a[0] for a in artifacts]
    assert {d for d, _, _ in cache.entries()} == {digests[0], digests[3], digests[4]}
    assert not any(cache.has(d) for d in digests[1:3])
    assert cache.get(digests[0]).num_params() > 0

    # Act and Assert: a byte bound below two backbones keeps only the one just installed, never evicts it
    small = BackboneCache(tmp_path / "cache", keep=3, max_bytes=size // 2)
    small.install(*artifacts[5])
    assert [d for d, _, _ in small.entries()] == [digests[5]] and small.get(digests[5]).num_params() > 0


def test_real_manifest_is_well_inside_the_bounds(packed: Path) -> None:
    manifest = read_manifest(packed)
    assert MIN_IMG_SIZE <= manifest.img_size <= MAX_IMG_SIZE
    assert (packed / MANIFEST).stat().st_size < MAX_MANIFEST_BYTES // 100
