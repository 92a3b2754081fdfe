"""SynQT query tuning: frozen no-grad backbone, cacheable features, state round trip, three families."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.adapters.synqt import BlockRead, CrossRead, SynQTAdapter, SynQTConfig
from fedpetah.adapters.synqt_features import pool_tokens
from fedpetah.backbone import Backbone
from fedpetah.config import PruningConfig
from fedpetah.pruning import prune_backbone

FAMILIES = ["efficientvit_b0", "edgenext_xx_small", "mobilevit_xxs"]
HYBRID = "test_efficientvit"  # the tiny test hybrid (fedpetah/backbone/tiny.py), where any hybrid will do
SIZE = 64

BackboneFactory = Callable[..., Backbone]


def synqt(backbone: Backbone, num_classes: int = 3, **fields: object) -> SynQTAdapter:
    adapter = build_adapter(adapter_config("synqt", **fields), backbone, num_classes)
    assert isinstance(adapter, SynQTAdapter)
    return adapter


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


COUNTS = "num_queries, query_dim, num_heads, grid and frozen_batch must be >= 1"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stages": []}, "stages must be a non-empty list of ints"),
        ({"stages": [1.5]}, "stages must be a non-empty list of ints"),
        ({"num_queries": 0}, COUNTS),
        ({"grid": 0}, COUNTS),
        ({"frozen_batch": 0}, COUNTS),
        ({"query_dim": 30, "num_heads": 4}, "query_dim 30 must be divisible by num_heads 4"),
    ],
)
def test_config_rejects_bad_values(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=rf"^synqt\.{message}"):
        SynQTConfig(name="synqt", **fields)  # type: ignore[arg-type]


def test_config_accepts_tuples_and_rejects_unknown_fields() -> None:
    assert adapter_config("synqt", stages=(-2, -1)).stages == [-2, -1]  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="'queries'"):
        adapter_config("synqt", queries=4)


@pytest.mark.parametrize("stages", [[4], [-5], [1, -3]])
def test_stage_indices_must_name_distinct_levels(tiny_backbone: BackboneFactory, stages: list[int]) -> None:
    with pytest.raises(ValueError, match="feature levels"):
        synqt(tiny_backbone(HYBRID, SIZE), stages=stages)  # 4 levels


def test_pool_tokens_averages_maps_and_token_grids_without_upsampling() -> None:
    maps = torch.arange(16.0).view(1, 1, 4, 4)
    assert pool_tokens(maps, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    tokens = maps.flatten(2).transpose(1, 2)  # (1, 16, 1) on a 4x4 grid
    assert torch.equal(pool_tokens(tokens, 2), pool_tokens(maps, 2))
    assert pool_tokens(maps, 8).shape == (1, 16, 1)
    assert pool_tokens(torch.ones(2, 5, 3), 2).shape == (2, 4, 3)


@pytest.mark.parametrize(("name", "reuse"), [(HYBRID, False), ("mobilevit_xxs", True)])
def test_backbone_saves_nothing_for_backward_and_gets_no_gradient(
    tiny_backbone: BackboneFactory, name: str, reuse: bool
) -> None:
    adapter = synqt(tiny_backbone(name, SIZE), reuse_attention=reuse)
    model = adapter.model.train()
    events: list[str] = []
    model.backbone.register_forward_pre_hook(lambda *_: events.append("backbone start"))
    model.backbone.register_forward_hook(lambda *_: events.append("backbone end"))

    def pack(t: torch.Tensor) -> torch.Tensor:
        events.append("saved")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(images())
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()

    start, end = events.index("backbone start"), events.index("backbone end")
    assert "saved" not in events[start:end]
    assert "saved" in events[end:]  # the query path does record its own small graph
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.trainable().values())
    assert all(not f.requires_grad and f.grad_fn is None for f in adapter.frozen_features(images()))


def test_saves_far_less_for_backward_than_full_fine_tuning(tiny_backbone: BackboneFactory) -> None:
    backbone = tiny_backbone("efficientvit_b0", SIZE)  # a real backbone's activations (the tiny one's are few)
    saved: dict[str, int] = {}
    for name in ("synqt", "full"):
        model = build_adapter(adapter_config(name), backbone, 3).model.train()
        sizes: dict[int, int] = {}

        def pack(t: torch.Tensor, sizes: dict[int, int] = sizes) -> torch.Tensor:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(images(8))
        saved[name] = sum(sizes.values())
    assert saved["synqt"] * 20 < saved["full"], saved


@pytest.mark.parametrize("name", FAMILIES)
def test_model_equals_forward_features_of_frozen_features(tiny_backbone: BackboneFactory, name: str) -> None:
    adapter = synqt(tiny_backbone(name, SIZE))
    x = images()
    for mode in (True, False):
        adapter.model.train(mode)
        assert torch.equal(adapter.model(x), adapter.forward_features(adapter.frozen_features(x)))
    chunks = [adapter.frozen_features(part) for part in x.split(2)]
    cached = [torch.cat(parts) for parts in zip(*chunks, strict=True)]
    torch.testing.assert_close(adapter.forward_features(cached), adapter.model(x))
    adapter.model.frozen_batch = 3  # the frozen forward in chunks of 3 and 1: same features
    for whole, chunked in zip(cached, adapter.frozen_features(x), strict=True):
        torch.testing.assert_close(chunked, whole)
    with pytest.raises(ValueError, match="feature tensors"):
        adapter.forward_features(cached[:-1])


def digits(per_class: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images: scikit-learn's 8x8 digits 0 and 1, upsampled to RGB at SIZE."""
    data = load_digits(n_class=2)
    index = torch.cat([torch.nonzero(torch.tensor(data.target) == c).flatten()[:per_class] for c in (0, 1)])
    x = torch.tensor(data.images, dtype=torch.float32)[index, None] / 16
    return F.interpolate(x, size=SIZE, mode="bilinear").expand(-1, 3, -1, -1), torch.tensor(data.target)[index]


