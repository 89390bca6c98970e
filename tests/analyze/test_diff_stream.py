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


def _small_blocks_forked(monkeypatch) -> list[tuple[str, bool]]:
    """Stream in blocks small enough that the second half of every table is forked off; the
    returned list fills with (table, whether a child was started) per streamed pass."""
    monkeypatch.setattr(stream_mod, "STREAM_BYTES", 1 << 19)
    forked: list[tuple[str, bool]] = []
    orig = stream_mod.HalfWorker.start

    def spy(A, B, table, *a, **k):
        w = orig(A, B, table, *a, **k)
        forked.append((table, w is not None))
        return w

    monkeypatch.setattr(stream_mod.HalfWorker, "start", spy)
    return forked


def _tail_statuses(clean, edited, monkeypatch):
    """(A rows, B rows, status) of the paired reshape rows, and reshape_status of those rows;
    the reshapes streamed in blocks small enough that their second half is forked off."""
    from vlmscope.analyze.align import align
    from vlmscope.analyze.compare import reshape_status
    from vlmscope.analyze.match import translate_strings

    forked = _small_blocks_forked(monkeypatch)
    r = align(clean, edited).reshapes
    assert ("reshapes", True) in forked
    both = (r.a >= 0) & (r.b >= 0)
    ia, ib, st = r.a[both], r.b[both], r.status[both]
    with open_trace(clean) as ta, open_trace(edited) as tb:
        tr = translate_strings(index_of(ta), index_of(tb))
        want = reshape_status(ta.table("reshapes")[ia], tb.table("reshapes")[ib], tr)
    return ia, ib, st, want


def _edit_reshape(f, r: int, **fields) -> None:
    import numpy as np

    rs = f["reshapes"]
    row = rs[r]
    for k, v in fields.items():
        if k == "out_shape":
            row["out_shape"][0] += 1
        elif k == "args":                         # an argument string of another op
            others = np.unique(rs["args"][max(0, r - 200):r + 200])
            row["args"] = int(others[others != row["args"]][0])
        else:
            row[k] = v
    rs[r] = row


def test_reshape_status_after_the_row_for_row_prefix_is_the_rows_own(pair, tmp_path, monkeypatch):
    """Rows that stop pairing up row for row (a cache grown twice shifts every later row) get
    their status from fingerprints taken while streaming, not from a second read. That status
    is ``reshape_status`` of the two rows, for every pair: here with one op's arguments changed
    (drift) and one output shape changed (shape) after the prefix, in the forked half too."""
    import h5py
    import numpy as np

    from vlmscope.analyze.compare import DRIFT, SHAPE

    clean, bad = pair
    edited = tmp_path / "edited.h5"
    shutil.copy(bad, edited)
    with h5py.File(edited, "r+") as f:
        steps = f["reshapes"]["step"]
        late = np.nonzero(steps >= steps.max() - 2)[0]       # the last steps: in the forked half
        r_args, r_shape, r_dtype, r_out = int(late[3]), int(late[40]), int(late[60]), int(late[80])
        _edit_reshape(f, r_args, args=True)
        _edit_reshape(f, r_shape, out_shape=True)
        # the same mechanism through other fields: an input dtype string, an output count
        _edit_reshape(f, r_dtype, in_dtypes=int(f["reshapes"][r_dtype]["op"]))
        _edit_reshape(f, r_out, n_out=int(f["reshapes"][r_out]["n_out"]) + 1)
    ia, ib, st, want = _tail_statuses(clean, edited, monkeypatch)
    assert np.array_equal(st, want)
    assert st[ib == r_args][0] == DRIFT and st[ib == r_shape][0] == SHAPE
    assert st[ib == r_dtype][0] == SHAPE and st[ib == r_out][0] == SHAPE
    # both edits sit after the row-for-row prefix: their rows pair at other row numbers
    assert ia[ib == r_args][0] != r_args and ia[ib == r_shape][0] != r_shape


