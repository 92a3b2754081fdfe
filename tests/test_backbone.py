"""The backbone pipeline's parts: glyph rendering, augmentation, proxy data, cached warm-up, import hygiene."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpetah.backbone import Backbone, build_backbone
from fedpetah.backbone.augment import Augmentation, augment, warp
from fedpetah.backbone.glyphs import FONT_FILES, GLYPHS, font_dir, glyph_images, render
from fedpetah.backbone.proxy import PROXIES, ProxySet, calibration_batches, load_proxy
from fedpetah.backbone.warmup import pretrain, warm_up
from fedpetah.config import BackboneConfig, WarmupConfig

REPO = Path(__file__).resolve().parent.parent
STILL = Augmentation(rotation=0, scale=(1.0, 1.0), shear=0, shift=0, elastic=0, stroke=0, noise=0, invert=0)


def test_glyph_classes_hold_no_digit_and_no_duplicate() -> None:
    assert len(set(GLYPHS)) == len(GLYPHS) == 110
    assert not set(GLYPHS) & set("0123456789OoIlZzSsBbgq")  # digits and their look-alikes


def test_every_glyph_is_rendered_by_several_fonts_deterministically() -> None:
    images, labels, fonts = glyph_images(64)
    assert images.shape == (len(labels), 1, 64, 64) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=len(GLYPHS)).min() >= 5
    assert set(fonts.tolist()) == set(range(len(FONT_FILES)))
    assert images.reshape(len(images), -1).max(1).min() == 255  # no glyph rendered empty or faint
    again = render(GLYPHS[int(labels[7])], font_dir() / FONT_FILES[int(fonts[7])], 64)
    np.testing.assert_array_equal(again, images[7, 0])


def test_warp_by_half_a_turn_flips_both_axes() -> None:
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 2:5, 3:12] = 1.0  # an off-centre bar
    turned = warp(x, torch.tensor([180.0]), STILL, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(turned, torch.flip(x, (2, 3)), atol=1e-4, rtol=0)


def test_augment_is_seeded_and_stays_in_range() -> None:
    images = torch.rand(8, 1, 20, 20)
    a, degrees_a = augment(images, Augmentation(), 32, torch.Generator().manual_seed(3))
    b, degrees_b = augment(images, Augmentation(), 32, torch.Generator().manual_seed(3))
    c, _ = augment(images, Augmentation(), 32, torch.Generator().manual_seed(4))
    assert a.shape == (8, 1, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(degrees_a, degrees_b, atol=0, rtol=0)
    assert not torch.equal(a, c) and float(degrees_a.abs().max()) <= 180


def test_proxies_cover_their_classes_and_calibrate_at_the_backbone_input() -> None:
    assert PROXIES.names() == ["digits", "glyphs"]
    for name in PROXIES:
        proxy = load_proxy(name)
        assert np.array_equal(np.unique(proxy.labels), np.arange(proxy.classes))
        batches = calibration_batches(proxy, 32, 3, count=2, batch_size=16)
        assert [tuple(b.shape) for b in batches] == [(16, 3, 32, 32)] * 2
        assert float(batches[0].max()) > 0.5 and float(batches[0].min()) >= 0
    with pytest.raises(ValueError, match="labels must cover"):
        ProxySet("bad", np.zeros((2, 1, 8, 8), np.uint8), np.array([0, 0]), 2, Augmentation())


def test_warmup_config_rejects_an_unknown_data_set_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"backbone.warmup.dataset='mnist'.*digits.*glyphs"):
        WarmupConfig(dataset="mnist")
    with pytest.raises(ValueError, match="backbone.warmup.rotation"):
        WarmupConfig(rotation=270)


def test_warmup_config_takes_each_data_set_s_own_recipe_unless_set() -> None:
    digits, glyphs = WarmupConfig(dataset="digits"), WarmupConfig(dataset="glyphs")
    assert (digits.epochs, digits.lr) == (12, 2e-3)  # the former defaults: the digits cache keys stay valid
    assert (glyphs.epochs, glyphs.lr) == (PROXIES.get("glyphs").epochs, PROXIES.get("glyphs").lr) != (12, 2e-3)
    assert (WarmupConfig(dataset="glyphs", epochs=3, lr=1e-3).epochs, WarmupConfig(lr=1e-3).lr) == (3, 1e-3)
    with pytest.raises(ValueError, match="epochs >= 1"):
        WarmupConfig(dataset="glyphs", epochs=0)


def _tiny() -> tuple[Backbone, WarmupConfig]:
    config = BackboneConfig(name="efficientvit_b0", img_size=32, weights="random")
    return build_backbone(config), WarmupConfig(dataset="glyphs", epochs=1, batch_size=128)


@pytest.mark.slow  # trains the backbone at 32 px
def test_pretraining_learns_the_proxy_and_reports_its_cost() -> None:
    backbone, config = _tiny()
    before = {k: v.clone() for k, v in backbone.module.state_dict().items()}
    info = pretrain(backbone, replace(config, dataset="digits", epochs=3, batch_size=64), load_proxy("digits"))
    assert info["dataset"] == "digits" and info["classes"] == 10 and info["epochs"] == 3
    assert info["test_accuracy"] > 0.3  # chance is 0.1; 66 steps at 32 px
    assert info["cpu_seconds"] > 0 and len(info["load_average"]) == 3
    changed = [k for k, v in backbone.module.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("weight") for k in changed)
    assert not any(p.requires_grad for p in backbone.module.parameters())


@pytest.mark.slow  # trains the backbone at 32 px
def test_warm_up_is_cached_by_its_settings(tmp_path: Path) -> None:
    backbone, config = _tiny()
    first = warm_up(backbone, config, tmp_path)
    (weights,) = tmp_path.glob("warmup-efficientvit_b0-32px-*.safetensors")
    again, _ = _tiny()
    assert warm_up(again, config, tmp_path) == first  # loaded, not retrained: same record, same tensors
    for key, value in load_file(str(weights)).items():
        torch.testing.assert_close(again.module.state_dict()[key], value, atol=0, rtol=0)
    warm_up(_tiny()[0], replace(config, dataset="digits"), tmp_path)
    assert len(list(tmp_path.glob("warmup-*.safetensors"))) == 2  # another data set, another entry


DEVICE_MODULES = ("fedpetah.device.local", "fedpetah.artifact", "fedpetah.adapters", "fedpetah.train")


def test_device_modules_import_neither_sklearn_nor_matplotlib() -> None:
    code = (
        f"import sys\nimport {', '.join(DEVICE_MODULES)}\n"
        "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _module_imports(path: Path, name: str) -> set[str]:
    """fedpetah modules that ``name`` imports anywhere: at module level, inside functions, for type checking."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] != "fedpetah":
                continue
            found.add(target)
            # importing a.b.c first runs the package a.b, unless the importer is already inside it
            found.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts))) if not name.startswith(p + "."))
    return found - {name}


