"""Export a run for phones: one task-free model as ONNX, as safetensors + JSON for torch, and as ExecuTorch.

``fedpetah-export RUN_DIR OUT_DIR`` writes::

    model.onnx          float32 images [N, C, H, W] in [0, 1] -> scores [N, K] (the best is the prediction)
    model.pte           with --executorch: the same model for ExecuTorch's runtime (XNNPACK), one image
                        [1, C, H, W] per call; needs ``fedpetah[executorch]`` (executorch 1.5.1 with torch 2.14)
    labels.json         the K labels "<task>/<class>", in score order
    model.safetensors   the same model's tensors (adapters merged; a tensor repeated across experts stored once),
                        for torch users
    model.json          how to rebuild it (adapter config, tasks, widths) + SHA-256 of model.safetensors
    backbone/           the frozen backbone artifact (weights.safetensors + manifest.json) it builds on

Read the torch form back with :func:`load_export`; a run directory with :func:`load_run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedpetah.adapters import ADAPTERS, AdapterConfig, build_adapter
from fedpetah.artifact import MANIFEST, ArtifactError, artifact_digest, cached_artifact_dir, load_artifact
from fedpetah.backbone import Backbone
from fedpetah.backbone.build import default_cache_dir
from fedpetah.bank import AdapterBank, BankError
from fedpetah.config import ROUTER_KEY, RouterConfig
from fedpetah.experiment import ExperimentConfig, to_experiment
from fedpetah.routing.features import FrozenFeatures, feature_width
from fedpetah.routing.model import TaskFreeModel
from fedpetah.routing.predict import TaskFreePredictor, build_predictor
from fedpetah.routing.stats import FeatureStats
from fedpetah.wire.flatconfig import build_dataclass

EXPORT_FORMAT, EXPORT_VERSION = "fedpetah-task-free", 3
LEGACY_VERSIONS = (1, 2)
"""Versions :func:`load_export` still reads (v1: no router section: the final pooled features, the task marginal;
v2: every expert's tensors stored in full, no aliases)."""
ONNX_FILE, LABELS_FILE, WEIGHTS_FILE, MODEL_FILE = "model.onnx", "labels.json", "model.safetensors", "model.json"
PTE_FILE = "model.pte"
ALIASES_KEY = "aliases"
"""``model.safetensors`` metadata: JSON ``{alias: stored key}`` for tensors stored once and used under more names."""
BACKBONE_DIR = "backbone"


class ExportError(RuntimeError):
    """A run or export directory is missing, partial or corrupt, or the model cannot be exported."""


@dataclasses.dataclass
class Run:
    """What a finished (or interrupted) run directory holds."""

    config: ExperimentConfig
    backbone: Backbone
    bank: AdapterBank
    stats: dict[int, FeatureStats]
    router: RouterConfig


def router_config(bank: AdapterBank) -> RouterConfig:
    """The router config recorded in the bank (the defaults when none is)."""
    try:
        return RouterConfig.from_record(bank.metadata.get(ROUTER_KEY, {}))
    except (TypeError, ValueError) as error:
        raise ExportError(f"bank metadata {ROUTER_KEY!r} is malformed: {error}") from None


def bank_stats(bank: AdapterBank, backbone: Backbone, router: RouterConfig) -> dict[int, FeatureStats]:
    """Every task's validated statistics; a task without any is an error naming it."""
    width = router.width(feature_width(backbone, router.grid))
    missing = [t for t in bank.tasks() if not bank[t].stats]
    if missing:
        raise ExportError(f"tasks {missing} have no router statistics in the bank: the run predates task-free "
                          "routing or its clients sent none")
    try:
        return {t: FeatureStats.from_tensors(bank[t].stats, bank[t].num_classes, width, legacy_ok=True)
                for t in bank.tasks()}
    except ValueError as error:
        raise ExportError(f"router statistics in the bank are invalid: {error}") from None


def find_artifact(config: ExperimentConfig, run_dir: Path) -> Path:
    """The backbone artifact of a run: ``RUN_DIR/backbone`` if present, else the settings' cache entry."""
    local = run_dir / BACKBONE_DIR
    if (local / MANIFEST).is_file():
        return local
    cached = cached_artifact_dir(default_cache_dir(), config.backbone, config.pruning)
    if (cached / MANIFEST).is_file():
        return cached
    raise ExportError(f"the run's backbone artifact is in neither {local} nor {cached}; copy it to {local}")


def load_run(run_dir: str | Path, artifact: str | Path | None = None) -> Run:
    """Config, verified backbone, bank and router statistics of a run directory (clear errors when partial)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ExportError(f"run directory {root} does not exist")
    try:
        raw = json.loads((root / "config.json").read_text())
        config = to_experiment(raw)
    except FileNotFoundError:
        raise ExportError(f"{root} has no config.json: not a fedpetah run directory") from None
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ExportError(f"{root / 'config.json'} is unreadable: {error}") from None
    try:
        bank = AdapterBank.load(root / "bank")
    except BankError as error:
        raise ExportError(f"the run's adapter bank is unusable: {error}") from None
    if not len(bank):
        raise ExportError(f"{root / 'bank'} holds no task yet")
    path = Path(artifact) if artifact is not None else find_artifact(config, root)
    expected = {str(bank[t].record.backbone) for t in bank.tasks() if bank[t].record.backbone}
    try:
        digest = artifact_digest(path)
        if expected and expected != {digest}:
            raise ExportError(f"backbone {path} has digest {digest[:12]}, the bank was trained on "
                              f"{sorted(d[:12] for d in expected)}")
        backbone = load_artifact(path, expected_digest=digest)
    except ArtifactError as error:
        raise ExportError(f"backbone artifact {path}: {error}") from None
    router = router_config(bank)
    return Run(config, backbone, bank, bank_stats(bank, backbone, router), router)


def run_predictor(run: Run) -> TaskFreePredictor:
    return build_predictor(run.backbone, run.config.adapter, run.bank, run.stats, router=run.router)


def require_onnx() -> None:
    """Raise :class:`ExportError` with the install hint when torch.onnx's exporters cannot run here: they import
    onnx and onnxscript, which the ``export`` extra installs (a device's base install has neither)."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"model.onnx needs the export extra ({', '.join(missing)} missing): "
                          "pip install 'fedpetah[export]', or pass --no-onnx")


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``model`` as ONNX (opset 18) with a dynamic batch axis: input ``images``, output ``scores``.

    Tries torch's TorchScript-based exporter first: where it works it was 20x faster here than the
    ``torch.export``-based one (10 s against 203 s for a 32 px backbone on a loaded 2-core machine); the
    latter handles what the former cannot (SynQT's adaptive pooling of traced shapes).
    """
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["scores"],
                                      dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), opset_version=18,
                                      dynamo=True, external_data=False, verbose=False)
                else:
                    torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["scores"],
                                      dynamic_axes={"images": {0: "N"}, "scores": {0: "N"}}, opset_version=18,
                                      dynamo=False)
            return
        except Exception as error:  # the exporters raise many types; report both
            errors.append(f"{'torch.export' if dynamo else 'TorchScript'}: {type(error).__name__}: "
                          f"{str(error)[:300]}")
    raise ExportError("ONNX export failed: " + " | ".join(errors))


def export_pte(model: torch.nn.Module, example: torch.Tensor, path: Path) -> dict[str, str]:
    """``model`` as an ExecuTorch program lowered to XNNPACK (static input shape: ``example``'s); returns the
    versions used. Raises :class:`ExportError` when executorch is missing or cannot lower the model."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as error:
        raise ExportError(f"ExecuTorch is not installed ({error}): pip install 'fedpetah[executorch]' "
                          "(executorch 1.5.1, built for torch 2.14)") from None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,))
            lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as error:  # torch.export and the lowering passes raise many types
        raise ExportError(f"ExecuTorch export failed: {type(error).__name__}: {str(error)[:300]}") from None
    path.write_bytes(lowered.buffer)
    return {"executorch": importlib.metadata.version("executorch"), "torch": torch.__version__}


def export_run(run_dir: str | Path, out_dir: str | Path, artifact: str | Path | None = None,
               onnx: bool = True, pte: bool = False) -> dict[str, Any]:
    """Write the export of ``run_dir`` into ``out_dir``; returns ``model.json``'s content."""
    run = load_run(run_dir, artifact)
    predictor = run_predictor(run)
    return write_export(predictor, run.backbone, run.config.adapter, Path(out_dir), onnx=onnx, pte=pte)


def export_payload(predictor: TaskFreePredictor, backbone: Backbone, adapter: AdapterConfig, version: int | None,
                   digest: str) -> tuple[bytes, bytes]:
    """The torch form of an export as bytes: ``model.safetensors`` and ``model.json`` (``onnx`` and ``pte`` null).

    This is the snapshot a server sends a device (``query.evaluate``), and what :func:`write_export` writes (one
    writer). ``model.json`` names the backbone it builds on by its artifact ``digest`` (``"backbone"``; the
    backbone itself is not included) and carries the bank ``version`` it was built from (``"version"``; null when
    it is not a bank snapshot). :func:`load_export` reads both forms: the two keys only add to the manifest.
    ``router.task_aware_mix`` is written only when it is not 0 (``RouterConfig.task_aware_mix``), so a snapshot
    without it is the same bytes as before it and still loads where it is unknown.
    """
    model = predictor.model
    mix = {"task_aware_mix": model.task_aware_mix} if model.task_aware_mix else {}
    tensors, aliases = _deduplicated(model.state_dict())
    data = save_safetensors(tensors, metadata={ALIASES_KEY: json.dumps(aliases, sort_keys=True)})
    info = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "labels": predictor.labels,
        "tasks": predictor.task_order,
        "widths": model.widths,
        "shared": model.shared,
        "class_names": predictor.class_names,
        "adapter": dataclasses.asdict(adapter),
        "input": {"shape": ["N", backbone.in_chans, backbone.img_size, backbone.img_size],
                  "dtype": "float32", "range": [0.0, 1.0], "normalised_inside": True},
        "router": {"grid": model.features.grid, "joint": model.joint, **mix},
        "output": "scores [N, K]: (1 - joint) log p(task | x) + joint log p(task, class | x) "
                  "+ log softmax(adapter_task(x)), K = len(labels)",
        "sha256": hashlib.sha256(data).hexdigest(),
        "onnx": None,
        "pte": None,
        "backbone": digest,
        "version": version,
    }
    return data, json.dumps(info, indent=2, allow_nan=False).encode()


