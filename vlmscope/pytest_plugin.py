"""pytest plugin: record a model inside a test and pin its shapes with a golden snapshot.

Registered as the ``vlmscope`` ``pytest11`` entry point. Importing this module imports only
pytest and the standard library; the recorder (torch) and the analysis code are imported
inside the fixtures, when a test uses them.

Fixtures:

``vlmscope_record``
    ``vlmscope_record(model, processor, image=..., prompt=..., max_new_tokens=4, name=None, **kw)``
    records a generate call into the test's temporary directory and returns the open
    :class:`vlmscope.Trace` (closed at teardown). ``vlmscope_record.path`` is the last file.

``vlmscope_golden``
    ``vlmscope_golden.check(trace, name=None)`` compares the trace's shape snapshot with the
    golden file stored next to the test, ``<test dir>/__vlmscope__/<test file>/<test>[.<name>].json``,
    and fails with a unified diff on mismatch (``vlmscope_golden.assert_match`` is an alias).
    A missing golden file fails with a hint; ``pytest --vlmscope-update`` (re)writes the
    golden files instead of comparing. ``vlmscope_golden.path(name=None)`` gives the path;
    ``vlmscope_golden.use(path)`` compares with an explicit file instead (e.g. ``traces/golden/``).

Example::

    def test_shapes(vlmscope_record, vlmscope_golden):
        model, processor = vlmscope_models.load_embedded("tiny-qwen2-vl")
        trace = vlmscope_record(model, processor, image="examples/astronaut.png", max_new_tokens=2)
        vlmscope.expect(trace, "model.language_model.layers.*.self_attn.q_proj", output="B S 64")
        vlmscope_golden.check(trace)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

GOLDEN_DIR = "__vlmscope__"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("vlmscope", "vlmscope shape snapshots")
    group.addoption("--vlmscope-update", action="store_true", default=False,
                    help="rewrite vlmscope golden shape snapshots instead of comparing against them")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "vlmscope: a test that records or compares vlmscope traces")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "test"


class _Recorder:
    """The ``vlmscope_record`` fixture object (callable)."""

    def __init__(self, tmp_path: Path, test_name: str):
        self.tmp_path = tmp_path
        self.test_name = test_name
        self.path: Path | None = None
        self._open: list[Any] = []
        self._n = 0

    def __call__(self, model: Any, processor: Any = None, *, image: Any = None, prompt: str = "Describe this image.",
                 max_new_tokens: int = 4, name: str | None = None, **kw: Any):
        from vlmscope.recorder import record
        from vlmscope.trace import open_trace

        self._n += 1
        out = self.tmp_path / f"{_safe(name or self.test_name)}-{self._n}.h5"
        self.path = Path(record(model, processor, image=image, prompt=prompt, out=out,
                                max_new_tokens=max_new_tokens, **kw))
        t = open_trace(self.path)
        self._open.append(t)
        return t

    def close(self) -> None:
        for t in self._open:
            try:
                t.close()
            except Exception:  # noqa: BLE001 - teardown of a trace the test may have damaged on purpose
                pass
        self._open.clear()


class GoldenSnapshot:
    """The ``vlmscope_golden`` fixture object."""

    def __init__(self, test_path: Path, test_name: str, update: bool):
        self.test_path = Path(test_path)
        self.test_name = test_name
        self.update = update
        self._explicit: Path | None = None
        self.written: list[Path] = []

    def path(self, name: str | None = None) -> Path:
        if self._explicit is not None and name is None:
            return self._explicit
        stem = _safe(self.test_name) + (f".{_safe(name)}" if name else "")
        return self.test_path.parent / GOLDEN_DIR / self.test_path.stem / f"{stem}.json"

    def use(self, path: str | os.PathLike) -> "GoldenSnapshot":
        """Compare with (or update) an explicit golden file."""
        self._explicit = Path(path)
        return self

    def check(self, trace: Any, name: str | None = None, *, reshapes: bool = False) -> None:
        """Compare ``trace`` (a Trace or a path) with the golden snapshot; fail with a unified diff."""
        from vlmscope.analyze.snapshot import compare_snapshots, load_snapshot, snapshot, write_snapshot

        gp = self.path(name)
        if self.update:
            write_snapshot(snapshot(trace, reshapes=reshapes), gp)
            self.written.append(gp)
            return
        if not gp.is_file():
            pytest.fail(f"no golden shape snapshot at {gp}; run pytest with --vlmscope-update to create it",
                        pytrace=False)
        golden = load_snapshot(gp)
        actual = snapshot(trace, reshapes=bool(golden.get("reshapes", reshapes)))
        d = compare_snapshots(golden, actual, fromfile=str(gp), tofile=str(getattr(trace, "path", trace)))
        if d:
            lines = d.splitlines()
            shown = "\n".join(lines[:400]) + (f"\n... {len(lines) - 400} more lines" if len(lines) > 400 else "")
            pytest.fail(f"shapes differ from the golden snapshot {gp} "
                        f"(pytest --vlmscope-update rewrites it if the change is intended):\n{shown}", pytrace=False)

    assert_match = check


@pytest.fixture
def vlmscope_record(tmp_path: Path, request: Any):
    """Record a model's generate call into a trace; returns the open Trace."""
    rec = _Recorder(tmp_path, request.node.name)
    yield rec
    rec.close()


@pytest.fixture
def vlmscope_golden(request: Any) -> GoldenSnapshot:
    """Compare traces with golden shape snapshots stored next to the test (see module docs)."""
    return GoldenSnapshot(Path(str(request.node.path if hasattr(request.node, "path") else request.node.fspath)),
                          request.node.name, bool(request.config.getoption("vlmscope_update", False)))


@pytest.fixture
def vlmscope_update(request: Any) -> bool:
    """True when pytest runs with ``--vlmscope-update``."""
    return bool(request.config.getoption("vlmscope_update", False))
