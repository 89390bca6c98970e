"""pytest plugin: record a model inside a test and pin its shapes with a golden snapshot.

Registered as the ``vlmscope`` ``pytest11`` entry point. Importing this module imports only
pytest and the standard library; the recorder (torch) and the analysis code are imported
inside the fixtures, when a test uses them.

Fixtures:

``vlmscope_record``
    ``vlmscope_record(model, processor, image=..., prompt=..., max_new_tokens=4, name=None, **kw)``
    (or ``rows=[...]`` / ``calls=[...]`` for batches and several calls, as ``vlmscope.record``)
    records a generate call into the test's temporary directory and returns the open
    :class:`vlmscope.Trace` (closed at teardown). ``vlmscope_record.path`` is the last file.

``vlmscope_golden``
    ``vlmscope_golden.check(trace, name=None)`` compares the trace's shape snapshot with the
    golden file stored next to the test, ``<test dir>/__vlmscope__/<test file>/<test>[.<name>].json``,
    and fails on mismatch with a summary line (how many entries differ, in which steps and
    modules), then the first lines of the unified diff and the ``vlmscope snapshot ... --compare``
    command that prints all of it (``vlmscope_golden.assert_match`` is an alias).
    A missing golden file fails with a hint; ``pytest --vlmscope-update`` (re)writes the
    golden files instead of comparing. ``vlmscope_golden.path(name=None)`` gives the path;
    ``vlmscope_golden.use(path)`` compares with an explicit file instead (e.g. ``traces/golden/``).

A failing :func:`vlmscope.expect` is reported in a few lines (the test's line, then what was
expected, what was found, where and which dim differs) rather than a traceback through the
analysis code; ``--tb=long`` (or any explicit ``--tb``) and ``--fulltrace`` keep pytest's own.

Example::

    import vlmscope
    import vlmscope_models

    def test_shapes(vlmscope_record, vlmscope_golden):
        model, processor = vlmscope_models.load_embedded("tiny-qwen2-vl")
        trace = vlmscope_record(model, processor, image="examples/astronaut.png", max_new_tokens=2)
        vlmscope.expect(trace, "model.language_model.layers.*.self_attn.q_proj", output="B S 64")
        vlmscope_golden.check(trace)
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

GOLDEN_DIR = "__vlmscope__"
#: lines of the unified diff a golden mismatch shows (the summary line comes first)
DIFF_LINES = 40


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("vlmscope", "vlmscope shape snapshots")
    group.addoption("--vlmscope-update", action="store_true", default=False,
                    help="rewrite vlmscope golden shape snapshots instead of comparing against them")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "vlmscope: a test that records or compares vlmscope traces")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any):
    """Report a failing ``vlmscope.expect`` in pytest's short style: the test's own line and the
    assertion's message (expected, found, where, which dim), no frames of the analysis code.
    Only under the default ``--tb=auto``; ``--fulltrace``, ``--showlocals`` and an explicit ``--tb``
    keep pytest's report (the analysis code's frames stay hidden by ``__tracebackhide__``)."""
    outcome = yield
    rep = outcome.get_result()
    exc = call.excinfo
    if exc is None or rep.when != "call" or not rep.failed or not _is_shape_mismatch(exc.value):
        return
    cfg = item.config
    if cfg.getoption("tbstyle", "auto") != "auto" or cfg.getoption("fulltrace", False) \
            or cfg.getoption("showlocals", False):
        return
    short = getattr(item, "_repr_failure_py", None)
    if short is None:
        return
    try:
        rep.longrepr = short(exc, style="short")
    except Exception:  # noqa: BLE001 - a reporting nicety: pytest's own report stays when it fails
        pass


def _is_shape_mismatch(e: BaseException) -> bool:
    # without importing the analysis code: a ShapeMismatch can only come from a loaded module
    mod = sys.modules.get("vlmscope.analyze.expect")
    return mod is not None and isinstance(e, mod.ShapeMismatch)


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

    def __call__(self, model: Any, processor: Any = None, *, image: Any = None, prompt: str | None = None,
                 max_new_tokens: int = 4, name: str | None = None, **kw: Any):
        from vlmscope.recorder import record
        from vlmscope.trace import open_trace

        self._n += 1
        out = self.tmp_path / f"{_safe(name or self.test_name)}-{self._n}.h5"
        if "rows" not in kw and "calls" not in kw:     # one row: the default prompt
            kw.update(image=image, prompt="Describe this image." if prompt is None else prompt)
        elif prompt is not None or image is not None:
            kw.update(image=image, prompt=prompt or "")    # record() says "not both" in one line
        self.path = Path(record(model, processor, out=out, max_new_tokens=max_new_tokens, **kw))
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
        """Compare ``trace`` (a Trace or a path) with the golden snapshot; fail with a summary line
        and a bounded unified diff (:func:`mismatch_message`)."""
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
        tpath = str(getattr(trace, "path", trace))
        d = compare_snapshots(golden, actual, fromfile=str(gp), tofile=tpath)
        if d:
            pytest.fail(mismatch_message(golden, actual, d, gp, tpath), pytrace=False)

    assert_match = check


def mismatch_message(golden: dict, actual: dict, diff: str, golden_path: Any, trace_path: Any,
                     max_lines: int = DIFF_LINES) -> str:
    """A golden mismatch in a few lines: a summary line first (how many entries differ, in which
    steps and modules), where the golden file is, what else differs, then the first
    ``max_lines`` lines of the unified ``diff`` and the command that prints all of it."""
    try:
        s = summarize(golden, actual)
    except Exception:  # noqa: BLE001 - a hand-edited golden file may hold anything; the diff still shows
        s = {"entries": 0, "changed": 0, "added": 0, "removed": 0, "steps": [], "modules": [], "headers": [],
             "n_steps": 0}
    steps, mods = s["steps"], s["modules"]
    what = f"{s['entries']} entr{'y differs' if s['entries'] == 1 else 'ies differ'}"
    if s["added"] or s["removed"]:
        what += f" ({s['changed']} changed, {s['added']} added, {s['removed']} removed)"
    where = []
    if steps:
        where.append(f"{len(steps)} of {s['n_steps']} step{'s' if s['n_steps'] != 1 else ''} ({_few(steps, 8)})")
    if mods:
        where.append(f"{len(mods)} module{'s' if len(mods) != 1 else ''} ({_few(mods, 3)})")
    head = f"shapes differ from the golden snapshot: {what}" + (" in " + ", ".join(where) if where else "")
    also = _few(s["headers"], 4, sep="; ")
    if not s["entries"] and also:
        head, also = f"shapes differ from the golden snapshot: {also}", ""
    lines = [head, f"  golden: {golden_path} (pytest --vlmscope-update rewrites it if the change is intended)"]
    if also:
        lines.append(f"  also:   {also}")
    dl = diff.splitlines()
    lines += dl[:max_lines]
    if len(dl) > max_lines:
        lines.append(f"... {len(dl) - max_lines} more lines; run `vlmscope snapshot {shlex.quote(str(trace_path))} "
                     f"--compare {shlex.quote(str(golden_path))}` for all")
    return "\n".join(lines)


def summarize(golden: dict, actual: dict) -> dict:
    """What differs between two snapshots, entry by entry: ``entries`` (``changed`` + ``added`` +
    ``removed``), the ``steps`` and ``modules`` they are in (execution order), ``headers`` (run or
    step fields that differ, e.g. ``"step 1 q_len 88 -> 89"``) and ``n_steps``."""
    out: dict[str, Any] = {"changed": 0, "added": 0, "removed": 0, "steps": [], "modules": [], "headers": []}
    mods: dict[str, None] = {}
    skip = ("steps", "model")        # the model's name is not compared (vlmscope.analyze.snapshot)
    for k in [k for k in golden if k not in skip] + [k for k in actual if k not in golden and k not in skip]:
        if golden.get(k) != actual.get(k):
            out["headers"].append(f"{k} {_short(golden.get(k))} -> {_short(actual.get(k))}")
    gs = {int(st.get("step", i)): st for i, st in enumerate(golden.get("steps") or [])}
    as_ = {int(st.get("step", i)): st for i, st in enumerate(actual.get("steps") or [])}
    for n in sorted(set(gs) | set(as_)):
        g, a = gs.get(n), as_.get(n)
        gc, ac = list((g or {}).get("calls") or []), list((a or {}).get("calls") or [])
        if g is not None and a is not None:
            for k in [k for k in g if k != "calls"]:
                if g.get(k) != a.get(k):
                    out["headers"].append(f"step {n} {k} {_short(g.get(k))} -> {_short(a.get(k))}")
        elif g is None:
            out["headers"].append(f"step {n} is new")
        else:
            out["headers"].append(f"step {n} is missing")
        before = out["changed"] + out["added"] + out["removed"]
        sm = difflib.SequenceMatcher(None, [_key(e) for e in gc], [_key(e) for e in ac], autojunk=False)
        for tag, i1, i2, j1, j2 in sm.get_opcodes():
            if tag == "equal":
                continue
            ni, nj = i2 - i1, j2 - j1
            out["changed"] += min(ni, nj)
            out["removed"] += max(0, ni - nj)
            out["added"] += max(0, nj - ni)
            for e in gc[i1:i2] + ac[j1:j2]:
                mods.setdefault(_module_of(e), None)
        if out["changed"] + out["added"] + out["removed"] > before or g is None or a is None:
            out["steps"].append(n)
    out["entries"] = out["changed"] + out["added"] + out["removed"]
    out["modules"] = list(mods)
    out["n_steps"] = max(len(gs), len(as_))
    return out


def _key(entry: Any) -> str:
    return json.dumps(entry, sort_keys=True, ensure_ascii=False)


def _module_of(entry: Any) -> str:
    m = entry[0] if isinstance(entry, list) and entry else None
    return "<root>" if m == "" else str(m)


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return s if len(s) <= n else s[: n - 1] + "…"


def _few(items: list, n: int, sep: str = ", ") -> str:
    shown = sep.join(str(x) for x in items[:n])
    return shown + (f"{sep}+{len(items) - n} more" if len(items) > n else "")


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
