"""Reading a trace file as untrusted input: the checks the reader makes before it trusts a name,
a dataset's layout, an attribute or a row (``docs/trace-format.md``, "Reading untrusted traces").

- :func:`check_link` / :func:`check_storage`: every name the reader touches is a hard link to an
  object stored in this file (no external or soft links, no external storage, no virtual
  datasets), and its data passes only through the filters a trace uses.
- :func:`check_table`: a table is 1-D, of the row dtype of its format version, in bounded
  chunks, and its declared length is backed by stored data (a 96 KB file cannot declare 30M rows).
- :func:`read_attr`, :func:`attr_json`: attributes of the wrong type, shape or size, or bad
  JSON, give one line.
- :func:`check_rows`, :func:`step_damage`: the references between tables (rows, string ids,
  probe bytes, parents), vectorised over a table or a step's block of rows.
- strings: :func:`vlmscope.trace.read_strings` checks their offsets;
- :func:`preflight`: walks the file's metadata in a forked child with a timeout, since some
  damaged files make HDF5's C code loop forever (where Ctrl-C cannot stop it).

h5py, numpy and the standard library only. Every failure is a one-line :class:`TraceError`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import select
import signal
import time
import weakref
from typing import Any, Callable, Mapping

import h5py
import numpy as np

from .format import ENC_BITS, ENC_FLOAT64, ENC_NONE, MAX_DIMS, TraceError, _first_line
from .sketch import MAX_SKETCH_ROWS

#: A table (or payload) may declare at most this many bytes per byte it stores...
MAX_EXPANSION = 1024
#: ...or this many, whatever it stores (small tables of constant rows compress very well).
EXPANSION_FLOOR = 64 << 20
#: Bytes of one chunk (traces use ~1 MiB; HDF5 allocates a whole chunk to read any of it).
MAX_CHUNK_BYTES = 64 << 20
#: Bytes of one attribute's value (metadata JSON, error tracebacks).
MAX_ATTR_BYTES = 64 << 20
#: HDF5 filters a trace may use: deflate, shuffle, fletcher32, lzf (format 1), Blosc2 (format 2+).
ALLOWED_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 32000: "lzf", 32026: "blosc2"}
#: Seconds :func:`preflight` lets the metadata walk run by default (``VLMSCOPE_PREFLIGHT_TIMEOUT``
#: overrides it). A sound trace's walk takes milliseconds.
PREFLIGHT_TIMEOUT = 5.0


def _q(s: Any) -> str:
    """A name from the file, quoted on one line (it may hold anything)."""
    if isinstance(s, bytes):
        s = s.decode("utf-8", "backslashreplace")
    return ascii(str(s)[:200])


def corrupt(path: Any, what: str) -> TraceError:
    return TraceError(f"trace is truncated or corrupt: {path} ({what})")


def outside(path: Any, what: str) -> TraceError:
    return TraceError(f"trace refers to a file outside itself: {what} ({path})")


# ============================================================================ names and storage


def check_link(group: h5py.Group, name: str, path: Any, where: str) -> None:
    """``group[name]`` must be a hard link (to an object of this file): external links name
    another file, soft links another name, and user-defined links anything."""
    try:
        info = group.id.links.get_info(name.encode())
    except KeyError:
        raise corrupt(path, f"no {where}") from None
    except Exception as e:  # noqa: BLE001 - a damaged link table raises many types
        raise corrupt(path, f"{where}: {_first_line(e)}") from None
    if info.type == h5py.h5l.TYPE_HARD:
        return
    if info.type == h5py.h5l.TYPE_EXTERNAL:
        try:
            fname, target = group.id.links.get_val(name.encode())
            raise outside(path, f"{where} is an external link to {_q(fname)}:{_q(target)}")
        except TraceError:
            raise
        except Exception:  # noqa: BLE001
            raise outside(path, f"{where} is an external link") from None
    if info.type == h5py.h5l.TYPE_SOFT:
        raise corrupt(path, f"{where} is a soft link, which a trace never holds")
    raise outside(path, f"{where} is a user-defined link")


def check_storage(ds: h5py.Dataset, path: Any, where: str) -> None:
    """The dataset's data lies in this file, and passes only through the filters a trace uses."""
    try:
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        n_ext = dcpl.get_external_count()
        ext = dcpl.get_external(0)[0] if n_ext else b""
        filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())] if layout == h5py.h5d.CHUNKED else []
    except Exception as e:  # noqa: BLE001
        raise corrupt(path, f"{where}: {_first_line(e)}") from None
    if n_ext:
        raise outside(path, f"{where} stores its data in external file {_q(ext)}")
    if layout == getattr(h5py.h5d, "VIRTUAL", -99):
        raise outside(path, f"{where} is a virtual dataset (its data lies in other datasets or files)")
    for fid in filters:
        if fid not in ALLOWED_FILTERS:
            raise corrupt(path, f"{where} uses HDF5 filter {fid}, which vlmscope traces never use")


