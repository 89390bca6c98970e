"""A fuzz harness for hostile trace files (issue 13): mutate real and synthetic traces, run every
reader accessor and the trace commands on each, and judge what comes back.

Three parts:

- :func:`mutate` ``(src, dst, rng) -> Mutation``: a seeded mutation engine. Byte-level classes
  (truncation, bit flips in the HDF5 metadata or in data chunks, zeroed or garbage ranges,
  non-HDF5 files) and h5py-level ones (deleted or renamed objects and attributes, attributes of
  the wrong type, newer format versions, tables of the wrong dtype, string offsets past the end,
  out-of-range row references, huge declared dimensions, parent cycles, soft / external links,
  HDF5 external storage and virtual datasets pointing at other files, plausible value edits).
- :func:`run_case`: one case in this process: mutate, then ``open_trace`` and every accessor
  (``api``) and the commands ``summary``, ``check``, ``diff`` (against the unmutated original)
  and ``snapshot``, each judged against the same command on the original.
- :func:`supervise`: runs cases in worker subprocesses that each process many cases, with a
  memory cap (``RLIMIT_AS``) and a per-run timeout; a worker that hangs or dies is killed and
  replaced, and the case resumes at the next run, so a hang costs one run.

Outcomes of one run (:data:`OUTCOMES`):

``ok``                the same result as on the original (or a plausible edit read as such);
``partial``           a result that differs from the original's, with a warning saying so;
``error-exit-3``      refused: exit 3 with a one-line message (API: a one-line ``TraceError``);
``bad-exit``          refused badly: another exit code, or exit 3 with no or a multi-line message;
``traceback``         a Python exception escaped (detail: its last line and where it was raised);
``silently-different`` exit 0/1 (API: no error) with a result that differs from the original's
                      and no warning, on a file whose damage a reader can detect (HDF5 reports
                      it, or the mutation broke the format's structure);
``silent-unchecked``  the same, after a byte mutation that only changed stored values no checksum
                      covers (a bit flip inside a data chunk of a dataset without fletcher32, an
                      attribute string in the unchecksummed global heap): undetectable by any
                      reader of that file, reported but not a reader bug;
``hang``              ran past the timeout (the worker is killed);
``blowup``            ``MemoryError`` under the memory cap, or killed by the kernel;
``crash``             the worker died of a signal (segfault, abort) or exited on its own.

numpy, h5py, hdf5plugin and the stdlib only: the command group is resolved by name (:data:`CLI_TARGET`)
when a run starts, so importing this module loads neither click nor the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from vlmscope.trace import FORMAT_VERSION, TABLES, TraceError, open_trace

__all__ = [
    "COMMANDS", "OUTCOMES", "FAILURES", "MUTATION_CLASSES", "Mutation", "mutate", "make_sources", "run_case",
    "supervise", "tabulate", "CaseResult",
]

COMMANDS = ("api", "summary", "check", "diff", "snapshot")
OUTCOMES = ("ok", "partial", "error-exit-3", "bad-exit", "traceback", "silently-different", "silent-unchecked",
            "hang", "blowup", "crash", "harness-error")
#: Outcomes that are bugs of vlmscope (``silent-unchecked`` is reported, not counted).
FAILURES = ("bad-exit", "traceback", "silently-different", "hang", "blowup", "crash")
_SEVERITY = {o: i for i, o in enumerate(("ok", "error-exit-3", "partial", "silent-unchecked", "silently-different",
                                         "bad-exit", "traceback", "hang", "blowup", "crash", "harness-error"))}

# Mutation kinds: how a changed result is judged.
BYTE = "byte"          # byte-level: judged by what HDF5 sees of the damage (content digest)
INVALID = "invalid"    # structure broken: a changed result needs a warning
VALUE = "value"        # invalid values in table rows: raw table accessors may return them as stored
VALID = "valid"        # a plausible edit: any result is fine, as long as nothing escapes

# ============================================================================ mutations


@dataclass
class Mutation:
    cls: str
    desc: str
    kind: str

    def __str__(self) -> str:
        return f"{self.cls}: {self.desc}"


@dataclass
class _SrcInfo:
    size: int
    regions: list          # (dataset, offset, size, checksummed) of every stored data block
    tables: dict           # name -> rows
    payloads: list         # payload dataset names
    meta_attrs: list
    datasets: list


_INFO: dict[str, _SrcInfo] = {}


def _src_info(src: Path) -> _SrcInfo:
    key = str(src)
    if key not in _INFO:
        regions, tables, datasets = [], {}, []
        with h5py.File(src, "r") as f:
            def visit(name: str, obj: Any) -> None:
                if not isinstance(obj, h5py.Dataset):
                    return
                datasets.append(name)
                ck = bool(obj.fletcher32)
                if obj.chunks:
                    for i in range(obj.id.get_num_chunks()):
                        ci = obj.id.get_chunk_info(i)
                        if ci.byte_offset is not None and ci.size:
                            regions.append((name, int(ci.byte_offset), int(ci.size), ck))
                else:
                    off = obj.id.get_offset()
                    if off is not None and obj.id.get_storage_size():
                        regions.append((name, int(off), int(obj.id.get_storage_size()), ck))
            f.visititems(visit)
            for name in (*TABLES, "strings", "string_ends", "probe_data"):
                if name in f:
                    tables[name] = int(f[name].shape[0])
            if "string_ends" not in tables and "strings" in f:      # format 1: one string per row
                tables["string_ends"] = tables["strings"]
            payloads = sorted(f["payloads"].keys(), key=lambda s: int(s)) if "payloads" in f else []
            meta_attrs = list(f["meta"].attrs) if "meta" in f else []
        _INFO[key] = _SrcInfo(src.stat().st_size, regions, tables, payloads, meta_attrs, datasets)
    return _INFO[key]


def _pick(rng: np.random.Generator, seq: Any) -> Any:
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _meta_intervals(info: _SrcInfo) -> list[tuple[int, int]]:
    """Byte ranges of the file outside every data block: superblock, object headers, B-trees,
    heaps, free space."""
    out, pos = [], 0
    for _, off, n, _ in sorted(info.regions, key=lambda r: r[1]):
        if off > pos:
            out.append((pos, off))
        pos = max(pos, off + n)
    if pos < info.size:
        out.append((pos, info.size))
    return out


def _offset_in(rng: np.random.Generator, intervals: list[tuple[int, int]]) -> int:
    lens = np.array([b - a for a, b in intervals], dtype=float)
    a, b = intervals[int(rng.choice(len(intervals), p=lens / lens.sum()))]
    return int(rng.integers(a, b))


def _flip(buf: bytearray, off: int, rng: np.random.Generator) -> str:
    bit = int(rng.integers(8))
    buf[off] ^= 1 << bit
    return f"{off}:{bit}"


# ---------------------------------------------------------------------------- byte level


def _m_truncate(src: Path, dst: Path, rng: np.random.Generator) -> tuple[str, str]:
    info = _src_info(src)
    data = src.read_bytes()
    how = _pick(rng, ("fraction", "tail", "chunk", "head"))
    if how == "fraction":
        n = int(info.size * rng.uniform(0.02, 0.98))
    elif how == "tail":
        n = info.size - int(rng.integers(1, 4097))
    elif how == "chunk" and info.regions:
        name, off, size, _ = _pick(rng, info.regions)
        n = off + int(rng.integers(0, size))
        how = f"inside a data chunk of /{name}"
    else:
        n = int(rng.integers(0, 2048))
    n = max(0, min(n, info.size - 1))
    dst.write_bytes(data[:n])
    return f"truncated to {n} of {info.size} bytes ({how})", BYTE


def _m_bitflip_header(src: Path, dst: Path, rng: np.random.Generator) -> tuple[str, str]:
    info = _src_info(src)
    buf = bytearray(src.read_bytes())
    iv = _meta_intervals(info)
    if rng.random() < 0.3:
        iv = [(0, min(info.size, 2048))]              # the superblock and the root group's header
    flips = [_flip(buf, _offset_in(rng, iv), rng) for _ in range(int(rng.integers(1, 5)))]
    dst.write_bytes(bytes(buf))
    return f"bit flips outside data chunks at {' '.join(flips)}", BYTE


def _m_bitflip_data(src: Path, dst: Path, rng: np.random.Generator) -> tuple[str, str]:
    info = _src_info(src)
    buf = bytearray(src.read_bytes())
    name, off, size, ck = _pick(rng, info.regions)
    flips = [_flip(buf, off + int(rng.integers(size)), rng) for _ in range(int(rng.integers(1, 4)))]
    dst.write_bytes(bytes(buf))
    return f"bit flips in a data chunk of /{name}{'' if ck else ' (no checksum)'} at {' '.join(flips)}", BYTE


def _m_zero_range(src: Path, dst: Path, rng: np.random.Generator) -> tuple[str, str]:
    info = _src_info(src)
    buf = bytearray(src.read_bytes())
    n = int(_pick(rng, (4096, 4096, 512, 64, 8)))
    where = _pick(rng, ("anywhere", "aligned", "chunk", "meta"))
    if where == "chunk" and info.regions:
        name, off, size, _ = _pick(rng, info.regions)
        start, n = off, min(n, size)
        where = f"start of a data chunk of /{name}"
    elif where == "meta":
        start = _offset_in(rng, _meta_intervals(info))
    elif where == "aligned":
        start = int(rng.integers(0, max(1, info.size // 4096))) * 4096
    else:
        start = int(rng.integers(0, info.size))
    fill = _pick(rng, ("zero", "zero", "ff", "random"))
    end = min(info.size, start + n)
    if fill == "zero":
        buf[start:end] = bytes(end - start)
    elif fill == "ff":
        buf[start:end] = b"\xff" * (end - start)
    else:
        buf[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(buf))
    return f"{fill} bytes over [{start}, {end}) ({where})", BYTE


def _m_not_hdf5(src: Path, dst: Path, rng: np.random.Generator) -> tuple[str, str]:
    data = src.read_bytes()
    what = _pick(rng, ("empty", "random", "text", "json", "signature+garbage", "head", "nul", "zip", "sig-only"))
    if what == "empty":
        out = b""
    elif what == "random":
        out = rng.integers(0, 256, int(rng.integers(1, 65536)), dtype=np.uint8).tobytes()
    elif what == "text":
        out = b"this is not a trace\n" * 100
    elif what == "json":
        out = json.dumps({"format": "vlmscope-trace", "format_version": 2}).encode()
    elif what == "signature+garbage":
        out = data[:8] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif what == "head":
        out = data[:int(rng.integers(8, 4096))]
    elif what == "nul":
        out = bytes(len(data))
    elif what == "zip":
        out = b"PK\x03\x04" + bytes(100)
    else:
        out = data[:8]
    dst.write_bytes(out)
    return f"not an HDF5 file ({what}, {len(out)} bytes)", BYTE


# ---------------------------------------------------------------------------- h5py level


_TOP = (*TABLES, "strings", "string_ends", "probe_data", "meta", "payloads")


def _h5(fn: Callable[[h5py.File, np.random.Generator, _SrcInfo, Path], tuple[str, str]]):
    def run(src: Path, dst: Path, rng: np.random.Generator) -> tuple[str, str]:
        shutil.copyfile(src, dst)
        info = _src_info(src)
        with h5py.File(dst, "r+") as f:
            return fn(f, rng, info, dst)
    run.__name__ = fn.__name__
    return run


def _objects(f: h5py.File, info: _SrcInfo) -> list[str]:
    return [*_TOP, *(f"payloads/{p}" for p in info.payloads[:3])]


@_h5
def _m_delete_object(f, rng, info, dst):
    name = _pick(rng, _objects(f, info))
    del f[name]
    return f"deleted /{name}", INVALID


@_h5
def _m_rename_object(f, rng, info, dst):
    name = _pick(rng, _objects(f, info))
    new = _pick(rng, (name + "_old", name.upper(), name + " "))
    f.move(name, new)
    return f"renamed /{name} to /{new}", INVALID


def _attr_targets(f: h5py.File, info: _SrcInfo) -> list[tuple[str, str]]:
    out = [("/", k) for k in f.attrs]
    if "meta" in f:
        out += [("meta", k) for k in f["meta"].attrs]
    for p in info.payloads[:2]:
        out += [(f"payloads/{p}", k) for k in f[f"payloads/{p}"].attrs]
    return out


@_h5
def _m_delete_attr(f, rng, info, dst):
    obj, k = _pick(rng, _attr_targets(f, info))
    del f[obj].attrs[k]
    kind = VALID if k in ("created", "closed", "config_json") or obj.startswith("payloads/") else INVALID
    return f"deleted attribute {k} of {obj}", kind


@_h5
def _m_rename_attr(f, rng, info, dst):
    obj, k = _pick(rng, _attr_targets(f, info))
    a = f[obj].attrs
    v = a[k]
    del a[k]
    a[k + "_x"] = v
    kind = VALID if k in ("created", "closed", "config_json") or obj.startswith("payloads/") else INVALID
    return f"renamed attribute {k} of {obj} to {k}_x", kind


_BAD_JSON = ("{", "[]", "null", '"text"', "5", '{"warnings": 5}', '{"warnings": [1, {"a": 2}]}',
             '{"image": [1, 2]}', '{"image": {"size": "big", "resized": 7}}', '{"decoder_layers": 7}',
             '{"decoder_layers": ["a"], "text_model": 3, "vision_model": {}}', '{"model": {"x": 1}}',
             '{"image_token_id": "x", "num_attention_heads": -1, "num_key_value_heads": 0}',
             '{"generated_text": 7, "generation": "x", "family": 5}', '{"model_type": 5, "vision_config": 3}',
             '[' * 5000 + ']' * 5000, '{"a": NaN}', "\ud800")


@_h5
def _m_attr_type(f, rng, info, dst):
    obj, k = _pick(rng, [("/", "format_version"), ("/", "format"), ("/", "status"), ("/", "n_steps"),
                         ("meta", "run_json"), ("meta", "config_json"), ("meta", "run_json"),
                         *(("payloads/" + p, a) for p in info.payloads[:1] for a in ("step", "dtype", "module"))])
    if obj not in f:
        obj, k = "/", "format_version"
    a = f[obj].attrs
    if k == "format_version":
        v = _pick(rng, ("2", 2.5, np.array([2, 2]), -1, 0, b"2", np.float64("nan"), 2 ** 62))
    elif k == "format":
        v = _pick(rng, ("vlmscope-trace2", b"vlmscope-trace", np.array([1, 2]), 5, ""))
    elif k == "status":
        v = _pick(rng, (5, "bogus", b"\xff\xfe", np.array(["complete"], dtype=h5py.string_dtype()), ""))
    elif k == "n_steps":
        v = _pick(rng, (-1, 10 ** 12, "4", 2.5))
    elif k in ("run_json", "config_json"):
        v = _pick(rng, _BAD_JSON)
        if v == "\ud800":
            v = np.bytes_(b'{"model": "\xff\xfe"}')
    else:
        v = _pick(rng, ("x", -5, np.array([1, 2, 3]), 2 ** 40))
    try:
        a[k] = v
    except Exception:  # noqa: BLE001 - some values HDF5 cannot store: use a plain wrong type
        a[k] = np.int64(-7)
        v = -7
    kind = VALID if ((obj == "meta" and k == "config_json") or obj.startswith("payloads/")
                     or (isinstance(v, str) and v == '{"a": NaN}')) else INVALID
    return f"attribute {k} of {obj} set to {str(v)[:60]!r} ({type(v).__name__})", kind


@_h5
def _m_newer_version(f, rng, info, dst):
    v = int(_pick(rng, (FORMAT_VERSION + 1, FORMAT_VERSION + 2, 99, 2 ** 31, 2 ** 40)))
    f.attrs["format_version"] = v
    return f"format_version set to {v}", INVALID


def _replace(f: h5py.File, name: str, data: Any = None, **kw: Any) -> None:
    attrs = dict(f[name].attrs) if name in f else {}
    del f[name]
    ds = f.create_dataset(name, data=data, **kw)
    for k, v in attrs.items():
        ds.attrs[k] = v


@_h5
def _m_wrong_dtype(f, rng, info, dst):
    name = _pick(rng, (*TABLES, "strings", "string_ends", "probe_data", *(f"payloads/{p}" for p in info.payloads[:1])))
    old = f[name][()]
    how = _pick(rng, ("drop-field", "retype-field", "rename-field", "plain-int", "2-d", "scalar", "group", "float",
                      "vlen-str", "bytes"))
    if old.dtype.names:
        fields = list(old.dtype.names)
        if how == "drop-field":
            victim = _pick(rng, fields)
            new = np.zeros(old.shape, [(n, old.dtype[n]) for n in fields if n != victim])
            for n in new.dtype.names:
                new[n] = old[n]
            _replace(f, name, new)
            return f"/{name} lost field {victim}", INVALID
        if how in ("retype-field", "rename-field"):
            victim = _pick(rng, fields)
            to = _pick(rng, ("f4", "i1", "u8", "S4", "f8")) if how == "retype-field" else None
            dt = [((n + "_x" if how == "rename-field" and n == victim else n),
                   (np.dtype(to) if how == "retype-field" and n == victim else old.dtype[n])) for n in fields]
            new = np.zeros(old.shape, dt)
            for (n, _), o in zip(dt, fields):
                try:
                    new[n] = old[o]
                except (TypeError, ValueError):
                    pass
            _replace(f, name, new)
            return f"/{name} field {victim} {'retyped to ' + str(to) if to else 'renamed'}", INVALID
    if how == "2-d":
        _replace(f, name, np.stack([old, old]) if old.ndim else np.array([[old]]))
    elif how == "scalar":
        _replace(f, name, old[0] if old.ndim and len(old) else np.int64(3))
    elif how == "group":
        del f[name]
        f.create_group(name)
    elif how == "float":
        _replace(f, name, np.arange(max(1, min(len(old) if old.ndim else 1, 1000)), dtype=np.float64) * 1.5)
    elif how == "vlen-str":
        _replace(f, name, np.array(["a", "bb", "ccc"], dtype=object), dtype=h5py.string_dtype())
    elif how == "bytes":
        _replace(f, name, np.frombuffer(old.tobytes()[:4096] or b"x", dtype=np.uint8))
    else:
        _replace(f, name, np.arange(max(1, len(old) if old.ndim else 1), dtype=np.int64))
    return f"/{name} replaced by {how} data", INVALID


@_h5
def _m_string_offsets(f, rng, info, dst):
    ends = f["string_ends"][:]
    blob_n = f["strings"].shape[0]
    how = _pick(rng, ("last-past-end", "middle-past-end", "huge", "negative", "decreasing", "blob-cut",
                      "invalid-utf8", "ends-empty", "blob-empty"))
    if how == "blob-cut":
        n = int(rng.integers(0, max(1, blob_n)))
        f["strings"].resize((n,))
        return f"/strings cut to {n} of {blob_n} bytes (ends point past it)", INVALID
    if how == "invalid-utf8":
        i = int(rng.integers(0, max(1, blob_n)))
        ds = f["strings"]
        b = ds[i:i + 2]
        b[:] = (0xFF, 0xC3)[:len(b)]
        ds[i:i + len(b)] = b
        return f"/strings bytes at {i} set to invalid UTF-8 (shown escaped: documented)", VALID
    if how == "ends-empty":
        f["string_ends"].resize((0,))
        return "/string_ends emptied", INVALID
    if how == "blob-empty":
        f["strings"].resize((0,))
        return "/strings emptied", INVALID
    i = int(rng.integers(0, len(ends)))
    if how == "last-past-end":
        i = len(ends) - 1
        ends[i] = blob_n + int(rng.integers(1, 10 ** 6))
    elif how == "middle-past-end":
        ends[i] = blob_n + 10
    elif how == "huge":
        ends[i] = 2 ** 62
    elif how == "negative":
        ends[i] = -int(rng.integers(1, 100))
    else:
        j = min(len(ends) - 1, i + int(rng.integers(1, 20)))
        ends[i], ends[j] = ends[j], ends[i]
    f["string_ends"][:] = ends
    return f"/string_ends[{i}] made {how} ({int(ends[i])}; blob {blob_n})", INVALID


_REFS = {
    "modules": ("path", "cls", "parent", "depth"),
    "steps": ("event_start", "event_count", "tensor_start", "tensor_count", "reshape_start", "reshape_count",
              "probe_start", "probe_count", "step", "mask_ndim", "pos_rows"),
    "events": ("module", "parent", "tensor_start", "tensor_count", "step", "seq", "end_seq", "depth"),
    "tensors": ("event", "name", "dtype", "device", "payload", "ndim", "step", "role"),
    "reshapes": ("event", "module", "op", "in_shapes", "args", "site_file", "ndim:in_ndim", "out_ndim", "step"),
    "probes": ("event", "module", "kind", "name", "info", "enc", "data_off", "data_len", "ndim", "dtype", "step"),
}


def _bad_value(dt: np.dtype, rng: np.random.Generator) -> Any:
    if dt.kind == "f":
        return _pick(rng, (np.nan, np.inf, -np.inf, 1e308))
    info = np.iinfo(dt)
    return int(_pick(rng, (info.max, info.min, -1, -2, min(info.max, 10 ** 6), min(info.max, 2 ** 40), 127)))


def _edit_row(f: h5py.File, table: str, row: int, fld: str, value: Any) -> None:
    ds = f[table]
    r = ds[row:row + 1]
    if r.dtype[fld].shape:
        r[fld][0, 0] = value
    else:
        r[fld] = value
    ds[row:row + 1] = r


_STRING_FIELDS = {"path", "cls", "name", "dtype", "device", "op", "in_shapes", "in_dtypes", "args", "out_dtype",
                  "site_file", "site_func", "kind", "info"}


def _domain(table: str, fld: str, info: _SrcInfo) -> tuple[float, float]:
    """[lo, hi) of the values a field may hold in this file (a value outside is damage)."""
    n = info.tables.get
    if fld in _STRING_FIELDS:
        return 0, n("string_ends", 0)
    if fld == "module":
        return (0 if table == "events" else -1), n("modules", 0)
    if fld in ("event", "parent"):
        return -1, (n("modules", 0) if table == "modules" else n("events", 0))
    if fld.endswith("_start") or fld.endswith("_count"):
        tab = {"event": "events", "tensor": "tensors", "reshape": "reshapes", "probe": "probes"}[fld.split("_")[0]]
        return 0, n(tab, 0) + 1
    if fld in ("data_off", "data_len"):
        return 0, n("probe_data", 0) + 1
    if fld == "payload":
        return -1, len(info.payloads)
    if fld == "step":
        return 0, n("steps", 0)
    if fld in ("ndim", "in_ndim", "out_ndim"):
        return 0, 9
    return {"enc": (0, 4), "role": (0, 3), "mask_ndim": (0, 5), "pos_rows": (0, 4)}.get(fld, (0, 2 ** 31))


@_h5
def _m_bad_reference(f, rng, info, dst):
    table = _pick(rng, [t for t in _REFS if info.tables.get(t)])
    fld = _pick(rng, _REFS[table]).split(":")[-1]
    n = info.tables[table]
    row = int(rng.integers(0, n))
    dt = f[table].dtype[fld].base
    v = _bad_value(dt, rng)
    _edit_row(f, table, row, fld, v)
    lo, hi = _domain(table, fld, info)
    inside = lo <= v < hi
    return f"/{table}[{row}].{fld} = {v}{' (in range: a plausible edit)' if inside else ''}", (VALID if inside else VALUE)


@_h5
def _m_huge_dims(f, rng, info, dst):
    how = _pick(rng, ("resize-table", "resize-table", "tensor-shape", "probe-shape", "payload", "step-count"))
    big = int(_pick(rng, (2 ** 40, 2 ** 33, 2 ** 31 - 1)))
    if how == "resize-table":
        name = _pick(rng, [n for n in (*TABLES, "strings", "string_ends", "probe_data") if n in f])
        f[name].resize((big,))
        return f"/{name} resized to {big} rows (from {info.tables.get(name)})", INVALID
    if how == "tensor-shape" and info.tables.get("tensors"):
        row = int(rng.integers(0, info.tables["tensors"]))
        ds = f["tensors"]
        r = ds[row:row + 1]
        r["shape"][0, :3] = big
        r["numel"] = big
        ds[row:row + 1] = r
        return f"/tensors[{row}] shape and numel set to {big}", VALUE
    if how == "probe-shape" and info.tables.get("probes"):
        pr = f["probes"][:]
        rows = np.flatnonzero(pr["enc"] > 0)
        row = int(_pick(rng, rows)) if len(rows) else 0
        r = pr[row:row + 1]
        r["ndim"] = _pick(rng, (1, 3, 8, 100, -1))
        r["shape"][0, :] = big
        if rng.random() < 0.5:
            r["data_len"] = big
        f["probes"][row:row + 1] = r
        return f"/probes[{row}] ndim {int(r['ndim'][0])}, shape dims {big}, data_len {int(r['data_len'][0])}", VALUE
    if how == "payload":
        name = f"payloads/{info.payloads[0]}" if info.payloads else "payloads/0"
        attrs = dict(f[name].attrs) if name in f else {}
        if name in f:
            del f[name]
        ds = f.create_dataset(name, shape=(big, 1024), dtype=np.float32, chunks=(1, 1024))
        for k, v in attrs.items():
            ds.attrs[k] = v
        return f"/{name} declared {big} x 1024 float32 (no data written)", INVALID
    row = int(rng.integers(0, max(1, info.tables.get("steps", 1))))
    fld = _pick(rng, ("event_count", "tensor_count", "reshape_count", "probe_count"))
    _edit_row(f, "steps", row, fld, 2 ** 31 - 1)
    return f"/steps[{row}].{fld} = {2 ** 31 - 1}", VALUE


@_h5
def _m_parent_cycle(f, rng, info, dst):
    table = _pick(rng, ("modules", "events"))
    arr = f[table][:]
    n = len(arr)
    if n < 3:
        return f"/{table} too short for a cycle", VALID
    how = _pick(rng, ("self", "two", "root", "forward"))
    if how == "self":
        i = int(rng.integers(0, n))
        arr["parent"][i] = i
    elif how == "two":
        kids = np.flatnonzero(arr["parent"] > 0)
        i = int(_pick(rng, kids)) if len(kids) else 1
        p = int(arr["parent"][i])
        arr["parent"][p] = i
    elif how == "root":
        arr["parent"][0] = n - 1
    else:
        i = int(rng.integers(0, n - 1))
        arr["parent"][i] = n - 1
    f[table][:] = arr
    return f"/{table} parent cycle ({how})", VALUE


@_h5
def _m_link(f, rng, info, dst):
    name = _pick(rng, (*TABLES, "strings", "string_ends", "probe_data", "meta", "payloads",
                       *(f"payloads/{p}" for p in info.payloads[:1])))
    how = _pick(rng, ("soft-other", "soft-dangling", "soft-self", "external-original", "external-missing",
                      "external-self", "hard-other", "soft-root"))
    del f[name]
    other = _pick(rng, [n for n in (*TABLES, "strings", "probe_data") if n != name])
    if how == "soft-other":
        f[name] = h5py.SoftLink("/" + other)
    elif how == "soft-dangling":
        f[name] = h5py.SoftLink("/nowhere/" + name)
    elif how == "soft-self":
        f[name] = h5py.SoftLink("/" + name)
    elif how == "soft-root":
        f[name] = h5py.SoftLink("/")
    elif how == "external-original":
        orig = dst.with_name(dst.stem + ".ext.h5")
        f[name] = h5py.ExternalLink(str(orig), "/" + other)
        with h5py.File(orig, "w") as g:
            g.create_dataset(other, data=np.arange(10))
    elif how == "external-missing":
        f[name] = h5py.ExternalLink("/nonexistent/dir/x.h5", "/" + name)
    elif how == "external-self":
        f[name] = h5py.ExternalLink(str(dst), "/" + name)
    else:
        f[name] = f[other]
    return f"/{name} replaced by a {how} link" + (f" (to /{other})" if "other" in how or "original" in how else ""), INVALID


@_h5
def _m_external_storage(f, rng, info, dst):
    name = _pick(rng, (*TABLES, "strings", "string_ends", "probe_data", *(f"payloads/{p}" for p in info.payloads[:1])))
    old = f[name]
    dt, shape = old.dtype, old.shape
    attrs = dict(old.attrs)
    del f[name]
    how = _pick(rng, ("random-file", "missing-file", "system-file", "vds"))
    if how == "vds":
        other = dst.with_name(dst.stem + ".vds.h5")
        with h5py.File(other, "w") as g:
            g.create_dataset("x", shape=shape, dtype=dt)
        lay = h5py.VirtualLayout(shape=shape, dtype=dt)
        lay[...] = h5py.VirtualSource(str(other), "x", shape=shape)
        ds = f.create_virtual_dataset(name, lay)
    else:
        nbytes = int(np.prod(shape)) * dt.itemsize
        if how == "random-file":
            ext = dst.with_name(dst.stem + ".raw")
            ext.write_bytes(rng.integers(0, 256, max(nbytes, 1), dtype=np.uint8).tobytes())
        elif how == "missing-file":
            ext = Path("/nonexistent/raw.bin")
        else:
            ext = Path("/etc/hostname") if Path("/etc/hostname").exists() else Path(sys.executable)
        ds = f.create_dataset(name, shape=shape, dtype=dt, external=[(str(ext), 0, max(nbytes, 1))])
    for k, v in attrs.items():
        ds.attrs[k] = v
    return f"/{name} stored outside the file ({how})", INVALID


@_h5
def _m_shorten(f, rng, info, dst):
    name = _pick(rng, [n for n in (*TABLES, "probe_data", "string_ends") if info.tables.get(n, 0) > 1])
    n = info.tables[name]
    k = int(rng.integers(0, n))
    f[name].resize((k,))
    return f"/{name} resized to {k} of {n} rows (references past its end)", INVALID


@_h5
def _m_valid_edit(f, rng, info, dst):
    how = _pick(rng, ("stat", "status", "step-field", "empty", "nan", "wall"))
    if how == "stat" and info.tables.get("tensors"):
        row = int(rng.integers(0, info.tables["tensors"]))
        fld = _pick(rng, ("mean", "std", "min", "max", "absmax"))
        _edit_row(f, "tensors", row, fld, float(rng.normal()) * 100)
        return f"/tensors[{row}].{fld} changed", VALID
    if how == "nan" and info.tables.get("tensors"):
        row = int(rng.integers(0, info.tables["tensors"]))
        _edit_row(f, "tensors", row, "nan", 5)
        return f"/tensors[{row}].nan = 5", VALID
    if how == "status":
        v = _pick(rng, ("incomplete", "failed", "recording"))
        f.attrs["status"] = v
        return f"status set to {v}", VALID
    if how == "step-field":
        fld = _pick(rng, ("q_len", "input_len", "cache_after", "image_tokens"))
        _edit_row(f, "steps", 0, fld, int(rng.integers(0, 50)))
        return f"/steps[0].{fld} changed", VALID
    if how == "empty":
        for n in TABLES:
            f[n].resize((0,))
        f.attrs["n_steps"] = 0
        return "every table emptied (a trace with no steps)", VALID
    _edit_row(f, "steps", 0, "wall_ms", 1e9)
    return "/steps[0].wall_ms = 1e9", VALID


MUTATION_CLASSES: dict[str, tuple[float, Callable]] = {
    "truncate": (6, _m_truncate),
    "bitflip-header": (8, _m_bitflip_header),
    "bitflip-data": (8, _m_bitflip_data),
    "zero-range": (6, _m_zero_range),
    "not-hdf5": (3, _m_not_hdf5),
    "delete-object": (4, _m_delete_object),
    "rename-object": (2, _m_rename_object),
    "delete-attr": (3, _m_delete_attr),
    "rename-attr": (1, _m_rename_attr),
    "attr-type": (5, _m_attr_type),
    "newer-version": (1, _m_newer_version),
    "wrong-dtype": (5, _m_wrong_dtype),
    "string-offsets": (4, _m_string_offsets),
    "bad-reference": (10, _m_bad_reference),
    "huge-dims": (6, _m_huge_dims),
    "parent-cycle": (3, _m_parent_cycle),
    "link": (4, _m_link),
    "external-storage": (3, _m_external_storage),
    "shorten-table": (3, _m_shorten),
    "valid-edit": (3, _m_valid_edit),
}


def mutate(src: str | os.PathLike, dst: str | os.PathLike, rng: np.random.Generator,
           cls: str | None = None) -> Mutation:
    """Write a mutated copy of trace ``src`` to ``dst``; returns what was done. ``cls`` forces a
    class of :data:`MUTATION_CLASSES` (else one is drawn, weighted)."""
    src, dst = Path(src), Path(dst)
    if cls == "cycle":
        raise ValueError("cls='cycle' is resolved per case by prepare_case")
    if cls is None:
        names = list(MUTATION_CLASSES)
        w = np.array([MUTATION_CLASSES[n][0] for n in names], dtype=float)
        cls = names[int(rng.choice(len(names), p=w / w.sum()))]
    desc, kind = MUTATION_CLASSES[cls][1](src, dst, rng)
    return Mutation(cls, desc, kind)


# ============================================================================ sources


def make_sources(workdir: str | os.PathLike, *, synthetic: bool = True, real: bool = True,
                 examples: str | os.PathLike | None = None) -> list[Path]:
    """The unmutated traces cases are made from: real recordings (``examples``, by default the
    repository's ``traces/examples`` when run from a checkout) and synthetic traces with saved
    payloads."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = []
    if real:
        ex = Path(examples) if examples is not None else Path(__file__).resolve().parents[2] / "traces" / "examples"
        for name in ("tiny-qwen2.5-vl-astronaut.h5", "tiny-mqwen-astronaut.h5"):
            if (ex / name).is_file():             # a copy: the run must not see a re-recording
                shutil.copyfile(ex / name, workdir / name)
                out.append(workdir / name)
    if synthetic:
        from vlmscope.testing import make_trace, write_demo_trace

        p = workdir / "synth-qwen2vl.h5"
        p.unlink(missing_ok=True)
        out.append(make_trace(p, n_steps=3, n_layers=2, n_vision=1, payloads=True))
        p = workdir / "synth-demo.h5"
        p.unlink(missing_ok=True)
        out.append(write_demo_trace(p, n_decode=2))
    return out


# ============================================================================ one case


@dataclass
class RunResult:
    cmd: str
    outcome: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class CaseResult:
    case: int
    source: str
    mutation: dict
    runs: list = field(default_factory=list)
    kept: str = ""


_MARKERS = re.compile(r"(?i)(warning:|damag|corrupt|truncat|could not|unreadable|invalid|inconsisten|out of range|"
                      r"incomplete|partial)")


def _digest(v: Any) -> str:
    h = hashlib.blake2b(digest_size=12)

    def feed(x: Any) -> None:
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                h.update(repr(x.tolist()).encode("utf-8", "surrogatepass"))
            else:
                h.update(f"{x.dtype.str}{x.dtype.descr}{x.shape}".encode())
                h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            for y in x:
                feed(y)
        elif isinstance(x, dict):
            h.update(json.dumps(x, sort_keys=True, default=repr).encode("utf-8", "surrogatepass"))
        elif isinstance(x, np.void):
            feed(np.array(x))
        else:
            h.update(repr(x).encode("utf-8", "surrogatepass"))
    feed(v)
    return h.hexdigest()


def content_digest(path: Path, max_bytes: int = 1 << 28) -> dict[str, str]:
    """What plain h5py sees of a file: object tree, attributes, dataset layouts and a hash of
    their data. ``ERR ...`` entries where HDF5 reported damage; links and external storage are
    recorded, never followed."""
    out: dict[str, str] = {}
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001
        return {"/": f"ERR {type(e).__name__}"}

    def attrs(obj: Any, p: str) -> None:
        try:
            for k in obj.attrs:
                try:
                    out[f"{p}@{k}"] = _digest(obj.attrs[k])
                except Exception as e:  # noqa: BLE001
                    out[f"{p}@{k}"] = f"ERR {type(e).__name__}"
        except Exception as e:  # noqa: BLE001
            out[f"{p}@"] = f"ERR {type(e).__name__}"

    def walk(g: Any, p: str) -> None:
        attrs(g, p)
        try:
            names = list(g)
        except Exception as e:  # noqa: BLE001
            out[p + "/"] = f"ERR {type(e).__name__}"
            return
        for n in names:
            q = f"{p}/{n}" if p != "/" else f"/{n}"
            try:
                link = g.get(n, getlink=True)
                if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                    out[q] = f"link {type(link).__name__} {getattr(link, 'filename', '')}:{link.path}"
                    continue
                obj = g[n]
            except Exception as e:  # noqa: BLE001
                out[q] = f"ERR {type(e).__name__}"
                continue
            if isinstance(obj, h5py.Group):
                walk(obj, q)
                continue
            attrs(obj, q)
            try:
                lay = f"ds {obj.dtype.str}{obj.dtype.descr} {obj.shape} {obj.chunks} {obj.fletcher32} " \
                      f"{obj.external} {obj.is_virtual}"
                if obj.external or obj.is_virtual:
                    out[q] = lay + " (not read)"
                elif obj.size * obj.dtype.itemsize > max_bytes:
                    out[q] = lay + " (huge)"
                else:
                    out[q] = lay + " " + _digest(obj[()])
            except Exception as e:  # noqa: BLE001
                out[q] = f"ERR {type(e).__name__}"
    try:
        walk(f, "/")
    finally:
        try:
            f.close()
        except Exception:  # noqa: BLE001
            pass
    return out


def _judge_byte(orig: dict[str, str], mut: dict[str, str]) -> str:
    """How a byte mutation shows to HDF5: ``same`` content, ``damaged`` (HDF5 reports it, or the
    structure changed) or ``unchecked`` (only stored values of datasets without checksum, or
    attribute values, changed)."""
    if orig == mut:
        return "same"
    if set(orig) != set(mut) or any(v.startswith("ERR") for v in mut.values()):
        return "damaged"
    for k, v in mut.items():
        if v == orig[k]:
            continue
        if "@" in k:
            continue                                   # attribute value: global heap, no checksum
        a, b = orig[k].rsplit(" ", 1)[0], v.rsplit(" ", 1)[0]
        if a != b or " True " in a:                    # layout changed, or a checksummed dataset
            return "damaged"
    return "unchecked"


# ---------------------------------------------------------------------------- the API run

#: Accessors that return table rows as stored: a row value out of range is theirs to return.
RAW_ACCESSORS = ("steps", "modules", "table:", "read_rows:", "events", "tensors", "reshapes", "probes", "step(",
                 "event_tensors",
                 "iter_steps", "n_steps", "stream_rows:", "dataset_dtype:", "n_rows:")


def _api_calls(t: Any) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(name, thunk) of every accessor of an open trace; the names do not depend on the file's
    contents except through the numbers of steps, rows and payloads."""
    yield "format_version", lambda: t.format_version
    yield "status", lambda: t.status
    yield "complete", lambda: t.complete
    yield "meta", lambda: t.meta
    yield "config", lambda: t.config
    yield "error", lambda: t.error
    yield "n_steps", lambda: t.n_steps
    yield "n_payloads", lambda: t.n_payloads
    yield "repr", lambda: repr(t).replace(str(t.path), "<T>")
    yield "strings", lambda: t.strings
    yield "string_id", lambda: [t.string_id(s) for s in ("", "cat", "position_ids", "never interned")]
    yield "steps", lambda: t.steps
    yield "modules", lambda: t.modules
    yield "module_paths", lambda: t.module_paths
    for name in (*TABLES, "probe_data"):
        yield f"table:{name}", lambda name=name: t.table(name)
    for name in TABLES:
        yield f"n_rows:{name}", lambda name=name: t.n_rows(name)
        yield f"dataset_dtype:{name}", lambda name=name: t.dataset_dtype(name)
        yield f"stream_rows:{name}", lambda name=name: t.stream_rows(name, 1 << 20)
        yield f"read_rows:{name}", lambda name=name: t.read_rows(name, 0, min(t.n_rows(name), 4096))
    for what in ("events", "tensors", "reshapes", "probes"):
        yield what, lambda what=what: getattr(t, what)()
    n = _safe(lambda: t.n_steps, 0)
    for i in range(min(n, 16)):
        yield f"step({i})", lambda i=i: t.step(i)
        for what in ("events", "tensors", "reshapes", "probes"):
            yield f"{what}(step={i})", lambda i=i, what=what: getattr(t, what)(i)
        yield f"probes(step={i}, kind)", lambda i=i: [t.probes(i, kind=k) for k in ("position_ids", "attention_mask")]
    yield "probes(kind)", lambda: t.probes(kind="cache")
    yield "iter_steps", lambda: [sv.step for sv in t.iter_steps()]
    # Counts are read inside the thunks: a count the damaged file cannot give is that accessor's error.
    yield "probe_value", lambda: [t.probe_value(r) for r in t.probes()[:5000]]
    yield "probe_info", lambda: [t.probe_info(r) for r in t.probes()[:5000]]
    yield "module_path", lambda: [t.module_path(i) for i in range(min(len(t.modules), 5000))]
    yield "module_class", lambda: [t.module_class(i) for i in range(min(len(t.modules), 5000))]
    yield "event_path", lambda: [t.event_path(r) for r in t.events()[:5000]]
    yield "event_tensors", lambda: [t.event_tensors(i) for i in range(min(len(t.events()), 2000))]
    yield "s", lambda: [t.s(i) for i in range(-1, min(len(t.strings), 20000))]

    def payload_ids() -> list[int]:
        te = t.tensors()
        refs = set(te["payload"][te["payload"] >= 0].tolist()) if len(te) else set()
        return sorted(set(range(min(t.n_payloads, 64))) | set(sorted(refs)[:64]))
    yield "payload", lambda: [t.payload(i) for i in payload_ids()]
    yield "payload_attrs", lambda: [t.payload_attrs(i) for i in payload_ids()]
    yield "payload[index]", lambda: [t.payload(i, (0,)) for i in range(min(t.n_payloads, 8))]


def _safe(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except BaseException:  # noqa: BLE001 - the run itself judges these; here only the names matter
        return default


def _exc_line(e: BaseException, tb: Any = None) -> str:
    """``Type: first line of message (at file:line in func)``, the innermost vlmscope frame."""
    msg = str(e).strip().splitlines()
    where = ""
    frames = traceback.extract_tb(tb or e.__traceback__)
    for fr in reversed(frames):
        if "vlmscope" in fr.filename and "testing/fuzz" not in fr.filename and "click" not in fr.filename:
            where = f" (at {fr.filename.split('vlmscope/', 1)[-1]}:{fr.lineno} in {fr.name})"
            break
    if not where and frames:
        fr = frames[-1]
        where = f" (at {Path(fr.filename).name}:{fr.lineno} in {fr.name})"
    return f"{type(e).__name__}: {(msg[0] if msg else '')[:200]}{where}"


def _run_api(path: Path, progress: Callable[[str], None]) -> tuple[dict[str, Any], bool]:
    """{accessor: ("ok", digest) | ("error", line) | (outcome, line)}, and whether the reader
    warned (a Python warning)."""
    import warnings

    res: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        progress("open_trace")
        try:
            t = open_trace(path)
        except BaseException as e:  # noqa: BLE001
            res["open_trace"] = _classify_exc(e)
            return res, bool(caught)
        res["open_trace"] = ("ok", "")
        try:
            for name, thunk in _api_calls(t):
                progress(name)
                try:
                    v = thunk()
                    res[name] = ("ok", repr(v)[:100] if isinstance(v, (str, bool, int)) else _digest(v))
                except BaseException as e:  # noqa: BLE001
                    res[name] = _classify_exc(e)
        finally:
            t.close()
        warned = bool(caught) or any(bool(getattr(t, a, None)) for a in ("warnings", "problems", "damage"))
    return res, warned


def _classify_exc(e: BaseException) -> tuple[str, str]:
    if isinstance(e, TraceError):
        line = str(e)
        return ("error", line) if line and "\n" not in line else ("bad-exit", "multi-line TraceError: " + line[:200])
    if isinstance(e, MemoryError):
        return "blowup", _exc_line(e)
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        raise e
    return "traceback", _exc_line(e)


# ---------------------------------------------------------------------------- CLI runs


def _cli_args(cmd: str, path: Path, orig: Path) -> list[str]:
    return ["diff", str(orig), str(path)] if cmd == "diff" else [cmd, str(path)]


#: The command group the runs invoke, as "module:attribute". Resolved by name when a run starts:
#: this module sits below the command line and never imports it (nor click) itself.
CLI_TARGET = "vlmscope.cli:main"


def _run_cli(args: list[str], target: str = CLI_TARGET) -> dict[str, Any]:
    """One command in this process, as ``vlmscope ARGS`` would run it (click's standalone mode,
    stdout and stderr captured): exit code, stdout, stderr, or the exception that escaped."""
    import importlib
    import io

    mod, _, attr = target.partition(":")
    group = getattr(importlib.import_module(mod), attr)
    out_buf, err_buf = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    code, exc = 0, None
    sys.stdout, sys.stderr = out_buf, err_buf
    try:
        group.main(args=list(args), prog_name="vlmscope", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            err_buf.write(f"{e.code}\n")
    except MemoryError as e:
        exc = ("blowup", _exc_line(e))
    except BaseException as e:  # noqa: BLE001 - an exception escaping the command is the finding
        if isinstance(e, KeyboardInterrupt):
            raise
        exc = ("traceback", _exc_line(e))
    finally:
        sys.stdout, sys.stderr = saved
    return {"exit": code, "stdout": out_buf.getvalue(), "stderr": err_buf.getvalue(), "exc": exc}


_SIZE = re.compile(r"\d+(\.\d)? (B|KiB|MiB|GiB)\b")


def _norm(text: str, paths: dict[str, str]) -> str:
    for p, token in paths.items():
        text = text.replace(p, token)
    return _SIZE.sub("<size>", text)


def _judge_cli(res: dict[str, Any], ref: dict[str, Any], kind: str, paths: dict[str, str]) -> tuple[str, str]:
    if res["exc"] is not None:
        return res["exc"]
    out, err = res["stdout"] or "", res["stderr"] or ""
    if "Traceback (most recent call last)" in out + err:
        last = [ln for ln in (out + err).strip().splitlines() if ln.strip()][-1:]
        return "traceback", f"printed: {last[0][:200] if last else ''}"
    code = res["exit"]
    if code == 3:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        if len(lines) == 1:
            return "error-exit-3", lines[0][:300]
        return "bad-exit", f"exit 3 with {len(lines)} stderr lines: {' | '.join(lines[:3])[:300]}"
    if code not in (0, 1):
        return "bad-exit", f"exit {code}: {(err.strip().splitlines() or [''])[0][:300]}"
    mine = (code, _norm(out, paths), _norm(err, paths))
    theirs = (ref["exit"], _norm(ref["stdout"] or "", paths), _norm(ref["stderr"] or "", paths))
    if mine == theirs:
        return "ok", ""
    ref_lines = set((theirs[1] + theirs[2]).splitlines())
    new = [ln for ln in (mine[1] + mine[2]).splitlines() if ln not in ref_lines]
    # a warning is a line of its own: not a cell of a table of violations or divergences
    warned = [ln for ln in new if _MARKERS.search(ln) and not ln.lstrip().startswith(("│", "┃", "|"))]
    first = new[0].strip()[:200] if new else f"exit {code} (original {ref['exit']})"
    if warned:
        return "partial", warned[0].strip()[:200]
    return _silent(kind, f"exit {code} (original {ref['exit']}); first new line: {first}")


def _silent(kind: str, detail: str) -> tuple[str, str]:
    if kind == VALID:
        return "ok", "plausible edit: " + detail
    if kind == "unchecked":
        return "silent-unchecked", detail
    return "silently-different", detail


def _judge_api(res: dict[str, Any], warned: bool, ref: dict[str, Any], kind: str) -> tuple[str, str]:
    worst, detail = "ok", ""

    def bump(o: str, d: str) -> None:
        nonlocal worst, detail
        if _SEVERITY[o] > _SEVERITY[worst]:
            worst, detail = o, d

    if res.get("open_trace", ("ok",))[0] != "ok":
        o, line = res["open_trace"]
        return ("error-exit-3" if o == "error" else o), f"open_trace: {line}"
    refused = False
    st, ref_st = res.get("status", ("", "")), ref.get("status", ("", ""))
    if st[0] == "ok" and st != ref_st and "complete" not in st[1].split("'"):
        warned = True                                  # the reader says: not a complete trace
    for name, (o, v) in res.items():
        if o == "error":
            refused = True
            bump("error-exit-3", f"{name}: {v}")
        elif o != "ok":
            bump(o, f"{name}: {v}")
    for name, (o, v) in res.items():
        if o != "ok" or (name in ref and ref[name] == (o, v)):
            continue
        if kind == VALUE and name.startswith(RAW_ACCESSORS):
            continue
        if warned or refused:
            bump("partial", f"{name} differs (with a warning or an error elsewhere)")
        else:
            o2, d2 = _silent(kind, f"{name} returned a different value" + (" (not in the original's accessors)"
                                                                              if name not in ref else ""))
            bump(o2, d2)
    return worst, detail


# ---------------------------------------------------------------------------- the case


class _Refs:
    """Per worker: each source's results on the unmutated file (at a path of the same length as
    the cases', so outputs compare after replacing paths), and its content digest."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.cache: dict[int, dict] = {}

    def paths(self, src_i: int) -> tuple[Path, Path]:
        d = self.workdir / "cases"
        return d / f"o{src_i:07d}.h5", d / f"r{src_i:07d}.h5"

    def get(self, src_i: int, src: Path, progress: Callable[[str], None]) -> dict:
        if src_i in self.cache:
            return self.cache[src_i]
        orig, ref = self.paths(src_i)
        orig.parent.mkdir(parents=True, exist_ok=True)
        for p in (orig, ref):
            if not p.exists():
                tmp = p.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, p)
        out: dict[str, Any] = {"digest": content_digest(ref)}
        progress("reference")
        out["api"], _ = _run_api(ref, lambda _n: None)
        for cmd in COMMANDS[1:]:
            out[cmd] = _run_cli(_cli_args(cmd, ref, orig))
        self.cache[src_i] = out
        return out


