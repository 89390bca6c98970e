"""What the pytest plugin prints when a shape test fails (issue 12, points 15 and 16).

A failing ``vlmscope.expect`` is a few lines: the test's line, what was expected, what was
found, the module and step, the dim that differs; no frames of the analysis code, however long
the test. A golden mismatch starts with a summary line (how many entries differ, in which steps
and modules), then a bounded diff, then the command that prints all of it, which works.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vlmscope.analyze.expect import ShapeMismatch, expect
from vlmscope.analyze.snapshot import compare_snapshots, snapshot, write_snapshot
from vlmscope.pytest_plugin import DIFF_LINES, summarize
from vlmscope.testing import make_trace
from vlmscope.trace import open_trace

pytest_plugins = ["pytester"]

SMALL = dict(n_steps=3, n_layers=2, n_vision=1)
Q = "model.language_model.layers.*.self_attn.q_proj"


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    base = tmp_path_factory.mktemp("msgs")
    return {
        "a": make_trace(base / "a.h5", **SMALL),
        "shape": make_trace(base / "shape.h5", faults={"shape": (1, 0)}, **SMALL),
        "deeper": make_trace(base / "deeper.h5", n_steps=3, n_layers=3, n_vision=1),
        "shorter": make_trace(base / "shorter.h5", n_steps=2, n_layers=2, n_vision=1),
    }


def _plugin_args() -> list[str]:
    args = ["-p", "no:textual-snapshot", "-p", "no:cacheprovider", "-p", "no:syrupy"]
    if not any(e.value == "vlmscope.pytest_plugin" for e in importlib.metadata.entry_points(group="pytest11")):
        args += ["-p", "vlmscope.pytest_plugin"]
    return args


def _failure_section(lines: list[str], test: str) -> list[str]:
    """The lines pytest prints for one failure: after its ``___ test ___`` header, up to the next
    header or the short summary."""
    start = next(i for i, x in enumerate(lines) if re.fullmatch(rf"_+ {re.escape(test)} _+", x))
    end = next(i for i in range(start + 1, len(lines))
               if re.match(r"(_+ \S+ _+|=+ )", lines[i]))
    return lines[start + 1:end]


LONG_TEST = """
    import os
    import vlmscope

    def test_long():
        t = vlmscope.open_trace(os.environ["VLMSCOPE_TEST_TRACE"])
{filler}
        vlmscope.expect(t, "model.language_model.layers.*.self_attn.q_proj", output="B S 128")
"""


def test_failing_expect_is_a_few_lines(pytester, traces, monkeypatch):
    filler = "\n".join(f"        x{i} = {i}  # a long test body" for i in range(40))
    src = pytester.makepyfile(test_long=LONG_TEST.format(filler=filler))
    line = 1 + next(i for i, x in enumerate(src.read_text().splitlines()) if "vlmscope.expect(" in x)
    monkeypatch.setenv("VLMSCOPE_TEST_TRACE", str(traces["a"]))
    res = pytester.runpytest(*_plugin_args())
    res.assert_outcomes(failed=1)
    sec = _failure_section(res.outlines, "test_long")
    text = "\n".join(sec)
    assert len([x for x in sec if x.strip()]) <= 15, text
    assert sec[0] == f"test_long.py:{line}: in test_long"               # where, in the test
    assert 'output="B S 128")' in text                                    # the failing line
    assert "expected: [B, S, 128] = [B=1, S=88, 128]" in text
    assert "actual:   [1, 88, 64] bfloat16" in text
    assert "module:   model.language_model.layers.0.self_attn.q_proj (call 0), step 0, output 'out'" in text
    assert "reason:   dim 2: expected 128, got 64" in text
    assert "x39 = 39" not in text and "expect.py" not in text and "_index.py" not in text


def test_explicit_tb_keeps_pytests_report_but_not_our_frames(pytester, traces, monkeypatch):
    filler = "\n".join(f"        x{i} = {i}" for i in range(3))
    pytester.makepyfile(test_long=LONG_TEST.format(filler=filler))
    monkeypatch.setenv("VLMSCOPE_TEST_TRACE", str(traces["a"]))
    res = pytester.runpytest(*_plugin_args(), "--tb=long")
    text = "\n".join(_failure_section(res.outlines, "test_long"))
    assert "x2 = 2" in text and "def test_long():" in text              # pytest's long style
    assert "reason:   dim 2: expected 128, got 64" in text
    assert "def _expect(" not in text and "def expect(" not in text      # __tracebackhide__


def test_expect_names_the_dim_that_differs(traces):
    with open_trace(traces["a"]) as t:
        with pytest.raises(ShapeMismatch) as ei:                        # after '...', dims count from the end
            expect(t, Q, output="... 2048")
        assert "dim 2: expected 2048, got 64" in str(ei.value)
        with pytest.raises(ShapeMismatch) as ei:
            expect(t, "model.language_model.layers.*.self_attn.k_proj", inputs="B S D", output="B S D")
        assert "D is bound to 64" in str(ei.value) and "but is 32 here (dim 2)" in str(ei.value)
        assert len(str(ei.value).splitlines()) <= 6


GOLDEN_TEST = """
    import os
    from vlmscope.trace import open_trace

    def test_g(vlmscope_golden):
        with open_trace(os.environ["VLMSCOPE_TEST_TRACE"]) as t:
            vlmscope_golden.check(t)