def _declared_ok(ds: h5py.Dataset, nbytes: int, file_size: int, path: Any, where: str) -> None:
    """The declared data (``nbytes``) is backed by stored data: allocated chunks for every
    chunk it spans, and no more than :data:`MAX_EXPANSION` times what is stored."""
    if nbytes <= 0:
        return
    try:
        stored = min(int(ds.id.get_storage_size()), file_size)
        chunks = ds.chunks
        n_chunks = ds.id.get_num_chunks() if chunks else 0
    except Exception as e:  # noqa: BLE001
        raise corrupt(path, f"{where}: {_first_line(e)}") from None
    if chunks:
        per = math.prod(chunks) * ds.dtype.itemsize
        if per > MAX_CHUNK_BYTES:
            raise corrupt(path, f"{where} has chunks of {per:,} bytes")
        need = math.prod(-(-d // c) for d, c in zip(ds.shape, chunks))
        if n_chunks < need:
            raise corrupt(path, f"{where} declares {ds.shape[0]:,} rows but stores {n_chunks} of their "
                                f"{need} chunks")
    if nbytes > max(EXPANSION_FLOOR, MAX_EXPANSION * stored):
        raise corrupt(path, f"{where} declares {nbytes:,} bytes of data but stores {stored:,}")


def check_table(ds: h5py.Dataset, dtype: np.dtype | None, path: Any, where: str, file_size: int,
                kind: str | None = None) -> None:
    """A table as a trace writes it: in this file (:func:`check_storage`), 1-D, of ``dtype`` (or
    of numpy kind ``kind``: ``"vlen-str"`` for format 1's strings), with its rows backed by data."""
    check_storage(ds, path, where)
    try:
        shape, dt = ds.shape, ds.dtype
    except Exception as e:  # noqa: BLE001 - a datatype h5py cannot map
        raise corrupt(path, f"{where} has an unreadable type or shape ({_first_line(e)})") from None
    if shape is None or len(shape) != 1:
        raise corrupt(path, f"{where} has shape {shape}, not one dimension")
    if kind == "vlen-str":
        if h5py.check_string_dtype(dt) is None or dt.kind != "O":
            raise corrupt(path, f"{where} has type {dt}, not variable-length strings")
        nbytes = shape[0] * 16
    elif dt != dtype:
        raise corrupt(path, f"{where} has the wrong row type for its format version")
    else:
        nbytes = shape[0] * dt.itemsize
    _declared_ok(ds, nbytes, file_size, path, where)


def check_payload(ds: h5py.Dataset, path: Any, where: str, file_size: int) -> None:
    """A saved tensor: in this file, of a plain numeric or bool dtype, its size backed by data."""
    check_storage(ds, path, where)
    try:
        shape, dt = ds.shape, ds.dtype
    except Exception as e:  # noqa: BLE001
        raise corrupt(path, f"{where} has an unreadable type or shape ({_first_line(e)})") from None
    if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None:
        raise corrupt(path, f"{where} has type {_q(dt)}, not a tensor's")
    if shape is None:
        raise corrupt(path, f"{where} has no shape")
    _declared_ok(ds, math.prod(shape) * dt.itemsize, file_size, path, where)


# ============================================================================ attributes


def read_attr(obj: h5py.HLObject, name: str, path: Any, where: str, default: Any = None) -> Any:
    """One attribute's value, a scalar (or one-element array) of bounded size, else a one-line
    :class:`TraceError`; ``default`` when it is missing. Strings come back as ``str``."""
    try:
        if not h5py.h5a.exists(obj.id, name.encode()):
            return default
        aid = h5py.h5a.open(obj.id, name.encode())
        space = aid.get_space()
        npoints = space.get_simple_extent_npoints() if space.get_simple_extent_type() != h5py.h5s.NULL else 0
        size = aid.get_type().get_size()
    except Exception as e:  # noqa: BLE001
        raise corrupt(path, f"attribute {where}{name}: {_first_line(e)}") from None
    if npoints != 1:
        raise corrupt(path, f"attribute {where}{name} holds {npoints:,} values, not one")
    if size > MAX_ATTR_BYTES:
        raise corrupt(path, f"attribute {where}{name} declares {size:,} bytes")
    try:
        v = obj.attrs[name]
    except Exception as e:  # noqa: BLE001
        raise corrupt(path, f"attribute {where}{name}: {_first_line(e)}") from None
    if isinstance(v, np.ndarray):
        v = v.reshape(-1)[0]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "backslashreplace")
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and len(v) > MAX_ATTR_BYTES:
        raise corrupt(path, f"attribute {where}{name} holds {len(v):,} characters")
    return v


def attr_str(obj: h5py.HLObject, name: str, path: Any, where: str, default: str = "") -> str:
    v = read_attr(obj, name, path, where, default)
    if not isinstance(v, str):
        raise corrupt(path, f"attribute {where}{name} is {type(v).__name__}, not a string")
    return v


def attr_int(obj: h5py.HLObject, name: str, path: Any, where: str, default: int = -1) -> int:
    v = read_attr(obj, name, path, where, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise corrupt(path, f"attribute {where}{name} is {type(v).__name__}, not an integer")
    return v


def loads(s: str) -> Any:
    """``json.loads`` that fails with ``ValueError`` only (deep nesting included)."""
    try:
        return json.loads(s)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def attr_json(obj: h5py.HLObject, name: str, path: Any, where: str, default: str, want: type | None = None,
              null_ok: bool = True) -> Any:
    """An attribute holding JSON (of type ``want`` when given; ``null`` only when ``null_ok``), decoded."""
    s = attr_str(obj, name, path, where, default)
    try:
        v = loads(s)
    except ValueError as e:
        raise corrupt(path, f"attribute {where}{name} is not valid JSON ({_first_line(e)})") from None
    if want is not None and (v is not None or not null_ok) and not isinstance(v, want):
        raise corrupt(path, f"attribute {where}{name} holds a JSON {type(v).__name__}, not a {want.__name__}")
    return v


# ============================================================================ rows and references

#: String-id fields per table (ids into the interned strings, never negative).
STRING_FIELDS = {
    "modules": ("path", "cls"),
    "events": (),
    "tensors": ("name", "dtype", "device"),
    "reshapes": ("op", "in_shapes", "in_dtypes", "args", "out_dtype", "site_file", "site_func"),
    "probes": ("kind", "name", "dtype", "info"),
    "sketches": ("dtype",),
}
#: Row references per table: field -> (table it points into, whether -1 means "none").
ROW_FIELDS = {
    "modules": {"parent": ("modules", True)},
    "events": {"module": ("modules", False), "parent": ("events", True)},
    "tensors": {"event": ("events", False)},
    "reshapes": {"event": ("events", True), "module": ("modules", True)},
    "probes": {"event": ("events", True), "module": ("modules", True)},
    "sketches": {"tensor": ("tensors", False)},
}
#: (ndim field, shape field, most dimensions) per table. Tensors and reshapes keep the first
#: MAX_DIMS dimensions of a longer shape (and its real ndim); a probe's values have its shape
#: (checked against its bytes). The dimensions of tensors and reshapes are recorded values, not
#: references: they are shown as stored (checking them costs more than the rest of the table).
SHAPE_FIELDS = {
    "tensors": (("ndim", "shape", 64),),
    "reshapes": (("in_ndim", "in_shape", 64), ("out_ndim", "out_shape", 64)),
    "probes": (("ndim", "shape", MAX_DIMS),),
}
#: Small enumerations: field -> values [lo, hi].
ENUM_FIELDS = {
    "tensors": (("role", 0, 2),),
    "events": (("status", 0, 1),),
    "reshapes": (("status", 0, 1),),
    "probes": (("enc", ENC_NONE, ENC_FLOAT64),),
}
#: (start, count, table) block references per table.
BLOCK_FIELDS = {"events": (("tensor_start", "tensor_count", "tensors"),)}
STEP_BLOCKS = (("event_start", "event_count", "events"), ("tensor_start", "tensor_count", "tensors"),
               ("reshape_start", "reshape_count", "reshapes"), ("probe_start", "probe_count", "probes"))
_DIMS = np.arange(MAX_DIMS)


class Sizes:
    """What references are checked against: rows per table, strings, probe bytes (each looked
    up when first needed, through ``get``)."""

    def __init__(self, get: Callable[[str], int]):
        # a bound method is held weakly: the sizes of a trace must not keep their trace alive
        self._get = weakref.WeakMethod(get) if inspect.ismethod(get) else (lambda: get)
        self._n: dict[str, int] = {}

    def __getitem__(self, key: str) -> int:
        n = self._n.get(key)
        if n is None:
            get = self._get()
            if get is None:
                raise TraceError("the trace of these rows was released")
            n = self._n[key] = int(get(key))
        return n


def _fields(rows: Any) -> tuple[str, ...]:
    if isinstance(rows, Mapping):
        return tuple(rows)
    return rows.dtype.names or ()


def _acyclic(parent: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Bool per row: following ``parent`` (global row numbers; -1 ends) from it reaches -1.
    ``rows`` are the rows' own global numbers. Written rows always point backwards (a caller
    starts before its callee), which settles it at once; otherwise by pointer doubling (rows
    whose parent lies outside the block are taken as ending there: checked by the caller)."""
    if not len(parent) or (parent < rows).all():
        return np.ones(len(parent), bool)
    base = int(rows[0])
    local = np.where(parent >= 0, parent - base, -1)
    local[(local < -1) | (local >= len(parent))] = -1
    jump = local
    for _ in range(max(1, int(len(parent)).bit_length() + 1)):
        nxt = np.where(jump >= 0, jump[np.maximum(jump, 0)], -1)
        if (nxt == jump).all():
            break
        jump = nxt
    return jump < 0


def check_rows(table: str, rows: Any, sizes: Sizes, path: Any, base: int = 0, step: int | None = None,
               block: tuple[int, int] | None = None) -> None:
    """The references of rows ``[base, base + len(rows))`` of ``table`` (a structured array, or a
    mapping of some of its columns): row numbers into other tables, string ids, small
    enumerations, shapes, probe bytes and parents (in range, and never a cycle). ``step``: the
    rows are that step's block, and must say so; ``block`` (start, stop): parents must lie in it.
    Raises a one-line :class:`TraceError` naming the first bad row and field.

    Vectorised: a min and a max per field, on blocks that stay in the CPU cache."""
    names = _fields(rows)
    if not names:
        return
    n = len(rows[names[0]])
    if not n:
        return
    at = f"step {step}: " if step is not None else ""

    def fail(bad: np.ndarray, what: Callable[[int], str] | str) -> None:
        i = int(np.argmax(bad))
        raise corrupt(path, f"{at}{table} row {base + i:,}: {what(i) if callable(what) else what}")

    def in_range(field: str, lo: int, hi: int, label: str) -> None:
        """Every value of ``field`` in ``[lo, hi)``."""
        x = rows[field]
        if lo == 0 and x.dtype.kind == "i":     # one pass: negative values are huge unsigned ones
            ok = hi > 0 and int(x.view(np.dtype(f"u{x.dtype.itemsize}")).max()) < hi
        else:
            ok = x.min() >= lo and x.max() < hi
        if not ok:
            fail((x < lo) | (x >= hi), lambda i: f"{field} {int(x[i])} is outside {label}")

    if "step" in names:
        if step is not None:
            x = rows["step"]
            if x.min() != step or x.max() != step:
                fail(x != step, lambda i: f"step {int(x[i])}, inside the block of step {step}")
        else:
            in_range("step", 0, max(sizes["steps"], 1), f"the {sizes['steps']} steps")
    for f in STRING_FIELDS.get(table, ()):
        if f in names:
            in_range(f, 0, sizes["strings"], f"the {sizes['strings']:,} strings")
    for f, lo, hi in ENUM_FIELDS.get(table, ()):
        if f in names:
            in_range(f, lo, hi + 1, f"{lo}..{hi}")
    for f, (target, none_ok) in ROW_FIELDS.get(table, {}).items():
        if f in names:
            hi = sizes[target]
            if f == "parent" and block is not None:
                x = rows[f]
                bad = (x != -1) & ((x < block[0]) | (x >= block[1]))
                if bad.any():
                    fail(bad, lambda i: f"parent {int(x[i])} is outside the step's rows")
            in_range(f, -1 if none_ok else 0, hi, f"/{target} ({hi:,} rows)")
    if "parent" in names and table in ("events", "modules"):
        ok = _acyclic(rows["parent"], np.arange(base, base + n))
        if not ok.all():
            fail(~ok, "its parents form a cycle")
    for nd, shp, most in SHAPE_FIELDS.get(table, ()):
        if nd in names:
            in_range(nd, 0, most + 1, f"0..{most} dimensions")
    for s, c, target in BLOCK_FIELDS.get(table, ()):
        if s in names and c in names:
            st, ct = rows[s].astype(np.int64), rows[c].astype(np.int64)
            total = sizes[target]
            # compared without adding: start + count can overflow int64 and wrap negative
            if st.min() < 0 or ct.min() < 0 or st.max() > total or (ct > total - st).any():
                bad = (st < 0) | (ct < 0) | (st > total) | (ct > total - np.minimum(st, total))
                fail(bad, lambda i: f"rows [{int(st[i])}, +{int(ct[i])}) lie outside /{target} ({total:,} rows)")
    if table == "events" and "seq" in names and "end_seq" in names:
        sq, es = rows["seq"], rows["end_seq"]
        if sq.min() < 0 or (es < sq).any():     # execution order: a call ends after it starts
            fail((sq < 0) | (es < sq), lambda i: f"seq {int(sq[i])} / end_seq {int(es[i])} are not an order")
    # (a tensor's ``payload`` is checked when it is read: Trace.payload names a missing one)
    if table == "probes" and "data_off" in names:
        _check_probes(rows, sizes, fail)
    if table == "sketches" and "off" in names:
        _check_sketches(rows, sizes, fail)


def _check_sketches(rows: Any, sizes: Sizes, fail: Callable) -> None:
    """A sketch's ``rows x width`` float16 values lie in ``/sketch_data`` (no product overflows)."""
    n, w, off = rows["rows"].astype(np.int64), rows["width"].astype(np.int64), rows["off"].astype(np.int64)
    total = sizes["sketch_data"]
    if n.min() < 1 or n.max() > MAX_SKETCH_ROWS or w.min() < 2 or w.max() > 65:
        bad = (n < 1) | (n > MAX_SKETCH_ROWS) | (w < 2) | (w > 65)
        fail(bad, lambda i: f"sketch of {int(n[i])} rows x {int(w[i])} values is outside 1..{MAX_SKETCH_ROWS} x 2..65")
    ln = n * w                               # both bounded above: no overflow
    if off.min() < 0 or off.max() > total or (ln > total - off).any():
        bad = (off < 0) | (off > total) | (ln > total - np.minimum(off, total))
        fail(bad, lambda i: f"sketch values [{int(off[i])}, +{int(ln[i])}) lie outside /sketch_data ({total:,} values)")


def _check_probes(rows: Any, sizes: Sizes, fail: Callable) -> None:
    """A probe's bytes lie in ``/probe_data`` and hold exactly its shape's values."""
    enc = rows["enc"]
    off, ln = rows["data_off"], rows["data_len"]
    total = sizes["probe_data"]
    if off.min() < 0 or ln.min() < 0 or off.max() > total or (ln > total - off).any():
        bad = (off < 0) | (ln < 0) | (off > total) | (ln > total - off)
        fail(bad, lambda i: f"probe bytes [{int(off[i])}, +{int(ln[i])}) lie outside /probe_data ({total:,} bytes)")
    nd = rows["ndim"]                       # in 0..MAX_DIMS (checked before)
    shape = rows["shape"]
    stored = enc != ENC_NONE
    count = np.ones(len(nd), np.int64)
    fcount = np.ones(len(nd), np.float64)   # an int64 product may wrap: its float twin may not
    for j in range(int(nd.max())):
        d = np.where(nd > j, shape[:, j], 1)
        if d.min() < 0:
            fail(stored & (d < 0), "negative probe dimension")
        count *= d
        fcount *= d
    want = np.where(enc == ENC_BITS, (count + 7) // 8, count * 8)
    bad = stored & ((want != ln) | (fcount > 8.0 * (ln + 1)))
    if bad.any():
        fail(bad, lambda i: f"probe shape {tuple(int(x) for x in shape[i][:nd[i]])} does not match its "
                            f"{int(ln[i])} bytes (encoding {int(enc[i])})")


def step_damage(steps: np.ndarray, sizes: Sizes) -> dict[int, str]:
    """What is wrong with each damaged step row (its number, its blocks of rows in the other
    tables, its small fields), by step; empty when all are sound."""
    n = len(steps)
    if not n:
        return {}
    bad: dict[int, str] = {}

    def note(mask: np.ndarray, what: Callable[[int], str]) -> None:
        for i in np.nonzero(mask)[0][:1000].tolist():
            bad.setdefault(i, what(i))

    x = steps["step"]
    note(x != np.arange(n), lambda i: f"its row says step {int(x[i])}")
    for s, c, target in STEP_BLOCKS:
        st, ct = steps[s].astype(np.int64), steps[c].astype(np.int64)
        total = sizes[target]
        note((st < 0) | (ct < 0) | (st > total) | (ct > total - np.minimum(st, total)),   # no overflowing sum
             lambda i, st=st, ct=ct, target=target, total=total:
             f"its {target} rows [{int(st[i])}, +{int(ct[i])}) lie outside /{target} ({total:,} rows)")
    for f, hi in (("pos_rows", 3), ("mask_ndim", 4)):
        v = steps[f]
        note((v < 0) | (v > hi), lambda i, v=v, f=f: f"{f} {int(v[i])}")
    k = steps["kind"]
    note((k != 0) & (k != 1), lambda i: f"unknown kind {int(k[i])}")
    return bad


# ============================================================================ preflight


def _walk(path: str) -> None:  # pragma: no cover - runs in the forked child
    """Touch every piece of metadata a reader may touch: attributes, links, object headers,
    dataset layouts and their chunk indexes."""
    with h5py.File(path, "r") as f:
        seen: set = set()

        def attrs(obj: Any) -> None:
            for k in obj.attrs:
                try:
                    read_attr(obj, k, path, "")
                except TraceError:
                    pass

        def visit(g: h5py.Group, depth: int) -> None:
            attrs(g)
            if depth > 4:
                return
            for name in list(g)[:100_000]:
                try:
                    info = g.id.links.get_info(name.encode())
                    if info.type != h5py.h5l.TYPE_HARD:
                        continue
                    obj = g[name]
                    key = h5py.h5o.get_info(obj.id).addr
                    if key in seen or len(seen) > 200_000:
                        continue
                    seen.add(key)
                    if isinstance(obj, h5py.Group):
                        visit(obj, depth + 1)
                    else:
                        attrs(obj)
                        obj.shape, obj.dtype
                        dcpl = obj.id.get_create_plist()
                        if dcpl.get_external_count() or dcpl.get_layout() == getattr(h5py.h5d, "VIRTUAL", -99):
                            continue
                        if obj.chunks:
                            obj.id.get_num_chunks()
                            obj.id.get_storage_size()
                except Exception:  # noqa: BLE001 - the reader reports damage; this only looks for hangs
                    pass

        visit(f, 0)


def preflight(path: str | os.PathLike, timeout: float | None = None) -> None:
    """Walk a trace's HDF5 metadata in a forked child process, and refuse the file in one line
    if that walk does not finish within ``timeout`` seconds or crashes the process. Some damaged
    files make HDF5 loop forever inside its C code, where neither a timeout nor Ctrl-C can stop
    the reading process; the child can be killed. Errors the walk meets are left to the reader.
    Where ``fork`` is missing, nothing is checked. A file that passed is not walked again in this
    process (or its forked children) while it is unchanged (same inode, size and mtime)."""
    p = os.fspath(path)
    if not hasattr(os, "fork") or not os.path.isfile(p):
        return
    try:
        st = os.stat(p)
    except OSError:
        return                   # the reader reports it
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _PASSED:
        return
    if timeout is None:
        try:
            timeout = float(os.environ.get("VLMSCOPE_PREFLIGHT_TIMEOUT", PREFLIGHT_TIMEOUT))
        except ValueError:
            timeout = PREFLIGHT_TIMEOUT
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _walk(p)
        except BaseException:  # noqa: BLE001
            code = 0
        finally:
            try:
                os.write(w, b"done")
            finally:
                os._exit(code)
    os.close(w)
    status = None
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([r], [], [], min(left, 0.5))
            if ready:
                os.read(r, 16)
                _, status = os.waitpid(pid, 0)
                pid = 0
                break
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status, pid = st, 0
                break
    finally:
        os.close(r)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
    if status is None:
        raise TraceError(f"trace is corrupt: reading it does not finish (HDF5 was still reading its "
                         f"metadata after {timeout:g} s): {p}")
    if os.WIFSIGNALED(status):
        raise TraceError(f"trace is corrupt: reading it crashes HDF5 (signal {os.WTERMSIG(status)}): {p}")
    _PASSED.add(key)


#: (device, inode, size, mtime) of the files ``preflight`` walked to the end in this process
_PASSED: set[tuple[int, int, int, int]] = set()


def check_tensor_shapes(rows: Any, path: Any, where: str = "tensors") -> None:
    """Tensor rows whose shape and ``numel`` disagree (a recorded tensor always has
    ``numel == prod(shape)``), or with a negative dimension: a damaged or doctored row. Checked
    where shapes are shown (snapshot entries, diff's divergent rows), not on whole tables."""
    rows = np.atleast_1d(np.asarray(rows))
    if not len(rows):
        return
    nd = np.asarray(rows["ndim"]).astype(np.int64)
    shape = np.asarray(rows["shape"]).reshape(len(nd), -1)
    k = shape.shape[1]
    used = np.arange(k)[None, :] < np.clip(nd, 0, k)[:, None]
    dims = np.where(used, shape, 1)
    prod = np.prod(dims.astype(np.float64), axis=1)
    numel = np.asarray(rows["numel"]).astype(np.float64)
    bad = (dims < 0).any(axis=1) | ((nd <= k) & (prod != numel)) | (prod > 2.0 ** 62)
    if bad.any():
        i = int(np.argmax(bad))
        raise corrupt(path, f"{where} row {i}: shape {[int(d) for d in shape[i][:max(int(nd[i]), 0)]]} does not "
                            f"hold its {int(rows['numel'][i]):,} elements")