def test_reshape_status_when_only_the_first_half_stops_pairing_row_for_row(pair, tmp_path, monkeypatch):
    """One op renamed early ends the row-for-row prefix in the first half, while the forked
    second half still pairs row for row from its start: its rows get their fingerprints after
    the pass, and their status is still the rows' own (a drift and a shape there)."""
    import h5py
    import numpy as np

    from vlmscope.analyze.compare import DRIFT, SHAPE

    clean, _ = pair
    edited = tmp_path / "renamed.h5"
    shutil.copy(clean, edited)
    with h5py.File(edited, "r+") as f:
        rs = f["reshapes"]
        n = len(rs)
        ops = np.unique(rs["op"][:1000])
        r_op = 500
        _edit_reshape(f, r_op, op=int(ops[ops != rs[r_op]["op"]][0]))
        r_args, r_shape = n - 300, n - 100                 # late: in the forked half
        _edit_reshape(f, r_args, args=True)
        _edit_reshape(f, r_shape, out_shape=True)
    ia, ib, st, want = _tail_statuses(clean, edited, monkeypatch)
    assert np.array_equal(st, want)
    assert st[ib == r_args][0] == DRIFT and st[ib == r_shape][0] == SHAPE


# ------------------------------------------------------------------ tables read by a helper


def test_diff_with_prefetched_tables_equals_diff_without(pair, monkeypatch):
    """``diff`` has a forked helper read the probe and sketch tables of big traces while it
    works on; the report is the same as without it, the helper is reaped, and the tables came
    from it."""
    from vlmscope.analyze import worker as worker_mod

    clean, bad = pair
    without = _report(clean, bad)[0]
    monkeypatch.setattr(worker_mod, "PREFETCH_MIN_BYTES", 0)
    started, pids, supplied = [], [], []
    orig_start, orig_result = worker_mod.TablePrefetch.start, worker_mod.TablePrefetch._result

    def spy_start(self):
        ok = orig_start(self)
        started.append((ok, sorted({n for _, n, _ in self.items})))
        pids.append(self.worker.pid)
        return ok

    def spy_result(self, arr):
        got = orig_result(self, arr)
        supplied.append(got is not None)
        return got

    monkeypatch.setattr(worker_mod.TablePrefetch, "start", spy_start)
    monkeypatch.setattr(worker_mod.TablePrefetch, "_result", spy_result)
    with_pf = _report(clean, bad)[0]
    assert started == [(True, ["probe_data", "probes", "sketches"])]
    assert len(supplied) == 6 and all(supplied)     # 3 tables of each trace came from the helper
    assert with_pf == without
    for pid in pids:                                # reaped: no such child any more
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_prefetched_rows_are_checked_like_rows_read_here(pair, tmp_path):
    """A damaged probe row is reported the same whether the trace read its table or the helper did."""
    import h5py

    from vlmscope.analyze.worker import TablePrefetch
    from vlmscope.trace import TraceError

    clean, _ = pair
    bad = tmp_path / "bad_probe.h5"
    shutil.copy(clean, bad)
    with h5py.File(bad, "r+") as f:
        row = f["probes"][3]
        row["data_off"] = 1 << 40
        f["probes"][3] = row
    messages = []
    for prefetch in (False, True):
        with open_trace(bad) as t:
            pre = TablePrefetch([t], min_bytes=0)
            if prefetch:
                assert pre.start()
            try:
                with pytest.raises(TraceError) as e:
                    t.table("probes")
                messages.append(str(e.value))
            finally:
                pre.close()
    assert messages[0] == messages[1] and "probe" in messages[0]


