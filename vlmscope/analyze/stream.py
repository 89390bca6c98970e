"""Streaming reads of the two big tables (tensors, reshapes) of two traces, block by block.

``diff`` never loads those tables whole: a streamed pass reads both traces' rows in lockstep,
keeps only a few compact columns of each (:data:`COMPACT_FIELDS`, served afterwards by
:meth:`TraceIndex.col <vlmscope.analyze._index.TraceIndex.col>`), finds the leading rows that
pair up row for row and gives those their status on the spot (:func:`stream_table`).

Decompression is most of such a pass, so the second half of the rows of a big table is done by
a forked process (:class:`HalfWorker`, on :mod:`.worker`), next to this one. If the child
fails, this process does that half too; ``VLMSCOPE_NO_FORK=1`` keeps everything in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from vlmscope.trace import Trace

from .worker import ForkedWorker, fork_allowed

if TYPE_CHECKING:
    from ._index import TraceIndex

#: Columns of the two big tables that analyses use across all rows. A pass that streams a
#: table keeps just these, as plain contiguous arrays (event ids as int32: 13 and 32 bytes a
#: row instead of 158 and 191): the keys that match rows, their times and modules. So
#: ``diff`` never holds the tables whole.
COMPACT_FIELDS = {"tensors": ("step", "event", "role", "name"),
                  "reshapes": ("step", "seq", "event", "module", "op", "nth", "site_file", "site_line")}

#: Bytes per block (per trace) when streaming a table: whole chunks (so HDF5 decompresses
#: straight into the buffer), few enough that both traces' blocks stay in the CPU cache for
#: the passes over them.
STREAM_BYTES = 2 << 20

#: Rows per block of the passes over whole tables: a block of each trace stays in cache.
BLOCK_ROWS = 1 << 15

#: ``(field, lut)``: a key field that must agree row for row; A's values go through ``lut`` (a
#: string-id translation into B's ids) when it is not None.
Keys = list[tuple[str, "np.ndarray | None"]]


def compact_columns(ix: "TraceIndex", table: str, n: int) -> dict[str, np.ndarray]:
    """Empty compact columns for ``n`` rows of ``table``."""
    full = ix.trace.dataset_dtype(table)
    small_events = ix.trace.n_rows("events") < 2**31
    return {f: np.empty(n, np.int32 if f == "event" and small_events else full.fields[f][0])
            for f in COMPACT_FIELDS[table]}


# ============================================================================ block readers


def block_reader(trace: Trace, table: str, cap: int):
    """``read(start, stop)``: rows of a table, as a slice of it when it is loaded whole, else
    read into one reused buffer of ``cap`` rows (each call overwrites the previous block)."""
    if trace.is_loaded(table):
        whole = trace.table(table)
        return lambda s, e: whole[s:e]
    buf = np.empty(cap, trace.dataset_dtype(table))
    return lambda s, e: trace.read_rows(table, s, e, buf)


def dataset_reader(ds, cap: int, check: Callable[[np.ndarray, int], None] | None = None):
    """:func:`block_reader` on an open h5py dataset (a forked process opens its own files);
    ``check(rows, start)`` checks each block (:meth:`Trace.row_checker
    <vlmscope.trace.Trace.row_checker>`)."""
    buf = np.empty(cap, ds.dtype)

    def read(s: int, e: int) -> np.ndarray:
        ds.read_direct(buf, np.s_[s:e], np.s_[0:e - s])
        if check is not None:
            check(buf[:e - s], s)
        return buf[:e - s]

    return read


def paired_blocks(read_a, read_b, lo: int, hi: int, rows: int, base: int = 0):
    """Yield ``(start - base, block_a, block_b)`` for rows ``[lo, hi)`` in blocks of ``rows``."""
    for s in range(lo, hi, rows):
        e = min(hi, s + rows)
        yield s - base, read_a(s, e), read_b(s, e)


def trace_blocks(A: "TraceIndex", B: "TraceIndex", table: str, lo: int, hi: int, rows: int):
    """Blocks of rows ``[lo, hi)`` of both traces, read in this process."""
    cap = min(rows, hi - lo)
    return paired_blocks(block_reader(A.trace, table, cap), block_reader(B.trace, table, cap), lo, hi, rows)


def stream_pair(A: "TraceIndex", B: "TraceIndex", table: str, n: int, rows: int | None = None):
    """Blocks ``(start, block_a, block_b)``: rows ``[start, start + len)`` of both traces' table,
    in lockstep, for the first ``n`` rows. A table not already loaded is read block by block
    into a buffer that the next block overwrites: use each block before asking for the next.

    All in this process: forking a reader of trace B's blocks costs more than it saves on the
    tables this serves (those too small for a :class:`HalfWorker`)."""
    if rows is None:
        rows = max(A.trace.stream_rows(table, STREAM_BYTES), B.trace.stream_rows(table, STREAM_BYTES))
    return trace_blocks(A, B, table, 0, max(n, 0), rows)


# ============================================================================ the streamed pass


def block_prefix(xa: np.ndarray, xb: np.ndarray, p_e: int, keys: Keys) -> int:
    """How many leading rows of two blocks (same start row) pair up row for row: the same event
    row inside the events' row-for-row prefix (its first ``p_e`` rows, where event row i of A
    is aligned with event row i of B), or both outside any module in the same step; and equal
    key fields (see :data:`Keys`)."""
    n = min(len(xa), len(xb))
    xa, xb = xa[:n], xb[:n]
    ea, eb = xa["event"], xb["event"]
    eq = (ea == eb) & (ea < p_e)
    outside = ea < 0
    if outside.any():
        eq &= ~outside | (xa["step"] == xb["step"])
    for name, lut in keys:
        x = xa[name]
        eq &= (lut[x] if lut is not None else x) == xb[name]
    return n if eq.all() else int(np.argmin(eq))


def child_prefix(A: "TraceIndex", B: "TraceIndex", table: str, p_e: int, keys: Keys) -> int:
    """Length of the leading run of rows of ``table`` that pair up row for row (see
    :func:`block_prefix`). Two traces of one structure agree on almost every row, so only the
    rows after this prefix need keys, sorting and matching."""
    n = min(A.n_rows(table), B.n_rows(table))
    for s, xa, xb in stream_pair(A, B, table, n):
        q = block_prefix(xa, xb, p_e, keys)
        if q < len(xa):
            return s + q
    return n


#: ``(rows_a, rows_b) -> (status, rows needing more)``: the status of rows paired row for row
BlockStatus = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]

#: ``(rows, side) -> {name: values}``: columns a pass derives from every row of trace A (side
#: 0) or B (side 1) while it streams them, for the rows that do not pair up row for row (their
#: status then needs no second read of the table). They belong to the pass, not to the index:
#: A's may depend on B (its string ids translated into B's).
Derive = Callable[[np.ndarray, int], "dict[str, np.ndarray]"]


@dataclass
class StreamPass:
    """What a streaming pass over one table matches on and where it writes (see
    :func:`stream_table`): compact columns of both traces, the status of the row-for-row
    prefix, and the prefix rows that need more."""

    p_e: int                      # events' row-for-row prefix
    keys: Keys                    # fields that must agree row for row
    block_status: BlockStatus
    ca: dict                      # compact columns of A (field -> array)
    cb: dict
    status: np.ndarray
    more: list = field(default_factory=list)
    derive: "Derive | None" = None
    da: dict = field(default_factory=dict)   # derived columns of A (name -> array), see Derive
    db: dict = field(default_factory=dict)

    def run(self, blocks) -> int | None:
        """Consume ``blocks`` (``(start, rows_a, rows_b)``): copy the compact columns, and while
        the rows pair up row for row, their status; from the first row that does not (returned,
        in the blocks' numbering, or None) on, the derived columns (:data:`Derive`)."""
        p0 = None
        for s, xa, xb in blocks:
            e = s + len(xa)
            for f in self.ca:
                self.ca[f][s:e] = xa[f]
                self.cb[f][s:e] = xb[f]
            if p0 is not None:
                self._derive(s, xa, xb)
                continue
            q = block_prefix(xa, xb, self.p_e, self.keys)
            for b0 in range(0, q, BLOCK_ROWS):         # in cache-sized pieces
                b1 = min(q, b0 + BLOCK_ROWS)
                st, m = self.block_status(xa[b0:b1], xb[b0:b1])
                self.status[s + b0:s + b1] = st
                self.more.append(m + s + b0)
            if q < e - s:
                p0 = s + q
                self._derive(p0, xa[q:], xb[q:])
        return p0

    def _derive(self, s: int, xa: np.ndarray, xb: np.ndarray) -> None:
        """The derived columns of rows ``[s, s + len)`` of both traces."""
        if self.derive is None:
            return
        for side, x, d in ((0, xa, self.da), (1, xb, self.db)):
            for f, v in self.derive(x, side).items():
                d[f][s:s + len(x)] = v


class HalfWorker:
    """Streams rows ``[lo, n)`` of both traces' table in a forked child (a
    :class:`ForkedWorker`; see :func:`stream_table`), which leaves its results (compact columns,
    statuses, rows needing more, its first unpaired row) in shared arrays. If the child fails,
    :meth:`join` does its half here."""

    def __init__(self, A: "TraceIndex", B: "TraceIndex", table: str, lo: int, n: int, rows: int, out: StreamPass):
        self.A, self.B, self.table, self.lo, self.n, self.rows = A, B, table, lo, n, rows
        self.worker = ForkedWorker()
        m = n - lo
        shared = self.worker.shared
        # the child's StreamPass: the same matching, its outputs in shared memory (rows from lo)
        self.out = StreamPass(out.p_e, out.keys, out.block_status,
                              {f: shared(c.dtype, m) for f, c in out.ca.items()},
                              {f: shared(c.dtype, m) for f, c in out.cb.items()}, shared(np.int8, m),
                              [np.zeros(0, np.int64)], out.derive,
                              {f: shared(c.dtype, m) for f, c in out.da.items()},
                              {f: shared(c.dtype, m) for f, c in out.db.items()})
        self.more = shared(np.int64, m)
        self.head = shared(np.int64, 2)          # [number of rows in ``more``, first unpaired row or -1]
        # the child checks every row it reads, as the parent's reads are checked (a damaged row
        # fails the child, and the parent then does the half itself and reports it)
        self.check_a, self.check_b = A.trace.row_checker(table), B.trace.row_checker(table)
        # and opens the files by their paths: they must still be the files the traces have open
        self.ids = A.trace.file_identity(), B.trace.file_identity()

    @property
    def pid(self) -> int:
        """The child's process id (-1 once it is reaped)."""
        return self.worker.pid

    @classmethod
    def start(cls, A: "TraceIndex", B: "TraceIndex", table: str, n: int, rows: int,
              out: StreamPass) -> "HalfWorker | None":
        """A worker whose child streams the second half (whole blocks), or None."""
        if not fork_allowed() or A.trace.is_loaded(table) or B.trace.is_loaded(table) or \
                A.trace.file_identity() is None or B.trace.file_identity() is None:   # not files on disk
            return None
        lo = (n // 2 // rows) * rows
        try:
            self = cls(A, B, table, lo, n, rows, out)
        except OSError:             # no shared memory
            return None
        return self if self.worker.start(self._stream_half) else None

    def _stream_half(self) -> None:  # pragma: no cover - runs in the forked process
        from vlmscope.trace import open_same_file

        cap = min(self.rows, self.n - self.lo)
        with open_same_file(self.A.trace.path, self.ids[0]) as fa, open_same_file(self.B.trace.path, self.ids[1]) as fb:
            q = self.out.run(paired_blocks(dataset_reader(fa[self.table], cap, self.check_a),
                                           dataset_reader(fb[self.table], cap, self.check_b),
                                           self.lo, self.n, self.rows, base=self.lo))
            mr = np.concatenate(self.out.more)
            self.more[:len(mr)] = mr
            self.head[0] = len(mr)
            self.head[1] = -1 if q is None else q

    def join(self, out: StreamPass) -> int | None:
        """Wait for the child and take its results into ``out`` (or do its half here if it
        failed); returns the first unpaired row of the half (absolute), or None."""
        lo, n = self.lo, self.n
        if not self.worker.join():
            return out.run(trace_blocks(self.A, self.B, self.table, lo, n, self.rows))
        for f in out.ca:
            out.ca[f][lo:n] = self.out.ca[f]
            out.cb[f][lo:n] = self.out.cb[f]
        for f in out.da:
            out.da[f][lo:n] = self.out.da[f]
            out.db[f][lo:n] = self.out.db[f]
        out.status[lo:n] = self.out.status
        out.more.append(self.more[:int(self.head[0])] + lo)
        q = int(self.head[1])
        return None if q < 0 else q + lo

    def close(self) -> None:
        self.worker.close()


def stream_table(A: "TraceIndex", B: "TraceIndex", table: str, p_e: int, keys: Keys,
                 block_status: BlockStatus, derive: "tuple[Derive, dict[str, np.dtype]] | None" = None
                 ) -> tuple[int, np.ndarray, np.ndarray, dict, dict]:
    """One pass over both traces' ``table`` (tensors or reshapes), block by block: keeps each
    trace's compact columns (:data:`COMPACT_FIELDS`, handed to the indexes), finds the
    row-for-row prefix and, for its rows, the status with ``block_status``.

    Returns (prefix length, status of the prefix rows, prefix rows needing more, derived columns
    of A, of B). The tables are never held whole: what stays is about a tenth of their size.
    ``derive``: a :data:`Derive` function and the dtypes of its columns, computed for the rows
    from the prefix's end on (without it, the derived columns are empty).

    Big tables (8 blocks and more) are cut in two: a :class:`HalfWorker` does the second half of
    the rows of both traces while this process does the first, so that the pass uses both of a
    small machine's cores. Smaller ones are read here (:func:`stream_pair`)."""
    na, nb = A.n_rows(table), B.n_rows(table)
    n = min(na, nb)
    fn, dts = derive if derive is not None else (None, {})
    out = StreamPass(p_e, keys, block_status, compact_columns(A, table, na), compact_columns(B, table, nb),
                     np.zeros(n, np.int8), [np.zeros(0, np.int64)], fn,
                     {f: np.empty(na, dt) for f, dt in dts.items()}, {f: np.empty(nb, dt) for f, dt in dts.items()})
    rows = max(A.trace.stream_rows(table, STREAM_BYTES), B.trace.stream_rows(table, STREAM_BYTES))
    worker = HalfWorker.start(A, B, table, n, rows, out) if n >= 8 * rows else None
    if worker is None:
        p0 = out.run(stream_pair(A, B, table, n))
    else:
        try:
            p0 = out.run(trace_blocks(A, B, table, 0, worker.lo, rows))
            p1 = worker.join(out)
        finally:
            worker.close()      # reaps the child even when this half failed
        if p0 is None:
            p0 = p1
        elif fn is not None and (p1 is None or p1 > worker.lo):
            # the second half derived only from its own first unpaired row on: derive the
            # rows before it too (they follow the prefix the first half found)
            for s, xa, xb in trace_blocks(A, B, table, worker.lo, n if p1 is None else p1, rows):
                out._derive(s, xa, xb)
    p0 = n if p0 is None else p0
    for side, ix, c, d, m in ((0, A, out.ca, out.da, na), (1, B, out.cb, out.db, nb)):
        if m > n:
            rest = ix.rows(table, slice(n, m))
            for f in c:
                c[f][n:] = rest[f]
            if fn is not None:
                for f, v in fn(rest, side).items():
                    d[f][n:] = v
        ix.set_compact(table, c)
    more_rows = np.concatenate(out.more)
    return p0, out.status[:p0], more_rows[more_rows < p0], out.da, out.db
