"""Matching rows of two traces by key: the primitives of :func:`vlmscope.analyze.align.align`.

Keys are non-negative integer columns packed into int64 (:func:`pack`) and matched with sorting
and ``searchsorted``. Two traces of one structure agree row for row on nearly all of a table,
so the matchers first find that common prefix and sort only the rows after it. String ids of
trace A are translated into B's (:func:`translate_strings`) before any comparison.
"""

from __future__ import annotations

import numpy as np

from ._index import TraceIndex


def translate_strings(ix_a: TraceIndex, ix_b: TraceIndex) -> np.ndarray:
    """For every string id of A, the id of the same string in B, or ``len(B) + id`` when B
    lacks it (so keys built from it never match, yet stay non-negative)."""
    sa, sb = ix_a.strings, ix_b.strings
    na, nb = len(sa), len(sb)
    out = np.arange(na, dtype=np.int64)
    # traces of one model intern their strings in much the same order: the ids agree where
    # the two tables do, and only the other strings need a look-up
    m = min(na, nb)
    differ = np.nonzero(sa[:m] != sb[:m])[0] if m else np.zeros(0, np.int64)
    rest = np.concatenate([differ, np.arange(m, na)])
    if len(rest):
        # a string of A past the first difference cannot sit in B before it (it would equal
        # A's own string there, and interned strings are unique)
        first = int(rest[0])
        b_ids = {s: i + first for i, s in enumerate(sb[first:])}
        out[rest] = np.fromiter((b_ids.get(s, nb + int(i)) for i, s in zip(rest, sa[rest])), np.int64,
                                count=len(rest))
    return out


def pack(cols: list[np.ndarray]) -> np.ndarray:
    """Pack non-negative integer columns into one int64 key (mixed radix); re-densifies on overflow."""
    n = len(cols[0])
    key = np.zeros(n, np.int64)
    radix_total = 1
    for c in cols:
        c = np.asarray(c)
        r = int(c.max()) + 1 if n else 1
        if radix_total * r >= (1 << 62):
            _, key = np.unique(key, return_inverse=True)
            key = key.astype(np.int64).ravel()
            radix_total = int(key.max()) + 1 if n else 1
        key *= r                 # in place: no new array of n keys per column
        key += c
        radix_total *= r
    return key


def occurrence(key: np.ndarray) -> np.ndarray:
    """0, 1, 2... for repeated keys, in array order."""
    if not len(key):
        return np.zeros(0, np.int64)
    o = np.argsort(key, kind="stable")
    k = key[o]
    start = np.r_[True, k[1:] != k[:-1]]
    grp_start = np.maximum.accumulate(np.where(start, np.arange(len(k)), 0))
    occ = np.empty(len(k), np.int64)
    occ[o] = np.arange(len(k)) - grp_start
    return occ