def test_a_failed_or_closed_helper_leaves_the_reading_to_the_trace(pair, monkeypatch):
    import numpy as np

    from vlmscope.analyze import worker as worker_mod
    from vlmscope.analyze.worker import TablePrefetch

    clean, _ = pair
    with open_trace(clean) as t:
        want = t.table("probes").copy()
    # the child fails: the trace reads the table itself
    monkeypatch.setattr(TablePrefetch, "_read", lambda self: (_ for _ in ()).throw(OSError("disk")))
    with open_trace(clean) as t:
        pre = TablePrefetch([t], min_bytes=0)
        assert pre.start()
        assert np.array_equal(t.table("probes"), want)
        assert pre._ok is False
        pre.close()
    monkeypatch.undo()
    # closed before anything was asked: the trace forgets the helper and reads the table itself
    with open_trace(clean) as t:
        pre = TablePrefetch([t], min_bytes=0)
        assert pre.start()
        pre.close()
        assert pre.worker.pid == -1
        assert np.array_equal(t.table("probes"), want)
    # small traces are not worth a helper
    with open_trace(clean) as t:
        assert not TablePrefetch([t]).start()
    assert worker_mod.PREFETCH_MIN_BYTES > 0


@pytest.mark.parametrize("table, field", [("reshapes", "args"), ("reshapes", "in_shapes"), ("tensors", "name")])
def test_a_damaged_row_in_the_forked_half_is_reported_as_without_the_fork(pair, tmp_path, monkeypatch, table, field):
    """The forked half checks every row it reads, as the parent's reads are checked: a damaged
    string id in the second half of a table is the same one-line error with or without the fork
    (the child fails, and the parent reads that half itself)."""
    import h5py

    from vlmscope.analyze.align import align
    from vlmscope.trace import TraceError

    clean, bad = pair
    damaged = tmp_path / "damaged.h5"
    shutil.copy(bad, damaged)
    with h5py.File(clean, "r") as f:
        n_clean = len(f[table])
    with h5py.File(damaged, "r+") as f:
        ds = f[table]
        r = min(len(ds), n_clean) * 4 // 5          # late, in both traces' rows: the forked half
        row = ds[r]
        row[field] = 10**9
        ds[r] = row
    forked = _small_blocks_forked(monkeypatch)
    messages = []
    for no_fork in ("", "1"):
        monkeypatch.setenv("VLMSCOPE_NO_FORK", no_fork) if no_fork else monkeypatch.delenv("VLMSCOPE_NO_FORK", raising=False)
        with pytest.raises(TraceError) as e:
            align(clean, damaged)
        messages.append(str(e.value))
    assert (table, True) in forked
    assert messages[0] == messages[1] and f"{table} row {r:,}" in messages[0] and "string" in messages[0]


def test_the_helpers_read_the_files_the_traces_have_open(pair, tmp_path, monkeypatch):
    """The forked helpers open the trace files by their paths; a file put at a trace's path
    after it was opened is not read (they fail, and the parent reads its own open file)."""
    import h5py

    from vlmscope.analyze import worker as worker_mod

    clean, bad = pair
    a = tmp_path / "a.h5"
    shutil.copy(clean, a)
    other = tmp_path / "other.h5"
    shutil.copy(clean, other)
    with h5py.File(other, "r+") as f:        # the same rows, other values
        for name in ("tensors", "probes"):
            ds = f[name]
            rows = ds[:]
            rows["mean" if name == "tensors" else "info"] = rows["mean" if name == "tensors" else "info"][::-1]
            ds[:] = rows
    monkeypatch.setattr(stream_mod, "STREAM_BYTES", 1 << 19)
    monkeypatch.setattr(worker_mod, "PREFETCH_MIN_BYTES", 0)
    with open_trace(a) as ta, open_trace(bad) as tb:
        want = json.dumps(diff(ta, tb).to_dict(), sort_keys=True, default=str)
    with open_trace(a) as ta, open_trace(bad) as tb:
        os.replace(other, a)                 # another file at the path of the open trace
        got = json.dumps(diff(ta, tb).to_dict(), sort_keys=True, default=str)
    assert got == want
