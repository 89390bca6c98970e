"""``diff`` streams the two big tables (tensors, reshapes) block by block, with trace B read
by a forked reader. These tests check that streaming changes nothing in the results, that
the tables are never loaded whole, and that the forked reader fails safe."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synth_trace import make_trace  # noqa: E402
from vlmscope.analyze._index import _ForkedReader, index_of, stream_pair  # noqa: E402
from vlmscope.analyze.diff import diff  # noqa: E402
from vlmscope.trace import open_trace  # noqa: E402

align_mod = importlib.import_module("vlmscope.analyze.align")   # the module (the package exports the function)

# big enough for many stream blocks of every table (so the forked workers run)
BIG = dict(n_events=60_000, n_layers=4, n_vision=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    clean = make_trace(d / "clean.h5", **BIG)
    # numbers drift from step 20 on, one step has a shape change, and a cache grows twice
    bad = make_trace(d / "bad.h5", faults={"drift": (20, 2), "shape": (25, 1), "cache_twice": (30, 3)}, **BIG)
    return clean, bad


def _report(a, b, preload: bool = False) -> tuple[str, tuple]:
    with open_trace(a) as ta, open_trace(b) as tb:
        if preload:
            for t in (ta, tb):
                for name in ("tensors", "reshapes"):
                    t.table(name)
        rep = diff(ta, tb)
        loaded = tuple(t.is_loaded(n) for t in (ta, tb) for n in ("tensors", "reshapes"))
        return json.dumps(rep.to_dict(), sort_keys=True, default=str), loaded


def test_streamed_diff_equals_diff_of_loaded_tables(pair, monkeypatch):
    clean, bad = pair
    with open_trace(clean) as t:
        assert t.n_rows("tensors") > 8 * t.stream_rows("tensors", 2 << 20)   # many blocks
    started = []
    orig = align_mod._HalfWorker.start

    def spy(*a, **k):
        w = orig(*a, **k)
        started.append(w is not None)
        return w

    monkeypatch.setattr(align_mod._HalfWorker, "start", spy)
    streamed, loaded = _report(clean, bad)
    assert started and all(started)            # the second half of each big table was forked off
    assert loaded == (False,) * 4              # never held whole
    rep = json.loads(streamed)
    assert not rep["same"] and rep["first_divergence"]["step"] == 20
    assert rep["counts"]["tensors"]["drift"] > 0 and rep["counts"]["tensors"]["shape"] > 0
    whole, loaded = _report(clean, bad, preload=True)
    assert loaded == (True,) * 4
    assert streamed == whole
    monkeypatch.setenv("VLMSCOPE_NO_FORK", "1")
    assert _report(clean, bad)[0] == streamed
    # and the other way round
    assert json.loads(_report(bad, clean)[0])["first_divergence"]["step"] == 20


def test_forked_reader_is_used_and_fails_safe(pair, tmp_path):
    clean, bad = pair
    with open_trace(clean) as ta, open_trace(bad) as tb:
        n = ta.n_rows("tensors")
        rows = ta.stream_rows("tensors", 2 << 20)
        r = _ForkedReader.start(tb, "tensors", n, rows)
        assert r is not None and r.pid > 0
        r.close()
    # trace B's file disappears after it was opened: the child cannot open it, and the
    # parent reads every block itself through its open handle
    moved = tmp_path / "bad.h5"
    shutil.copy(bad, moved)
    with open_trace(clean) as ta, open_trace(moved) as tb:
        moved.unlink()
        rep = diff(ta, tb)
    assert rep.to_dict()["counts"] == json.loads(_report(clean, bad)[0])["counts"]


def test_closing_a_stream_early_reaps_the_reader(pair):
    clean, bad = pair
    with open_trace(clean) as ta, open_trace(bad) as tb:
        A, B = index_of(ta), index_of(tb)
        pids = []
        orig = _ForkedReader.start

        def spy(*a, **k):
            r = orig(*a, **k)
            pids.append(r.pid)
            return r

        _ForkedReader.start = spy
        try:
            it = stream_pair(A, B, "tensors", ta.n_rows("tensors"))
            s, xa, xb = next(it)
            assert s == 0 and xb.tobytes() == tb.read_rows("tensors", 0, len(xb)).tobytes()
            it.close()
        finally:
            _ForkedReader.start = orig
        assert len(pids) == 1 and pids[0] > 0
        with pytest.raises(ChildProcessError):
            os.waitpid(pids[0], os.WNOHANG)      # already reaped: no zombie left behind
