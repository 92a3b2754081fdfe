"""Console scripts where the extras' modules cannot be imported: each works or exits with a one-line install hint.

The honest check, a venv holding only the base dependencies, is ``.ci/base-deps`` (CI runs it after the tests); this
is its fast stand-in, with the extras' modules made unimportable in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = ("hydra", "omegaconf", "ray", "sklearn", "mlxtend", "matplotlib", "onnx", "onnxscript", "onnxruntime",
          "executorch")
"""Top-level modules of the server, export and executorch extras (``sys.modules[name] = None`` hides one)."""


def _without_extras(code: str) -> subprocess.CompletedProcess[str]:
    hide = f"import sys\nfor _name in {EXTRAS!r}:\n    sys.modules[_name] = None\n"
    return subprocess.run([sys.executable, "-c", hide + code], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("script", "target"), sorted(PROJECT["scripts"].items()))
def test_console_script_works_or_hints_without_the_extras(script: str, target: str) -> None:
    module, _, function = target.partition(":")
    done = _without_extras(f"import importlib\nsys.argv = [{script!r}, '--help']\n"
                           f"sys.exit(importlib.import_module({module!r}).{function}())")
    if done.returncode != 0:
        assert len(done.stderr.splitlines()) == 1 and "pip install 'fedpetah[" in done.stderr, done.stderr[-2000:]
    else:
        assert f"usage: {script}" in done.stdout


def test_server_hint_names_the_extra_and_export_works_on_a_device() -> None:
    done = _without_extras("from server.entry import main\nsys.exit(main([]))")
    assert done.returncode == 1 and done.stderr.startswith("fedpetah-server: needs the server extra (hydra, ")
    assert done.stderr.rstrip().endswith("pip install 'fedpetah[server]'")
    # fedpetah-export is a device command: its module imports without the server extra, and model.onnx names its own
    done = _without_extras("from fedpetah.routing.export import ExportError, require_onnx\ntry:\n    require_onnx()\n"
                           "except ExportError as error:\n    print(error)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ("model.onnx needs the export extra (onnx, onnxscript missing): "
                                   "pip install 'fedpetah[export]', or pass --no-onnx")
