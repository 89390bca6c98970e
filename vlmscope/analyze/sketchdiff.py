"""Comparing value sketches (:mod:`vlmscope.trace.sketch`): one pair of tensors in words
(:func:`compare_sketches`: which tokens differ, and whether they are permuted or shifted), and
every aligned pair of two traces at once (:func:`sketch_drift`, vectorised, for ``diff`` and the
viewer: a pair whose statistics agree but whose tokens do not is a drift).
"""

from __future__ import annotations

import numpy as np

from vlmscope.trace.sketch import MAX_SKETCH_COLS, SKETCH_VERSION

from ._index import TraceIndex

#: a sketch value (a token's norm over the tensor's largest, or a cosine) is float16: two
#: equal tensors may differ by one float16 ulp (~1e-3 of 1); past that, by the dtype's noise
SKETCH_TOLERANCES: dict[str, float] = {"float64": 3e-3, "float32": 3e-3, "float16": 1e-2, "bfloat16": 4e-2}
_DEFAULT_SKETCH_TOL = 4e-2


def sketch_tol(dtype: str) -> float:
    return SKETCH_TOLERANCES.get(dtype.removeprefix("torch."), _DEFAULT_SKETCH_TOL)


def compare_sketches(va: np.ndarray, sa: float, vb: np.ndarray, sb: float, tol: float) -> str | None:
    """None when two sketches agree token by token, else what differs, in words: the tokens,
    and whether they are the same tokens permuted or shifted."""
    if va.shape != vb.shape:
        return f"{va.shape[0]} vs {vb.shape[0]} tokens"
    a = va.astype(np.float64)
    b = vb.astype(np.float64)
    scale = max(sa, sb)
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    # norms on one scale (each trace stored norm / its own largest norm)
    a[:, 0] *= sa / scale
    b[:, 0] *= sb / scale
    bad = _rows_differ(a, b, tol)
    if not bad.any():
        return None
    idx = np.nonzero(bad)[0]
    lo, hi = int(idx[0]), int(idx[-1])
    n = len(a)
    what = _pattern(a, b, lo, hi, tol)
    span = f"token {lo}" if lo == hi else f"tokens {lo}..{hi}"
    dmax = float(np.nanmax(np.abs(a - b)[bad])) if np.isfinite(a[bad]).all() and np.isfinite(b[bad]).all() else float("nan")
    tail = f" ({len(idx)} of {n} tokens differ, largest difference {dmax:.3g} of the largest token norm)"
    return f"{span} {what}{tail}" if what else f"{span} differ{tail}"