def _inject(case: int, cmd: str) -> None:
    """Self-test of the supervisor: ``VLMSCOPE_FUZZ_INJECT="hang@3:check,crash@5:api"`` makes
    that run hang, segfault, blow the memory cap (``blowup``) or be SIGKILLed (``killed``)."""
    for item in filter(None, os.environ.get("VLMSCOPE_FUZZ_INJECT", "").split(",")):
        what, _, where = item.partition("@")
        c, _, m = where.partition(":")
        if int(c) != case or m != cmd:
            continue
        if what == "hang":
            time.sleep(3600)
        elif what == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif what == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        elif what == "blowup":
            bytearray(1 << 40)


def case_path(workdir: Path, case: int) -> Path:
    return Path(workdir) / "cases" / f"c{case:07d}.h5"


def _case_rng(seed: int, case: int) -> np.random.Generator:
    return np.random.default_rng([seed, case])


def prepare_case(case: int, seed: int, sources: list[Path], workdir: Path, cls: str | None = None
                 ) -> tuple[int, Path, Mutation]:
    rng = _case_rng(seed, case)
    src_i = int(rng.integers(len(sources)))
    if cls == "cycle":                                 # every class in turn, sources drawn
        cls = list(MUTATION_CLASSES)[case % len(MUTATION_CLASSES)]
    dst = case_path(workdir, case)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for p in dst.parent.glob(dst.stem + ".*"):
        p.unlink()
    return src_i, dst, mutate(sources[src_i], dst, rng, cls)