def test_backbone_and_config_modules_import_no_cycle() -> None:
    modules: dict[str, Path] = {}
    for path in (REPO / "fedpetah").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _module_imports(path, name) & modules.keys() for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    mine = [m for m in graph
            if m.startswith("fedpetah.backbone") or m in ("fedpetah.config", "fedpetah.serving.pipeline")]
    assert [m for m in mine if reaches(m, m)] == []


@pytest.mark.slow  # trains the backbone at 32 px
def test_pipeline_prunes_recovers_and_packs_once(tmp_path: Path) -> None:
    from fedpetah.artifact import load_artifact
    from fedpetah.config import PruningConfig
    from fedpetah.experiment import ExperimentConfig
    from fedpetah.serving.pipeline import prepare_artifact

    warmup = WarmupConfig(dataset="glyphs", epochs=1, batch_size=128)
    backbone = BackboneConfig(name="efficientvit_b0", img_size=32, weights="random", warmup=warmup)
    config = ExperimentConfig(backbone=backbone, pruning=PruningConfig(ratio=0.5, recovery_epochs=1))
    target = prepare_artifact(config, tmp_path)
    shipped = load_artifact(target)
    assert shipped.pruning_history and shipped.pretraining["source"] == "random"
    assert shipped.pretraining["recovery"]["dataset"] == "glyphs" and shipped.pretraining["recovery"]["epochs"] == 1
    full = build_backbone(backbone)
    assert shipped.num_params() < 0.7 * full.num_params()
    stamp = (target / "weights.safetensors").stat().st_mtime_ns
    assert prepare_artifact(config, tmp_path) == target  # cached: not rebuilt
    assert (target / "weights.safetensors").stat().st_mtime_ns == stamp
