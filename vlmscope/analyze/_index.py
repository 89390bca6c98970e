"""Derived, cached views of a trace shared by check, diff, expect and snapshot.

Everything is computed once per trace with numpy over whole tables; nothing here loops
over events in Python. Loops run over *distinct* values only (module paths, interned
strings, probe blobs), which stay small however long the trace is. The two big tables can
also be streamed (:func:`stream_pair`), keeping only compact columns (:meth:`TraceIndex.col`
serves them) and reading single rows through a small block cache (:meth:`TraceIndex.rows`).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import sys
import threading
import weakref
from functools import cached_property
from typing import Any

import numpy as np

from vlmscope.trace import ENC_NONE, ROLE_OUTPUT, Trace, TraceError, decode_probe

FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")
_LAYER_RE_CACHE: dict[str, re.Pattern] = {}


def _read_table(trace: Trace, name: str) -> np.ndarray:
    """A whole table (or the ``probe_data`` bytes), read once and cached on the trace."""
    return trace.table(name)


#: Columns of the two big tables that analyses use across all rows. A pass that streams a
#: table keeps just these, as plain contiguous arrays (event ids as int32: 13 and 32 bytes a
#: row instead of 158 and 191): the keys that match rows, their times and modules. So
#: ``diff`` never holds the tables whole.
COMPACT_FIELDS = {"tensors": ("step", "event", "role", "name"),
                  "reshapes": ("step", "seq", "event", "module", "op", "nth", "site_file", "site_line")}


def compact_columns(ix: "TraceIndex", table: str, n: int) -> dict[str, np.ndarray]:
    """Empty compact columns for ``n`` rows of ``table``."""
    full = ix.trace.dataset_dtype(table)
    small_events = ix.trace.n_rows("events") < 2**31
    return {f: np.empty(n, np.int32 if f == "event" and small_events else full.fields[f][0])
            for f in COMPACT_FIELDS[table]}


#: Bytes per block (per trace) when streaming a table: whole chunks (so HDF5 decompresses
#: straight into the buffer), few enough that both traces' blocks stay in the CPU cache for
#: the passes over them.
STREAM_BYTES = 2 << 20


def block_reader(trace: Trace, table: str, cap: int):
    """``read(start, stop)``: rows of a table, as a slice of it when it is loaded whole, else
    read into one reused buffer of ``cap`` rows (each call overwrites the previous block)."""
    if trace.is_loaded(table):
        whole = trace.table(table)
        return lambda s, e: whole[s:e]
    buf = np.empty(cap, trace.dataset_dtype(table))
    return lambda s, e: trace.read_rows(table, s, e, buf)


def dataset_reader(ds, cap: int):
    """:func:`block_reader` on an open h5py dataset (a forked process opens its own files)."""
    buf = np.empty(cap, ds.dtype)

    def read(s: int, e: int) -> np.ndarray:
        ds.read_direct(buf, np.s_[s:e], np.s_[0:e - s])
        return buf[:e - s]

    return read


def paired_blocks(read_a, read_b, lo: int, hi: int, rows: int, base: int = 0):
    """Yield ``(start - base, block_a, block_b)`` for rows ``[lo, hi)`` in blocks of ``rows``."""
    for s in range(lo, hi, rows):
        e = min(hi, s + rows)
        yield s - base, read_a(s, e), read_b(s, e)


def stream_pair(A: "TraceIndex", B: "TraceIndex", table: str, n: int, rows: int | None = None):
    """Yield ``(start, block_a, block_b)``: rows ``[start, start + len)`` of both traces' table,
    in lockstep, for the first ``n`` rows. A table not already loaded is read block by block
    into a buffer that the next block overwrites: use each block before asking for the next.

    When both tables are read from their files, trace B's blocks are decompressed by a forked
    reader process (see :class:`_ForkedReader`) while this one reads A's: decompression is
    most of a streaming pass, and h5py serialises it across threads."""
    if rows is None:
        rows = max(A.trace.stream_rows(table, STREAM_BYTES), B.trace.stream_rows(table, STREAM_BYTES))
    if n <= 0:
        return
    read_a = block_reader(A.trace, table, min(rows, n))
    reader = None
    if not A.trace.is_loaded(table) and not B.trace.is_loaded(table) and n >= 4 * rows:
        reader = _ForkedReader.start(B.trace, table, n, rows)
    if reader is None:
        yield from paired_blocks(read_a, block_reader(B.trace, table, min(rows, n)), 0, n, rows)
        return
    try:
        for k, s in enumerate(range(0, n, rows)):
            e = min(n, s + rows)
            yield s, read_a(s, e), reader.block(k, e - s)
            reader.release(k)
    finally:
        reader.close()


def fork_allowed() -> bool:
    """Whether a helper process may be forked: POSIX ``fork``, a single-threaded parent (no
    lock can be held across the fork) and ``VLMSCOPE_NO_FORK`` unset."""
    return (hasattr(os, "fork") and sys.platform != "win32" and threading.active_count() == 1
            and not os.environ.get("VLMSCOPE_NO_FORK"))


class _ForkedReader:
    """A child process that reads one table's blocks into a ring of shared buffers, ahead of
    the parent, which takes them in order (``block``) and hands each slot back (``release``).

    Started only where :func:`fork_allowed` says so and the table spans several blocks. The
    child opens the file afresh and leaves with ``os._exit``. Any failure in the child (or in starting it)
    makes the parent read the block itself: results never depend on the child."""

    SLOTS = 3

    def __init__(self, trace: Trace, table: str, n: int, rows: int):
        self.trace, self.table, self.n, self.rows = trace, table, n, rows
        self.dtype = trace.dataset_dtype(table)
        self.shm = mmap.mmap(-1, self.SLOTS * rows * self.dtype.itemsize)
        self.slots = np.frombuffer(self.shm, dtype=self.dtype).reshape(self.SLOTS, rows)
        self.ready_r, self.ready_w = os.pipe()
        self.free_r, self.free_w = os.pipe()
        self.pid = -1
        self.failed = False
        self.own = np.empty(rows, self.dtype)

    @classmethod
    def start(cls, trace: Trace, table: str, n: int, rows: int) -> "_ForkedReader | None":
        if not fork_allowed():
            return None
        try:
            self = cls(trace, table, n, rows)
            os.write(self.free_w, bytes(self.SLOTS))      # every slot starts free
            self.pid = os.fork()
        except OSError:
            return None
        if self.pid == 0:
            self._child()
        os.close(self.ready_w)
        os.close(self.free_r)
        return self

    def _child(self) -> None:  # pragma: no cover - runs in the forked process
        code = 1
        try:
            import h5py

            os.close(self.ready_r)
            os.close(self.free_w)
            with h5py.File(self.trace.path, "r") as f:
                ds = f[self.table]
                for k, s in enumerate(range(0, self.n, self.rows)):
                    e = min(self.n, s + self.rows)
                    if not os.read(self.free_r, 1):
                        break                                      # the parent went away
                    ds.read_direct(self.slots[k % self.SLOTS], np.s_[s:e], np.s_[0:e - s])
                    os.write(self.ready_w, b"\x01")
            code = 0
        except BaseException:  # noqa: BLE001
            try:
                os.write(self.ready_w, b"\x00")                   # tell the parent: read it yourself
            except OSError:
                pass
        finally:
            os._exit(code)

    def block(self, k: int, count: int) -> np.ndarray:
        """Block ``k`` (``count`` rows): from the child's slot, or read here if the child failed."""
        if not self.failed:
            tok = os.read(self.ready_r, 1)
            if tok == b"\x01":
                return self.slots[k % self.SLOTS][:count]
            self.failed = True
        s = k * self.rows
        return self.trace.read_rows(self.table, s, s + count, self.own)

    def release(self, k: int) -> None:
        if not self.failed:
            try:
                os.write(self.free_w, b"\x01")
            except OSError:
                self.failed = True

    def close(self) -> None:
        for fd in (self.ready_r, self.free_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.pid > 0:
            try:
                os.kill(self.pid, 9)
            except OSError:
                pass
            try:
                os.waitpid(self.pid, 0)
            except OSError:
                pass
            self.pid = -1


class TraceIndex:
    """Cached derived arrays of one trace."""

    def __init__(self, trace: Trace):
        # a weak reference: the index is cached on the trace itself, and a cycle would keep
        # the trace's (large) tables alive until the cyclic garbage collector runs
        self._trace_ref = weakref.ref(trace)

    @property
    def trace(self) -> Trace:
        t = self._trace_ref()
        if t is None:  # pragma: no cover - the index outlived its trace
            raise TraceError("the trace of this index was closed and released")
        return t

    # ---- tables -------------------------------------------------------------
    @cached_property
    def steps(self) -> np.ndarray:
        return _read_table(self.trace, "steps")

    @cached_property
    def events(self) -> np.ndarray:
        return _read_table(self.trace, "events")

    @cached_property
    def tensors(self) -> np.ndarray:
        return _read_table(self.trace, "tensors")

    @cached_property
    def reshapes(self) -> np.ndarray:
        return _read_table(self.trace, "reshapes")

    @cached_property
    def probes(self) -> np.ndarray:
        return _read_table(self.trace, "probes")

    @cached_property
    def modules(self) -> np.ndarray:
        return _read_table(self.trace, "modules")

    @cached_property
    def strings(self) -> np.ndarray:
        return self.trace.strings

    def sid(self, s: str) -> int:
        return self.trace.string_id(s)

    def s(self, i: int) -> str:
        return self.trace.s(int(i))

    @cached_property
    def meta(self) -> dict:
        return self.trace.meta

    @cached_property
    def config(self) -> dict:
        return self.trace.config

    @cached_property
    def family(self) -> str:
        """Model family: ``meta.family``, else the config's ``model_type`` (``qwen2_vl``, ``mqwen``...)."""
        fam = self.meta.get("family") or (self.config or {}).get("model_type") or ""
        return str(fam)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    # ---- modules --------------------------------------------------------------
    @cached_property
    def module_paths(self) -> np.ndarray:
        """Path string per module row (object array)."""
        m = self.modules
        return self.strings[m["path"]] if len(m) else np.array([], dtype=object)

    @cached_property
    def module_classes(self) -> np.ndarray:
        m = self.modules
        return self.strings[m["cls"]] if len(m) else np.array([], dtype=object)

    def module_path(self, m: int) -> str:
        return str(self.module_paths[m]) if 0 <= m < len(self.module_paths) else ""

    def modules_under(self, prefix: str | None) -> np.ndarray:
        """Bool per module: the module is ``prefix`` or lies below it."""
        paths = self.module_paths
        if prefix is None:
            return np.zeros(len(paths), bool)
        if prefix == "":
            return np.ones(len(paths), bool)
        return np.array([p == prefix or p.startswith(prefix + ".") for p in paths], bool)

    @cached_property
    def decoder_layers_path(self) -> str | None:
        p = self.meta.get("decoder_layers")
        if p:
            return str(p)
        # Fallback: the ModuleList whose numbered children look like decoder blocks.
        paths, classes = self.module_paths, self.module_classes
        best, best_n = None, 0
        counts: dict[str, int] = {}
        for path, cls in zip(paths, classes):
            m = re.match(r"^(.*)\.(\d+)$", path)
            if m and re.search(r"(Decoder|Block|Layer)", cls) and "vis" not in path.lower():
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        for k, n in counts.items():
            if n > best_n:
                best, best_n = k, n
        return best

    @cached_property
    def layer_of_module(self) -> np.ndarray:
        """Decoder-layer index of each module that *is* a decoder layer, else -1."""
        out = np.full(len(self.module_paths), -1, np.int64)
        dl = self.decoder_layers_path
        if not dl:
            return out
        pat = re.compile(r"^" + re.escape(dl) + r"\.(\d+)$")
        for i, p in enumerate(self.module_paths):
            m = pat.match(p)
            if m:
                out[i] = int(m.group(1))
        return out

    @cached_property
    def layer_under_module(self) -> np.ndarray:
        """Decoder-layer index of each module inside (or equal to) a decoder layer, else -1."""
        out = np.full(len(self.module_paths), -1, np.int64)
        dl = self.decoder_layers_path
        if not dl:
            return out
        pat = re.compile(r"^" + re.escape(dl) + r"\.(\d+)(\.|$)")
        for i, p in enumerate(self.module_paths):
            m = pat.match(p)
            if m:
                out[i] = int(m.group(1))
        return out

    @cached_property
    def layer_paths(self) -> dict[int, str]:
        lo = self.layer_of_module
        return {int(lo[i]): str(self.module_paths[i]) for i in np.nonzero(lo >= 0)[0]}

    @cached_property
    def text_model_path(self) -> str | None:
        p = self.meta.get("text_model")
        if p is not None:
            return str(p)
        dl = self.decoder_layers_path
        return dl.rsplit(".", 1)[0] if dl and "." in dl else None

    @cached_property
    def vision_path(self) -> str | None:
        p = self.meta.get("vision_model")
        return str(p) if p else None

    @cached_property
    def in_vision(self) -> np.ndarray:
        return self.modules_under(self.vision_path)

    @cached_property
    def in_text(self) -> np.ndarray:
        """Modules of the language side: under the text model (or anywhere outside vision)."""
        tm = self.text_model_path
        if tm:
            inside = self.modules_under(tm)
            if inside.any():
                return inside
        return ~self.in_vision

    @cached_property
    def text_model_module(self) -> int:
        tm = self.text_model_path
        if tm is None:
            return -1
        hits = np.nonzero(self.module_paths == tm)[0]
        return int(hits[0]) if len(hits) else -1

    # ---- strings -------------------------------------------------------------
    @cached_property
    def is_float_dtype_id(self) -> np.ndarray:
        """Bool per string id: the string names a floating dtype."""
        fl = set(FLOAT_DTYPES) | {"torch." + x for x in FLOAT_DTYPES}
        return np.fromiter((s in fl for s in self.strings), bool, count=len(self.strings))

    @cached_property
    def is_mask_name_id(self) -> np.ndarray:
        return np.array(["mask" in str(s) for s in self.strings], bool)

    # ---- probes ----------------------------------------------------------------
    @cached_property
    def probe_data(self) -> np.ndarray:
        return _read_table(self.trace, "probe_data")

    @cached_property
    def _probe_groups(self) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Probe rows grouped by kind id (in row order), and a text-side flag per probe row."""
        p = self.probes
        if not len(p):
            return {}, np.zeros(0, bool)
        kind = p["kind"]
        o = np.argsort(kind, kind="stable")
        ks = kind[o]
        cuts = np.nonzero(np.r_[True, ks[1:] != ks[:-1]])[0]
        ends = np.r_[cuts[1:], len(ks)]
        groups = {int(ks[a]): o[a:b] for a, b in zip(cuts, ends)}
        mod = p["module"]
        text = np.zeros(len(p), bool)
        valid = mod >= 0
        text[valid] = self.in_text[mod[valid]]
        return groups, text

    def probe_rows(self, kind: str, *, text_only: bool = True) -> np.ndarray:
        """Row indices (global, in order) of the probes of ``kind`` (on the text side by default)."""
        kid = self.sid(kind)
        groups, text = self._probe_groups
        rows = groups.get(kid)
        if rows is None:
            return np.zeros(0, np.int64)
        return rows[text[rows]] if text_only else rows

    def value(self, row: int) -> np.ndarray | None:
        """Decode one probe's stored values (from the cached probe data buffer)."""
        p = self.probes
        enc = int(p["enc"][row])
        if enc == ENC_NONE:
            return None
        off, n = int(p["data_off"][row]), int(p["data_len"][row])
        raw = self.probe_data[off:off + n]
        nd = int(p["ndim"][row])
        shape = tuple(p["shape"][row][:nd].tolist())
        try:
            return decode_probe(raw, enc, shape)
        except ValueError:
            return None

    def layer_tensor_rows(self) -> np.ndarray:
        """Rows of the tensors of decoder-layer calls (gathered from their contiguous ranges)."""
        cached = self.__dict__.get("_layer_tensor_rows")
        if cached is not None:
            return cached
        ev = self.events
        lo = self.layer_of_module
        out = np.zeros(0, np.int64)
        if len(ev) and (lo >= 0).any():
            sel = np.nonzero(lo[ev["module"]] >= 0)[0]
            start = ev["tensor_start"][sel].astype(np.int64)
            cnt = ev["tensor_count"][sel].astype(np.int64)
            total = int(cnt.sum())
            if total:
                rep = np.repeat(start - (np.cumsum(cnt) - cnt), cnt)
                out = rep + np.arange(total)
                out = out[out < len(self.tensors)]
        self.__dict__["_layer_tensor_rows"] = out
        return out

    def info(self, row: int) -> dict:
        return self.info_of_sid(int(self.probes["info"][row]))

    def info_of_sid(self, sid: int) -> dict:
        cache = self.__dict__.setdefault("_info_cache", {})
        if sid not in cache:
            s = self.s(sid)
            try:
                cache[sid] = json.loads(s) if s else {}
            except json.JSONDecodeError:
                cache[sid] = {}
        return cache[sid]

    # ---- columns ---------------------------------------------------------------
    def col(self, table: str, field: str) -> np.ndarray:
        """One field of a table (a strided view of the structured array: no copy). For the
        big tables, served from their compact columns when a streaming pass kept them and the
        table is not loaded whole."""
        if table not in self.__dict__:
            c = self.__dict__.get("_compact", {}).get(table)
            if c is not None and field in c:
                return c[field]
        return getattr(self, table)[field]

    def n_rows(self, table: str) -> int:
        t = self.__dict__.get(table)
        return len(t) if t is not None else self.trace.n_rows(table)

    def set_compact(self, table: str, cols: dict[str, np.ndarray]) -> None:
        self.__dict__.setdefault("_compact", {})[table] = cols

    def fetch(self, table: str, rows: np.ndarray) -> np.ndarray:
        """Rows (an index array, mostly increasing) of a big table, read as the range they
        span when that is dense enough, else through :meth:`rows`. For passes over the rows
        of aligned pairs, block by block, without holding the table."""
        rows = np.asarray(rows, np.int64)
        if not len(rows) or self._whole(table):
            return self.rows(table, rows)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo > 4 * len(rows) + (1 << 14):
            return self.rows(table, rows)
        span = self.trace.read_rows(table, lo, hi)
        size = span.dtype.itemsize
        out = np.empty(len(rows), span.dtype)
        out.view(np.uint8).reshape(len(rows), size)[:] = np.take(span.view(np.uint8).reshape(hi - lo, size),
                                                                 rows - lo, axis=0)
        return out

    def _whole(self, table: str) -> bool:
        """Rows of this table are served from the whole table: a small table, or one already
        loaded (here or in the trace's cache)."""
        return table not in COMPACT_FIELDS or table in self.__dict__ or self.trace.is_loaded(table)

    def _row_block_rows(self, table: str) -> int:
        return self.trace.stream_rows(table, 1 << 20)

    def _row_block(self, table: str, b: int) -> np.ndarray:
        """Block ``b`` of a table (whole chunks, about 1 MiB), from a small LRU cache: the rows
        a report looks up cluster around its first divergences."""
        cache = self.__dict__.setdefault("_row_blocks", {})
        key = (table, b)
        blk = cache.pop(key, None)
        if blk is None:
            k = self._row_block_rows(table)
            blk = self.trace.read_rows(table, b * k, min(self.trace.n_rows(table), (b + 1) * k))
            while len(cache) >= 16:
                cache.pop(next(iter(cache)))
        cache[key] = blk          # most recently used last
        return blk

    def rows(self, table: str, idx) -> np.ndarray:
        """Rows of a table by index (an int, a slice or an index array), read from the file
        when the table is not loaded whole; many scattered rows load it whole instead."""
        if self._whole(table):
            return getattr(self, table)[idx]
        n = self.trace.n_rows(table)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step == 1 and stop - start > self._row_block_rows(table):
                return self.trace.read_rows(table, start, max(start, stop))
            idx = np.arange(start, max(start, stop), step)
        arr = np.asarray(idx)
        if arr.ndim == 0:
            r = int(arr) + (n if int(arr) < 0 else 0)
            k = self._row_block_rows(table)
            return self._row_block(table, r // k)[r % k]
        if not len(arr):
            return np.zeros(0, self.trace.dataset_dtype(table))
        k = self._row_block_rows(table)
        blocks = np.unique(arr // k)
        if len(blocks) <= 16:   # a few blocks (through the block cache), else the whole table
            out = np.empty(len(arr), self.trace.dataset_dtype(table))
            for b in blocks.tolist():
                sel = np.nonzero(arr // k == b)[0]
                out[sel] = self._row_block(table, b)[arr[sel] - b * k]
            return out
        return getattr(self, table)[arr]

    # ---- events / tensors ------------------------------------------------------
    @cached_property
    def event_module(self) -> np.ndarray:
        return self.events["module"].astype(np.int64)

    @cached_property
    def tensor_event_module(self) -> np.ndarray:
        """Module of each tensor row's event."""
        ev = self.tensors["event"]
        return self.event_module[ev] if len(ev) else np.zeros(0, np.int64)

    @cached_property
    def tensor_time(self) -> np.ndarray:
        """Execution time of each tensor: the call's seq for inputs, its end_seq for outputs."""
        te = self.tensors
        if not len(te):
            return np.zeros(0, np.int64)
        return self.tensor_time_of(np.arange(len(te)))

    def tensor_time_of(self, rows: np.ndarray) -> np.ndarray:
        """:attr:`tensor_time` of some tensor rows only."""
        if not len(rows):
            return np.zeros(0, np.int64)
        e = self.col("tensors", "event")[rows]
        out = self.col("tensors", "role")[rows] == ROLE_OUTPUT
        return np.where(out, self.col("events", "end_seq")[e], self.col("events", "seq")[e]).astype(np.int64)

    @cached_property
    def compute_dtype(self) -> str | None:
        """The model's compute dtype: hidden states entering the decoder layers, else meta."""
        rows = self.layer_tensor_rows()
        te = self.tensors
        if len(rows):
            role, dt, nm = te["role"][rows], te["dtype"][rows], te["name"][rows]
            sel = (role != ROLE_OUTPUT) & self.is_float_dtype_id[dt] & ~self.is_mask_name_id[nm]
            idx = np.nonzero(sel)[0]
            if len(idx):
                hs = self.sid("hidden_states")
                named = idx[nm[idx] == hs]
                pick = named if len(named) else idx
                vals, counts = np.unique(dt[pick], return_counts=True)
                return str(self.strings[vals[np.argmax(counts)]])
        d = self.meta.get("dtype")
        return str(d).removeprefix("torch.") if d else None

    @cached_property
    def merge_size(self) -> int:
        cfg = self.config or {}
        vc = cfg.get("vision_config") or {}
        return int(vc.get("spatial_merge_size") or cfg.get("spatial_merge_size") or 2)


def index_of(trace: Trace) -> TraceIndex:
    """The (cached) :class:`TraceIndex` of an open trace."""
    ix = trace.derived.get("index")
    if ix is None:
        ix = trace.derived["index"] = TraceIndex(trace)
    return ix


def shape_str(shape: Any) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def row_shape(row: np.void, field: str = "shape", ndim_field: str = "ndim") -> tuple[int, ...]:
    n = int(row[ndim_field])
    return tuple(int(d) for d in row[field][:max(0, min(n, 8))])
