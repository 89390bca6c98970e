"""A trace in a notebook (issue 12, point 17): readable, bounded, escaped reprs of a trace, a step
and a table view (strings resolved); ``to_pandas()`` and ``vlmscope.plot`` with pandas and
matplotlib optional (a clear ImportError naming the extra without them).

The optional paths are tested for real when pandas / matplotlib are importable (run with them on
``PYTHONPATH`` to cover that branch), and through their ImportError otherwise; the ImportError is
also forced in every run by hiding the package.
"""

from __future__ import annotations

import html
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import vlmscope
from vlmscope.testing import make_trace
from vlmscope.trace import open_trace
from vlmscope.trace.notebook import MAX_ROWS, TableView

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "traces" / "examples" / "tiny-qwen2.5-vl-astronaut.h5"
HAS_PANDAS = importlib.util.find_spec("pandas") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
EXTRA_HINT = "pip install 'vlmscope[notebook]'"

_spec = importlib.util.spec_from_file_location(
    "hostile_traces_nb", Path(__file__).resolve().parents[1] / "cli" / "test_hostile_text.py")
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


@pytest.fixture
def ex():
    with open_trace(EXAMPLE) as t:
        yield t


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory) -> Path:
    return make_trace(tmp_path_factory.mktemp("nb") / "long.h5", n_steps=30, n_layers=2, n_vision=1)


def test_trace_repr_says_what_the_trace_is(ex):
    r = repr(ex)
    lines = r.splitlines()
    assert lines[0] == f"<vlmscope.Trace {EXAMPLE}: format 3, complete, 4 steps>"
    assert "model tiny-qwen2.5-vl (Qwen2_5_VLForConditionalGeneration, float32, cpu, eager)" in r
    assert re.search(r"67 modules, 164 events, 452 tensors, 297 reshapes, 107 probes", r)
    # the steps table: labelled columns and resolved values, not tuples of codes
    head = next(x for x in lines if x.startswith("step"))
    for col in ("kind", "q_len", "cache_before", "cache_after", "positions", "mask", "image_tokens"):
        assert col in head
    rows = [x.split() for x in lines[lines.index(head) + 1:]]
    assert [r_[:2] for r_ in rows] == [["0", "prefill"], ["1", "decode"], ["2", "decode"], ["3", "decode"]]
    assert "[1, 1, 281, 281]" in lines[lines.index(head) + 1] and "0..40" in lines[lines.index(head) + 1]
    assert "(0, 0, 281" not in r                                  # not numpy's tuple rows


def test_trace_repr_is_bounded_and_html_escaped(long_trace):
    with open_trace(long_trace) as t:
        r = repr(t)
        assert "… 18 more rows" in r                 # 12 of 30 steps listed
        assert len(r.splitlines()) <= 3 + 1 + 12 + 1
        h = t._repr_html_()
        assert h.count("<tr><td") == 12 + 1 and "… 18 more rows" in h
        assert "<th>q_len</th>" in h and "<td>prefill</td>" in h


def test_repr_of_a_closed_or_damaged_trace_does_not_raise(tmp_path, ex):
    p = make_trace(tmp_path / "t.h5", n_steps=2, n_layers=1, n_vision=1)
    t = open_trace(p)
    t.close()
    assert repr(t) == f"<vlmscope.Trace {p}: closed>"
    assert "closed" in t._repr_html_()
    import h5py
    with h5py.File(p, "r+") as f:           # a step row naming events past the end of the table
        st = f["steps"][:]
        st["event_count"][1] = 10 ** 9
        f["steps"][:] = st
    with open_trace(p) as t:
        r = repr(t)
        assert r.startswith(f"<vlmscope.Trace {p}: format") and "damaged step row" in r and "step 1" in r
        assert "damaged" in t._repr_html_()


def test_table_views_resolve_strings_and_keep_the_numpy_rows(ex):
    v = ex.view("events", step=1)
    assert isinstance(v, TableView) and isinstance(ex.events(1), np.ndarray)
    assert np.array_equal(v.rows, ex.events(1))
    cols = v.columns()
    base = int(ex.steps["event_start"][1])
    assert list(cols["row"]) == list(range(base, base + len(v)))
    assert list(cols["module"]) == ["<root>" if not ex.module_path(int(m)) else ex.module_path(int(m))
                                    for m in ex.events(1)["module"]]
    assert cols["class"][0] == "Qwen2_5_VLForConditionalGeneration"
    r = repr(v)
    assert r.splitlines()[0] == "events of step 1: 33 rows (tiny-qwen2.5-vl-astronaut.h5)"
    assert "model.language_model.layers.0.self_attn.q_proj" in r and "Linear" in r
    assert f"… {33 - MAX_ROWS} more rows" in r and len(r.splitlines()) == 1 + 1 + MAX_ROWS + 2

    t = ex.view("tensors", step=0, max_rows=3).columns(0, 3)
    assert list(t["shape"]) == ["[1024, 3, 2, 14, 14]", "[1024, 64, 1, 1, 1]", "[1024, 1176]"]
    assert list(t["dtype"]) == ["float32"] * 3 and list(t["role"]) == ["input", "output", "input"]
    assert t["module"][0] == "model.visual.patch_embed.proj"