def match_sorted(ka: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (ia, ib) of equal keys (repeated keys pair up in order of occurrence)."""
    if not len(ka) or not len(kb):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sa = np.argsort(ka, kind="stable")
    sb = np.argsort(kb, kind="stable")
    kas, kbs = ka[sa], kb[sb]
    if (kas[1:] == kas[:-1]).any() or (kbs[1:] == kbs[:-1]).any():
        # make keys unique: (key, occurrence) ranks, then match on the rank pairs
        def occ_sorted(k):
            start = np.r_[True, k[1:] != k[:-1]]
            return np.arange(len(k)) - np.maximum.accumulate(np.where(start, np.arange(len(k)), 0))
        oa, ob = occ_sorted(kas), occ_sorted(kbs)
        allk = np.concatenate([kas, kbs])
        _, dense = np.unique(allk, return_inverse=True)
        dense = dense.ravel().astype(np.int64)
        m = int(max(oa.max(initial=0), ob.max(initial=0))) + 1
        kas = dense[:len(kas)] * m + oa
        kbs = dense[len(kas):] * m + ob
    pos = np.searchsorted(kas, kbs)
    pos_c = np.minimum(pos, len(kas) - 1)
    hit = kas[pos_c] == kbs
    ia = sa[pos_c[hit]]
    ib = sb[np.nonzero(hit)[0]]
    o = np.argsort(ia)
    return ia[o].astype(np.int64), ib[o].astype(np.int64)


def match_keys(ka: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs (ia, ib) of equal keys and the length ``p`` of the common prefix where they are
    equal row for row (the usual case: both traces have the same structure). Only the rest
    is matched by sorting."""
    n = min(len(ka), len(kb))
    eq = ka[:n] == kb[:n]
    p = n if eq.all() else int(np.argmin(eq))
    if p == len(ka) and p == len(kb):
        r = np.arange(p, dtype=np.int64)
        return r, r, p
    ia, ib = match_sorted(ka[p:], kb[p:])
    pre = np.arange(p, dtype=np.int64)
    return np.concatenate([pre, ia + p]), np.concatenate([pre, ib + p]), p


def match_in_groups(ga: np.ndarray, ka: np.ndarray, gb: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`match_sorted` for rows in groups (``g``: a group id, -1 for a row that matches
    nothing) whose every group has as many rows on both sides, in the same order mostly (the
    reshapes of an aligned module call): the rows, taken group by group in row order, pair up by
    position where their keys agree; only the others are matched by sorting. Falls back to
    :func:`match_sorted` when the groups' sizes differ. The same pairs as :func:`match_sorted`
    when keys are unique within a group, as the reshapes' (call, op, occurrence) keys are; a
    damaged trace with repeated keys may see its repeats paired in another order."""
    ra, rb = np.flatnonzero(ga >= 0), np.flatnonzero(gb >= 0)
    if len(ra) != len(rb):
        return match_sorted(np.where(ga >= 0, ka, -1 - np.arange(len(ka))),
                            np.where(gb >= 0, kb, -(len(ka) + 1) - np.arange(len(kb))))
    oa = ra[np.argsort(ga[ra], kind="stable")]
    ob = rb[np.argsort(gb[rb], kind="stable")]
    if not np.array_equal(ga[oa], gb[ob]):
        return match_sorted(np.where(ga >= 0, ka, -1 - np.arange(len(ka))),
                            np.where(gb >= 0, kb, -(len(ka) + 1) - np.arange(len(kb))))
    eq = ka[oa] == kb[ob]
    ia, ib = oa[eq], ob[eq]
    if not eq.all():
        xa, xb = oa[~eq], ob[~eq]
        ja, jb = match_sorted(ka[xa], kb[xb])
        ia, ib = np.concatenate([ia, xa[ja]]), np.concatenate([ib, xb[jb]])
    o = np.argsort(ia, kind="stable")
    return ia[o].astype(np.int64), ib[o].astype(np.int64)


def match_cols(cols_a: list[np.ndarray], cols_b: list[np.ndarray], valid_a: np.ndarray | None = None,
               valid_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Like :func:`match_keys` on keys made of several non-negative integer columns, without
    building keys for the common prefix where the columns agree row for row. Rows whose
    ``valid`` flag is False never match."""
    na, nb = len(cols_a[0]), len(cols_b[0])
    n = min(na, nb)
    eq = np.ones(n, bool)
    for x, y in zip(cols_a, cols_b):
        eq &= x[:n] == y[:n]
    if valid_a is not None:
        eq &= valid_a[:n]
    if valid_b is not None:
        eq &= valid_b[:n]
    p = n if eq.all() else int(np.argmin(eq))
    pre = np.arange(p, dtype=np.int64)
    if p == na and p == nb:
        return pre, pre, p
    keys = pack([np.concatenate([x[p:], y[p:]]) for x, y in zip(cols_a, cols_b)])
    ka, kb = keys[:na - p], keys[na - p:]
    if valid_a is not None:
        ka = np.where(valid_a[p:], ka, -1 - np.arange(na - p))
    if valid_b is not None:
        kb = np.where(valid_b[p:], kb, -(na + 1) - np.arange(nb - p))
    ia, ib = match_sorted(ka, kb)
    return np.concatenate([pre, ia + p]), np.concatenate([pre, ib + p]), p


def take(col: np.ndarray, idx: np.ndarray, p: int) -> np.ndarray:
    """``col[idx]`` where ``idx[:p]`` is known to be ``arange(p)``."""
    if p == len(idx):
        return col[:p]
    if p == 0:
        return col[idx]
    return np.concatenate([col[:p], col[idx[p:]]])


def with_prefix(p: int, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of a tail matched from row ``p`` on, after the ``p`` row-for-row pairs."""
    pre = np.arange(p, dtype=np.int64)
    if not len(ia) and not len(ib):
        return pre, pre
    return np.concatenate([pre, ia + p]), np.concatenate([pre, ib + p])


def pair_col(ix: TraceIndex, table: str, pair_of: np.ndarray, n_pairs: int, side: int, p: int = 0) -> np.ndarray:
    """Aligned-call id of each row (from row ``p`` on); rows outside any module pair by step;
    rows of unaligned calls get -1."""
    ev = ix.col(table, "event")[p:]
    out = np.empty(len(ev), np.int64)
    outside = ev < 0
    if len(pair_of):
        np.take(pair_of, ev, out=out, mode="clip")   # (event ids index pair_of: no int64 copy of them)
    else:
        out.fill(-1)
    if outside.any():
        out[outside] = n_pairs + ix.col(table, "step")[p:][outside].astype(np.int64)
    return out


def sequence_match(A: TraceIndex, B: TraceIndex, tr: np.ndarray, pa: np.ndarray, pb: np.ndarray,
                   irr_a: np.ndarray, irr_b: np.ndarray, off: int) -> tuple[np.ndarray, np.ndarray]:
    """Align the reshapes of calls whose op sequences differ, call by call, with difflib:
    first on (op, call site), then the leftovers of each changed block by op, in order.
    ``pa``/``irr_a`` (and B's) describe the table rows from ``off`` on; rows returned are global.

    The calls are grouped and ordered with numpy, each row becomes one integer code for its
    (op, call site) (A's string ids translated into B's), and the pairs difflib finds for a pair
    of code sequences are computed once and reused: a fault repeated every step gives every
    step's call the same pair of sequences."""
    ra = np.nonzero(irr_a)[0]
    rb = np.nonzero(irr_b)[0]
    if not len(ra) or not len(rb):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ra, rb = ra + off, rb + off
    ka, kb = pa[ra - off], pb[rb - off]
    oa = np.lexsort((A.col("reshapes", "seq")[ra], ka))
    ob = np.lexsort((B.col("reshapes", "seq")[rb], kb))
    ra, ka, rb, kb = ra[oa], ka[oa], rb[ob], kb[ob]
    op_a = tr[A.col("reshapes", "op")[ra]]
    op_b = B.col("reshapes", "op")[rb].astype(np.int64)
    fa_, fb_ = A.col("reshapes", "site_file")[ra], B.col("reshapes", "site_file")[rb]
    cols = [np.concatenate([op_a, op_b]).astype(np.int64),
            np.concatenate([np.where(fa_ >= 0, tr[np.maximum(fa_, 0)], fa_), fb_]).astype(np.int64),
            np.concatenate([A.col("reshapes", "site_line")[ra], B.col("reshapes", "site_line")[rb]]).astype(np.int64)]
    site = pack([c - c.min() for c in cols])       # one int64 key per (op, call site), exact
    _, code = np.unique(site, return_inverse=True)
    code = code.reshape(-1)
    ca, cb = code[:len(ra)].tolist(), code[len(ra):].tolist()
    opa, opb = op_a.tolist(), op_b.tolist()
    ua, sa_ = np.unique(ka, return_index=True)
    ub, sb_ = np.unique(kb, return_index=True)
    ea, eb = np.append(sa_[1:], len(ka)), np.append(sb_[1:], len(kb))
    common, ia_, ib_ = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    for a0, a1, b0, b1 in zip(sa_[ia_].tolist(), ea[ia_].tolist(), sb_[ib_].tolist(), eb[ib_].tolist()):
        key = (tuple(ca[a0:a1]), tuple(cb[b0:b1]))
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = _pairs(key[0], key[1], opa[a0:a1], opb[b0:b1])
        out_a.append(ra[a0 + hit[0]])
        out_b.append(rb[b0 + hit[1]])
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_a).astype(np.int64), np.concatenate(out_b).astype(np.int64)


def _pairs(sa: tuple, sb: tuple, op_a: list, op_b: list) -> tuple[np.ndarray, np.ndarray]:
    """Local index pairs of two calls' (op, call site) code sequences: difflib's equal blocks,
    then, within each replaced block, the same ops in order (e.g. a moved call site)."""
    import difflib

    li: list[int] = []
    lj: list[int] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=sa, b=sb, autojunk=False).get_opcodes():
        if tag == "equal":
            li += range(i1, i2)
            lj += range(j1, j2)
        elif tag == "replace":
            left = list(range(j1, j2))
            for i in range(i1, i2):
                for jj, j in enumerate(left):
                    if op_a[i] == op_b[j]:
                        li.append(i)
                        lj.append(j)
                        left = left[jj + 1:]
                        break
    return np.asarray(li, np.int64), np.asarray(lj, np.int64)
