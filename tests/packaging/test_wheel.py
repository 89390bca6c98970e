"""The wheel ships every module and data file of the source tree, and the suite tests that wheel.

Like pypa/build's self-packaging test: build the wheel from a clean copy of the source tree and
compare its file list with what the tree holds. A package missing from the wheel (as
``vlmscope.analyze`` once was) fails here, not in a user's venv.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vlmscope
import vlmscope_models

ROOT = Path(__file__).resolve().parents[2]
#: where each top-level package of the wheel lives in the source tree
PACKAGE_DIRS = {"vlmscope": ROOT / "vlmscope", "vlmscope_models": ROOT / "model" / "vlmscope_models"}
#: non-Python files that ship, per package (globs relative to the package directory)
DATA_GLOBS = {"vlmscope": ["**/*.tcss"], "vlmscope_models": ["configs/*.json", "*.jinja"]}


def _expected_files() -> set[str]:
    out: set[str] = set()
    for pkg, src in PACKAGE_DIRS.items():
        for pattern in ["**/*.py", *DATA_GLOBS[pkg]]:
            for f in src.glob(pattern):
                if "__pycache__" not in f.parts:
                    out.add(f"{pkg}/{f.relative_to(src).as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (no stale ``build/`` of an earlier build)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "traces", "tests", "bench"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True)
    (whl,) = (tmp / "dist").glob("vlmscope-*.whl")
    return whl


def test_wheel_holds_every_package_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if ".dist-info/" not in n}
    expected = _expected_files()
    assert "vlmscope/analyze/__init__.py" in expected and "vlmscope_models/configs/tiny-qwen2-vl.json" in expected
    assert sorted(expected - names) == [], "files of the source tree missing from the wheel"
    assert sorted(names - expected) == [], "files in the wheel that are not in the source tree"


def test_wheel_declares_the_cli_and_the_pytest_plugin(wheel):
    with zipfile.ZipFile(wheel) as z:
        (ep,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(ep).decode()
    assert "vlmscope = vlmscope.cli:main" in text
    assert "vlmscope = vlmscope.pytest_plugin" in text


def test_suite_runs_against_the_installed_wheel_not_the_source_tree():
    """The suite must test what users install: a non-editable install of the wheel."""
    for mod in (vlmscope, vlmscope_models):
        where = Path(mod.__file__).resolve().parent
        assert where != PACKAGE_DIRS[mod.__name__] and "site-packages" in where.parts, (
            f"{mod.__name__} is imported from the source tree ({mod.__file__}); "
            "run `bash scripts/setup.sh` (installs the wheel) and `.venv/bin/pytest`")
    dist = importlib.metadata.distribution("vlmscope")
    installed = {str(f) for f in dist.files if not str(f).startswith(("vlmscope-", "../", "__editable__"))
                 and "__pycache__" not in str(f) and ".dist-info/" not in str(f)}
    assert installed == _expected_files()
