"""The lazy trace reader: ``open_trace`` and ``Trace``. Every damaged-file error becomes a one-line
:class:`TraceError`."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from . import notebook
from .journal import is_journal, replay_in_memory
from .format import (
    _CACHE_BYTES, CHUNK_BYTES, ENC_NONE, FORMAT_NAME, FORMAT_VERSION, STATUS_COMPLETE, STATUS_FAILED, STATUS_INCOMPLETE,
    STATUS_RECORDING, TABLES, OPTIONAL_TABLES, TraceError, _decode, _first_line, decode_probe, read_strings, shape_of,
)
from .validate import (
    BLOCK_FIELDS, ROW_FIELDS, Sizes, _q, attr_int, attr_json, attr_str, check_link, check_payload, check_rows, check_table, corrupt, loads,
    preflight, read_attr, step_damage,
)


@dataclass(frozen=True)
class StepView:
    """Convenience bundle of one step's rows."""
    step: np.void
    events: np.ndarray
    tensors: np.ndarray
    reshapes: np.ndarray
    probes: np.ndarray
    trace: "Trace | None" = field(default=None, repr=False, compare=False)   # resolves strings in the repr

    def __repr__(self) -> str:
        return notebook.step_repr(self)

    def _repr_html_(self) -> str:
        return notebook.step_html(self)