def snapshot(backbone: Backbone, digest: str, adapter: AdapterConfig, bank: AdapterBank,
             tasks: Sequence[int] | None, router: RouterConfig, version: int,
             stats: Mapping[int, FeatureStats] | None = None) -> tuple[bytes, bytes]:
    """The server's snapshot of the learned ``tasks`` (None: every bank task) at bank ``version``:
    :func:`export_payload` of their task-free predictor. ``stats``: the tasks' router statistics (None: validated
    from the bank). Raises :class:`ExportError` when a task has no statistics or cannot be built (the server
    logs it and skips that evaluation)."""
    chosen = list(bank.tasks() if tasks is None else tasks)
    unknown = [t for t in chosen if t not in bank]
    if not chosen or unknown:
        raise ExportError(f"a snapshot needs learned tasks; not in the bank: {unknown or 'all'}")
    if stats is None:
        stats = bank_stats(bank, backbone, router)
    missing = [t for t in chosen if t not in stats]
    if missing:
        raise ExportError(f"tasks {missing} have no router statistics: no snapshot for task-free prediction")
    try:
        predictor = build_predictor(backbone, adapter, bank, stats, tasks=chosen, router=router)
    except (ValueError, RuntimeError) as error:
        raise ExportError(f"the snapshot cannot be built: {type(error).__name__}: {str(error)[:300]}") from None
    return export_payload(predictor, backbone, adapter, version, digest)