def _rows_differ(a: np.ndarray, b: np.ndarray, tol: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
        same = (d <= tol) | (np.isnan(a) & np.isnan(b)) | (a == b)
    return ~same.all(axis=1)


def _pattern(a: np.ndarray, b: np.ndarray, lo: int, hi: int, tol: float) -> str:
    """``permuted`` when tokens lo..hi of B are those of A in another order, ``shifted by k``
    when B's tokens are A's moved by k positions, else ''."""
    xa, xb = a[lo:hi + 1], b[lo:hi + 1]
    if len(xa) > 1:
        oa = np.lexsort(np.round(xa[:, ::-1] / max(tol, 1e-6)).T)
        ob = np.lexsort(np.round(xb[:, ::-1] / max(tol, 1e-6)).T)
        if not _rows_differ(xa[oa], xb[ob], 2 * tol).any():
            return "permuted (the same tokens in another order)"
    n = len(a)
    for k in (1, -1, 2, -2, 3, -3, 4, -4):
        s, e = max(lo, lo + k, 0), min(hi, hi + k, n - 1)
        if e - s < 1:
            continue
        # B's token t is A's token t - k
        ok = ~_rows_differ(a[s - k:e - k + 1], b[s:e + 1], tol)
        if ok.mean() >= 0.9:
            return (f"shifted by {abs(k)} position{'s' if abs(k) > 1 else ''} "
                    f"(A's token t{-k:+d} is B's token t)")
    return ""




def sketch_table(ix: TraceIndex) -> np.ndarray:
    """The trace's ``/sketches`` rows sorted by tensor row (cached on the index). Sketches of wide
    tokens written under an earlier definition (``sketch_version`` below the current one, see
    :data:`vlmscope.trace.sketch.SKETCH_VERSION`) are left out: they read other values than
    today's, so they compare with nothing."""
    sk = ix.__dict__.get("_sketch_table")
    if sk is None:
        sk = ix.trace.sketch_table()
        if len(sk) and not (np.diff(sk["tensor"]) >= 0).all():
            sk = sk[np.argsort(sk["tensor"], kind="stable")]
        if len(sk) and ix.trace.meta.get("sketch_version", 1) < SKETCH_VERSION:
            sk = sk[_numel_of(ix, sk["tensor"]) // np.maximum(sk["rows"], 1) <= MAX_SKETCH_COLS]
        ix.__dict__["_sketch_table"] = sk
    return sk


def _numel_of(ix: TraceIndex, rows: np.ndarray) -> np.ndarray:
    """``numel`` of the (sorted, checked) tensor rows ``rows``: from the table when it is loaded,
    else read block by block (an older trace's /tensors is not loaded whole for this)."""
    if "tensors" in ix.__dict__:
        return ix.col("tensors", "numel")[rows]
    out = np.empty(len(rows), np.int64)
    block = 1 << 18
    for lo in range(0, ix.n_rows("tensors"), block):
        i, j = np.searchsorted(rows, [lo, lo + block])
        if i < j:
            hi = min(ix.n_rows("tensors"), lo + block)
            out[i:j] = ix.trace.read_rows("tensors", lo, hi)["numel"][rows[i:j] - lo]
    return out


#: values compared per block (both traces): bounds the index arrays a block needs
_BLOCK_VALUES = 1 << 22


def sketch_drift(A: TraceIndex, B: TraceIndex, ra: np.ndarray, rb: np.ndarray, rtol: float | None = None) -> np.ndarray:
    """Bool per aligned tensor pair (rows ``ra`` of A, ``rb`` of B): both are sketched, with the
    same number of tokens, and some token differs beyond the dtype's sketch tolerance (or
    ``rtol``, a user's tolerance, where that is larger: sketch values are relative to the largest
    token norm). Pairs that share both sketches with an earlier pair are compared once."""
    out = np.zeros(len(ra), bool)
    ska, skb = sketch_table(A), sketch_table(B)
    if not len(ska) or not len(skb) or not len(ra):
        return out
    ia = sketch_lookup(A, ska, ra)
    ib = sketch_lookup(B, skb, rb)
    ok = (ia >= 0) & (ib >= 0)
    sel = np.nonzero(ok)[0]
    if not len(sel):
        return out
    ia, ib = ia[sel], ib[sel]
    # equal fingerprints (digest, scale, tokens, width): equal sketches, no value read (the
    # common case; one gather per side from a contiguous array)
    todo = np.nonzero(_fingerprints(A, ska)[ia] != _fingerprints(B, skb)[ib])[0]
    if not len(todo):
        return out
    sel, xa, xb = sel[todo], ska[ia[todo]], skb[ib[todo]]
    keep = (xa["rows"] == xb["rows"]) & (xa["width"] == xb["width"])
    sel, xa, xb = sel[keep], xa[keep], xb[keep]
    if not len(sel):
        return out
    # one comparison per distinct (A sketch, B sketch)
    key = (xa["off"].astype(np.int64) << 32) ^ xb["off"].astype(np.int64)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    ua, ub = xa[first], xb[first]
    tol = _tol_lut(A)[ua["dtype"]]
    if rtol is not None:
        tol = np.maximum(tol, rtol)
    need = int((ua["rows"] * ua["width"]).sum())
    va, vb = _values(A, ua, need), _values(B, ub, need)
    differs = np.zeros(len(first), bool)
    n = (ua["rows"] * ua["width"]).astype(np.int64)
    cum = np.cumsum(n)
    lo = 0
    while lo < len(first):
        hi = int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + _BLOCK_VALUES, side="right"))
        hi = max(hi, lo + 1)
        differs[lo:hi] = _block(va, vb, ua[lo:hi], ub[lo:hi], tol[lo:hi])
        lo = hi
    out[sel] = differs[inv.ravel()]
    return out


def _values(ix: TraceIndex, rows: np.ndarray, need: int):
    """The trace's sketch values: the whole ``/sketch_data`` when many are needed, else a
    read-on-demand view over just the rows' blocks."""
    if need > (1 << 20) or len(rows) > 256 or ix.trace.is_loaded("sketch_data"):
        return ix.trace.all_sketch_values()
    offs = rows["off"].astype(np.int64)
    n = (rows["rows"] * rows["width"]).astype(np.int64)
    return _Sparse({int(o): ix.trace.sketch_values(int(o), int(k)) for o, k in zip(offs, n)})