@pytest.mark.parametrize(("name", "reuse"), [(name, False) for name in FAMILIES] + [("mobilevit_xxs", True)])
def test_query_path_learns_from_cached_features(tiny_backbone: BackboneFactory, name: str, reuse: bool) -> None:
    backbone = tiny_backbone(name, SIZE)
    torch.manual_seed(0)  # the backbone may or may not have been built (drawing numbers) before
    adapter = synqt(backbone, num_classes=2, reuse_attention=reuse)
    x, y = digits()
    features = adapter.frozen_features(x)
    optimizer = torch.optim.AdamW(adapter.model.synqt.parameters(), lr=1e-2)  # the head stays fixed
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(adapter.forward_features(features), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_mobilevit_queries_reuse_the_frozen_attention_blocks(tiny_backbone: BackboneFactory) -> None:
    backbone = tiny_backbone("mobilevit_xxs", SIZE)
    reused, own = synqt(backbone, reuse_attention=True), synqt(backbone)
    assert all(t.block and ".transformer." in t.module for t in reused.model.taps)
    assert all(isinstance(r, BlockRead) for r in reused.model.synqt.readers)
    assert all(isinstance(r, CrossRead) for r in own.model.synqt.readers)
    x = images()
    with torch.no_grad():  # query-only reading leaves the backbone's own output unchanged
        plain = backbone.module((x - reused.model.mean) / reused.model.std)
    assert torch.equal(reused.frozen_features(x)[0], plain)


def test_state_round_trip_and_merge_give_identical_logits(tiny_backbone: BackboneFactory) -> None:
    backbone = tiny_backbone("mobilevit_xxs", SIZE)
    trained = synqt(backbone, reuse_attention=True)  # forward_features also runs frozen ViT blocks
    with torch.no_grad():
        for param in trained.trainable().values():
            param.add_(torch.randn_like(param) * 0.1)
    state = trained.state()
    assert "synqt.queries" in state and "head.weight" in state
    assert all(key.startswith(("synqt.", "head.")) for key in state)

    fresh = synqt(backbone, reuse_attention=True)
    x = images()
    fresh.model.eval(), trained.model.eval()
    assert not torch.equal(fresh.model(x), trained.model(x))
    fresh.load_state(state)
    assert torch.equal(fresh.model(x), trained.model(x))

    merged = trained.merge()
    assert not any(p.requires_grad for p in merged.parameters())
    assert torch.equal(merged(x), trained.model(x))
    with pytest.raises(KeyError, match=r"missing.*synqt\.queries"):
        fresh.load_state({k: v for k, v in state.items() if k != "synqt.queries"})


def test_works_on_a_pruned_backbone(tiny_backbone: BackboneFactory) -> None:
    pruned = prune_backbone(tiny_backbone("mobilevit_xxs", SIZE), PruningConfig(ratio=0.5))
    adapter = synqt(pruned, reuse_attention=True)
    assert all(t.block for t in adapter.model.taps)  # ViT blocks with pruned heads are still reused
    x = images()
    logits = adapter.model.train()(x)
    assert torch.equal(logits, adapter.forward_features(adapter.frozen_features(x)))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None for p in adapter.trainable().values())
