"""The status of paired rows: how :func:`vlmscope.analyze.align.align` compares what it matched.

- tensors: shape and dtype (:data:`~.status.SHAPE`), then the stats (min, max, mean, std, absmax,
  NaN and Inf counts) with dtype-aware tolerances (:data:`~.status.DRIFT`), or the saved tensors
  themselves where both sides have a payload;
- reshapes: input and output shapes, dtypes and status (SHAPE), else the non-tensor arguments
  (DRIFT);
- probes: the stored values, compared as bytes (:func:`blobs_differ`).

Rows are compared a block at a time, vectorised; rows that are bit for bit identical (the
usual case) are found with one pass over their raw bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._index import TraceIndex
from .match import pack
from .status import DRIFT, SAME, SHAPE
from .stream import BLOCK_ROWS

if TYPE_CHECKING:
    from .aligned import Alignment

#: Default (rtol, atol) per dtype, as torch.testing.assert_close uses them.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-7),
    "float32": (1.3e-6, 1e-5),
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float8_e4m3fn": (1.25e-1, 1e-3),
    "float8_e5m2": (2.5e-1, 1e-3),
    "complex64": (1.3e-6, 1e-5),
    "complex128": (1e-7, 1e-7),
}
#: The stats fields of a tensor row, in their order in the row.
STATS = ("min", "max", "mean", "std", "absmax")


def tolerance_luts(ix: TraceIndex, rtol: float | None, atol: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(rtol, atol) per string id of ``ix`` naming a floating dtype (0 for any other id: exact)."""
    strings = ix.strings
    r_lut, a_lut = np.zeros(max(len(strings), 1)), np.zeros(max(len(strings), 1))
    for u in np.nonzero(ix.is_float_dtype_id)[0]:
        tol = DEFAULT_TOLERANCES.get(str(strings[u]).removeprefix("torch."))
        if tol is not None:
            r_lut[u] = tol[0] if rtol is None else rtol
            a_lut[u] = tol[1] if atol is None else atol
    return r_lut, a_lut