def test_repr_of_a_whole_table_reads_only_the_rows_it_shows(long_trace):
    with open_trace(long_trace) as t:
        v = t.view("tensors")
        r = repr(v)
        n = t.n_rows("tensors")
        assert r.splitlines()[0] == f"tensors: {n:,} rows (long.h5)" and f"… {n - MAX_ROWS:,} more rows" in r
        assert not t.is_loaded("tensors") and len(v) == n
        assert v.columns(0, 3)["module"][0] == repr(v).splitlines()[2].split()[2]


def test_probe_view_of_one_kind(ex):
    v = ex.view("probes", step=1, kind="position_ids")
    cols = v.columns()
    assert set(cols["kind"]) == {"position_ids"}                 # not "kind 236"
    allp = ex.probes(1)
    want = int(ex.steps["probe_start"][1]) + np.nonzero(allp["kind"] == ex.string_id("position_ids"))[0]
    assert list(cols["row"]) == list(want)
    assert "[3, 1, 1]" in set(cols["shape"]) and set(cols["dtype"]) == {"int64"}
    assert "model.language_model.rotary_emb" in repr(v)
    with pytest.raises(ValueError):
        ex.view("events", kind="position_ids")
    with pytest.raises(KeyError):
        ex.view("payloads")


def test_step_repr(ex):
    r = repr(ex.step(1))
    assert r.startswith("<vlmscope step 1: decode, q_len 1, cache 281 -> 282, positions 41..41, "
                        "mask [1, 1, 1, 282]; 33 events, 91 tensors, 46 reshapes, 26 probes>")
    assert "numpy" not in r and "array(" not in r
    assert "<td>model.language_model</td>" in ex.step(1)._repr_html_()


def test_hostile_strings_are_escaped(tmp_path):
    p = H.hostile_trace(tmp_path / "h.h5", "a")
    with open_trace(p) as t:
        text = repr(t) + repr(t.view("events")) + repr(t.view("modules", max_rows=100))
        assert not H.CONTROL.search(text.replace("\n", ""))
        assert "\\x1b]0;pwned\\x07" in text                  # shown, not sent
        h = t._repr_html_() + t.view("events", max_rows=1000)._repr_html_()
        assert "<script" not in h and "\x1b" not in h
        assert html.escape(H.LEAF) in h and "[link=https://evil.example]" in h
        doc = t.view("modules", max_rows=1000)._repr_html_()
        assert doc.count("<table") == 1 and doc.count("</table>") == 1


def test_to_pandas(ex, monkeypatch):
    v = ex.view("tensors", step=0)
    if HAS_PANDAS:
        df = v.to_pandas()
        assert len(df) == 179 and df.index.name == "row"
        assert df.loc[0, "module"] == "model.visual.patch_embed.proj" and df.loc[0, "shape"] == "[1024, 3, 2, 14, 14]"
        assert df["dtype"].iloc[0] == "float32" and df["min"].dtype == np.float64
        sd = ex.view("steps").to_pandas()
        assert list(sd["kind"]) == ["prefill", "decode", "decode", "decode"]
    else:
        with pytest.raises(ImportError, match=re.escape(EXTRA_HINT)):
            v.to_pandas()
    monkeypatch.setitem(sys.modules, "pandas", None)        # pandas absent, whatever is installed
    with pytest.raises(ImportError) as ei:
        v.to_pandas()
    assert "to_pandas() needs pandas" in str(ei.value) and EXTRA_HINT in str(ei.value)
    assert ei.value.name == "pandas"


def test_plots(ex, monkeypatch):
    if HAS_MPL:
        from matplotlib.figure import Figure

        fig = vlmscope.plot.mask(ex, step=0)
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        img = ax.images[0].get_array()
        want = ex.probe_value(ex.probes(0, kind="attention_mask")[0])[0, 0]
        assert img.shape == (281, 281) and np.array_equal(np.asarray(img, bool), np.asarray(want, bool))
        assert "attention mask [1, 1, 281, 281]" in ax.get_title()
        span = [p for p in ax.patches]
        assert len(span) == 1                               # the image span, tokens [15, 271)
        x0 = span[0].get_x() if hasattr(span[0], "get_x") else span[0].get_xy()[0][0]
        assert abs(x0 - 14.5) < 1e-6

        fig = vlmscope.plot.positions(ex, step=0)
        lines = fig.axes[0].get_lines()
        assert [ln.get_label() for ln in lines] == ["t", "h", "w"]
        pos = ex.probe_value(next(p for p in ex.probes(0, kind="position_ids")
                                  if ex.module_path(int(p["module"])) == "model.language_model.rotary_emb"))
        assert np.array_equal(lines[1].get_ydata(), pos[1, 0])
        fig = vlmscope.plot.positions(str(EXAMPLE), step=2)          # a path works too
        assert list(fig.axes[0].get_lines()[0].get_xdata()) == [282]
    else:
        with pytest.raises(ImportError, match=re.escape(EXTRA_HINT)):
            vlmscope.plot.mask(ex, 0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as ei:
        vlmscope.plot.positions(ex, 0)
    assert "vlmscope.plot.positions() needs matplotlib" in str(ei.value) and EXTRA_HINT in str(ei.value)
