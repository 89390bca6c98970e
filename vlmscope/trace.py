"""The vlmscope trace format: writer and lazy reader.

This module is the contract between recording and everything else (check, diff,
snapshot, view). It depends on h5py, hdf5plugin (the Blosc2 filter) and numpy only:
importing it must never pull in torch or textual. The layout is documented in
``docs/trace-format.md``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc2 HDF5 filter; C plugins only, no torch)
import numpy as np

FORMAT_NAME = "vlmscope-trace"
#: Version 2: tables compressed with Blosc2 (lz4, byte shuffle) in ~1 MiB chunks.
#: Version 1 (lzf, 64 KiB chunks) is still read.
FORMAT_VERSION = 2
MAX_DIMS = 8
CHUNK_BYTES = 1 << 20     # per chunk: a per-step flush re-compresses the last, partly filled
                          # chunk (~1 ms), and whole-table reads pay a per-chunk cost
#: Blosc2 with lz4 over byte-shuffled rows: the shuffle groups byte k of every row of a chunk,
#: so the mostly-constant columns of a structured row compress away, and it decompresses
#: at ~2.5 GB/s (lzf: ~0.6 GB/s) -- whole-table reads by check / diff are bound by this.
COMPRESSION = hdf5plugin.Blosc2(cname="lz4", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE)
_CACHE_BYTES = 4 << 20    # HDF5 chunk cache per dataset: holds a few whole chunks

STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete"
STATUS_FAILED = "failed"

# Roles of a tensor row.
ROLE_INPUT, ROLE_KWARG, ROLE_OUTPUT = 0, 1, 2
ROLE_NAMES = {ROLE_INPUT: "input", ROLE_KWARG: "kwarg", ROLE_OUTPUT: "output"}

# Step kinds.
KIND_PREFILL, KIND_DECODE = 0, 1

# Probe payload encodings.
ENC_NONE, ENC_INT64, ENC_BITS, ENC_FLOAT64 = 0, 1, 2, 3

_shape = (np.int64, (MAX_DIMS,))

MODULE_DTYPE = np.dtype([
    ("path", np.int32),     # string id; "" is the root module
    ("cls", np.int32),      # string id of the class name
    ("depth", np.int16),
    ("parent", np.int32),   # row in /modules, -1 for the root
])

EVENT_DTYPE = np.dtype([
    ("step", np.int32),
    ("seq", np.int32),       # execution order within the step (shared with reshapes, probes)
    ("end_seq", np.int32),   # seq counter when the call returned (children lie in (seq, end_seq))
    ("module", np.int32),    # row in /modules
    ("nth", np.int32),       # nth call of this module within the step
    ("depth", np.int16),     # depth in the call stack (root call = 0)
    ("parent", np.int64),    # row in /events of the calling module, -1 for the root call
    ("tensor_start", np.int64),  # first row in /tensors
    ("tensor_count", np.int32),
    ("status", np.int8),     # 0 returned, 1 raised
    ("dur_us", np.float32),  # host wall time of the call
])

TENSOR_DTYPE = np.dtype([
    ("step", np.int32),
    ("event", np.int64),     # row in /events
    ("role", np.int8),       # ROLE_INPUT / ROLE_KWARG / ROLE_OUTPUT
    ("name", np.int32),      # string id: "args[0]", "hidden_states", "out", "out.logits", "out[0][1]"
    ("ndim", np.int8),
    ("shape", *_shape),      # padded with -1
    ("dtype", np.int32),     # string id: "float32", "bfloat16", "int64", "bool", ...
    ("device", np.int32),    # string id: "cpu", "cuda:0"
    ("numel", np.int64),
    ("min", np.float64),
    ("max", np.float64),
    ("mean", np.float64),
    ("std", np.float64),
    ("absmax", np.float64),
    ("nan", np.int64),
    ("inf", np.int64),
    ("payload", np.int32),   # dataset /payloads/<n>, -1 when not saved
])

RESHAPE_DTYPE = np.dtype([
    ("step", np.int32),
    ("seq", np.int32),
    ("event", np.int64),     # row in /events of the innermost running module, -1 if none
    ("module", np.int32),    # row in /modules, -1 if none
    ("op", np.int32),        # string id: "view", "cat", "masked_scatter", ...
    ("nth", np.int32),       # occurrence of this op within the module call
    ("n_in", np.int16),      # number of tensor inputs
    ("in_ndim", np.int8),
    ("in_shape", *_shape),   # first tensor input
    ("in_shapes", np.int32), # string id, every tensor input: "[1, 3, 4] [1, 5, 4]"
    ("in_dtypes", np.int32), # string id: "float32 bfloat16"
    ("args", np.int32),      # string id, the non-tensor arguments: "(-1, 256)", "dim=1"
    ("n_out", np.int16),     # number of tensor outputs (split/chunk give several)
    ("out_ndim", np.int8),
    ("out_shape", *_shape),  # first tensor output
    ("out_dtype", np.int32),
    ("site_file", np.int32), # user-code call site outside torch and vlmscope
    ("site_line", np.int32),
    ("site_func", np.int32),
    ("status", np.int8),     # 0 ok, 1 raised
])

PROBE_DTYPE = np.dtype([
    ("step", np.int32),
    ("seq", np.int32),
    ("event", np.int64),     # row in /events of the module that received it
    ("module", np.int32),
    ("kind", np.int32),      # string id: position_ids, cache_position, rope_deltas, attention_mask,
                             # cache, input_ids, image_grid_thw, mm_token_type_ids, merger_rows
    ("name", np.int32),      # string id: the argument name it came in under
    ("ndim", np.int8),
    ("shape", *_shape),
    ("dtype", np.int32),
    ("enc", np.int8),        # ENC_NONE / ENC_INT64 / ENC_BITS / ENC_FLOAT64
    ("data_off", np.int64),  # byte offset into /probe_data
    ("data_len", np.int64),  # byte length
    ("info", np.int32),      # string id of a small JSON object (ranges, cache layout, fill value)
])

STEP_DTYPE = np.dtype([
    ("step", np.int32),
    ("kind", np.int8),           # KIND_PREFILL / KIND_DECODE
    ("status", np.int8),         # 0 ok, 1 raised
    ("input_len", np.int32),     # token-space length of the step's input_ids / inputs_embeds
    ("q_len", np.int32),         # embedding-space length seen by the first decoder layer (-1 unknown)
    ("cache_before", np.int32),  # cache length before the step (-1 unknown / no cache)
    ("cache_after", np.int32),
    ("pos_rows", np.int8),       # 0 none, 1 for 1-D RoPE, 3 for M-RoPE
    ("pos_min", np.int64, (3,)),
    ("pos_max", np.int64, (3,)),
    ("mask_ndim", np.int8),      # 0 when no mask reached the decoder layers
    ("mask_shape", np.int64, (4,)),
    ("image_tokens", np.int32),  # image placeholder tokens in input_ids (-1 unknown)
    ("event_start", np.int64), ("event_count", np.int32),
    ("tensor_start", np.int64), ("tensor_count", np.int32),
    ("reshape_start", np.int64), ("reshape_count", np.int32),
    ("probe_start", np.int64), ("probe_count", np.int32),
    ("wall_ms", np.float64),
])

TABLES = {
    "modules": MODULE_DTYPE,
    "steps": STEP_DTYPE,
    "events": EVENT_DTYPE,
    "tensors": TENSOR_DTYPE,
    "reshapes": RESHAPE_DTYPE,
    "probes": PROBE_DTYPE,
}


class TraceError(Exception):
    """A trace file cannot be read. The message is one line, fit for a user."""


def pad_shape(shape: Iterable[int]) -> tuple[int, ...]:
    """Shape padded with -1 to MAX_DIMS entries (longer shapes are cut)."""
    s = tuple(int(d) for d in shape)[:MAX_DIMS]
    return s + (-1,) * (MAX_DIMS - len(s))


def shape_of(row: np.void, field: str = "shape", ndim_field: str = "ndim") -> tuple[int, ...]:
    """The real shape of a table row (undoing the -1 padding)."""
    n = int(row[ndim_field])
    return tuple(int(d) for d in row[field][: min(n, MAX_DIMS)])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


# --------------------------------------------------------------------------- writer


class TraceWriter:
    """Appends a trace to ``PATH.partial`` step by step; ``close`` renames it to PATH.

    Every ``write_step`` appends whole blocks to the resizable tables and flushes
    the file, so a crash loses at most the step in flight.
    """

    def __init__(self, path: str | os.PathLike, meta: dict | None = None, config_json: str | None = None):
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = h5py.File(self.partial_path, "w", libver="latest", rdcc_nbytes=_CACHE_BYTES)
        f = self._f
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["status"] = STATUS_RECORDING
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["n_steps"] = 0
        m = f.create_group("meta")
        m.attrs["run_json"] = json.dumps(_jsonable(meta or {}))
        m.attrs["config_json"] = config_json or "{}"
        for name, dt in TABLES.items():
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt,
                             chunks=(max(256, CHUNK_BYTES // dt.itemsize),), **COMPRESSION)
        # interned strings: their UTF-8 bytes back to back, and the end offset of each (reading
        # 100k HDF5 variable-length strings costs ~0.1 s; these two arrays, a few ms)
        f.create_dataset("strings", shape=(0,), maxshape=(None,), dtype=np.uint8,
                         chunks=(CHUNK_BYTES // 4,), **COMPRESSION)
        f.create_dataset("string_ends", shape=(0,), maxshape=(None,), dtype=np.int64,
                         chunks=(CHUNK_BYTES // 32,), **COMPRESSION)
        self.string_bytes = 0
        self.n_strings = 0
        f.create_dataset("probe_data", shape=(0,), maxshape=(None,), dtype=np.uint8,
                         chunks=(CHUNK_BYTES // 4,), **COMPRESSION)
        f.create_group("payloads")
        self._datasets: dict[str, h5py.Dataset] = {}
        self._strings: dict[str, int] = {}
        self._pending_strings: list[str] = []
        self.counts = {name: 0 for name in TABLES}
        self.probe_bytes = 0
        self.n_payloads = 0
        self.payload_bytes = 0
        self.closed = False
        self.intern("")

    # strings -------------------------------------------------------------
    def intern(self, s: str) -> int:
        i = self._strings.get(s)
        if i is None:
            i = len(self._strings)
            self._strings[s] = i
            self._pending_strings.append(s)
        return i

    def _flush_strings(self) -> None:
        if not self._pending_strings:
            return
        blob, ends = _encode_strings(self._pending_strings, self.string_bytes)
        if len(blob):
            self._write_block("strings", self.string_bytes, blob)
        self._write_block("string_ends", self.n_strings, ends)   # after the bytes they point into
        self.string_bytes = int(ends[-1])
        self.n_strings += len(ends)
        self._pending_strings = []

    # tables --------------------------------------------------------------
    def _dataset(self, name: str) -> h5py.Dataset:
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = self._f[name]
        return ds

    def _write_block(self, name: str, start: int, rows: np.ndarray) -> None:
        """Resize and write rows[start:] through h5py's low-level API (the high-level
        ``ds[a:b] = rows`` re-derives dtypes and selections on every call)."""
        ds = self._dataset(name)
        k = len(rows)
        ds.resize((start + k,))
        fspace = ds.id.get_space()
        fspace.select_hyperslab((start,), (k,))
        ds.id.write(h5py.h5s.create_simple((k,)), fspace, np.ascontiguousarray(rows))

    def append(self, table: str, rows: np.ndarray) -> int:
        """Append a block of rows; returns the index of the first one."""
        n = self.counts[table]
        if len(rows):
            self._write_block(table, n, rows.astype(TABLES[table], copy=False))
            self.counts[table] = n + len(rows)
        return n

    def append_probe_data(self, blob: bytes | np.ndarray) -> int:
        data = np.frombuffer(blob, dtype=np.uint8) if isinstance(blob, (bytes, bytearray, memoryview)) \
            else np.ascontiguousarray(blob).view(np.uint8).ravel()
        n = self.probe_bytes
        if len(data):
            self._write_block("probe_data", n, data)
            self.probe_bytes = n + len(data)
        return n

    def add_payload(self, array: np.ndarray, **attrs: Any) -> int:
        i = self.n_payloads
        ds = self._f["payloads"].create_dataset(str(i), data=array,
                                                **(COMPRESSION if array.size > 1024 else {}))
        for k, v in attrs.items():
            ds.attrs[k] = v
        self.n_payloads += 1
        self.payload_bytes += array.nbytes
        return i

    def set_modules(self, rows: np.ndarray) -> None:
        self.append("modules", rows)

    def update_meta(self, **fields: Any) -> None:
        run = json.loads(self._f["meta"].attrs["run_json"])
        run.update(_jsonable(fields))
        self._f["meta"].attrs["run_json"] = json.dumps(run)

    def set_config(self, config_json: str) -> None:
        self._f["meta"].attrs["config_json"] = config_json

    def end_step(self) -> None:
        """Make everything appended so far durable."""
        self._flush_strings()
        self._f.attrs["n_steps"] = self.counts["steps"]
        self._f.flush()

    def set_error(self, *, type: str, message: str, step: int, module_stack: list[str],
                  last_reshape: dict | None, traceback: str = "") -> None:
        g = self._f.require_group("error")
        g.attrs["type"] = type
        g.attrs["message"] = message
        g.attrs["step"] = step
        g.attrs["module_stack"] = json.dumps(module_stack)
        g.attrs["last_reshape"] = json.dumps(_jsonable(last_reshape) if last_reshape else None)
        g.attrs["traceback"] = traceback

    def close(self, status: str = STATUS_COMPLETE) -> Path:
        """Mark the trace with ``status`` and move it to its final name.

        A complete trace is renamed to PATH. An incomplete or failed one is renamed too,
        so that it opens like any other; its status says what happened.
        """
        if self.closed:
            return self.path
        self._flush_strings()
        self._f.attrs["status"] = status
        self._f.attrs["n_steps"] = self.counts["steps"]
        self._f.attrs["closed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._f.flush()
        self._f.close()
        self.closed = True
        os.replace(self.partial_path, self.path)
        return self.path


# --------------------------------------------------------------------------- reader


def _decode(s: Any) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else str(s)


@dataclass(frozen=True)
class StepView:
    """Convenience bundle of one step's rows."""
    step: np.void
    events: np.ndarray
    tensors: np.ndarray
    reshapes: np.ndarray
    probes: np.ndarray


