"""The task catalogue (<state-dir>/tasks.yaml): reading, appending under a lock, resume checks, the catalog stream
and ``fedpetah-server task``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedpetah.tasks import TaskStreamConfig, build_stream
from fedpetah.tasks.catalog import (
    MAX_CATALOG_BYTES,
    CatalogError,
    CatalogTask,
    add_task,
    catalog_path,
    check_extends,
    format_catalog,
    read_catalog,
)
from fedpetah.wire.protocol import MAX_TASKS
from server.tasks_cli import main as task_main

REPO = Path(__file__).resolve().parent.parent
CATS = CatalogTask("cats", ("tabby", "siamese"))
DOGS = CatalogTask("dogs", ("collie", "pug", "husky"))


def test_add_then_read_round_trips_names_yaml_would_retype(tmp_path: Path) -> None:
    path = catalog_path(tmp_path / "state")
    assert read_catalog(path, missing_ok=True) == []
    assert add_task(path, "cats", ["tabby", "siamese"]) == [CATS]
    odd = CatalogTask("café", ("yes", "007", "null", "1.5", "a b", "#x", "- y"))  # YAML would read most as non-str
    assert add_task(path, odd.name, list(odd.classes)) == [CATS, odd]
    assert read_catalog(path) == [CATS, odd]
    assert read_catalog(path) == [CATS, odd] and path.stat().st_mode & 0o777 == 0o644
    assert format_catalog([CATS, odd]) == path.read_text("utf-8")


def test_append_keeps_the_operators_comments_or_rewrites_a_layout_it_cannot_extend(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text("# my fleet\ntasks:\n- name: cats  # the first one\n  classes: [tabby, siamese]\n")
    assert add_task(path, "dogs", ["collie", "pug", "husky"]) == [CATS, DOGS]
    assert path.read_text().startswith("# my fleet\ntasks:\n- name: cats  # the first one\n")
    # an indented list, or flow style, cannot take one more block item: the whole file is written afresh
    for text in ("tasks:\n  - name: cats\n    classes: [tabby, siamese]\n",
                 "tasks: [{name: cats, classes: [tabby, siamese]}]\n", "tasks: []\n"):
        path.write_text(text)
        expected = [CATS, DOGS] if "cats" in text else [DOGS]
        assert add_task(path, "dogs", ["collie", "pug", "husky"]) == expected
        assert read_catalog(path) == expected and path.read_text() == format_catalog(expected)


MALFORMED = {  # fault: (file text, what the error says)
    "a list": ("- name: cats\n  classes: [a, b]\n", "must be a mapping with the one key 'tasks'.*found list"),
    "empty": ("", "found NoneType"),
    "an extra top-level key": ("tasks: []\nversion: 2\n", "found keys \\[\"'tasks'\", \"'version'\"\\]"),
    "tasks not a list": ("tasks: {name: cats}\n", "'tasks' must be a list"),
    "an extra task key": ("tasks:\n- {name: cats, classes: [a, b], images: 4}\n", "task 0: must be a mapping with "
                          "exactly the keys 'name' and 'classes', found keys"),
    "a missing classes key": ("tasks:\n- {name: cats}\n", "task 0: must be a mapping"),
    "a repeated task": ("tasks:\n- {name: cats, classes: [a, b]}\n- {name: cats, classes: [c, d]}\n",
                        "task 1 \\('cats'\\): the name is task 0's too"),
    "one class": ("tasks:\n- {name: cats, classes: [a]}\n", "task 0 \\('cats'\\): classes must be a list of 2 to"),
    "repeated classes": ("tasks:\n- {name: cats, classes: [a, b, a]}\n", "repeated class names \\['a'\\]"),
    "classes a string": ("tasks:\n- {name: cats, classes: a}\n", "found str"),
    "a path as task name": ("tasks:\n- {name: ../x, classes: [a, b]}\n", "task 0: task name '../x' is not a plain"),
    "a separator in a class": ("tasks:\n- {name: cats, classes: [a/b, c]}\n", "class name 'a/b' is not a plain"),
    "a non-string name": ("tasks:\n- {name: 5, classes: [a, b]}\n", "task 0: task name must be a string, got int"),
    "a non-string class": ("tasks:\n- {name: cats, classes: [a, 2]}\n", "class name must be a string, got int"),
    "a dot name": ("tasks:\n- {name: '..', classes: [a, b]}\n", "task name '..' is not a plain"),
    "a control character": ('tasks:\n- {name: "a\\tb", classes: [a, b]}\n', "is not a plain folder name"),
    "a name too long for the wire": (f"tasks:\n- {{name: {'n' * 129}, classes: [a, b]}}\n", "129 characters"),
    "not YAML": ("tasks: [\n", "not valid YAML"),
    "a python tag": ("tasks: !!python/object/apply:os.system [echo]\n", "not valid YAML.*python/object"),
    "too many tasks": ("tasks:\n" + "".join(f"- {{name: t{i}, classes: [a, b]}}\n" for i in range(MAX_TASKS + 1)),
                       f"{MAX_TASKS + 1} tasks \\(at most {MAX_TASKS}\\)"),
    "oversized": ("tasks: []\n" + "#" * MAX_CATALOG_BYTES, f"larger than {MAX_CATALOG_BYTES} bytes"),
    "not UTF-8": ("tasks: []\n# \udcff\n", "not UTF-8"),
}


@pytest.mark.parametrize("fault", sorted(MALFORMED))
def test_a_malformed_catalogue_is_an_error_that_changes_nothing(tmp_path: Path, fault: str) -> None:
    path = tmp_path / "tasks.yaml"
    text, message = MALFORMED[fault]
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    before = path.read_bytes()
    with pytest.raises(CatalogError, match=message) as read:
        read_catalog(path)
    assert str(read.value).startswith(f"{path}: ")
    with pytest.raises(CatalogError) as added:
        add_task(path, "birds", ["owl", "wren"])
    assert path.read_bytes() == before and str(added.value) == str(read.value)


def test_bad_additions_and_duplicates_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    add_task(path, "cats", ["tabby", "siamese"])
    before = path.read_bytes()
    faults = [
        (("cats", ["tabby", "siamese"]), "'cats' is declared already \\(task 0, classes \\['tabby', 'siamese'\\]\\)"),
        (("cats", ["tabby", "lynx"]), "with classes \\['tabby', 'siamese'\\], not \\['tabby', 'lynx'\\]"),
        (("birds", ["owl"]), "task 1 \\('birds'\\): classes must be a list of 2 to"),
        (("birds", ["owl", "owl"]), "repeated class names \\['owl'\\]"),
        (("../x", ["a", "b"]), "task 1: task name '../x' is not a plain folder name"),
        (("a/b", ["a", "b"]), "not a plain folder name"),
        (("birds", ["owl", "a\x00b"]), "class name 'a\\\\x00b' is not a plain folder name"),
        (("birds", "owl,wren"), "not the one string"),
        (("birds", ["owl", 3]), "class name must be a string, got int"),
    ]
    for (name, classes), message in faults:
        with pytest.raises(CatalogError, match=message):
            add_task(path, name, classes)  # type: ignore[arg-type]
        assert path.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_missing_catalogue_is_an_error_unless_missing_is_ok(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no task catalogue .*fedpetah-server task add"):
        read_catalog(tmp_path / "tasks.yaml")
    assert read_catalog(tmp_path / "tasks.yaml", missing_ok=True) == []
    assert not (tmp_path / "tasks.yaml").exists()


APPENDER = """
import sys
from fedpetah.tasks.catalog import add_task
for i in range(20):
    add_task(sys.argv[1], f"{sys.argv[2]}{i}", ["a", "b"])
