"""Derived, cached views of a trace shared by check, diff, expect and snapshot.

Everything is computed once per trace with numpy over whole tables; nothing here loops
over events in Python. Loops run over *distinct* values only (module paths, interned
strings, probe blobs), which stay small however long the trace is. The two big tables can
also be streamed (:mod:`.stream`), keeping only compact columns (:meth:`TraceIndex.col`
serves them) and reading single rows through a small block cache (:meth:`TraceIndex.rows`).

The index of a trace is cached here, in the analysis layer (:func:`index_of`), not on the trace.
"""

from __future__ import annotations

import json
import weakref
from functools import cached_property

import numpy as np

from vlmscope.semantics import find_decoder_layers, is_under, layer_index, merge_size_of, text_model_of
from vlmscope.trace import ENC_NONE, ROLE_OUTPUT, Trace, TraceError, decode_probe

from .rows import call_index
from .stream import COMPACT_FIELDS

FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2")


def _read_table(trace: Trace, name: str) -> np.ndarray:
    """A whole table (or the ``probe_data`` bytes), read once and cached on the trace."""
    return trace.table(name)


class TraceIndex:
    """Cached derived arrays of one trace."""

    def __init__(self, trace: Trace):
        # a weak reference: the index is cached while its trace lives (index_of), and a strong
        # one would keep the trace and its (large) tables alive as long as the cache
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

    @cached_property
    def call_of_step(self) -> np.ndarray:
        """The generate call of each step (int64 [n_steps]): a call begins at every prefill
        (``kind == 0``), so the call of step s is ``cumsum(kind == 0)[s] - 1`` (-1 for decode
        steps before the first prefill)."""
        return call_index(self.col("steps", "kind") if self.n_steps else np.zeros(0, np.int64))

    @cached_property
    def call_first_steps(self) -> np.ndarray:
        """The first (prefill) step of each call, in order (int64)."""
        kind = self.col("steps", "kind") if self.n_steps else np.zeros(0, np.int64)
        return np.flatnonzero(np.asarray(kind) == 0).astype(np.int64)

    @cached_property
    def rope_config(self) -> dict:
        """What the M-RoPE position oracle needs: ``meta.rope`` (``family``,
        ``spatial_merge_size``, ``tokens_per_second``, ``image_token_id``, ``video_token_id``,
        ``vision_start_token_id``), each missing value filled from the model config (a trace
        recorded before ``rope`` was stored). ``family`` is None for a family without M-RoPE."""
        from vlmscope.semantics import image_token_id_of

        raw = self.meta.get("rope")
        rope = dict(raw) if isinstance(raw, dict) else {}
        cfg = self.config if isinstance(self.config, dict) else {}
        vc = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else {}
        tc = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}

        def first(*vals):
            return next((v for v in vals if v is not None), None)

        if "family" not in rope:
            fam = str(self.meta.get("family") or cfg.get("model_type") or "")
            fam = fam.strip().lower().replace("-", "_").replace(".", "_")
            rope["family"] = fam if fam in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl") else None
        if rope.get("spatial_merge_size") is None:
            rope["spatial_merge_size"] = first(vc.get("spatial_merge_size"), cfg.get("spatial_merge_size"))
        if rope.get("tokens_per_second") is None:
            rope["tokens_per_second"] = first(vc.get("tokens_per_second"), cfg.get("tokens_per_second"),
                                              tc.get("tokens_per_second"))
        if rope.get("image_token_id") is None:
            rope["image_token_id"] = first(self.meta.get("image_token_id"), image_token_id_of(cfg))
        if rope.get("video_token_id") is None:
            rope["video_token_id"] = first(cfg.get("video_token_id"), cfg.get("video_token_index"))
        if rope.get("vision_start_token_id") is None:
            rope["vision_start_token_id"] = cfg.get("vision_start_token_id")
        return rope

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
        return np.fromiter((is_under(str(p), prefix) for p in paths), bool, count=len(paths))

    @cached_property
    def decoder_layers_path(self) -> str | None:
        p = self.meta.get("decoder_layers")
        if p:
            return str(p)
        # a trace without the recorded structure: the largest numbered module list outside vision
        return find_decoder_layers(self.module_paths.tolist())

    @cached_property
    def layer_of_module(self) -> np.ndarray:
        """Decoder-layer index of each module that *is* a decoder layer, else -1."""
        return self._layer_numbers(inside=False)

    @cached_property
    def layer_under_module(self) -> np.ndarray:
        """Decoder-layer index of each module inside (or equal to) a decoder layer, else -1."""
        return self._layer_numbers(inside=True)

    def _layer_numbers(self, inside: bool) -> np.ndarray:
        dl = self.decoder_layers_path
        if not dl:
            return np.full(len(self.module_paths), -1, np.int64)
        return np.fromiter((layer_index(str(p), dl, inside=inside) for p in self.module_paths), np.int64,
                           count=len(self.module_paths))

    @cached_property
    def layer_paths(self) -> dict[int, str]:
        lo = self.layer_of_module
        return {int(lo[i]): str(self.module_paths[i]) for i in np.nonzero(lo >= 0)[0]}

    @cached_property
    def text_model_path(self) -> str | None:
        p = self.meta.get("text_model")
        if p is not None:
            return str(p)
        return text_model_of(self.decoder_layers_path)

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
                v = json.loads(s) if s else {}
            except (ValueError, RecursionError):
                v = None
            if not isinstance(v, dict):
                raise TraceError(f"trace is truncated or corrupt: {self.trace.path} (probe info, string {sid}, "
                                 "is not a JSON object)")
            cache[sid] = v
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
        """Keep the compact columns a streamed pass read (see :mod:`.stream`), once their
        references are checked (a forked reader's half never went through the trace's checks)."""
        self.trace.check_rows(table, cols)
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
        if (arr < 0).any():                       # negative indices count from the end, as numpy's
            arr = np.where(arr < 0, arr + n, arr)
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
        return merge_size_of(self.config or {})


#: The index of each open trace, kept while the trace lives (the index holds its trace weakly).
_INDEXES: "weakref.WeakKeyDictionary[Trace, TraceIndex]" = weakref.WeakKeyDictionary()


def index_of(trace: Trace) -> TraceIndex:
    """The (cached) :class:`TraceIndex` of an open trace."""
    ix = _INDEXES.get(trace)
    if ix is None:
        ix = _INDEXES[trace] = TraceIndex(trace)
    return ix



def row_shape(row: np.void, field: str = "shape", ndim_field: str = "ndim") -> tuple[int, ...]:
    n = int(row[ndim_field])
    return tuple(int(d) for d in row[field][:max(0, min(n, 8))])
