"""``TraceWriter``: appends a trace step by step to ``NAME.h5.partial`` and renames it when closed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .format import (
    _CACHE_BYTES, CHUNK_BYTES, COMPRESSION, FORMAT_NAME, FORMAT_VERSION, STATUS_COMPLETE, STATUS_RECORDING, TABLES,
    _encode_strings, _jsonable,
)


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