"""


def test_concurrent_appends_from_two_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    writers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), prefix], cwd=REPO) for prefix in "pq"]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    names = [t.name for t in read_catalog(path)]
    assert len(names) == 40 and set(names) == {f"{p}{i}" for p in "pq" for i in range(20)}
    for prefix in "pq":  # each writer's tasks in its own order
        assert [n for n in names if n[0] == prefix] == [f"{prefix}{i}" for i in range(20)]


def test_check_extends_accepts_appended_tasks_only(tmp_path: Path) -> None:
    learned = [("cats", ["tabby", "siamese"]), ("dogs", ["collie", "pug", "husky"])]
    birds = CatalogTask("birds", ("owl", "wren"))
    check_extends(learned, [CATS, DOGS])
    check_extends(learned, [CATS, DOGS, birds])
    check_extends([], [birds])
    refusals = [
        ([CATS, CatalogTask("dogs", ("collie", "pug"))], "catalogue task 1 is 'dogs' with classes \\['collie', "
                                                          "'pug'\\], but the learned task 1 'dogs' with classes"),
        ([CATS, CatalogTask("hounds", DOGS.classes)], "catalogue task 1 is 'hounds'"),
        ([DOGS, CATS], "catalogue task 0 is 'dogs' .* learned task 0 'cats'"),
        ([CATS, CatalogTask("dogs", ("pug", "collie", "husky"))], "task 1 is 'dogs' with classes \\['pug'"),
        ([CATS], "has 1 task\\(s\\): learned task 1 'dogs' .* is missing"),
    ]
    for catalog, message in refusals:
        with pytest.raises(CatalogError, match=message):
            check_extends(learned, catalog)


def test_the_catalog_stream_builds_tasks_with_empty_splits_read_afresh(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    add_task(path, "cats", ["tabby", "siamese"])
    config = TaskStreamConfig(name="catalog", root=str(path), channels=1, store_size=32)
    (task,) = build_stream(config)
    assert (task.index, task.name, task.classes) == (0, "cats", ["tabby", "siamese"])
    for split in (task.train, task.test):
        assert len(split) == 0 and split.images.shape == (0, 1, 32, 32) and split.images.dtype == torch.uint8
    add_task(path, "dogs", ["collie", "pug", "husky"])
    assert [(t.index, t.name, t.num_classes) for t in build_stream(config)] == [(0, "cats", 2), (1, "dogs", 3)]
    with pytest.raises(ValueError, match="tasks.name=catalog needs tasks.root"):
        TaskStreamConfig(name="catalog")
    with pytest.raises(CatalogError, match="no task catalogue"):
        build_stream(TaskStreamConfig(name="catalog", root=str(tmp_path / "missing.yaml")))


def test_task_cli_adds_lists_and_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    assert task_main(["add", "cats", "--classes", "tabby, siamese", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert out == (f"added task 0 'cats' with 2 classes to {state / 'tasks.yaml'} (1 task(s)); a running server picks "
                   "it up at its next poll\n")
    assert task_main(["add", "cats", "--classes", "tabby,lynx", "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpetah-server task: error: ") and "not ['tabby', 'lynx']" in err
    assert task_main(["add", "birds", "--classes", "owl", "--state-dir", str(state)]) == 2
    assert "classes must be a list of 2" in capsys.readouterr().err
    assert task_main(["list", "--state-dir", str(state)]) == 0
    assert capsys.readouterr().out == '0\tcats\t["tabby", "siamese"]\n'
    assert task_main(["list", "--state-dir", str(tmp_path / "none")]) == 2
    assert "no task catalogue" in capsys.readouterr().err


def test_fedpetah_server_task_runs_without_torch(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "server.entry", "task", "add", "cats", "--classes", "tabby,siamese",
                           "--state-dir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("added task 0 'cats'"), done.stderr
    done = subprocess.run([sys.executable, "-m", "server.entry", "task", "add", "x/y", "--classes", "a,b",
                           "--state-dir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("fedpetah-server task: error: ") and not done.stdout
    check = ("import sys\nfrom server.entry import main\n"
             f"assert main(['task', 'list', '--state-dir', {str(tmp_path)!r}]) == 0\n"
             "assert 'torch' not in sys.modules, 'fedpetah-server task imported torch'")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == '0\tcats\t["tabby", "siamese"]\n', done.stderr
