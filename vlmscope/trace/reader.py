"""The lazy trace reader: ``open_trace`` and ``Trace``. Every damaged-file error becomes a one-line
:class:`TraceError`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .format import (
    _CACHE_BYTES, CHUNK_BYTES, ENC_NONE, FORMAT_NAME, FORMAT_VERSION, STATUS_COMPLETE, STATUS_INCOMPLETE, STATUS_RECORDING, TABLES,
    TraceError, _decode, _first_line, decode_probe, read_strings, shape_of,
)


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
        except Exception:  # noqa: BLE001 - closing a damaged user file can fail too; nothing is left to keep
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
            except Exception as e:  # noqa: BLE001 - the user's file is damaged (h5py raises many types): one line
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
        except Exception as e:  # noqa: BLE001 - the user's file is damaged (h5py raises many types): one line
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

    @property
    def strings(self) -> np.ndarray:
        """All interned strings as a numpy array of ``str`` (index = string id)."""
        if "strings" not in self._cache:
            try:
                self._cache["strings"] = read_strings(self._f)
            except Exception as e:  # noqa: BLE001 - the user's file is damaged (h5py raises many types): one line
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
        except Exception as e:  # noqa: BLE001 - the user's file is damaged (h5py raises many types): one line
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



def open_trace(path: str | os.PathLike) -> Trace:
    """Open a trace lazily. Raises :class:`TraceError` with a one-line message on bad files."""
    return Trace(path)