def write_export(predictor: TaskFreePredictor, backbone: Backbone, adapter: AdapterConfig, out: Path,
                 onnx: bool = True, pte: bool = False, version: int | None = None) -> dict[str, Any]:
    """The files of an export (see the module docstring) for a built predictor: :func:`export_payload`'s two
    files (``version`` in ``model.json``), the backbone artifact it names, labels and the runtime forms."""
    if onnx:
        require_onnx()  # before any file is written
    out.mkdir(parents=True, exist_ok=True)
    model = predictor.model
    if (out / BACKBONE_DIR).exists():
        shutil.rmtree(out / BACKBONE_DIR)
    from fedpetah.artifact import pack_artifact

    digest = pack_artifact(backbone, out / BACKBONE_DIR).manifest_sha256
    data, manifest = export_payload(predictor, backbone, adapter, version, digest)
    (out / WEIGHTS_FILE).write_bytes(data)
    (out / LABELS_FILE).write_text(json.dumps(predictor.labels, indent=1))
    info: dict[str, Any] = json.loads(manifest)
    info["onnx"] = ONNX_FILE if onnx else None
    if onnx:
        example = torch.rand(2, backbone.in_chans, backbone.img_size, backbone.img_size)
        export_onnx(model, example, out / ONNX_FILE)
    if pte:
        example = torch.rand(1, backbone.in_chans, backbone.img_size, backbone.img_size)
        versions = export_pte(model, example, out / PTE_FILE)
        info["pte"] = {"file": PTE_FILE, "input": list(example.shape), "backend": "xnnpack", **versions}
    (out / MODEL_FILE).write_text(json.dumps(info, indent=2, allow_nan=False))
    return info