"""


def _golden_run(pytester, monkeypatch, golden_of: Path, trace: Path):
    pytester.makepyfile(test_g=GOLDEN_TEST)
    golden = pytester.path / "__vlmscope__" / "test_g" / "test_g.json"
    write_snapshot(snapshot(golden_of), golden)
    monkeypatch.setenv("VLMSCOPE_TEST_TRACE", str(trace))
    res = pytester.runpytest(*_plugin_args())
    res.assert_outcomes(failed=1)
    return golden, _failure_section(res.outlines, "test_g")


def test_golden_mismatch_starts_with_a_summary(pytester, traces, monkeypatch):
    golden, sec = _golden_run(pytester, monkeypatch, traces["a"], traces["shape"])
    diff = compare_snapshots(snapshot(traces["a"]), snapshot(traces["shape"]))
    minus = [x for x in diff.splitlines() if x.startswith("-      [")]
    plus = [x for x in diff.splitlines() if x.startswith("+      [")]
    assert len(minus) == len(plus) == 4
    assert sec[0] == ("shapes differ from the golden snapshot: 4 entries differ in 2 of 3 steps (1, 2), "
                      "2 modules (model.language_model.layers.0.self_attn.o_proj, "
                      "model.language_model.layers.0.self_attn)")
    assert sec[1] == f"  golden: {golden} (pytest --vlmscope-update rewrites it if the change is intended)"
    assert sec[2].startswith("--- ") and sec[3].startswith("+++ ")
    assert len(sec) == 2 + len(diff.splitlines())                  # short enough: the whole diff, no "more"


def test_golden_mismatch_diff_is_bounded_and_the_hint_works(pytester, traces, monkeypatch):
    golden, sec = _golden_run(pytester, monkeypatch, traces["a"], traces["deeper"])
    full = compare_snapshots(snapshot(traces["a"]), snapshot(traces["deeper"]),
                             fromfile=str(golden), tofile=str(traces["deeper"]))
    n = len(full.splitlines())
    assert n > 100
    assert sec[0].startswith("shapes differ from the golden snapshot: ") and "entries differ" in sec[0]
    assert "3 of 3 steps (0, 1, 2)" in sec[0] and "model.language_model.layers.2" in sec[0]
    assert sec[2:2 + DIFF_LINES] == full.splitlines()[:DIFF_LINES]
    assert len(sec) == 2 + DIFF_LINES + 1
    m = re.fullmatch(r"\.\.\. (\d+) more lines; run `(vlmscope snapshot .+)` for all", sec[-1])
    assert m and int(m.group(1)) == n - DIFF_LINES
    argv = shlex.split(m.group(2))
    assert argv[:2] == ["vlmscope", "snapshot"] and "--compare" in argv
    r = subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", *argv[1:]], capture_output=True, text=True,
                       timeout=300)
    out = r.stdout.splitlines()
    assert r.returncode == 1 and [x for x in full.splitlines() if x in out] == full.splitlines()   # all of it


def test_golden_with_fewer_steps(pytester, traces, monkeypatch):
    golden, sec = _golden_run(pytester, monkeypatch, traces["a"], traces["shorter"])
    assert sec[0].startswith("shapes differ from the golden snapshot: ")
    assert f"{len(snapshot(traces['a'])['steps'][2]['calls'])} entries differ" in sec[0]
    assert "in 1 of 3 steps (2)" in sec[0]
    assert sec[2] == "  also:   n_steps 3 -> 2; step 2 is missing"
    assert len(sec) <= 3 + DIFF_LINES + 1


def test_summarize_counts_changed_added_and_removed(traces):
    a, d, sh = snapshot(traces["a"]), snapshot(traces["deeper"]), snapshot(traces["shorter"])
    s = summarize(a, d)
    layer2 = [c for st in d["steps"] for c in st["calls"] if c[0].startswith("model.language_model.layers.2")]
    assert s["added"] == len(layer2) and s["removed"] == 0 and s["changed"] == 0
    assert s["entries"] == len(layer2) and s["steps"] == [0, 1, 2] and s["n_steps"] == 3
    assert s["modules"][0] == "model.language_model.layers.2" and s["headers"] == []
    s = summarize(a, sh)
    assert s["removed"] == len(a["steps"][2]["calls"]) and s["added"] == s["changed"] == 0
    assert s["steps"] == [2] and s["headers"] == ["n_steps 3 -> 2", "step 2 is missing"]
    assert summarize(a, a)["entries"] == 0
    assert summarize(a, {**a, "model": "renamed"})["headers"] == []     # goldens ignore the model's name