class Trace:
    """Lazy reader of a vlmscope trace. Tables are read on first use and cached."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            if partial.exists():
                raise TraceError(f"trace not found: {self.path} (its recording did not finish; "
                                 f"open {partial} for the finished steps)")
            raise TraceError(f"trace not found: {self.path}")
        if self.path.is_dir():
            raise TraceError(f"not a trace file (a directory): {self.path}")
        if self.path.stat().st_size == 0:
            raise TraceError(f"not a vlmscope trace (empty file): {self.path}")
        self._cache: dict[Any, Any] = {}
        self._loaders: dict[str, Callable[[], "np.ndarray | None"]] = {}   # see expect_table
        self._version = 0
        self._file_size = self.path.stat().st_size
        self._sizes = Sizes(self._size_of)
        if threading.active_count() == 1:
            # some damaged files make HDF5 loop forever in C, where nothing can stop it: walk the
            # metadata in a killable child first (~10 ms). Not with other threads running: a
            # child forked while one of them holds HDF5's lock would wait for it forever.
            preflight(self.path)
        try:
            self._f = self._open_h5()
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

    def _size_of(self, what: str) -> int:
        """Rows of a table, strings, steps or probe bytes: what references are checked against."""
        if what == "strings":
            return len(self.strings)
        return self.n_steps if what == "steps" else self.n_rows(what)

    def _open_h5(self) -> h5py.File:
        """The HDF5 file behind this trace, opened for reading. The journal of a recording that
        did not finish (``NAME.h5.partial``) is replayed into memory: every committed step."""
        if is_journal(self.path):
            return replay_in_memory(self.path)
        return h5py.File(self.path, "r", rdcc_nbytes=_CACHE_BYTES)

    def _check_header(self) -> None:
        f, p = self._f, self.path
        if read_attr(f, "format", p, "/", "") != FORMAT_NAME:
            raise TraceError(f"not a vlmscope trace (an HDF5 file without the vlmscope header): {p}")
        v = read_attr(f, "format_version", p, "/", -1)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TraceError(f"trace has an invalid format version {_q(v)}: {p}")
        if v > FORMAT_VERSION:
            raise TraceError(f"trace format version {v} is newer than this vlmscope reads "
                             f"(version {FORMAT_VERSION}); upgrade vlmscope: {p}")
        if v < 1:
            raise TraceError(f"trace has an invalid format version {v}: {p}")
        self._version = v
        for name in (*TABLES, "strings", "probe_data", "meta", *(("string_ends",) if v >= 2 else ())):
            if not self._has(f, name):
                raise TraceError(f"trace is truncated or corrupt (no /{name}): {p}")
        for name in (*TABLES, "strings", "probe_data", *(("string_ends",) if v >= 2 else ())):
            self._layout(name)              # every name a hard link to a dataset of this file
        self._group("meta")
        # Touch the step table: a truncated file fails here rather than later.
        steps = self._layout("steps")[0]
        self._guard(lambda: steps[: min(1, self.n_steps)])

    # context manager -------------------------------------------------------
    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - closing a damaged user file can fail too; nothing is left to keep
            pass

    # names -------------------------------------------------------------------
    def _group(self, name: str, required: bool = True) -> h5py.Group | None:
        """A top-level group (``meta``, ``payloads``, ``error``): a hard link to a group of this
        file; None when it is missing and not ``required``."""
        key = ("group", name)
        if key not in self._cache:
            if not required and not self._has(self._f, name):
                return None
            check_link(self._f, name, self.path, f"/{name}")
            g = self._guard(lambda: self._f[name])
            if not isinstance(g, h5py.Group):
                raise corrupt(self.path, f"/{name} is not a group")
            self._cache[key] = g
        return self._cache[key]

    def _has(self, g: h5py.Group, name: str) -> bool:
        """Whether ``g`` holds a link ``name`` (not following it: ``name in g`` would open the
        file an external link names)."""
        return bool(self._guard(lambda: g.id.links.exists(name.encode())))

    def _guard(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, with any error of a damaged file as one line."""
        try:
            return fn()
        except TraceError:
            raise
        except MemoryError:
            raise corrupt(self.path, "a read would not fit in memory") from None
        except Exception as e:  # noqa: BLE001 - the user's file is damaged (h5py raises many types): one line
            raise TraceError(f"trace is truncated or corrupt: {self.path} ({_first_line(e)})") from None

    # header ----------------------------------------------------------------
    @property
    def format_version(self) -> int:
        return self._version

    @property
    def status(self) -> str:
        s = attr_str(self._f, "status", self.path, "/", STATUS_INCOMPLETE)
        if s not in _STATUSES:
            raise corrupt(self.path, f"unknown status {_q(s)}")
        # A file still marked "recording" was never closed: the process died.
        return STATUS_INCOMPLETE if s == STATUS_RECORDING else s

    @property
    def recovered(self) -> str | None:
        """Why a recovered recording ends early (set when a killed recording's journal was
        replayed and its last records were cut or unfinished), else None."""
        r = read_attr(self._f, "recovered", self.path, "/")
        return None if r is None else _decode(r)

    @property
    def complete(self) -> bool:
        return self.status == STATUS_COMPLETE

    @property
    def meta(self) -> dict:
        if "meta" not in self._cache:
            g = self._group("meta")
            if not self._guard(lambda: h5py.h5a.exists(g.id, b"run_json")):
                raise corrupt(self.path, "no /meta run_json")     # every recording writes it
            m = attr_json(g, "run_json", self.path, "/meta/", "{}", dict, null_ok=False)
            for key, types in _META_TYPES.items():
                v = m.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
                    raise corrupt(self.path, f"/meta run_json: {key!r} is a {type(v).__name__}")
            self._cache["meta"] = m
        return self._cache["meta"]

    @property
    def config(self) -> dict:
        if "config" not in self._cache:
            try:
                c = attr_json(self._group("meta"), "config_json", self.path, "/meta/", "{}")
            except TraceError:
                c = None          # an unreadable model config reads as none (it is informative only)
            self._cache["config"] = c if isinstance(c, dict) else {}
        return self._cache["config"]

    @property
    def error(self) -> dict | None:
        g = self._group("error", required=False)
        if g is None:
            return None
        p, w = self.path, "/error/"
        stack = attr_json(g, "module_stack", p, w, "[]", list) or []
        if not all(isinstance(x, str) for x in stack):
            raise corrupt(p, "attribute /error/module_stack is not a list of strings")
        return {
            "type": attr_str(g, "type", p, w),
            "message": attr_str(g, "message", p, w),
            "step": attr_int(g, "step", p, w, -1),
            "module_stack": stack,
            "last_reshape": attr_json(g, "last_reshape", p, w, "null", dict),
            "traceback": attr_str(g, "traceback", p, w),
        }

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    # tables ------------------------------------------------------------------
    def _table(self, name: str) -> np.ndarray:
        """A whole table, read once, its own rows checked (dtype, shape, references) but not,
        for ``steps``, the blocks each step names (see :meth:`_step_row`)."""
        arr = self._cache.get(name)
        if arr is None:
            ds, dt, _ = self._layout(name)
            n = ds.shape[0]
            loader = self._loaders.pop(name, None)
            got = loader() if loader is not None else None
            # rows read by another process (expect_table) are checked like rows read here
            read = not (got is not None and got.dtype == dt and got.shape == (n,))
            arr = self._guard(lambda: np.empty(n, dt)) if read else got
            if name not in _ROW_TABLES:
                if n and read:
                    self._guard(lambda: ds.read_direct(arr))  # faster than ds[:] for compound types
            else:
                # block by block (whole chunks), each block's rows checked while they are in the
                # CPU cache: checking the whole table afterwards would read it from memory again
                k = self.stream_rows(name, _CHECK_BYTES)
                for s in range(0, n, k):
                    e = min(n, s + k)
                    if read:
                        self._guard(lambda: ds.read_direct(arr, np.s_[s:e], np.s_[s:e]))
                    check_rows(name, arr[s:e], self._sizes, self.path, base=s)
            self._cache[name] = arr
        return arr

    def has_sketches(self) -> bool:
        """Whether the trace holds value sketches (``/sketches`` and ``/sketch_data``, optional)."""
        key = ("has", "sketches")
        if key not in self._cache:
            self._cache[key] = (self._has(self._f, "sketches") and self._has(self._f, "sketch_data")
                                and self.n_rows("sketches") > 0)
        return self._cache[key]

    def sketch_table(self) -> np.ndarray:
        """The ``/sketches`` rows (empty when the trace has none), read once, references checked."""
        if not self.has_sketches():
            return np.zeros(0, OPTIONAL_TABLES["sketches"])
        return self._table("sketches")

    def sketch_values(self, off: int, count: int) -> np.ndarray:
        """``count`` float16 values of ``/sketch_data`` from element ``off`` (checked against its size)."""
        if not self.has_sketches():
            raise corrupt(self.path, "no /sketch_data")
        total = self.n_rows("sketch_data")
        if off < 0 or count < 0 or off > total or count > total - off:
            raise corrupt(self.path, f"sketch values [{off}, +{count}) lie outside /sketch_data ({total:,} values)")
        data = self._cache.get("sketch_data")
        if data is not None:
            return data[off:off + count]
        ds = self._layout("sketch_data")[0]
        return self._guard(lambda: ds[off:off + count])

    def all_sketch_values(self) -> np.ndarray:
        """The whole ``/sketch_data`` (float16), read once and cached."""
        if not self.has_sketches():
            return np.zeros(0, np.float16)
        return self._table("sketch_data")

    def table(self, name: str) -> np.ndarray:
        """A whole table (``steps``, ``events``, ``tensors``, ``reshapes``, ``probes``,
        ``modules``) or the raw ``probe_data`` bytes, read once and cached."""
        if name not in (*TABLES, "probe_data"):
            raise KeyError(f"no table {name!r} in a vlmscope trace")
        if name == "steps":
            return self.steps
        return self._table(name)

    def check_rows(self, table: str, rows: Any, start: int = 0) -> None:
        """Raise :class:`TraceError` unless rows ``[start, start + len(rows))`` of ``table`` (a
        structured array, or a mapping of some of its columns) refer only to rows, strings and
        probe bytes the trace holds (see :func:`vlmscope.trace.validate.check_rows`)."""
        check_rows(table, rows, self._sizes, self.path, base=start)

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of a table, read from the file (into ``out`` when given, which
        must hold them), without loading or caching the whole table, their references checked.
        For readers that stream a large table block by block."""
        ds, dt, _ = self._layout(name)
        n = stop - start
        if start < 0 or n < 0 or stop > ds.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) of /{name}, which has {ds.shape[0]}")
        if out is None:
            out = np.empty(n, dt)
        if n > 0:
            self._guard(lambda: ds.read_direct(out, np.s_[start:stop], np.s_[0:n]))
        rows = out[:n]
        if name in _ROW_TABLES:
            check_rows(name, rows, self._sizes, self.path, base=start)
        return rows

    def _layout(self, name: str) -> tuple[h5py.Dataset, np.dtype, int]:
        """(dataset, row dtype, rows per chunk) of a table (or of ``strings``, ``string_ends``,
        ``probe_data``), looked up and checked once: a hard link to a dataset stored in this file,
        1-D, of the row dtype of the format version, every declared row backed by stored data."""
        key = ("layout", name)
        lay = self._cache.get(key)
        if lay is None:
            check_link(self._f, name, self.path, f"/{name}")
            ds = self._guard(lambda: self._f[name])
            if not isinstance(ds, h5py.Dataset):
                raise corrupt(self.path, f"/{name} is not a dataset")
            if name == "strings" and self._version < 2:
                check_table(ds, None, self.path, f"/{name}", self._file_size, kind="vlen-str")
            else:
                check_table(ds, _DTYPES[name], self.path, f"/{name}", self._file_size)
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

    def file_identity(self) -> tuple[int, int, int, int] | None:
        """(device, inode, size, modification time in ns) of the file this trace has open, so
        that a process opening its path on its own can make sure it reads the same file (see
        :func:`open_same_file`); None when the trace is not a plain file read from disk (a journal
        replayed in memory)."""
        return _identity(self._f)

    def row_checker(self, table: str) -> Callable[[np.ndarray, int], None]:
        """``check(rows, base)``: :meth:`check_rows` for rows of ``table`` read elsewhere (a
        forked process reading the file on its own), against the sizes taken now: it needs no
        access to this trace's open file."""
        keys = {"steps", "strings", *(t for t, _ in ROW_FIELDS.get(table, {}).values()),
                *(t for _, _, t in BLOCK_FIELDS.get(table, ()))}
        snap = {k: self._sizes[k] for k in keys}
        sizes = Sizes(snap.__getitem__)
        path = self.path
        return lambda rows, base=0: check_rows(table, rows, sizes, path, base=base)

    def expect_table(self, name: str, loader: "Callable[[], np.ndarray | None] | None") -> None:
        """Have the first read of the whole table ``name`` (``probes``, ``probe_data``,
        ``sketches``...) ask ``loader`` first: another process may be reading it meanwhile. The
        loader returns the rows (their dtype and length must be the dataset's) or None, and then
        the table is read here. Rows it supplies are checked like rows read here. ``None``
        forgets a loader not asked yet."""
        if loader is None:
            self._loaders.pop(name, None)
        elif name not in self._cache:
            self._loaders[name] = loader

    def is_loaded(self, name: str) -> bool:
        """Whether a table is already read whole (and cached)."""
        return name in self._cache

    @property
    def strings(self) -> np.ndarray:
        """All interned strings as a numpy array of ``str`` (index = string id)."""
        if "strings" not in self._cache:
            self._layout("strings")
            if self._version >= 2:
                self._layout("string_ends")
            # a closed trace's offsets cover its bytes exactly; only a recording that died (status
            # "recording") may have lost the offsets of its last strings
            strict = read_attr(self._f, "status", self.path, "/", STATUS_RECORDING) != STATUS_RECORDING
            self._cache["strings"] = self._guard(lambda: read_strings(self._f, self.path, strict=strict))
        return self._cache["strings"]

    def s(self, i: int) -> str:
        """The interned string with id ``i``."""
        return self.strings[int(i)] if i >= 0 else ""

    def string_id(self, s: str) -> int:
        """The id of string ``s``, or -1 when the trace never interned it. Looked up among the
        strings of its length (no dictionary of every string: a big trace holds 100,000 of them
        and an analysis asks for a few), and remembered."""
        ids = self._cache.setdefault("string_ids", {})
        i = ids.get(s)
        if i is None:
            strings = self.strings
            lens = self._cache.get("string_lens")
            if lens is None:
                lens = self._cache["string_lens"] = np.fromiter(map(len, strings), np.int64, count=len(strings))
            cand = np.flatnonzero(lens == len(s))
            hit = cand[strings[cand] == s] if len(cand) else cand
            i = ids[s] = int(hit[0]) if len(hit) else -1
        return i

    @property
    def steps(self) -> np.ndarray:
        """The step table. Raises :class:`TraceError` naming the first damaged step when any
        step's row is damaged (the others stay readable through the per-step accessors)."""
        arr = self._table("steps")
        bad = self.damaged_steps
        if bad:
            s = min(bad)
            more = f"; {len(bad) - 1} more damaged steps" if len(bad) > 1 else ""
            raise corrupt(self.path, f"step {s}: {bad[s]}{more}")
        return arr

    @property
    def damaged_steps(self) -> dict[int, str]:
        """What is wrong with each damaged step row, by step (empty for a sound trace)."""
        if "step_damage" not in self._cache:
            self._cache["step_damage"] = step_damage(self._table("steps"), self._sizes)
        return self._cache["step_damage"]

    def _step_row(self, step: int) -> np.void:
        """One step's row, refused in one line when that step is damaged."""
        st = self._table("steps")[step]
        bad = self.damaged_steps.get(int(step) % max(1, len(self._table("steps"))))
        if bad is not None:
            raise corrupt(self.path, f"step {int(step)}: {bad}")
        return st

    @property
    def n_steps(self) -> int:
        return int(self._layout("steps")[0].shape[0])

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
        st = self._step_row(step)
        start, count = int(st[f"{table[:-1]}_start"]), int(st[f"{table[:-1]}_count"])
        if table in self._cache:
            rows = self._cache[table][start:start + count]
        else:
            ds = self._layout(table)[0]
            rows = self._guard(lambda: ds[start:start + count])
        check_rows(table, rows, self._sizes, self.path, base=start, step=int(st["step"]),
                   block=(start, start + count))
        return rows

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
        return StepView(self._step_row(i), self.events(i), self.tensors(i), self.reshapes(i), self.probes(i), self)

    def event_tensors(self, event_row: int) -> np.ndarray:
        """The tensor rows of one module call (global event row)."""
        if "events" in self._cache:
            ev = self._cache["events"][event_row]
        else:
            n = self.n_rows("events")
            r = int(event_row) + (n if int(event_row) < 0 else 0)
            if not 0 <= r < n:
                raise IndexError(f"event row {event_row} of {n}")
            ev = self.read_rows("events", r, r + 1)[0]
        start, count = int(ev["tensor_start"]), int(ev["tensor_count"])
        if "tensors" in self._cache:
            return self._cache["tensors"][start:start + count]
        return self.read_rows("tensors", start, start + count)

    # probes ------------------------------------------------------------------
    def probe_value(self, row: np.void) -> np.ndarray | None:
        """Decode the data a probe stored (int64 values, a bool mask, float64 values)."""
        enc = int(row["enc"])
        if enc == ENC_NONE:
            return None
        off, n = int(row["data_off"]), int(row["data_len"])
        total = self.n_rows("probe_data")
        if off < 0 or n < 0 or off + n > total:
            raise corrupt(self.path, f"probe bytes [{off}, +{n}) lie outside /probe_data ({total:,} bytes)")
        if "probe_data" in self._cache:
            raw = self._cache["probe_data"][off:off + n]
        else:
            ds = self._layout("probe_data")[0]
            raw = self._guard(lambda: ds[off:off + n])
        try:
            value = decode_probe(raw, enc, shape_of(row))
        except ValueError as e:
            raise corrupt(self.path, f"probe at byte {off}: {_first_line(e)}") from None
        if value is None:
            raise TraceError(f"unknown probe encoding {enc} in {self.path}")
        return value

    def probe_info(self, row: np.void) -> dict:
        s = self.s(int(row["info"]))
        if not s:
            return {}
        try:
            v = loads(s)
        except ValueError as e:
            raise corrupt(self.path, f"probe info (string {int(row['info'])}) is not valid JSON "
                                     f"({_first_line(e)})") from None
        if not isinstance(v, dict):
            raise corrupt(self.path, f"probe info (string {int(row['info'])}) is not a JSON object")
        return v

    # payloads ----------------------------------------------------------------
    @property
    def n_payloads(self) -> int:
        g = self._group("payloads", required=False)
        return 0 if g is None else self._guard(lambda: len(g))

    def _payload(self, i: int) -> h5py.Dataset:
        """Payload dataset ``i``, checked on access: a hard link to a dataset stored in this file,
        of a tensor's dtype, its size backed by stored data."""
        key = ("payload", int(i))
        ds = self._cache.get(key)
        if ds is None:
            g = self._group("payloads", required=False)
            name = str(int(i))
            if g is None or not self._has(g, name):
                raise corrupt(self.path, f"no /payloads/{name}")   # a tensor row names it: the file lost it
            where = f"/payloads/{name}"
            check_link(g, name, self.path, where)
            ds = self._guard(lambda: g[name])
            if not isinstance(ds, h5py.Dataset):
                raise corrupt(self.path, f"{where} is not a dataset")
            check_payload(ds, self.path, where, self._file_size)
            self._cache[key] = ds
        return ds

    def payload(self, i: int, index: Any = ()) -> np.ndarray:
        """A saved tensor (or a slice of it, ``index``), read on demand."""
        ds = self._payload(i)
        return self._guard(lambda: ds[index] if index != () else ds[()])

    def payload_attrs(self, i: int) -> dict:
        ds = self._payload(i)
        where = f"/payloads/{int(i)}/"
        names = self._guard(lambda: list(ds.attrs)[:64])
        return {k: read_attr(ds, k, self.path, where) for k in names}

    # convenience -------------------------------------------------------------
    def iter_steps(self) -> Iterator[StepView]:
        for i in range(self.n_steps):
            yield self.step(i)

    def event_path(self, row: np.void) -> str:
        return self.module_path(int(row["module"]))

    # notebooks and the REPL (vlmscope/trace/notebook.py) ----------------------------
    def view(self, table: str = "steps", step: int | None = None, kind: str | None = None,
             max_rows: int = notebook.MAX_ROWS) -> notebook.TableView:
        """A readable view of a table (``steps``, ``events``, ``tensors``, ``reshapes``, ``probes``,
        ``modules``), of one step's rows with ``step=``, of the probes of one ``kind=``: strings
        resolved, a bounded ``repr`` and ``_repr_html_``, ``.rows`` (the numpy array the accessor
        returns) and ``.to_pandas()`` (pandas optional)."""
        return notebook.TableView(self, table, step=step, kind=kind, max_rows=max_rows)

    def __repr__(self) -> str:
        """Path, format, status, model, table sizes and the first steps (never raises)."""
        return notebook.trace_repr(self)

    def _repr_html_(self) -> str:
        return notebook.trace_html(self)