def _deduplicated(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One copy of each distinct tensor (same dtype, shape and bytes) and ``{alias: stored key}`` for the repeats:
    every merged expert repeats the backbone weights its adapter leaves alone."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[str, tuple[int, ...], str], str] = {}
    for key, value in state.items():
        value = value.detach().to("cpu").clone()  # its own storage: safetensors refuses shared ones
        digest = hashlib.sha256(value.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        fingerprint = (str(value.dtype), tuple(value.shape), digest)
        if fingerprint in first:
            aliases[key] = first[fingerprint]
        else:
            first[fingerprint] = key
            stored[key] = value
    return stored, aliases


def _aliases(data: bytes) -> dict[str, str]:
    """The ``{alias: stored key}`` map in a safetensors file's metadata (covered by its SHA-256); {} if none."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError("the safetensors header is truncated")
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    aliases = json.loads(metadata.get(ALIASES_KEY, "{}"))
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"{ALIASES_KEY} must map tensor names to tensor names")
    return aliases


def load_export(out_dir: str | Path, backbone: Backbone | None = None) -> TaskFreePredictor:
    """The torch form of an export: rebuilt from the backbone artifact and ``model.json``, tensors verified.

    ``backbone``: the verified backbone to build on instead of ``out_dir/backbone`` (a device's snapshot, which
    comes without one; the caller checks it is the one the snapshot names)."""
    root = Path(out_dir)
    try:
        info = json.loads((root / MODEL_FILE).read_text())
        data = (root / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError as error:
        raise ExportError(f"{root} is not a complete export: {error.filename} is missing") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{root / MODEL_FILE} is unreadable: {error}") from None
    if info.get("format") != EXPORT_FORMAT or info.get("format_version") not in (EXPORT_VERSION, *LEGACY_VERSIONS):
        raise ExportError(f"{root / MODEL_FILE} is not a {EXPORT_FORMAT} manifest of version "
                          f"{[EXPORT_VERSION, *LEGACY_VERSIONS]}")
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise ExportError(f"{root / WEIGHTS_FILE}: SHA-256 does not match model.json (corrupted or tampered)")
    try:
        if backbone is None:
            backbone = load_artifact(root / BACKBONE_DIR)
        raw = dict(info["adapter"])
        adapter = build_dataclass(ADAPTERS.get(str(raw.get("name"))).config_class, raw)
        widths, shared, labels = list(info["widths"]), list(info["shared"]), list(info["labels"])
        experts = [build_adapter(adapter, backbone, int(w)).merge() for w in widths]
        # a v1 manifest has no router section: RouterConfig.from_record reads that as the legacy router; one
        # without task_aware_mix (before it) as the adapters' own task-aware logits (0)
        routing = RouterConfig.from_record(dict(info["router"]) if info["format_version"] >= 2 else {})
        features = FrozenFeatures(backbone.module, backbone.mean, backbone.std, routing.grid)
        tensors = load_safetensors(data)
        for alias, key in _aliases(data).items():
            tensors[alias] = tensors[key]  # a missing key is a KeyError: reported below
        router = torch.nn.Linear(int(tensors["router.weight"].shape[1]), sum(widths))
        model = TaskFreeModel(features, router, experts, widths, shared=shared, joint=routing.joint,
                              task_aware_mix=routing.task_aware_mix)
        model.load_state_dict(tensors, strict=True)
    except (ArtifactError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ExportError(f"{root} cannot be rebuilt: {type(error).__name__}: {str(error)[:300]}") from None
    owners = [t for t, w in zip(info["tasks"], widths, strict=True) for _ in range(int(w))]
    return TaskFreePredictor(model, labels, owners, list(info["tasks"]), list(info["class_names"]),
                             backbone.img_size, backbone.in_chans)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpetah-export", description="Export a run's adapters as one "
                                     "task-free model: model.onnx, labels.json, model.safetensors + model.json "
                                     "(and model.pte with --executorch).")
    parser.add_argument("run_dir", help="a run directory (config.json, bank/)")
    parser.add_argument("out_dir", help="where to write the export")
    parser.add_argument("--artifact", default=None, help="the backbone artifact directory (default: "
                        "RUN_DIR/backbone, else the cache entry of the run's settings)")
    parser.add_argument("--no-onnx", action="store_true", help="skip model.onnx")
    parser.add_argument("--executorch", action="store_true", help="also write model.pte for ExecuTorch "
                        "(needs fedpetah[executorch]; lowering takes minutes on a laptop)")
    args = parser.parse_args(argv)
    try:
        info = export_run(args.run_dir, args.out_dir, args.artifact, onnx=not args.no_onnx, pte=args.executorch)
    except ExportError as error:
        print(f"fedpetah-export: {error}", file=sys.stderr)
        return 2
    print(f"exported {len(info['labels'])} classes of {len(info['tasks'])} tasks to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
