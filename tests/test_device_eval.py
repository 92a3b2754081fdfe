"""Federated evaluation on the device: the content-hash holdout, hello holdings (device folder and simulation),
evaluating a snapshot on held-out images, and keeping it atomically and verified."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from snapshots import TASKS, Learned, device_cache, learned, write_images

from clients import device_data
from clients.device_data import device_holdout_data, device_split, device_task_data
from clients.worker import device_sources
from fedpetah.adapters import build_adapter
from fedpetah.backbone import Backbone
from fedpetah.device.client import ClientRuntime, EvaluateSettings, simulated_sources
from fedpetah.device.holdout import HOLDOUT_FRACTION, held_out
from fedpetah.device.keep import BANK_DIR, SnapshotError, load_kept
from fedpetah.routing.predict import evaluate_task_free
from fedpetah.tasks import Task, TaskStreamConfig, batches, load_stream
from fedpetah.wire.evaluation import EvaluateReply, EvaluateRequest
from fedpetah.wire.protocol import HelloReply, HelloRequest, Status, TaskInfo

SECTIONS: dict[str, dict[str, Any]] = {"adapter": {"name": "lora", "rank": 2}, "train": {"batch_size": 4},
            "tasks": {"name": "split_mnist", "num_tasks": 2}, "partition": {"name": "iid"}}


@pytest.fixture(scope="module")
def snapshot(tiny_backbone: Callable[..., Backbone]) -> Learned:
    return learned(tiny_backbone())


@pytest.fixture(autouse=True)
def _fresh_reads() -> None:
    device_data._LOADED.clear()  # each test's folders are new; a device reads a task once per process


def _request(snapshot: Learned, keep: bool = True, evaluate: bool = True, **change: object) -> EvaluateRequest:
    fields: dict[str, object] = dict(digest=snapshot.digest, version=1, tasks=snapshot.tasks, model=snapshot.model,
                                     manifest=snapshot.manifest, keep=keep, evaluate=evaluate, seed=0, clients=1,
                                     sections=SECTIONS)
    fields.update(change)
    return EvaluateRequest.decode(EvaluateRequest(**fields).encode())  # type: ignore[arg-type]


def test_holdout_is_stable_when_images_are_added_and_never_trained_on(tmp_path: Path) -> None:
    # Arrange: 2 classes of 20 distinct images, read once
    task = TaskInfo(0, "t", ("a", "b"))
    first = write_images(tmp_path, (task,), per_class=20)
    before = device_split(tmp_path, "t", ["a", "b"], store_size=12)
    assert before is not None and before.train is not None and before.holdout is not None

    # Act: 20 more images per class, read again by a fresh process
    write_images(tmp_path, (task,), per_class=20, seed=1, start=20)
    device_data._LOADED.clear()
    after = device_split(tmp_path, "t", ["a", "b"], store_size=12)

    # Assert: exactly the files whose content hash says so are held out, before and after; no training image is a
    # held-out one; every image of the first read keeps its side
    assert after is not None and after.train is not None and after.holdout is not None
    expected = sum(held_out(p.read_bytes()) for p in first)
    assert len(before.holdout) == expected and len(before.train) == len(first) - expected
    assert 0 < expected < len(first) * 2 * HOLDOUT_FRACTION  # about a fifth
    rows = {side: {bytes(im.numpy().tobytes()) for im in data.images}
            for side, data in (("train", after.train), ("holdout", after.holdout))}
    assert not rows["train"] & rows["holdout"]
    assert {im.numpy().tobytes() for im in before.holdout.images} <= rows["holdout"]
    assert {im.numpy().tobytes() for im in before.train.images} <= rows["train"]
    assert len(after.train) + len(after.holdout) == 80
    train = device_task_data(tmp_path, "t", ["a", "b"], store_size=12)
    held = device_holdout_data(tmp_path, "t", ["a", "b"], store_size=12)
    assert train is after.train and held is after.holdout  # both from one read of each file


def test_hello_reports_the_images_a_device_holds_per_class(tmp_path: Path, snapshot: Learned) -> None:
    # Arrange: images of task t0 only, class c01 missing; the catalogue names t0, t1 and one with a bad name
    paths = write_images(tmp_path / "data", (TaskInfo(0, "t0", ("c00",)),), per_class=15)
    catalogue = (*TASKS, TaskInfo(2, "..", ("x", "y")))
    runtime = ClientRuntime(device_cache(tmp_path / "cache", snapshot))
    sources = device_sources(tmp_path / "data")

    # Act
    reply = runtime.hello(HelloRequest(snapshot.digest, catalogue), sources.holdings)
    decoded = HelloReply.decode(reply.encode(), catalogue)
    again = runtime.hello(HelloRequest(snapshot.digest, catalogue), sources.holdings)

    # Assert: [train, held out] per class in the catalogue's class order, only for the task it holds
    held = sum(held_out(p.read_bytes()) for p in paths)
    assert decoded.has_backbone and set(decoded.holdings) == {0}
    np.testing.assert_array_equal(decoded.holdings[0], [[15 - held, held], [0, 0]])
    np.testing.assert_array_equal(again.holdings[0], decoded.holdings[0])
    split = device_split(tmp_path / "data", "t0", ["c00", "c01"])  # what training and evaluation will read
    assert split is not None and split.holdout is not None and len(split.holdout) == held


def test_simulated_holdouts_of_all_clients_partition_the_test_split(tmp_path: Path, snapshot: Learned) -> None:
    # Arrange: split_mnist's first two tasks as the catalogue, 3 simulated clients
    stream = load_stream(TaskStreamConfig(name="split_mnist", num_tasks=2))
    catalogue = tuple(TaskInfo(t.index, t.name, tuple(t.classes)) for t in stream)
    cache = device_cache(tmp_path / "cache", snapshot)
    request = HelloRequest.decode(HelloRequest(snapshot.digest, catalogue, seed=7, clients=3,
                                               sections=SECTIONS).encode())

    # Act
    replies = [ClientRuntime(cache, c).hello(request, simulated_sources(c).holdings) for c in range(3)]
    old_server = ClientRuntime(cache, 0).hello(HelloRequest(snapshot.digest, catalogue), simulated_sources(0).holdings)

    # Assert: the clients' training counts add up to the training split, their held-out counts to the test split
    for task in stream:
        total = np.sum([r.holdings[task.index] for r in replies], axis=0)
        np.testing.assert_array_equal(total[:, 0], np.bincount(task.train.labels.numpy(), minlength=2))
        np.testing.assert_array_equal(total[:, 1], np.bincount(task.test.labels.numpy(), minlength=2))
        assert all(abs(int(r.holdings[task.index][:, 1].sum()) - len(task.test) / 3) <= 1 for r in replies)
    assert old_server.holdings == {}  # no stream config in the hello: nothing to count from
    # and what a client evaluates on is that share: disjoint between clients, the whole test split together
    settings = EvaluateSettings.of(_request(snapshot, seed=7, clients=3, tasks=catalogue))
    shares = [simulated_sources(c).holdout(settings, catalogue[1]) for c in range(3)]
    rows = [{im.numpy().tobytes() for im in s.images} for s in shares if s is not None]
    assert sum(len(r) for r in rows) == len({im.numpy().tobytes() for im in stream[1].test.images})
    assert len(set.union(*rows)) == sum(len(r) for r in rows)


def test_evaluate_counts_what_a_direct_evaluation_of_the_predictor_counts(tmp_path: Path, snapshot: Learned) -> None:
    # Arrange: a device with 12 images per class of both learned tasks
    write_images(tmp_path / "data", TASKS, per_class=12, size=20)
    cache = device_cache(tmp_path / "cache", snapshot)
    runtime = ClientRuntime(cache)

    # Act
    reply = runtime.evaluate(_request(snapshot), device_sources(tmp_path / "data").holdout)
    decoded = EvaluateReply.decode(reply.encode(), snapshot.tasks)

    # Assert: per class [images, task-aware correct, task-free correct] as the predictor and each task's own
    # adapter count them on the same held-out images
    assert decoded.status is Status.OK and decoded.kept, decoded.reason
    assert set(decoded.counts) == {0, 1} and set(decoded.confusion) == {0, 1}
    predictor = snapshot.predictor
    for task in TASKS:
        data = device_holdout_data(tmp_path / "data", task.name, list(task.classes))
        assert data is not None
        counts = decoded.counts[task.index]
        np.testing.assert_array_equal(counts[:, 0], np.bincount(data.labels.numpy(), minlength=task.num_classes))
        expert = build_adapter(snapshot.adapter, snapshot.backbone, task.num_classes)
        expert.load_state(snapshot.bank[task.index].state)
        expert.model.eval()
        aware = np.zeros(task.num_classes, dtype=np.int64)
        with torch.no_grad():
            for x, y in batches(data, predictor.img_size, predictor.in_chans, 5):
                right = (expert.model(x).argmax(1) == y).numpy()
                np.add.at(aware, y.numpy(), right.astype(np.int64))
        np.testing.assert_array_equal(counts[:, 1], aware)
        free = evaluate_task_free(predictor, [Task(task.index, task.name, list(task.classes), data, data)])
        assert counts[:, 2].sum() == round(free.per_task[0] * len(data))
        assert 0 < counts[:, 1].sum() < len(data) or 0 < counts[:, 2].sum() < len(data)  # not trivially equal
    kept = load_kept(cache)
    assert kept.predictor.labels == predictor.labels and kept.version == 1


def test_keep_replaces_the_snapshot_whole_and_refuses_a_bad_or_oversized_one(tmp_path: Path, snapshot: Learned,
                                                                             tiny_backbone: Callable[..., Backbone]
                                                                             ) -> None:
    cache = device_cache(tmp_path / "cache", snapshot)
    runtime = ClientRuntime(cache, bank_max_bytes=len(snapshot.model) + len(snapshot.manifest))
    no_data = device_sources(tmp_path / "none").holdout
    assert runtime.evaluate(_request(snapshot, evaluate=False), no_data).kept
    first = (cache.root / BANK_DIR).resolve()

    # a tampered model, another backbone, other tasks, a snapshot over the bound: error replies, the kept one stays
    tampered = bytearray(snapshot.model)
    tampered[-1] ^= 1
    other_manifest = json.dumps(json.loads(snapshot.manifest) | {"backbone": "0" * 64}).encode()
    bigger = learned(tiny_backbone(), seed=1, version=2, tasks=(*TASKS, TaskInfo(2, "t2", ("a", "b", "c", "d"))))
    bad = {"tampered": _request(snapshot, model=bytes(tampered)),
           "backbone": _request(snapshot, manifest=other_manifest),
           "tasks": _request(snapshot, tasks=TASKS[:1]),
           "size": _request(bigger, tasks=bigger.tasks)}
    reasons = {name: runtime.evaluate(request, no_data) for name, request in bad.items()}
    assert all(r.status is Status.ERROR and not r.kept for r in reasons.values()), reasons
    assert "SHA-256" in reasons["tampered"].reason and "backbone" in reasons["backbone"].reason
    assert "--bank-max-mb" in reasons["size"].reason
    assert (cache.root / BANK_DIR).resolve() == first and load_kept(cache).version == 1
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".bank-") and p != first]  # no staging left

    # a newer snapshot within the bound replaces it whole, and the old directory goes
    runtime.bank_max_bytes = 2**30
    assert runtime.evaluate(_request(bigger, tasks=bigger.tasks), no_data).kept
    assert load_kept(cache).version == 2 and not first.exists()

    # a kept file changed on disk is refused on load, naming the file
    model_json = (cache.root / BANK_DIR) / "model.json"
    model_json.write_text(model_json.read_text().replace('"t2/a"', '"t2/z"'))
    with pytest.raises(SnapshotError, match="model.json: SHA-256 does not match"):
        load_kept(cache)


def test_evaluate_without_the_backbone_asks_for_it(tmp_path: Path, snapshot: Learned) -> None:
    from fedpetah.device.local import BackboneCache

    runtime = ClientRuntime(BackboneCache(tmp_path / "empty"))
    reply = runtime.evaluate(_request(snapshot), device_sources(tmp_path).holdout)
    assert reply.status is Status.NEEDS_BACKBONE and not (tmp_path / "empty" / BANK_DIR).exists()
    with_artifact = _request(snapshot, artifact=snapshot.artifact)
    assert runtime.evaluate(with_artifact, device_sources(tmp_path).holdout).status is Status.OK


def test_simulated_client_evaluates_its_share_of_the_test_split(tmp_path: Path, snapshot: Learned) -> None:
    stream = load_stream(TaskStreamConfig(name="split_mnist", num_tasks=2))
    cache = device_cache(tmp_path / "cache", snapshot)
    tasks = (TaskInfo(0, stream[0].name, tuple(stream[0].classes)),)
    mnist = learned(snapshot.backbone, tasks=tasks)
    totals = np.zeros(2, dtype=np.int64)
    for client in range(2):
        request = _request(mnist, tasks=tasks, seed=3, clients=2, keep=False)
        reply = ClientRuntime(cache, client).evaluate(request, simulated_sources(client).holdout)
        assert reply.status is Status.OK and not reply.kept, reply.reason
        totals += reply.counts[0][:, 0]
    np.testing.assert_array_equal(totals, np.bincount(stream[0].test.labels.numpy(), minlength=2))