class _Sparse:
    """Sketch blocks read one by one, indexed like the whole array (for a few pairs)."""

    def __init__(self, blocks: dict[int, np.ndarray]):
        self.blocks = blocks

    def take(self, offs: np.ndarray, n: np.ndarray) -> np.ndarray:
        return np.concatenate([self.blocks[int(o)][:int(k)] for o, k in zip(offs, n)]) if len(offs) else \
            np.zeros(0, np.float16)


def _gather(v, offs: np.ndarray, n: np.ndarray, within: np.ndarray) -> np.ndarray:
    if isinstance(v, _Sparse):
        return v.take(offs, n)
    return v[np.repeat(offs, n) + within]


def _fingerprints(ix: TraceIndex, sk: np.ndarray) -> np.ndarray:
    """One uint64 per sketch row from its digest, scale (bits; every NaN alike), tokens and width
    (cached): equal fingerprints, equal sketches."""
    fp = ix.__dict__.get("_sketch_fp")
    if fp is None:
        # digest ^ (scale bits * G) ^ (rows << 24) ^ width, built in place (one array of the
        # table's length, not one per term)
        scale = sk["scale"].astype(np.float32)
        scale[np.isnan(scale)] = np.float32(np.nan)
        fp = scale.view(np.uint32).astype(np.uint64)
        with np.errstate(over="ignore"):
            fp *= np.uint64(0x9E3779B97F4A7C15)
        fp ^= sk["digest"].astype(np.uint64, copy=False)
        rows = sk["rows"].astype(np.uint64)
        rows <<= np.uint64(24)
        fp ^= rows
        fp ^= sk["width"].astype(np.uint64)
        ix.__dict__["_sketch_fp"] = fp
    return fp


def sketch_lookup(ix: TraceIndex, sk: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The sketch row of each tensor row (-1: none), through a dense table (cached)."""
    lut = ix.__dict__.get("_sketch_lut")
    if lut is None:
        # lut[r + 1]: the sketch of tensor row r; -1 at both ends, for rows -1 (none) and past
        # the table (a clipped take lands there)
        n = ix.n_rows("tensors")
        lut = np.full(n + 2, -1, np.int64)
        t = sk["tensor"].astype(np.int64)
        if len(t) and t.min() >= 0 and t.max() < n:      # checked by the reader; kept safe here
            t += 1
            lut[t] = np.arange(len(t))
        else:
            ok = (t >= 0) & (t < n)
            lut[t[ok] + 1] = np.nonzero(ok)[0]
        ix.__dict__["_sketch_lut"] = lut
    r = np.asarray(rows, np.int64) + 1
    return np.take(lut, r, mode="clip")


def _tol_lut(ix: TraceIndex) -> np.ndarray:
    strings = ix.strings
    lut = np.full(max(len(strings), 1), _DEFAULT_SKETCH_TOL)
    for u in np.nonzero(ix.is_float_dtype_id)[0]:
        lut[u] = sketch_tol(str(strings[u]))
    return lut


def _block(va: np.ndarray, vb: np.ndarray, xa: np.ndarray, xb: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """Whether each sketch pair of a block differs (vectorised over its values)."""
    n = (xa["rows"] * xa["width"]).astype(np.int64)
    total = int(n.sum())
    if not total:
        return np.zeros(len(xa), bool)
    start = np.cumsum(n) - n
    within = np.arange(total) - np.repeat(start, n)
    a = _gather(va, xa["off"].astype(np.int64), n, within).astype(np.float32)
    b = _gather(vb, xb["off"].astype(np.int64), n, within).astype(np.float32)
    # column 0 is norm / scale: bring both onto one scale
    col0 = (within % np.repeat(xa["width"].astype(np.int64), n)) == 0
    sa, sb = xa["scale"].astype(np.float64), xb["scale"].astype(np.float64)
    s = np.fmax(sa, sb)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    fa, fb = np.repeat(sa / s, n), np.repeat(sb / s, n)
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.where(col0, a * fa, a)
        b = np.where(col0, b * fb, b)
        d = np.abs(a - b)
        bad = ~((d <= np.repeat(tol, n)) | (a == b) | (np.isnan(a) & np.isnan(b)))
    which = np.repeat(np.arange(len(xa)), n)
    return np.bincount(which[bad], minlength=len(xa)) > 0