class Trace:
    """Lazy reader of a vlmscope trace. Tables are read on first use and cached."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise TraceError(f"trace not found: {self.path}")
        if self.path.is_dir():
            raise TraceError(f"not a trace file (a directory): {self.path}")
        if self.path.stat().st_size == 0:
            raise TraceError(f"not a vlmscope trace (empty file): {self.path}")
        try:
            self._f = h5py.File(self.path, "r", rdcc_nbytes=_CACHE_BYTES)
        except OSError as e:
            if not h5py.is_hdf5(self.path):
                raise TraceError(f"not a vlmscope trace (not an HDF5 file): {self.path}") from None
            raise TraceError(f"trace is truncated or corrupt: {self.path} ({_first_line(e)})") from None
        try:
            self._check_header()
        except TraceError:
            self._f.close()
            raise
        except Exception as e:  # noqa: BLE001 - damaged internals surface as many types
            self._f.close()
            raise TraceError(f"trace is truncated or corrupt: {self.path} ({_first_line(e)})") from None
        self._cache: dict[str, Any] = {}
        #: per-trace cache for derived structures built by readers (e.g. the analysis index)
        self.derived: dict[str, Any] = {}

    def _check_header(self) -> None:
        a = self._f.attrs
        if _decode(a.get("format", "")) != FORMAT_NAME:
            raise TraceError(f"not a vlmscope trace (an HDF5 file without the vlmscope header): {self.path}")
        v = int(a.get("format_version", -1))
        if v > FORMAT_VERSION:
            raise TraceError(f"trace format version {v} is newer than this vlmscope reads "
                             f"(version {FORMAT_VERSION}); upgrade vlmscope: {self.path}")
        if v < 1:
            raise TraceError(f"trace has an invalid format version {v}: {self.path}")
        for name in (*TABLES, "strings", "probe_data", "meta", *(("string_ends",) if v >= 2 else ())):
            if name not in self._f:
                raise TraceError(f"trace is truncated or corrupt (no /{name}): {self.path}")
        # Touch the step table: a truncated file fails here rather than later.
        self._f["steps"][: min(1, self._f["steps"].shape[0])]

    # context manager -------------------------------------------------------
    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001
            pass

    # header ----------------------------------------------------------------
    @property
    def format_version(self) -> int:
        return int(self._f.attrs["format_version"])

    @property
    def status(self) -> str:
        s = _decode(self._f.attrs.get("status", STATUS_INCOMPLETE))
        # A file still marked "recording" was never closed: the process died.
        return STATUS_INCOMPLETE if s == STATUS_RECORDING else s

    @property
    def complete(self) -> bool:
        return self.status == STATUS_COMPLETE

    @property
    def meta(self) -> dict:
        if "meta" not in self._cache:
            self._cache["meta"] = json.loads(_decode(self._f["meta"].attrs.get("run_json", "{}")))
        return self._cache["meta"]

    @property
    def config(self) -> dict:
        if "config" not in self._cache:
            try:
                self._cache["config"] = json.loads(_decode(self._f["meta"].attrs.get("config_json", "{}")))
            except json.JSONDecodeError:
                self._cache["config"] = {}
        return self._cache["config"]

    @property
    def error(self) -> dict | None:
        if "error" not in self._f:
            return None
        a = self._f["error"].attrs
        return {
            "type": _decode(a.get("type", "")),
            "message": _decode(a.get("message", "")),
            "step": int(a.get("step", -1)),
            "module_stack": json.loads(_decode(a.get("module_stack", "[]"))),
            "last_reshape": json.loads(_decode(a.get("last_reshape", "null"))),
            "traceback": _decode(a.get("traceback", "")),
        }

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    # tables ------------------------------------------------------------------
    def _table(self, name: str) -> np.ndarray:
        if name not in self._cache:
            try:
                ds = self._f[name]
                arr = np.empty(ds.shape, ds.dtype)
                if ds.shape[0]:
                    ds.read_direct(arr)  # faster than ds[:] for compound types
                self._cache[name] = arr
            except Exception as e:  # noqa: BLE001
                raise TraceError(f"trace is truncated or corrupt: {self.path} ({_first_line(e)})") from None
        return self._cache[name]

    def table(self, name: str) -> np.ndarray:
        """A whole table (``steps``, ``events``, ``tensors``, ``reshapes``, ``probes``,
        ``modules``) or the raw ``probe_data`` bytes, read once and cached."""
        if name not in (*TABLES, "probe_data"):
            raise KeyError(f"no table {name!r} in a vlmscope trace")
        return self._table(name)

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of a table, read from the file (into ``out`` when given, which
        must hold them), without loading or caching the whole table. For readers that stream
        a large table block by block."""
        try:
            ds, dt, _ = self._layout(name)
            n = stop - start
            if out is None:
                out = np.empty(n, dt)
            if n > 0:
                ds.read_direct(out, np.s_[start:stop], np.s_[0:n])
            return out[:n]
        except Exception as e:  # noqa: BLE001
            raise TraceError(f"trace is truncated or corrupt: {self.path} ({_first_line(e)})") from None

    def _layout(self, name: str) -> tuple[h5py.Dataset, np.dtype, int]:
        """(dataset, row dtype, rows per chunk) of a table, looked up once (h5py's look-ups
        cost a fraction of a millisecond each)."""
        key = ("layout", name)
        lay = self._cache.get(key)
        if lay is None:
            ds = self._f[name]
            dt = ds.dtype
            lay = self._cache[key] = (ds, dt, (ds.chunks or (max(1, CHUNK_BYTES // dt.itemsize),))[0])
        return lay

    def stream_rows(self, name: str, nbytes: int) -> int:
        """Rows per block for streaming a table in blocks of about ``nbytes``: whole chunks."""
        _, dt, chunk = self._layout(name)
        return chunk * max(1, nbytes // (chunk * dt.itemsize))

    def dataset_dtype(self, name: str) -> np.dtype:
        """The row dtype of a table as stored (format 1 and 2 share the field names)."""
        return self._layout(name)[1]

    def is_loaded(self, name: str) -> bool:
        """Whether a table is already read whole (and cached)."""
        return name in self._cache

    def expect(self, pattern: str, output: str | None = None, inputs: Any = None, **kw: Any) -> Any:
        """Symbolic shape assertion, e.g. ``t.expect("model.language_model.layers.*.self_attn.q_proj",
        output="B S 2048")``; see :func:`vlmscope.analyze.expect.expect`."""
        from vlmscope.analyze.expect import expect

        return expect(self, pattern, output=output, inputs=inputs, **kw)

    @property
    def strings(self) -> np.ndarray:
        """All interned strings as a numpy array of ``str`` (index = string id)."""
        if "strings" not in self._cache:
            try:
                self._cache["strings"] = read_strings(self._f)
            except Exception as e:  # noqa: BLE001
                raise TraceError(f"trace is truncated or corrupt: {self.path} ({_first_line(e)})") from None
        return self._cache["strings"]

    def s(self, i: int) -> str:
        """The interned string with id ``i``."""
        return self.strings[int(i)] if i >= 0 else ""

    def string_id(self, s: str) -> int:
        """The id of string ``s``, or -1 when the trace never interned it."""
        if "string_ids" not in self._cache:
            self._cache["string_ids"] = {v: i for i, v in enumerate(self.strings)}
        return self._cache["string_ids"].get(s, -1)

    @property
    def steps(self) -> np.ndarray:
        return self._table("steps")

    @property
    def n_steps(self) -> int:
        return int(self._f["steps"].shape[0])

    @property
    def modules(self) -> np.ndarray:
        return self._table("modules")

    def module_path(self, module: int) -> str:
        return self.s(self.modules["path"][module]) if module >= 0 else ""

    def module_class(self, module: int) -> str:
        return self.s(self.modules["cls"][module]) if module >= 0 else ""

    @property
    def module_paths(self) -> np.ndarray:
        """Path string of every module row (index = module id)."""
        if "module_paths" not in self._cache:
            self._cache["module_paths"] = self.strings[self.modules["path"]] if len(self.modules) else \
                np.array([], dtype=object)
        return self._cache["module_paths"]

    def n_rows(self, table: str) -> int:
        return int(self._layout(table)[0].shape[0])

    def _slice(self, table: str, step: int | None) -> np.ndarray:
        if step is None:
            return self._table(table)
        st = self.steps[step]
        start, count = int(st[f"{table[:-1]}_start"]), int(st[f"{table[:-1]}_count"])
        if table in self._cache:
            return self._cache[table][start:start + count]
        try:
            return self._f[table][start:start + count]
        except Exception as e:  # noqa: BLE001
            raise TraceError(f"trace is truncated or corrupt: {self.path} ({_first_line(e)})") from None

    def events(self, step: int | None = None) -> np.ndarray:
        """Module-call rows (``EVENT_DTYPE``), all or one step's, in execution order."""
        return self._slice("events", step)

    def tensors(self, step: int | None = None) -> np.ndarray:
        return self._slice("tensors", step)

    def reshapes(self, step: int | None = None) -> np.ndarray:
        return self._slice("reshapes", step)

    def probes(self, step: int | None = None, kind: str | None = None) -> np.ndarray:
        rows = self._slice("probes", step)
        if kind is not None:
            rows = rows[rows["kind"] == self.string_id(kind)]
        return rows

    def step(self, i: int) -> StepView:
        return StepView(self.steps[i], self.events(i), self.tensors(i), self.reshapes(i), self.probes(i))

    def event_tensors(self, event_row: int) -> np.ndarray:
        """The tensor rows of one module call (global event row)."""
        ev = self.events()[event_row] if "events" in self._cache else self._f["events"][event_row]
        start, count = int(ev["tensor_start"]), int(ev["tensor_count"])
        if "tensors" in self._cache:
            return self._cache["tensors"][start:start + count]
        return self._f["tensors"][start:start + count]

    # probes ------------------------------------------------------------------
    def probe_value(self, row: np.void) -> np.ndarray | None:
        """Decode the data a probe stored (int64 values, a bool mask, float64 values)."""
        enc = int(row["enc"])
        if enc == ENC_NONE:
            return None
        off, n = int(row["data_off"]), int(row["data_len"])
        buf = self._cache["probe_data"] if "probe_data" in self._cache else self._f["probe_data"]
        value = decode_probe(buf[off:off + n], enc, shape_of(row))
        if value is None:
            raise TraceError(f"unknown probe encoding {enc} in {self.path}")
        return value

    def probe_info(self, row: np.void) -> dict:
        s = self.s(int(row["info"]))
        return json.loads(s) if s else {}

    # payloads ----------------------------------------------------------------
    @property
    def n_payloads(self) -> int:
        return len(self._f["payloads"])

    def payload(self, i: int, index: Any = ()) -> np.ndarray:
        """A saved tensor (or a slice of it, ``index``), read on demand."""
        ds = self._f["payloads"][str(int(i))]
        return ds[index] if index != () else ds[()]

    def payload_attrs(self, i: int) -> dict:
        return {k: (_decode(v) if isinstance(v, (bytes, str)) else v)
                for k, v in self._f["payloads"][str(int(i))].attrs.items()}

    # convenience -------------------------------------------------------------
    def iter_steps(self) -> Iterator[StepView]:
        for i in range(self.n_steps):
            yield self.step(i)

    def event_path(self, row: np.void) -> str:
        return self.module_path(int(row["module"]))

    def __repr__(self) -> str:
        return f"<Trace {self.path} v{self.format_version} {self.status} steps={self.n_steps}>"


def _encode_strings(strings: list[str], start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Format-2 string storage: the UTF-8 bytes back to back, and each string's end offset
    (counted from byte ``start`` of the whole array)."""
    enc = [x.encode("utf-8", "surrogatepass") for x in strings]
    ends = start + np.cumsum([len(b) for b in enc], dtype=np.int64)
    return np.frombuffer(b"".join(enc), dtype=np.uint8), ends


def read_strings(f: h5py.File) -> np.ndarray:
    """The interned strings of an open trace file, as an object array of ``str`` (index = id).
    Format 2 keeps UTF-8 bytes and end offsets; format 1 a variable-length string dataset."""
    ds = f["strings"]
    if "string_ends" not in f:                                  # format 1
        return np.array([_decode(x) for x in ds[:]], dtype=object)
    blob = np.empty(ds.shape, np.uint8)
    if ds.shape[0]:
        ds.read_direct(blob)
    ends = f["string_ends"][:]
    ends = ends[ends <= len(blob)]            # a crash between the two writes loses a tail only
    raw = blob.tobytes()
    starts = np.concatenate([[0], ends[:-1]]).tolist()
    return np.array([raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(starts, ends.tolist())],
                    dtype=object)


def write_strings(f: h5py.File, strings: Iterable[str]) -> None:
    """Replace the interned strings of a trace file opened for writing (tools and tests that
    rewrite names; ids keep their positions)."""
    strings = list(strings)
    if "string_ends" not in f:                                  # format 1
        f["strings"][:] = strings
        return
    blob, ends = _encode_strings(strings)
    f["strings"].resize((len(blob),))
    if len(blob):
        f["strings"][:] = blob
    f["string_ends"].resize((len(ends),))
    f["string_ends"][:] = ends


def decode_probe(raw: np.ndarray, enc: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """Probe values from their stored bytes (``ENC_INT64``, ``ENC_FLOAT64``, ``ENC_BITS``)."""
    if enc == ENC_INT64:
        return raw.view(np.int64).reshape(shape)
    if enc == ENC_FLOAT64:
        return raw.view(np.float64).reshape(shape)
    if enc == ENC_BITS:
        count = int(np.prod(shape)) if shape else 1
        return np.unpackbits(raw, count=count).astype(bool).reshape(shape)
    return None


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def open_trace(path: str | os.PathLike) -> Trace:
    """Open a trace lazily. Raises :class:`TraceError` with a one-line message on bad files."""
    return Trace(path)