def run_case(case: int, seed: int, sources: list[Path], workdir: Path, *, commands: tuple[str, ...] = COMMANDS,
             refs: _Refs | None = None, progress: Callable[[str, str], None] = lambda c, l: None,
             on_result: Callable[[RunResult], None] = lambda r: None, cls: str | None = None,
             digest: bool = True) -> CaseResult:
    """Mutate case ``case`` and run ``commands`` on it in this process (no limits: see
    :func:`supervise`)."""
    workdir = Path(workdir)
    refs = refs or _Refs(workdir)
    src_i, dst, mut = prepare_case(case, seed, sources, workdir, cls)
    cr = CaseResult(case, str(sources[src_i]), asdict(mut))
    progress("prepared", json.dumps({"source": cr.source, "mutation": cr.mutation}))
    ref = refs.get(src_i, sources[src_i], lambda n: progress("reference", n))
    orig, refpath = refs.paths(src_i)
    kind = mut.kind
    if kind == BYTE:
        progress("digest", "content_digest")
        # digest=False: plain h5py already hung or died on this file (the supervisor retried
        # without it): HDF5 itself stumbles on the damage, so it is detectable.
        how = _judge_byte(ref["digest"], content_digest(dst)) if digest else "damaged"
        kind = {"same": INVALID, "damaged": INVALID, "unchecked": "unchecked"}[how]
        cr.mutation["content"] = how
    paths = {str(dst): "<T>", str(refpath): "<T>", str(orig): "<O>"}
    for cmd in commands:
        t0 = time.monotonic()
        progress(cmd, cmd)
        try:
            _inject(case, cmd)
            if cmd == "api":
                res, warned = _run_api(dst, lambda n: progress("api", n))
                outcome, detail = _judge_api(res, warned, ref["api"], kind)
            else:
                outcome, detail = _judge_cli(_run_cli(_cli_args(cmd, dst, orig)), ref[cmd], kind, paths)
        except MemoryError as e:
            outcome, detail = "blowup", _exc_line(e)
        except Exception as e:  # noqa: BLE001 - a harness bug: say so, never hide it
            outcome, detail = "harness-error", _exc_line(e)
        rr = RunResult(cmd, outcome, detail, round(time.monotonic() - t0, 3))
        cr.runs.append(asdict(rr))
        on_result(rr)
    return cr


