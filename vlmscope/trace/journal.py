"""The recording journal: what ``NAME.h5.partial`` holds while a recording runs.

A recording appends *records* to a plain file and never rewrites a byte it has written. Each
record carries its length and a CRC-32; a ``COMMIT`` record ends each step. A process killed at
any moment (SIGKILL, an OOM kill, a pre-emption) therefore leaves a file whose committed prefix
is intact: :func:`replay` rebuilds a trace from every record up to the last valid ``COMMIT`` and
drops the torn tail. A clean close replays the journal into the final HDF5 file (``convert``),
which is written under a temporary name and linked into place, so the journal is removed only
once the trace exists.

Layout (little-endian), documented in ``docs/trace-format.md``::

    file    := HEADER record*
    HEADER  := b"VLMSCOPE-JOURNAL" u32 version u32 0 u64 0                      (32 bytes)
    record  := b"VJ" u8 type u16 name_len u64 payload_len u32 crc32 name payload
               crc32 covers type, name_len, payload_len, name and payload

Record types: ``META`` (name ``run_json``, ``config_json`` or ``created``; UTF-8 text), ``ROWS`` (name a
table, ``strings``, ``string_ends`` or ``probe_data``; raw rows in the format's dtype),
``PAYLOAD`` (name the payload number; u32 header length, a JSON header ``{dtype, shape, attrs}``,
raw C-order bytes), ``ERROR`` (JSON attributes of ``/error``), ``COMMIT`` (JSON
``{"n_steps": n}``), ``CLOSE`` (JSON ``{"status": s, "closed": t}``, also a commit).

h5py, hdf5plugin, numpy and the standard library only.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from .format import (
    _CACHE_BYTES, CHUNK_BYTES, COMPRESSION, FORMAT_NAME, FORMAT_VERSION, SKETCH_COMPRESSION, STATUS_INCOMPLETE,
    STATUS_RECORDING, TABLES, OPTIONAL_TABLES, TraceError, _first_line,
)

MAGIC = b"VLMSCOPE-JOURNAL"
JOURNAL_VERSION = 1
_HEADER = struct.Struct("<16sIIQ")
_REC = struct.Struct("<2sBHQI")
_REC_MAGIC = b"VJ"

META, ROWS, PAYLOAD, ERROR, COMMIT, CLOSE = 1, 2, 3, 4, 5, 6
_TYPES = {META, ROWS, PAYLOAD, ERROR, COMMIT, CLOSE}
_MAX_NAME = 256
_MAX_JSON = 64 << 20
#: every dataset a ROWS record may name, with its row dtype
ROW_DTYPES: dict[str, np.dtype] = {**TABLES, **OPTIONAL_TABLES, "strings": np.dtype(np.uint8),
                                   "string_ends": np.dtype(np.int64), "probe_data": np.dtype(np.uint8),
                                   "sketch_data": np.dtype(np.float16)}
_CHUNK_ROWS = {"strings": CHUNK_BYTES // 4, "string_ends": CHUNK_BYTES // 32, "probe_data": CHUNK_BYTES // 4,
               "sketch_data": CHUNK_BYTES // 2}
_PAYLOAD_KINDS = set("biuf")
_PAYLOAD_MAX_DIMS = 32


def is_journal(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the journal's magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def header_bytes() -> bytes:
    return _HEADER.pack(MAGIC, JOURNAL_VERSION, 0, 0)


def record_bytes(rtype: int, name: str, payload: bytes | memoryview) -> list[bytes | memoryview]:
    """The pieces of one record, ready to write (header, name, payload)."""
    nb = name.encode("utf-8")
    n = memoryview(payload).nbytes
    crc = zlib.crc32(payload, zlib.crc32(nb, zlib.crc32(struct.pack("<BHQ", rtype, len(nb), n))))
    return [_REC.pack(_REC_MAGIC, rtype, len(nb), n, crc) + nb, payload]


def payload_record(array: np.ndarray, attrs: dict[str, Any]) -> bytes:
    arr = np.ascontiguousarray(array)
    head = json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape), "attrs": attrs}).encode()
    return struct.pack("<I", len(head)) + head + arr.tobytes()


# --------------------------------------------------------------------------- reading a journal


@dataclass
class _Record:
    rtype: int
    name: str
    offset: int      # of the payload in the file
    length: int


@dataclass
class Scan:
    """What a journal holds: its records up to the last valid commit, and how it ends."""
    records: list[_Record] = field(default_factory=list)
    n_steps: int = 0
    closed_status: str | None = None
    closed_time: str = ""
    damage: str | None = None    # why the scan stopped before the end of the file (None: clean end)
    committed_bytes: int = 0


def scan(fh: BinaryIO, size: int, label: str) -> Scan:
    """Read every record header, check each CRC, and keep the records up to the last commit.

    The file is untrusted: every length is checked against the bytes that remain before it
    is read, names and JSON are bounded, and a bad record ends the scan (with ``damage`` set)
    instead of raising, so that every step committed before it stays readable.
    """
    fh.seek(0)
    head = fh.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise TraceError(f"trace is truncated or corrupt (journal header cut short): {label}")
    magic, version, _, _ = _HEADER.unpack(head)
    if magic != MAGIC:
        raise TraceError(f"not a vlmscope recording journal: {label}")
    if version > JOURNAL_VERSION:
        raise TraceError(f"journal version {version} is newer than this vlmscope reads "
                         f"(version {JOURNAL_VERSION}); upgrade vlmscope: {label}")
    out = Scan(committed_bytes=_HEADER.size)
    pending: list[_Record] = []
    pos = _HEADER.size
    while pos < size:
        raw = fh.read(_REC.size)
        if len(raw) < _REC.size:
            out.damage = f"a record header is cut short at byte {pos}"
            break
        magic, rtype, nlen, plen, crc = _REC.unpack(raw)
        if magic != _REC_MAGIC or rtype not in _TYPES or nlen > _MAX_NAME:
            out.damage = f"no valid record at byte {pos}"
            break
        body_at = pos + _REC.size
        if plen > size - body_at - nlen:
            out.damage = f"the record at byte {pos} is cut short"
            break
        nb = fh.read(nlen)
        c = zlib.crc32(nb, zlib.crc32(struct.pack("<BHQ", rtype, nlen, plen)))
        # the payload is checked in pieces: a record can be large (saved tensors)
        left = plen
        while left:
            piece = fh.read(min(left, 8 << 20))
            if not piece:
                break
            c = zlib.crc32(piece, c)
            left -= len(piece)
        if left or c != crc:
            out.damage = f"the record at byte {pos} fails its checksum"
            break
        try:
            name = nb.decode("utf-8")
        except UnicodeDecodeError:
            out.damage = f"the record at byte {pos} has a garbled name"
            break
        rec = _Record(rtype, name, body_at + nlen, plen)
        pos = body_at + nlen + plen
        if rtype in (COMMIT, CLOSE):
            try:
                info = _json_at(fh, rec)
                n_steps = int(info.get("n_steps", out.n_steps))
            except (ValueError, TypeError, AttributeError):
                out.damage = f"the commit record at byte {rec.offset} is garbled"
                break
            fh.seek(pos)
            out.records.extend(pending)
            pending = []
            out.n_steps = n_steps
            out.committed_bytes = pos
            if rtype == CLOSE:
                out.closed_status = str(info.get("status", STATUS_INCOMPLETE))
                out.closed_time = str(info.get("closed", ""))
        else:
            pending.append(rec)
    if pending and out.damage is None:
        out.damage = f"{len(pending)} records after the last finished step were never committed"
    return out


def _read(fh: BinaryIO, rec: _Record) -> bytes:
    fh.seek(rec.offset)
    return fh.read(rec.length)


def _json_at(fh: BinaryIO, rec: _Record) -> Any:
    if rec.length > _MAX_JSON:
        raise ValueError("JSON record too large")
    return json.loads(_read(fh, rec).decode("utf-8"))


class _Table:
    """Rows of one dataset on their way into HDF5: written in whole chunks, once each."""

    def __init__(self, ds: h5py.Dataset, dtype: np.dtype):
        self.ds, self.dtype = ds, dtype
        self.chunk = ds.chunks[0]
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def add(self, rows: np.ndarray) -> None:
        self.parts.append(rows)
        self.buffered += len(rows)
        if self.buffered >= self.chunk * 4:
            self.flush(whole_chunks=True)

    def flush(self, whole_chunks: bool = False) -> None:
        if not self.buffered:
            return
        rows = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        k = (len(rows) // self.chunk) * self.chunk if whole_chunks else len(rows)
        if k:
            ds = self.ds
            ds.resize((self.written + k,))
            fspace = ds.id.get_space()
            fspace.select_hyperslab((self.written,), (k,))
            ds.id.write(h5py.h5s.create_simple((k,)), fspace, np.ascontiguousarray(rows[:k]))
            self.written += k
        rest = rows[k:]
        self.parts = [rest] if len(rest) else []
        self.buffered = len(rest)


def create_layout(f: h5py.File, sizes: dict[str, int] | None = None) -> dict[str, _Table]:
    """Create the empty datasets and groups of a trace in ``f`` (format ``FORMAT_VERSION``).
    ``sizes``: the rows each table will hold, when known: a table smaller than a chunk gets a
    chunk of its own size (HDF5 checksums and compresses whole chunks, padding included, so a
    small recording would pay for a MiB of padding per table when it is closed)."""
    tables = {}
    for name, dt in ROW_DTYPES.items():
        rows = _CHUNK_ROWS.get(name, max(256, CHUNK_BYTES // dt.itemsize))
        if sizes is not None:
            rows = max(1, min(rows, sizes.get(name, 0)))
        ds = f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(rows,), fletcher32=True,
                              **(SKETCH_COMPRESSION if name == "sketch_data" else COMPRESSION))
        tables[name] = _Table(ds, dt)
    f.create_group("meta")
    f.create_group("payloads")
    return tables


def write_payload(group: h5py.Group, index: int, array: np.ndarray, attrs: dict[str, Any]) -> None:
    """One saved tensor as ``/payloads/<index>``, checksummed (chunked) when it is not a scalar."""
    opts: dict[str, Any] = {}
    if array.ndim and array.size:
        opts["fletcher32"] = True
        if array.size > 1024:
            opts.update(COMPRESSION)
    ds = group.create_dataset(str(index), data=array, **opts)
    for k, v in attrs.items():
        ds.attrs[k] = v


def _payload(fh: BinaryIO, rec: _Record) -> tuple[np.ndarray, dict]:
    body = _read(fh, rec)
    if len(body) < 4:
        raise ValueError("payload record cut short")
    (hlen,) = struct.unpack_from("<I", body)
    if hlen > min(len(body) - 4, _MAX_JSON):
        raise ValueError("payload header length out of range")
    head = json.loads(body[4:4 + hlen].decode("utf-8"))
    dt = np.dtype(str(head["dtype"]))
    shape = tuple(int(d) for d in head["shape"])
    if dt.kind not in _PAYLOAD_KINDS or dt.hasobject or len(shape) > _PAYLOAD_MAX_DIMS or min(shape, default=0) < 0:
        raise ValueError(f"payload of unsupported dtype {dt} or shape {shape}")
    data = memoryview(body)[4 + hlen:]
    if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(data):
        raise ValueError("payload size does not match its shape")
    attrs = head.get("attrs", {})
    if not isinstance(attrs, dict):
        raise ValueError("payload attributes are not an object")
    return np.frombuffer(data, dtype=dt).reshape(shape), attrs


def convert(journal: str | os.PathLike, target: h5py.File, label: str | None = None) -> Scan:
    """Replay the committed records of ``journal`` into ``target`` (an empty, writable h5py
    File) as a complete trace file, and return the scan (its ``damage`` says what was dropped)."""
    journal = Path(journal)
    label = label or str(journal)
    with open(journal, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        sc = scan(fh, size, label)
        f = target
        sizes: dict[str, int] = {}
        for rec in sc.records:
            if rec.rtype == ROWS and rec.name in ROW_DTYPES:
                sizes[rec.name] = sizes.get(rec.name, 0) + rec.length // ROW_DTYPES[rec.name].itemsize
        tables = create_layout(f, sizes)
        meta = {"run_json": "{}", "config_json": "{}", "created": ""}
        n_payloads = 0
        for rec in sc.records:
            try:
                if rec.rtype == ROWS:
                    dt = ROW_DTYPES.get(rec.name)
                    if dt is None or rec.length % dt.itemsize:
                        raise ValueError(f"rows of {rec.name!r} do not fit its row size")
                    tables[rec.name].add(np.frombuffer(_read(fh, rec), dtype=dt))
                elif rec.rtype == META:
                    if rec.name not in meta or rec.length > _MAX_JSON:
                        raise ValueError(f"unknown metadata {rec.name!r}")
                    meta[rec.name] = _read(fh, rec).decode("utf-8")
                elif rec.rtype == PAYLOAD:
                    array, attrs = _payload(fh, rec)
                    write_payload(f["payloads"], n_payloads, array, attrs)
                    n_payloads += 1
                elif rec.rtype == ERROR:
                    info = _json_at(fh, rec)
                    g = f.require_group("error")
                    for k in ("type", "message", "module_stack", "last_reshape", "traceback"):
                        g.attrs[k] = str(info.get(k, ""))
                    g.attrs["step"] = int(info.get("step", -1))
            except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
                raise TraceError(f"trace is truncated or corrupt (journal record at byte {rec.offset}: {e}): "
                                 f"{label}") from None
        for t in tables.values():
            t.flush()
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["status"] = sc.closed_status or STATUS_RECORDING
    f.attrs["n_steps"] = min(sc.n_steps, tables["steps"].written)
    f.attrs["created"] = meta["created"]
    if sc.closed_time:
        f.attrs["closed"] = sc.closed_time
    if sc.damage and sc.closed_status is None:
        f.attrs["recovered"] = f"recovered from a recording that did not finish: {sc.damage}"
    f["meta"].attrs["run_json"] = meta["run_json"]
    f["meta"].attrs["config_json"] = meta["config_json"]
    return sc


def replay_in_memory(journal: str | os.PathLike) -> h5py.File:
    """The trace a journal holds, as an in-memory h5py File (nothing is written to disk)."""
    name = f"vlmscope-replay-{os.getpid()}-{id(journal)}-{time.monotonic_ns()}"
    f = h5py.File(name, "w", driver="core", backing_store=False, libver="latest", rdcc_nbytes=_CACHE_BYTES)
    try:
        convert(journal, f)
        f.flush()
    except TraceError:
        f.close()
        raise
    except Exception as e:  # noqa: BLE001 - h5py and numpy raise many types on odd input: one line
        f.close()
        raise TraceError(f"trace is truncated or corrupt (journal: {_first_line(e)}): {journal}") from None
    except BaseException:
        f.close()
        raise
    return f
