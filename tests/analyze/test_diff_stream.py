"""``diff`` streams the two big tables (tensors, reshapes) block by block, the second half of a
big table in a forked worker. These tests check that streaming changes nothing in the results,
that the tables are never loaded whole, that the forked worker fails safe and that its child is
always reaped; and that the index of a trace is cached by the analysis layer, not on the trace."""

from __future__ import annotations

import json
import os
import shutil

import pytest


from vlmscope.testing import make_trace
from vlmscope.analyze import stream as stream_mod
from vlmscope.analyze._index import index_of
from vlmscope.analyze.diff import diff
from vlmscope.analyze.stream import stream_pair
from vlmscope.analyze.worker import ForkedWorker
from vlmscope.trace import open_trace

# big enough for many stream blocks of every table (so the forked worker runs)
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
    orig = stream_mod.HalfWorker.start

    def spy(*a, **k):
        w = orig(*a, **k)
        started.append(w is not None)
        return w

    monkeypatch.setattr(stream_mod.HalfWorker, "start", spy)
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


def _spy_workers(monkeypatch) -> tuple[list[int], list[bool]]:
    """Record the child's pid of each HalfWorker started, and what each join() answered."""
    pids: list[int] = []
    joins: list[bool] = []
    orig_start, orig_join = stream_mod.HalfWorker.start, ForkedWorker.join

    def start(*a, **k):
        w = orig_start(*a, **k)
        pids.append(w.pid if w is not None else -1)
        return w

    def join(self):
        ok = orig_join(self)
        joins.append(ok)
        return ok

    monkeypatch.setattr(stream_mod.HalfWorker, "start", start)
    monkeypatch.setattr(ForkedWorker, "join", join)
    return pids, joins


def test_the_forked_worker_fails_safe(pair, tmp_path, monkeypatch):
    clean, bad = pair
    expected = json.loads(_report(clean, bad)[0])["counts"]
    pids, joins = _spy_workers(monkeypatch)
    # trace B's file disappears after it was opened: the child cannot open it, and the
    # parent streams the child's half itself through its open handles
    moved = tmp_path / "bad.h5"
    shutil.copy(bad, moved)
    with open_trace(clean) as ta, open_trace(moved) as tb:
        moved.unlink()
        rep = diff(ta, tb)
    assert pids and all(p > 0 for p in pids)   # the child was forked...
    assert joins == [False] * len(pids)        # ... and failed
    assert rep.to_dict()["counts"] == expected


def test_the_forked_worker_is_always_reaped(pair, monkeypatch):
    clean, bad = pair
    pids, joins = _spy_workers(monkeypatch)
    diff(clean, bad)                             # the child finishes
    assert len(pids) == 1 and pids[0] > 0 and joins == [True]

    def broken(*a, **k):
        raise OSError("the parent's half failed")

    monkeypatch.setattr(stream_mod, "trace_blocks", broken)
    with pytest.raises(OSError):
        diff(clean, bad)                         # the parent fails while the child runs
    assert len(pids) == 2 and pids[1] > 0
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)          # reaped: no zombie left behind


def test_stream_pair_reads_both_traces_in_lockstep(pair):
    clean, bad = pair
    with open_trace(clean) as ta, open_trace(bad) as tb:
        A, B = index_of(ta), index_of(tb)
        n = ta.n_rows("tensors")
        starts = []
        for s, xa, xb in stream_pair(A, B, "tensors", n):
            assert xa.tobytes() == ta.read_rows("tensors", s, s + len(xa)).tobytes()
            assert xb.tobytes() == tb.read_rows("tensors", s, s + len(xb)).tobytes()
            starts.append(s)
        assert len(starts) > 8 and starts[0] == 0 and starts[-1] + len(xa) == n
        assert not ta.is_loaded("tensors") and not tb.is_loaded("tensors")


def test_the_index_is_cached_in_the_analysis_layer(pair):
    import gc
    import weakref

    clean, _ = pair
    t = open_trace(clean)
    ix = index_of(t)
    assert index_of(t) is ix
    held = [*vars(t).values(), *t._cache.values()]
    assert not any(v is ix for v in held)                    # the trace itself holds no analysis state
    ref = weakref.ref(ix)
    t.close()
    del t, ix
    gc.collect()
    assert ref() is None                         # released with its trace