def rows_equal(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Per row of two structured arrays of one dtype (and length): are the rows bit-identical?

    Compares the raw buffers 8 bytes at a time and maps the differing words back to rows, so
    identical data costs one streaming pass."""
    n = len(xa)
    eq = np.ones(n, bool)
    if not n:
        return eq
    if xa.dtype != xb.dtype or len(xb) != n:
        return np.zeros(n, bool)
    size = xa.dtype.itemsize
    try:
        ra = np.ascontiguousarray(xa).view(np.uint8).reshape(-1)
        rb = np.ascontiguousarray(xb).view(np.uint8).reshape(-1)
        nw = len(ra) // 8
        bad = np.flatnonzero(ra[:nw * 8].view(np.uint64) != rb[:nw * 8].view(np.uint64)) * 8
        tail = np.flatnonzero(ra[nw * 8:] != rb[nw * 8:]) + nw * 8
    except ValueError:  # pragma: no cover - unaligned buffers
        bad = np.flatnonzero(np.ascontiguousarray(xa).view(np.uint8) != np.ascontiguousarray(xb).view(np.uint8))
        tail = np.zeros(0, np.int64)
    eq[bad // size] = False
    eq[np.minimum((bad + 7) // size, n - 1)] = False
    eq[tail // size] = False
    return eq


def same_string_ids(tr: np.ndarray) -> np.ndarray:
    """Per string id of A: does B use the same id for the same string?"""
    return tr == np.arange(len(tr))


def field_block(table: np.ndarray, first: str, names: tuple[str, ...]) -> np.ndarray:
    """``(n, k)`` view of ``k`` consecutive same-typed fields of a structured array (one pass
    over memory instead of k strided ones); a stacked copy when they are not consecutive."""
    f = table.dtype.fields
    off0, dt0 = f[first][1], f[first][0]
    if all(f[nm][0] == dt0 and f[nm][1] == off0 + i * dt0.itemsize for i, nm in enumerate(names)):
        base = table[first]
        return np.lib.stride_tricks.as_strided(base, shape=(len(table), len(names)),
                                               strides=(table.dtype.itemsize, dt0.itemsize), writeable=False)
    return np.stack([table[nm] for nm in names], axis=1)


def any1(x: np.ndarray) -> np.ndarray:
    """``x.any(axis=1)`` for a 2-D bool array with a few columns: numpy reduces a short axis
    slowly, so 8 contiguous columns are read as one uint64 and others are OR-ed column by column."""
    if x.shape[1] == 8 and x.flags.c_contiguous:
        return x.view(np.uint64).ravel() != 0
    out = x[:, 0].copy()
    for j in range(1, x.shape[1]):
        out |= x[:, j]
    return out


def stats_drift(sa: np.ndarray, sb: np.ndarray, na: np.ndarray, nb: np.ndarray, r: np.ndarray,
                at: np.ndarray) -> np.ndarray:
    """The drift test on stats ``(k, 5)`` (min max mean std absmax) and NaN/Inf counts ``(k, 2)``.

    Counts must match exactly; values may differ by ``at + r * magnitude``; non-finite stats are
    equal only when identical (two NaNs, the same infinity)."""
    drift = any1(na != nb)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mag = np.fmax(np.abs(sa[:, 4]), np.abs(sb[:, 4]))
        mag[~np.isfinite(mag)] = 0.0
        tol = at + r * mag
        d = np.abs(sa - sb)
        bad = ~(d <= tol[:, None])          # also True where d is NaN (a NaN, or inf - inf)
        out = drift | any1(bad)
        nf = np.nonzero(out & any1(np.isnan(d)))[0]
        if len(nf):
            x, y = sa[nf], sb[nf]
            same_v = (x == y) | (np.isnan(x) & np.isnan(y))
            out[nf] = drift[nf] | any1(bad[nf] & ~same_v)
    return out


def tensor_block_status(xa: np.ndarray, xb: np.ndarray, tr: np.ndarray, r_lut: np.ndarray,
                        a_lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Status of paired tensor rows (paired by name and role, so only shape, dtype and stats
    are compared; stats that are bit for bit equal skip the drift test), and the rows that
    need more (both sides saved a payload)."""
    shape_ne = (xa["ndim"] != xb["ndim"]) | (tr[xa["dtype"]] != xb["dtype"]) | any1(xa["shape"] != xb["shape"])
    sa, sb = field_block(xa, "min", STATS), field_block(xb, "min", STATS)
    na, nb = field_block(xa, "nan", ("nan", "inf")), field_block(xb, "nan", ("nan", "inf"))
    stats_ne = any1(sa.view(np.int64) != sb.view(np.int64)) | any1(na != nb)   # bit for bit
    st = np.where(shape_ne, SHAPE, SAME).astype(np.int8)
    k = np.nonzero(stats_ne & ~shape_ne)[0]
    if len(k):
        dt = xa["dtype"][k]
        st[k[stats_drift(sa[k], sb[k], na[k], nb[k], r_lut[dt], a_lut[dt])]] = DRIFT
    return st, np.nonzero((xa["payload"] >= 0) & (xb["payload"] >= 0))[0]


def tensor_status(A: TraceIndex, B: TraceIndex, tr: np.ndarray, ra: np.ndarray, rb: np.ndarray, p0: int,
                  pre_status: np.ndarray, pre_more: np.ndarray, r_lut: np.ndarray, a_lut: np.ndarray, payloads: bool):
    """Status of every aligned tensor pair: the first ``p0`` (the row-for-row prefix) come with
    their status from the streaming pass; the rest, and the prefix rows with payloads on both
    sides, are compared here, block by block (rows read as the ranges they span)."""
    n = len(ra)
    metrics = {"payload": {}}
    status = np.zeros(n, np.int8)
    status[:p0] = pre_status
    idx = np.concatenate([pre_more, np.arange(p0, n)]).astype(np.int64)
    if not len(idx):
        return status, metrics
    for j0 in range(0, len(idx), BLOCK_ROWS):     # in blocks: the gathered rows stay in cache
        sel = idx[j0:j0 + BLOCK_ROWS]
        xa, xb = A.fetch("tensors", ra[sel]), B.fetch("tensors", rb[sel])
        st, both = tensor_block_status(xa, xb, tr, r_lut, a_lut)
        if payloads:
            pa_, pb_, dt_a = xa["payload"], xb["payload"], xa["dtype"]
            for j in both[st[both] != SHAPE]:
                res = payload_metrics(A, B, int(pa_[j]), int(pb_[j]), float(r_lut[dt_a[j]]), float(a_lut[dt_a[j]]))
                if res is None:
                    continue
                metrics["payload"][int(sel[j])] = res[:3]
                st[j] = SAME if res[3] else DRIFT
        status[sel] = st
    return status, metrics


def tensor_metrics(al: "Alignment", i: int, rtol: float | None = None, atol: float | None = None) -> dict:
    """Drift metrics of aligned tensor ``i`` (an index into ``al.tensors``): the stats error
    relative to the magnitude, the tolerances, and max abs / max rel / cosine when both
    sides saved the tensor."""
    a, b = int(al.tensors.a[i]), int(al.tensors.b[i])
    out = {"stat_err": float("nan"), "rtol": float("nan"), "atol": float("nan")}
    if a < 0 or b < 0:
        return out
    xa, xb = al.ix_a.rows("tensors", slice(a, a + 1)), al.ix_b.rows("tensors", slice(b, b + 1))
    r_lut, a_lut = tolerance_luts(al.ix_a, al.rtol_opt if rtol is None else rtol,
                                  al.atol_opt if atol is None else atol)
    r, at = r_lut[xa["dtype"]], a_lut[xa["dtype"]]
    sa, sb = field_block(xa, "min", STATS)[0], field_block(xb, "min", STATS)[0]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = np.abs(sa - sb)
        d[(sa == sb) | (np.isnan(sa) & np.isnan(sb))] = 0.0
        d[np.isnan(d)] = np.inf
        mag = max(abs(float(sa[4])) if np.isfinite(sa[4]) else 0.0, abs(float(sb[4])) if np.isfinite(sb[4]) else 0.0)
        err = float(d.max() / mag) if mag > 0 else float(d.max())
    out.update(stat_err=err, rtol=float(r[0]), atol=float(at[0]))
    pm = al.payload_metrics.get(int(i))
    if pm is not None:
        out.update(max_abs=pm[0], max_rel=pm[1], cosine=pm[2])
    return out


def payload_metrics(A: TraceIndex, B: TraceIndex, pa: int, pb: int, rtol: float, atol: float):
    """(max abs, max rel, cosine, allclose) of two saved tensors, or None when unreadable."""
    try:
        xa = np.asarray(A.trace.payload(pa), np.float64)
        xb = np.asarray(B.trace.payload(pb), np.float64)
    except Exception:  # noqa: BLE001 - a damaged payload in the user's trace: fall back to the stats
        return None
    if xa.shape != xb.shape:
        return None
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = np.abs(xa - xb)
        both_nan = np.isnan(xa) & np.isnan(xb)
        fin = np.isfinite(d)
        ma = float(d[fin].max()) if fin.any() else 0.0
        rel = d / np.maximum(np.abs(xb), 1e-12)
        mr = float(rel[fin].max()) if fin.any() else 0.0
        va, vb = xa.ravel(), xb.ravel()
        ok = np.isfinite(va) & np.isfinite(vb)
        den = np.linalg.norm(va[ok]) * np.linalg.norm(vb[ok])
        cos = float(va[ok] @ vb[ok] / den) if den > 0 else (1.0 if np.array_equal(va[ok], vb[ok]) else 0.0)
        close = bool(((d <= atol + rtol * np.abs(xb)) | both_nan | (xa == xb)).all())
    return ma, mr, cos, close


def reshape_status(x: np.ndarray, y: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Status of paired reshape rows: shape (inputs, outputs, dtypes, status), drift (only the
    non-tensor arguments differ) or same."""
    diff = (tr[x["in_shapes"]] != y["in_shapes"]) | (x["out_ndim"] != y["out_ndim"]) | \
        any1(x["out_shape"] != y["out_shape"]) | (tr[x["in_dtypes"]] != y["in_dtypes"]) | \
        (tr[x["out_dtype"]] != y["out_dtype"]) | (x["n_in"] != y["n_in"]) | (x["n_out"] != y["n_out"]) | \
        (x["status"] != y["status"])
    args_diff = tr[x["args"]] != y["args"]
    return np.where(diff, SHAPE, np.where(args_diff, DRIFT, SAME)).astype(np.int8)


#: the fields of a reshape row whose difference makes a pair SHAPE in :func:`reshape_status`
#: (string ids translated first), and the multiplier of the fingerprint that mixes them
_SHAPE_IDS = ("in_shapes", "in_dtypes", "out_dtype")
_SHAPE_NUMS = ("out_ndim", "n_in", "n_out", "status")
_MIX = np.uint64(0x9E3779B97F4A7C15)
RESHAPE_DERIVED = {"shape_fp": np.dtype(np.uint64), "args": np.dtype(np.int64)}


def reshape_fingerprints(tr: np.ndarray):
    """A :data:`~vlmscope.analyze.stream.Derive` function for the reshapes: per row, a 64-bit
    fingerprint of every field :func:`reshape_status` compares for SHAPE (A's string ids
    translated with ``tr`` into B's, every dimension of ``out_shape``), and the row's ``args``
    string id (translated likewise). Two rows with equal fingerprints and args get SAME, equal
    fingerprints and other args DRIFT, others SHAPE: :func:`reshape_status`'s verdict, up to a
    2^-64 chance of two different recorded rows mixing to the same fingerprint (the mix has no
    key: a file crafted to collide could pass a shape difference off as the same)."""

    def derive(x: np.ndarray, side: int) -> dict[str, np.ndarray]:
        h = np.full(len(x), 0x243F6A8885A308D3, np.uint64)
        cols = [tr[x[f]] if side == 0 else x[f] for f in _SHAPE_IDS] + [x[f] for f in _SHAPE_NUMS]
        shape = x["out_shape"]
        cols += [shape[:, i] for i in range(shape.shape[1])]
        with np.errstate(over="ignore"):
            for c in cols:
                h ^= c.astype(np.int64).view(np.uint64)
                h *= _MIX
                h ^= h >> np.uint64(29)
        return {"shape_fp": h, "args": (tr[x["args"]] if side == 0 else x["args"]).astype(np.int64)}

    return derive


def reshape_status_derived(fa: np.ndarray, fb: np.ndarray, aa: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """:func:`reshape_status` of pairs from their derived columns (:func:`reshape_fingerprints`)."""
    return np.where(fa != fb, SHAPE, np.where(aa != ab, DRIFT, SAME)).astype(np.int8)


def reshape_block_status(xa: np.ndarray, xb: np.ndarray, tr: np.ndarray, ok_id: np.ndarray,
                         all_ok: bool) -> tuple[np.ndarray, np.ndarray]:
    """Status of row-for-row paired reshape rows: bit-identical rows (with the same string ids)
    are the same, the others are compared field by field."""
    eq = rows_equal(xa, xb)
    if not all_ok:
        e = np.nonzero(eq)[0]
        eq[e] = ok_id[xa["in_shapes"][e]] & ok_id[xa["args"][e]] & ok_id[xa["in_dtypes"][e]] & \
            ok_id[xa["out_dtype"][e]]
    st = np.zeros(len(xa), np.int8)
    t = np.nonzero(~eq)[0]
    if len(t):
        st[t] = reshape_status(xa[t], xb[t], tr)
    return st, np.zeros(0, np.int64)


def blobs_differ(A: TraceIndex, B: TraceIndex, ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Per aligned probe pair: do the stored bytes differ?

    Pairs whose blobs sit at the same offset (or at a common shift) in both traces' probe data
    -- the usual case for traces of one structure -- are answered from one prefix sum over the
    byte-wise comparison of the two buffers; the rest are compared blob by blob, vectorised.
    """
    n = len(ra)
    out = np.zeros(n, bool)
    if not n:
        return out
    oa = A.col("probes", "data_off")[ra].astype(np.int64)
    ob = B.col("probes", "data_off")[rb].astype(np.int64)
    la = A.col("probes", "data_len")[ra].astype(np.int64)
    lb = B.col("probes", "data_len")[rb].astype(np.int64)
    out |= la != lb
    todo = (la == lb) & (la > 0)
    da, db = A.probe_data, B.probe_data
    delta = ob - oa
    shifts, counts = np.unique(delta[todo], return_counts=True) if todo.any() else (np.zeros(0, np.int64), [])
    for sh in shifts[np.argsort(counts)[::-1][:4]]:
        sh = int(sh)
        sel = np.nonzero(todo & (delta == sh))[0]
        if len(sel) < 64 and sh != 0:
            continue
        a0 = max(0, -sh)                       # compare da[i] with db[i + sh]
        a1 = min(len(da), len(db) - sh)
        if a1 <= a0:
            continue
        where = np.flatnonzero(da[a0:a1] != db[a0 + sh:a1 + sh]) + a0   # differing byte positions
        s_, e_ = oa[sel], oa[sel] + la[sel]
        inside = (s_ >= a0) & (e_ <= a1)
        si, ei = s_[inside], e_[inside]
        out[sel[inside]] |= np.searchsorted(where, ei) > np.searchsorted(where, si)
        todo[sel[inside]] = False
    rest = np.nonzero(todo)[0]
    if not len(rest):
        return out
    key = pack([oa[rest], ob[rest], la[rest]])
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    inv = inv.ravel()
    uoa, uob, ul = oa[rest][first], ob[rest][first], la[rest][first]
    res = np.zeros(len(first), bool)
    cum = np.cumsum(ul)
    cuts = np.searchsorted(cum, np.arange(1 << 22, int(cum[-1]) + 1, 1 << 22), side="right")
    bounds = [0, *[int(c) for c in cuts], len(first)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi <= lo:
            continue
        L = ul[lo:hi]
        seg = np.repeat(np.arange(hi - lo), L)
        starts = np.cumsum(L) - L
        pos = np.arange(int(L.sum())) - starts[seg]
        xa = da[np.minimum(uoa[lo:hi][seg] + pos, len(da) - 1)]
        xb = db[np.minimum(uob[lo:hi][seg] + pos, len(db) - 1)]
        res[lo:hi] = np.maximum.reduceat((xa != xb).view(np.uint8), starts) > 0
    out[rest] |= res[inv]
    return out
