"""The layers of docs/architecture.md hold, statically and at run time.

Statically: the import-linter contracts in pyproject.toml (``lint-imports``). At run time: a fresh
interpreter imports each layer and reports which third-party packages it loaded; lazy imports
inside functions, which static analysis also sees, must not load a higher layer either.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOTTOM = {"h5py", "hdf5plugin", "numpy"}

_PROBE = r"""
import json, sys
before = set(sys.modules)
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
tops = {m.split(".")[0] for m in set(sys.modules) - before}
def installed(top):  # a package from site-packages (not the stdlib, not a built-in runtime module)
    f = getattr(sys.modules.get(top), "__file__", None) or ""
    return ("site-packages" in f or "dist-packages" in f) and top != "vlmscope"
third = sorted(t for t in tops if installed(t))
print(json.dumps({"third": third, "vlmscope": sorted(m for m in sys.modules if m.startswith("vlmscope"))}))
"""


def _loaded(*modules: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True,
                         check=True, cwd="/")
    return json.loads(out.stdout)


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed in this venv (pip install '.[test]')"
    res = subprocess.run([exe, str(ROOT / "pyproject.toml"), "--no-cache"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 4 kept, 0 broken." in res.stdout


@pytest.mark.parametrize("modules", [
    ["vlmscope.trace", "vlmscope.semantics", "vlmscope.errors"],
    ["vlmscope"],                      # the public package: the trace reader, nothing heavy
])
def test_bottom_layer_loads_h5py_hdf5plugin_numpy_only(modules):
    got = _loaded(*modules)
    assert set(got["third"]) <= BOTTOM, got["third"]
    assert not [m for m in got["vlmscope"] if m.startswith(("vlmscope.analyze", "vlmscope.recorder",
                                                              "vlmscope.tui", "vlmscope.cli"))]


def test_analysis_and_testing_load_no_torch_and_no_ui():
    got = _loaded("vlmscope.analyze", "vlmscope.analyze.check", "vlmscope.analyze.diff", "vlmscope.testing")
    assert set(got["third"]) <= BOTTOM, got["third"]
    assert not [m for m in got["vlmscope"] if m.startswith(("vlmscope.recorder", "vlmscope.tui", "vlmscope.cli"))]


def test_recorder_loads_no_ui_and_no_analysis():
    got = _loaded("vlmscope.recorder")
    assert "torch" in got["third"]
    assert not {"textual", "click"} & set(got["third"])
    assert not [m for m in got["vlmscope"] if m.startswith(("vlmscope.analyze", "vlmscope.tui", "vlmscope.cli"))]


def test_cli_group_imports_commands_lazily():
    got = _loaded("vlmscope.cli")
    assert not {"torch", "textual", "transformers"} & set(got["third"]), got["third"]


def test_checking_diffing_and_snapshotting_a_trace_loads_no_torch_and_no_ui(tmp_path):
    code = f"""
import json, sys
from vlmscope.testing import make_trace
from vlmscope.analyze import check, diff, expect, snapshot
p = make_trace({str(tmp_path / 't.h5')!r}, n_steps=2, n_layers=2, n_vision=1)
assert check(p).violations == [], "a clean synthetic trace checks clean"
assert diff(p, p).same
snapshot(p)
expect(p, "**.q_proj", output="B S 64")
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "textual", "transformers", "rich", "click"}})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