# ============================================================================ the worker


def _worker_main() -> None:
    """Worker process: reads JSON tasks on stdin, reports on the protocol fd passed in argv."""
    import resource

    cfg = json.loads(sys.argv[1])
    proto = os.fdopen(int(cfg["fd"]), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)                       # stray C-level prints must not reach the protocol
    if cfg.get("mem"):
        resource.setrlimit(resource.RLIMIT_AS, (int(cfg["mem"]), int(cfg["mem"])))
    os.environ.setdefault("COLUMNS", "160")
    sources = [Path(p) for p in cfg["sources"]]
    workdir = Path(cfg["workdir"])
    refs = _Refs(workdir)

    def send(**msg: Any) -> None:
        proto.write(json.dumps(msg) + "\n")

    send(ev="ready", pid=os.getpid())
    for line in sys.stdin:
        task = json.loads(line)
        case = task["case"]
        try:
            cr = run_case(case, cfg["seed"], sources, workdir, commands=tuple(task["commands"]), refs=refs,
                          cls=cfg.get("cls"), digest=not task.get("no_digest"),
                          progress=lambda cmd, label: send(ev="start", case=case, cmd=cmd, label=label),
                          on_result=lambda rr: send(ev="result", case=case, **asdict(rr)))
            send(ev="done", case=case, source=cr.source, mutation=cr.mutation)
        except MemoryError as e:
            send(ev="done", case=case, error=f"blowup preparing the case: {_exc_line(e)}")
        except Exception as e:  # noqa: BLE001
            send(ev="done", case=case, error=f"harness error: {_exc_line(e)}")


