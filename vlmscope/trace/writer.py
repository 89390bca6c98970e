"""``TraceWriter``: records a trace step by step into the journal ``NAME.h5.partial``
(:mod:`.journal`) and turns it into the HDF5 trace ``NAME.h5`` when closed."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import journal as J
from .sketch import SKETCH_VERSION
from .format import _CACHE_BYTES, OPTIONAL_TABLES, STATUS_COMPLETE, TABLES, _encode_strings, _first_line, _jsonable


class TraceWriteError(OSError):
    """Writing the trace failed (a full disk, a quota, a file-size limit, a vanished directory).

    ``steps`` finished steps are safe in ``path`` (the journal, readable with ``open_trace``);
    ``str(e)`` is one line for the user."""

    def __init__(self, message: str, *, path: Path, steps: int, cause: BaseException | None = None):
        super().__init__(getattr(cause, "errno", None) or errno.EIO, message)
        self.message, self.path, self.steps = message, path, steps

    def __str__(self) -> str:
        return self.message


def _bytes(a: np.ndarray) -> memoryview:
    """The bytes of an array, without a copy when it is contiguous."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _reason(e: BaseException) -> str:
    """What failed, in a few words: the OS's reason (``No space left on device``), else the first line."""
    return e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)


class TraceWriter:
    """Appends a trace to the journal ``PATH.partial`` step by step; ``close`` converts it to PATH.

    Nothing written is ever rewritten: each record is appended with its CRC, and
    ``end_step`` appends a commit and hands the bytes to the OS, so a process killed at any
    moment leaves every finished step readable (``open_trace`` replays the journal).
    ``fsync=True`` also forces each step to the disk (power loss; it costs a disk flush per step).

    ``overwrite=False`` refuses to start when PATH or PATH.partial exists (``FileExistsError``);
    the journal is always created exclusively, so two writers never share one.
    A write error raises :class:`TraceWriteError` once; the writer then ignores further writes,
    and ``close`` raises it again, leaving the journal with every committed step.
    """

    def __init__(self, path: str | os.PathLike, meta: dict | None = None, config_json: str | None = None,
                 *, overwrite: bool = True, fsync: bool = False):
        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.fsync = fsync
        self.overwrite = overwrite
        self.closed = False
        self.failed: TraceWriteError | None = None
        self.committed_steps = 0
        if not overwrite:
            for p in (self.path, self.partial_path):
                if p.exists() or p.is_symlink():
                    raise FileExistsError(errno.EEXIST, "file exists", str(p))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.partial_path.unlink(missing_ok=True)
        self._fh = open(self.partial_path, "xb", buffering=1 << 20)   # noqa: SIM115 - closed by close()
        self._strings: dict[str, int] = {}
        self._pending_strings: list[str] = []
        self.string_bytes = 0
        self.n_strings = 0
        self.counts = {name: 0 for name in (*TABLES, *OPTIONAL_TABLES)}
        self.sketch_values = 0   # float16 values in /sketch_data
        self.probe_bytes = 0
        self.n_payloads = 0
        self.payload_bytes = 0
        self._run = _jsonable(meta or {})
        try:
            self._fh.write(J.header_bytes())
            self._put(J.META, "created", time.strftime("%Y-%m-%dT%H:%M:%S%z").encode())
            self._put(J.META, "run_json", json.dumps(self._run).encode())
            self._put(J.META, "config_json", (config_json or "{}").encode())
        except TraceWriteError:
            self._abandon()
            raise
        self.intern("")

    # low level -------------------------------------------------------------
    def _put(self, rtype: int, name: str, payload: bytes | memoryview) -> None:
        if self.failed is not None:
            return
        try:
            for piece in J.record_bytes(rtype, name, payload):
                self._fh.write(piece)
        except (OSError, ValueError) as e:   # ValueError: the file object was closed under us
            self._fail(e)

    def _fail(self, e: BaseException, kept: str = "finished") -> None:
        """Remember the write error ``e`` (the one line says how many steps the journal keeps:
        ``N finished steps``, or ``all N steps`` when only the final conversion failed) and raise it."""
        n = self.committed_steps
        what = f"all {n} step{'s' if n != 1 else ''}" if kept == "all" else f"{n} finished step{'s' if n != 1 else ''}"
        self.failed = TraceWriteError(f"cannot write the trace ({_reason(e)}); {what} kept in {self.partial_path}",
                                      path=self.partial_path, steps=n, cause=e)
        raise self.failed from None

    def _abandon(self) -> None:
        try:
            self._fh.close()
        except (OSError, ValueError):
            pass

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
            self._put(J.ROWS, "strings", _bytes(blob))
        self._put(J.ROWS, "string_ends", _bytes(ends))   # after the bytes they point into
        self.string_bytes = int(ends[-1])
        self.n_strings += len(ends)
        self._pending_strings = []

    # tables --------------------------------------------------------------
    def append(self, table: str, rows: np.ndarray) -> int:
        """Append a block of rows; returns the index of the first one."""
        n = self.counts[table]
        if len(rows):
            dt = TABLES[table] if table in TABLES else OPTIONAL_TABLES[table]
            self._put(J.ROWS, table, _bytes(rows.astype(dt, copy=False)))
            self.counts[table] = n + len(rows)
        return n

    def append_probe_data(self, blob: bytes | np.ndarray) -> int:
        data = np.frombuffer(blob, dtype=np.uint8) if isinstance(blob, (bytes, bytearray, memoryview)) \
            else np.ascontiguousarray(blob).view(np.uint8).ravel()
        n = self.probe_bytes
        if len(data):
            self._put(J.ROWS, "probe_data", _bytes(data))
            self.probe_bytes = n + len(data)
        return n

    def append_sketch_data(self, values: np.ndarray) -> int:
        """Append float16 sketch values; returns the element offset of the first one."""
        data = np.ascontiguousarray(values, dtype=np.float16).ravel()
        n = self.sketch_values
        if len(data):
            if not n:     # the first sketches: say which definition they follow
                self.update_meta(sketch_version=SKETCH_VERSION)
            self._put(J.ROWS, "sketch_data", _bytes(data))
            self.sketch_values = n + len(data)
        return n

    def add_payload(self, array: np.ndarray, **attrs: Any) -> int:
        i = self.n_payloads
        self._put(J.PAYLOAD, str(i), J.payload_record(array, _jsonable(attrs)))
        self.n_payloads += 1
        self.payload_bytes += array.nbytes
        return i

    def set_modules(self, rows: np.ndarray) -> None:
        self.append("modules", rows)

    def update_meta(self, **fields: Any) -> None:
        self._run.update(_jsonable(fields))
        self._put(J.META, "run_json", json.dumps(self._run).encode())

    def set_config(self, config_json: str) -> None:
        self._put(J.META, "config_json", config_json.encode())

    def end_step(self) -> None:
        """Commit everything appended so far: it survives the process from here on."""
        self._flush_strings()
        self._put(J.COMMIT, "", json.dumps({"n_steps": self.counts["steps"]}).encode())
        self._sync()
        if self.failed is None:
            self.committed_steps = self.counts["steps"]

    def _sync(self) -> None:
        if self.failed is not None:
            return
        try:
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
        except (OSError, ValueError) as e:
            self._fail(e)

    def set_error(self, *, type: str, message: str, step: int, module_stack: list[str],
                  last_reshape: dict | None, traceback: str = "") -> None:
        info = {"type": type, "message": message, "step": int(step), "module_stack": json.dumps(module_stack),
                "last_reshape": json.dumps(_jsonable(last_reshape) if last_reshape else None),
                "traceback": traceback}
        self._put(J.ERROR, "", json.dumps(info).encode())

    def close(self, status: str = STATUS_COMPLETE) -> Path:
        """Mark the trace with ``status`` and turn the journal into the HDF5 trace PATH.

        An incomplete or failed recording is converted too, so that it opens like any other;
        its status says what happened. The trace is written under a temporary name and
        linked into place; the journal is removed only after that. When writing fails, the
        journal stays (with every committed step) and :class:`TraceWriteError` is raised.
        """
        if self.closed:
            return self.path
        if self.failed is None:
            try:
                self._flush_strings()
                self._put(J.CLOSE, "", json.dumps({"status": status, "n_steps": self.counts["steps"],
                                                   "closed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
                self._sync()
            except TraceWriteError:
                pass
        self._abandon()
        self.closed = True
        if self.failed is not None:
            raise self.failed
        self.committed_steps = self.counts["steps"]
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        created = False
        try:
            with h5py.File(tmp, "w-", libver="latest", rdcc_nbytes=_CACHE_BYTES) as f:   # w-: never truncate
                created = True
                J.convert(self.partial_path, f)
            _link_into_place(tmp, self.path, self.overwrite)
        except BaseException as e:  # noqa: BLE001 - h5py raises many types for a full disk; the journal is intact
            if created:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass
            if not isinstance(e, Exception):    # interrupted while converting: the journal is the trace
                raise
            self._fail(e, kept="all")
        self.partial_path.unlink(missing_ok=True)
        return self.path


def _link_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``path``. Without ``overwrite``, a file that appeared at ``path`` since
    the writer started is never replaced (``os.link`` fails instead of clobbering it)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "another process created it during the recording", str(path)) from None
    except OSError:               # no hard links here (some network and FUSE file systems)
        if path.exists():
            raise FileExistsError(errno.EEXIST, "another process created it during the recording",
                                  str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()