#: Bytes per block when a whole table is read and checked (see :meth:`Trace._table`).
_CHECK_BYTES = 8 << 20
_ROW_TABLES = ("modules", "events", "tensors", "reshapes", "probes", "sketches")
_DTYPES = {**TABLES, **OPTIONAL_TABLES, "strings": np.dtype(np.uint8), "string_ends": np.dtype(np.int64),
           "probe_data": np.dtype(np.uint8), "sketch_data": np.dtype(np.float16)}
_STATUSES = (STATUS_RECORDING, STATUS_COMPLETE, STATUS_INCOMPLETE, STATUS_FAILED)
#: Types of the run metadata fields the analyses and commands use (each may also be null).
_META_TYPES: dict[str, type | tuple[type, ...]] = {
    **{k: str for k in ("family", "model", "model_class", "dtype", "device", "attn_implementation",
                        "decoder_layers", "text_model", "vision_model", "merger", "prompt", "generated_text")},
    **{k: int for k in ("image_token_id", "num_key_value_heads", "num_attention_heads", "sketch_version")},
    "warnings": list, "image": dict, "generation": dict,
}


def open_trace(path: str | os.PathLike) -> Trace:
    """Open a trace lazily. Raises :class:`TraceError` with a one-line message on bad files."""
    return Trace(path)


def _identity(f: h5py.File) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime in ns) of an open h5py file read from disk, else None."""
    try:
        if f.driver != "sec2":
            return None
        st = os.fstat(f.id.get_vfd_handle())
    except Exception:  # noqa: BLE001 - no file descriptor to ask: treat as not a plain file
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_same_file(path: str | os.PathLike, identity: tuple[int, int, int, int] | None) -> h5py.File:
    """Open ``path`` for reading (a forked helper opens its own handle), making sure it is the
    file of that :meth:`Trace.file_identity`, not one put at the same path since: OSError if not."""
    f = h5py.File(path, "r")
    if identity is None or _identity(f) != identity:
        f.close()
        raise OSError(f"{path} is no longer the file the trace has open")
    return f