class _Worker:
    def __init__(self, cfg: dict, env: dict):
        r, w = os.pipe()
        cfg = {**cfg, "fd": w}
        self.errlog = open(Path(cfg["workdir"]) / f"worker-stderr-{time.time_ns()}.log", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", "from vlmscope.testing.fuzz import _worker_main; _worker_main()",
             json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.errlog, pass_fds=(w,), env=env,
            start_new_session=True)
        os.close(w)
        self.rfd = r
        self.buf = b""
        self.task: dict | None = None
        self.label = ""
        self.cmd = ""
        self.deadline = time.monotonic() + cfg["startup_timeout"]
        self.ready = False
        self.killed_by_us = False

    def send(self, task: dict, timeout: float) -> None:
        self.task = task
        self.cmd, self.label = "", "prepare"
        self.deadline = time.monotonic() + timeout
        self.proc.stdin.write((json.dumps(task) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.killed_by_us = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        os.close(self.rfd)
        self.errlog.close()

    def stderr_tail(self) -> str:
        try:
            self.errlog.flush()
            self.errlog.seek(0)
            lines = [ln.strip() for ln in self.errlog.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            fatal = [ln for ln in lines if ln.startswith("Fatal Python error")]
            frames = [ln for ln in lines if ln.startswith("File ") and "vlmscope" in ln and "fuzz.py" not in ln]
            return " ".join([*fatal[-1:], *frames[:1]])[:300] or (lines[-1][:200] if lines else "")
        except OSError:
            return ""


def _death(proc: subprocess.Popen) -> tuple[str, str]:
    rc = proc.returncode
    if rc is None:
        return "crash", "worker stopped reporting"
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        if -rc == signal.SIGKILL:
            return "blowup", "worker killed (SIGKILL: out of memory?)"
        return "crash", f"worker died of {sig}"
    return "crash", f"worker exited with status {rc}"


def supervise(n_cases: int, seed: int, sources: list[Path], workdir: str | os.PathLike, *, jobs: int = 2,
              timeout: float = 20.0, mem_bytes: int = 3 << 30, start: int = 0, commands: tuple[str, ...] = COMMANDS,
              keep_dir: str | os.PathLike | None = None, cls: str | None = None,
              on_case: Callable[[dict], None] | None = None, env: dict | None = None) -> list[dict]:
    """Run cases ``start .. start+n_cases-1`` in ``jobs`` worker processes under a memory cap and
    a per-run timeout; returns one dict per case (``runs``: one per command, with ``outcome``).
    Failing cases' files are copied to ``keep_dir`` when given; every case file is then deleted."""
    workdir = Path(workdir)
    (workdir / "cases").mkdir(parents=True, exist_ok=True)
    pkg_root = str(Path(__file__).resolve().parents[2])          # the vlmscope this process imported
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("VLMSCOPE_NO_FORK", "1")
    env.setdefault("COLUMNS", "160")
    env["PYTHONFAULTHANDLER"] = "1"
    cfg = {"seed": seed, "sources": [str(s) for s in sources], "workdir": str(workdir), "mem": mem_bytes,
           "startup_timeout": 120.0, "cls": cls}
    pending = list(range(start, start + n_cases))[::-1]
    results: dict[int, dict] = {}
    sel = selectors.DefaultSelector()
    workers: list[_Worker] = []

    def spawn() -> _Worker:
        w = _Worker(cfg, env)
        sel.register(w.rfd, selectors.EVENT_READ, w)
        workers.append(w)
        return w

    def retire(w: _Worker) -> None:
        sel.unregister(w.rfd)
        workers.remove(w)
        w.close()

    def feed(w: _Worker) -> None:
        if w.task is None and pending:
            case = pending.pop()
            results.setdefault(case, {"case": case, "runs": [], "source": "", "mutation": {}})
            w.send({"case": case, "commands": list(commands)}, timeout if w.ready else cfg["startup_timeout"])

    def finish(case: int) -> None:
        r = results[case]
        r["runs"].sort(key=lambda x: commands.index(x["cmd"]) if x["cmd"] in commands else 99)
        bad = [x for x in r["runs"] if x["outcome"] in FAILURES or x["outcome"] == "harness-error"]
        stem = case_path(workdir, case)
        if bad and keep_dir is not None:
            kd = Path(keep_dir)
            kd.mkdir(parents=True, exist_ok=True)
            for p in stem.parent.glob(stem.stem + ".*"):
                if p.exists():
                    shutil.copyfile(p, kd / p.name)
            r["kept"] = str(kd / stem.name)
        for p in stem.parent.glob(stem.stem + ".*"):
            try:
                p.unlink()
            except OSError:
                pass
        if on_case:
            on_case(r)

    def fail_current(w: _Worker, outcome: str, detail: str) -> None:
        """The worker's run in flight ends with ``outcome``; the case resumes at its next command."""
        task = w.task
        retire(w)
        if task is None:
            return
        case = task["case"]
        r = results[case]
        done = {x["cmd"] for x in r["runs"]}
        cmd = w.cmd if w.cmd in commands else None
        if w.cmd == "digest" and not task.get("no_digest"):
            # the harness's own h5py walk of the damaged file hung or died: not a run of vlmscope;
            # retry the case without it (the damage is then taken as detectable)
            r.setdefault("notes", []).append(f"content digest: {outcome} ({detail})")
            nw = spawn()
            nw.task = {**task, "no_digest": True}
            nw.proc.stdin.write((json.dumps(nw.task) + "\n").encode())
            nw.proc.stdin.flush()
            nw.deadline = time.monotonic() + cfg["startup_timeout"]
            return
        if cmd is None:                                  # died while preparing the case
            r["runs"].append({"cmd": "prepare", "outcome": outcome, "detail": f"{detail} in {w.label}",
                              "seconds": 0.0})
            finish(case)
            return
        r["runs"].append({"cmd": cmd, "outcome": outcome, "detail": f"{detail} in {w.label}",
                          "seconds": timeout if outcome == "hang" else 0.0})
        rest = [c for c in commands if c not in done and c != cmd]
        if rest:
            nw = spawn()
            nw.task = {**task, "commands": rest}
            nw.proc.stdin.write((json.dumps(nw.task) + "\n").encode())
            nw.proc.stdin.flush()
            nw.deadline = time.monotonic() + cfg["startup_timeout"]
        else:
            finish(case)

    for _ in range(max(1, min(jobs, n_cases))):
        feed(spawn())
    try:
        while workers:
            now = time.monotonic()
            wait = max(0.05, min(w.deadline for w in workers) - now)
            for key, _ in sel.select(timeout=min(wait, 1.0)):
                w = key.data
                try:
                    chunk = os.read(w.rfd, 1 << 16)
                except OSError:
                    chunk = b""
                if not chunk:
                    w.proc.wait()
                    o, d = _death(w.proc)
                    tail = w.stderr_tail()
                    fail_current(w, o, d + (f" [{tail}]" if tail else ""))
                    if pending and len(workers) < jobs:
                        feed(spawn())
                    continue
                w.buf += chunk
                while b"\n" in w.buf:
                    line, w.buf = w.buf.split(b"\n", 1)
                    msg = json.loads(line)
                    ev = msg.get("ev")
                    if ev == "ready":
                        w.ready = True
                        if w.task is not None:
                            w.deadline = time.monotonic() + timeout
                    elif ev == "start" and msg["cmd"] == "prepared":
                        got = json.loads(msg["label"])
                        results[msg["case"]]["source"] = got["source"]
                        results[msg["case"]]["mutation"] = got["mutation"]
                    elif ev == "start":
                        if msg["cmd"] != w.cmd:
                            w.deadline = time.monotonic() + timeout
                        w.cmd, w.label = msg["cmd"], msg["label"]
                    elif ev == "result":
                        results[msg["case"]]["runs"].append({k: msg[k] for k in ("cmd", "outcome", "detail", "seconds")})
                        w.cmd = ""
                    elif ev == "done":
                        r = results[msg["case"]]
                        if msg.get("error"):
                            r["runs"].append({"cmd": "prepare", "outcome": "harness-error", "detail": msg["error"],
                                              "seconds": 0.0})
                        else:
                            r["source"] = msg.get("source") or r["source"]
                            r["mutation"] = msg.get("mutation") or r["mutation"]
                        w.task = None
                        finish(msg["case"])
                        if pending:
                            feed(w)
                        else:
                            retire(w)
            now = time.monotonic()
            for w in list(workers):
                if w.task is not None and now > w.deadline:
                    w.kill()
                    fail_current(w, "hang" if w.ready else "harness-error",
                                 f"no answer in {timeout if w.ready else cfg['startup_timeout']:.0f} s")
                    if pending and len(workers) < jobs:
                        feed(spawn())
            while pending and len(workers) < jobs:
                feed(spawn())
    finally:
        for w in list(workers):
            w.kill()
            retire(w)
    return [results[c] for c in sorted(results)]


# ============================================================================ reports


def tabulate(results: list[dict]) -> str:
    """Outcome counts per command and per mutation class, as text tables."""
    shown = [o for o in OUTCOMES if any(r["outcome"] == o for c in results for r in c["runs"])]
    lines = []

    def table(title: str, key: Callable[[dict, dict], str]) -> None:
        rows: dict[str, dict[str, int]] = {}
        for c in results:
            for r in c["runs"]:
                rows.setdefault(key(c, r), {}).setdefault(r["outcome"], 0)
                rows[key(c, r)][r["outcome"]] += 1
        w = max([len(title), *(len(k) for k in rows)])
        cols = [max(len(o), 5) for o in shown]
        lines.append(f"{title:<{w}}  " + "  ".join(f"{o:>{n}}" for o, n in zip(shown, cols)) + "  total")
        for k in sorted(rows):
            v = rows[k]
            lines.append(f"{k:<{w}}  " + "  ".join(f"{v.get(o, 0):>{n}}" for o, n in zip(shown, cols)) +
                         f"  {sum(v.values()):>5}")
        tot = {o: sum(v.get(o, 0) for v in rows.values()) for o in shown}
        lines.append(f"{'total':<{w}}  " + "  ".join(f"{tot[o]:>{n}}" for o, n in zip(shown, cols)) +
                     f"  {sum(tot.values()):>5}")
        lines.append("")

    table("command", lambda c, r: r["cmd"])
    table("mutation class", lambda c, r: (c.get("mutation") or {}).get("cls", "?"))
    return "\n".join(lines)


def failure_groups(results: list[dict], outcomes: tuple[str, ...] = FAILURES) -> list[dict]:
    """Failures grouped by (outcome, command, message with numbers and paths blanked), biggest first."""
    groups: dict[tuple, dict] = {}
    for c in results:
        for r in c["runs"]:
            if r["outcome"] not in outcomes:
                continue
            sig = re.sub(r"/[\w./-]+\.h5\S*", "<path>", r["detail"])
            sig = re.sub(r"\b\d+\b", "N", sig)
            if r["outcome"] in ("silently-different", "silent-unchecked"):
                sig = re.sub(r";.*", "", sig)
            k = (r["outcome"], r["cmd"], sig)
            g = groups.setdefault(k, {"outcome": r["outcome"], "cmd": r["cmd"], "signature": sig, "count": 0,
                                      "example_case": c["case"], "example_mutation": "", "example_detail": r["detail"],
                                      "classes": {}})
            g["count"] += 1
            m = c.get("mutation") or {}
            g["classes"][m.get("cls", "?")] = g["classes"].get(m.get("cls", "?"), 0) + 1
            if not g["example_mutation"]:
                g["example_mutation"] = f"{m.get('cls')}: {m.get('desc')}"
    return sorted(groups.values(), key=lambda g: (-_SEVERITY[g["outcome"]], -g["count"]))
