"""Local training is a function of its inputs and ``train.seed``: same seed, same tensors; caller's RNG untouched."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedpetah.adapters import adapter_config, build_adapter
from fedpetah.backbone import Backbone
from fedpetah.config import TrainConfig
from fedpetah.tasks import ImageSet
from fedpetah.train import label_log_prior, proximal_term, train_adapter


def _data(n: int = 24) -> ImageSet:
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=generator)
    return ImageSet(images, torch.arange(n) % 2)


def _trained(backbone: Backbone, seed: int, adapter: str, global_seed: int) -> dict[str, torch.Tensor]:
    """``adapter`` built from one fixed initial state, then trained after the global RNG was set to ``global_seed``."""
    torch.manual_seed(0)  # synqt draws its initial queries from the global RNG: the same start for every call
    model = build_adapter(adapter_config(adapter, rank=2, dropout=0.1) if adapter == "lora"
                          else adapter_config(adapter), backbone, 2)
    torch.manual_seed(global_seed)
    torch.rand(100)
    train_adapter(model, _data(), TrainConfig(epochs=1, batch_size=8, lr=1e-2, loss="cross_entropy", seed=seed))
    return model.state()


@pytest.mark.parametrize("adapter", ["lora", "synqt"])
def test_same_seed_gives_identical_tensors_whatever_the_global_rng(
        tiny_backbone: Callable[..., Backbone], adapter: str) -> None:
    backbone = tiny_backbone()
    first = _trained(backbone, seed=3, adapter=adapter, global_seed=1)
    second = _trained(backbone, seed=3, adapter=adapter, global_seed=12345)  # what the caller drew must not matter
    assert first.keys() == second.keys()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0)
    other = _trained(backbone, seed=4, adapter=adapter, global_seed=1)
    assert any(not torch.equal(other[k], v) for k, v in first.items())  # the seed does drive the batch order


def test_training_leaves_the_callers_rng_state_alone(tiny_backbone: Callable[..., Backbone]) -> None:
    backbone = tiny_backbone()
    model = build_adapter(adapter_config("lora", rank=2, dropout=0.1), backbone, 2)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    train_adapter(model, _data(), TrainConfig(epochs=1, batch_size=8, loss="cross_entropy", seed=9))
    assert torch.equal(torch.get_rng_state(), before)


def test_label_log_prior_is_the_log_share_of_each_class() -> None:
    prior = label_log_prior(torch.tensor([0, 0, 2, 0]), 4)
    torch.testing.assert_close(prior[[0, 2]], torch.log(torch.tensor([0.75, 0.25])))
    assert torch.isneginf(prior[[1, 3]]).all()
    with pytest.raises(ValueError, match="labels outside"):
        label_log_prior(torch.tensor([0, 4]), 4)


@pytest.mark.parametrize("loss", ["cross_entropy", "balanced"])
def test_balanced_loss_leaves_the_head_rows_of_absent_classes_alone(
        tiny_backbone: Callable[..., Backbone], loss: str) -> None:
    torch.manual_seed(0)
    model = build_adapter(adapter_config("head"), tiny_backbone(), 4)  # 4 classes, the data has only 0 and 1
    before = {k: v.clone() for k, v in model.state().items()}
    train_adapter(model, _data(), TrainConfig(epochs=2, batch_size=8, lr=1e-2, loss=loss, weight_decay=0.0))
    after = model.state()
    rows = {k: (before[k][2:], after[k][2:], before[k][:2], after[k][:2]) for k in before if k.startswith("head")}
    assert rows, f"no head tensors in {sorted(before)}"
    for old_absent, new_absent, old_present, new_present in rows.values():
        assert not torch.equal(old_present, new_present)  # both losses train the classes the client has
        # balanced: a class the client lacks gets no gradient; plain cross-entropy pushes it down
        assert torch.equal(old_absent, new_absent) == (loss == "balanced")


def test_unknown_loss_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"train\.loss must be cross_entropy\|balanced, got 'focal'"):
        TrainConfig(loss="focal")


# FedProx ----------------------------------------------------------------------------------------------


def test_proximal_term_is_half_mu_times_the_squared_distance() -> None:
    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))]
    anchor = [torch.tensor([0.0, 4.0]), torch.tensor([[1.0]])]
    term = proximal_term(params, anchor, mu=0.5)
    assert term.item() == 0.25 * (1.0 + 4.0 + 4.0)  # (mu / 2) * ||(1, -2, 2)||^2
    term.backward()
    first, second = (p.grad for p in params)
    assert first is not None and second is not None
    assert torch.equal(first, torch.tensor([0.5, -1.0])) and torch.equal(second, torch.tensor([[1.0]]))  # mu (w - w0)
    with pytest.raises(ValueError, match=r"train\.prox_mu must be finite and >= 0"):
        TrainConfig(prox_mu=-0.1)


def _distance_after(backbone: Backbone, **fields: object) -> tuple[dict[str, torch.Tensor], float]:
    """A LoRA adapter from one fixed start trained with ``fields``: its state and its distance from the start."""
    torch.manual_seed(0)
    model = build_adapter(adapter_config("lora", rank=2), backbone, 2)
    start = model.state()
    train_adapter(model, _data(), TrainConfig(epochs=2, batch_size=8, lr=1e-2, seed=3, **fields))  # type: ignore[arg-type]
    state = model.state()
    return state, sum(float((state[k] - start[k]).square().sum()) for k in start) ** 0.5


def test_prox_mu_zero_trains_bit_for_bit_as_without_fedprox(tiny_backbone: Callable[..., Backbone]) -> None:
    backbone = tiny_backbone()
    plain, _ = _distance_after(backbone)
    off, _ = _distance_after(backbone, prox_mu=0.0)
    for key, value in plain.items():
        torch.testing.assert_close(off[key], value, rtol=0, atol=0)
    on, _ = _distance_after(backbone, prox_mu=1.0)
    assert any(not torch.equal(on[k], v) for k, v in plain.items())  # the term does reach the gradients


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_large_prox_mu_keeps_the_adapter_near_the_round_start(
        tiny_backbone: Callable[..., Backbone], optimizer: str) -> None:
    backbone = tiny_backbone()
    _, free = _distance_after(backbone, optimizer=optimizer)
    _, held = _distance_after(backbone, optimizer=optimizer, prox_mu=50.0)
    assert free > 0 and held < 0.5 * free
