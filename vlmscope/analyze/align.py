"""Align two traces node by node: module calls, their tensors, reshapes and probes.

Used by ``vlmscope diff`` and by the viewer's diff mode. Everything is vectorised: keys
are packed into int64 and matched with sorting / ``searchsorted``.

The two big tables (tensors, reshapes) are streamed, not loaded: one pass over both traces,
block by block (its second half done by a forked worker, see ``_stream_table``), finds the
leading rows that pair up row for row (two traces of one structure: nearly all of them),
gives those their status on the spot and keeps a few compact columns. The rows after that
prefix are matched by key on the compact columns, and their pairs compared block by block.

- **Events** (module calls) are aligned by ``(step, module path, nth call)``.
- **Tensors** by ``(aligned call, input|output, argument name)``.
- **Reshapes** by ``(aligned call, op, occurrence of the op in the call)``.
- **Probes** by ``(aligned call, kind, argument name, occurrence)``.

Module paths of trace A can be rewritten with ``--map`` rules ``a_regex=b_replacement``
(applied in order with ``re.sub``) so that two implementations line up, e.g.
``transformer\\.h\\.(\\d+)\\.attn=model.language_model.layers.\\1.self_attn``. A rule written
``arg:a_regex=b_replacement`` rewrites argument names instead.

API::

    al = align(trace_a, trace_b, maps=["transformer\\.h=model.layers"])
    al.events.a, al.events.b, al.events.status   # aligned rows (-1 = absent), in execution order
    al.event_status_a[row_in_a], al.event_status_b[row_in_b]   # per-row status, for viewers
    al.tensors, al.reshapes, al.probes            # the same for the other tables

Status codes: :data:`SAME`, :data:`SHAPE` (shape or dtype differs), :data:`DRIFT` (values
drift beyond tolerance; for probes: the semantic values differ), :data:`MISSING_A` (only in
B), :data:`MISSING_B` (only in A).
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from vlmscope.trace import ENC_NONE, ROLE_OUTPUT, Trace, open_trace

from ._index import (
    STREAM_BYTES, TraceIndex, block_reader, compact_columns, dataset_reader, fork_allowed,
    index_of, paired_blocks, stream_pair,
)

SAME, SHAPE, DRIFT, MISSING_A, MISSING_B = 0, 1, 2, 3, 4
STATUS_NAMES = {SAME: "same", SHAPE: "shape", DRIFT: "drift", MISSING_A: "missing_in_a", MISSING_B: "missing_in_b"}
#: Severity rank of each status (missing > shape > drift > same), for "worst of" reductions.
STATUS_RANK = np.array([0, 2, 1, 3, 3], np.int8)

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
_STATS = ("min", "max", "mean", "std", "absmax")
#: Rows per block of the passes over whole tables: a block of each trace stays in cache.
_BLOCK_ROWS = 1 << 15


# ============================================================================ --map rules


@dataclass
class MapRules:
    """Regex rewrite rules applied (in order, with ``re.sub``) to trace A's names."""

    modules: list[tuple[re.Pattern, str]] = field(default_factory=list)
    args: list[tuple[re.Pattern, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.modules or self.args)

    def map_module(self, path: str) -> str:
        for pat, repl in self.modules:
            path = pat.sub(repl, path)
        return path

    def map_arg(self, name: str) -> str:
        for pat, repl in self.args:
            name = pat.sub(repl, name)
        return name


def _split_rule(spec: str) -> tuple[str, str]:
    if " => " in spec:
        a, b = spec.split(" => ", 1)
        return a.strip(), b.strip()
    depth, esc, klass = 0, False, False
    for i, ch in enumerate(spec):
        if esc:
            esc = False
            continue
        if ch == "\\":
            esc = True
        elif klass:
            klass = ch != "]"
        elif ch == "[":
            klass = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == "=" and depth == 0:
            return spec[:i], spec[i + 1:]
    raise ValueError(f"bad --map rule {spec!r}: expected 'a_regex=b_replacement'")


def parse_maps(specs: Iterable[str] | str | MapRules | None) -> MapRules:
    """Build :class:`MapRules` from rule strings and/or rule files.

    A spec is ``a_regex=b_replacement`` (or ``a_regex => b_replacement``), optionally
    prefixed by ``arg:`` to rewrite argument names; ``@FILE`` or the path of an existing
    file reads one rule per line (``#`` starts a comment). Raises ``ValueError`` on a bad rule.
    """
    if isinstance(specs, MapRules):
        return specs
    rules = MapRules()
    if specs is None:
        return rules
    if isinstance(specs, str):
        specs = [specs]
    for spec in specs:
        spec = str(spec)
        path = spec[1:] if spec.startswith("@") else spec
        if spec.startswith("@") or ("=" not in spec and os.path.isfile(path)) or \
                (os.path.isfile(path) and not re.search(r"[\\(\[]", spec)):
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise ValueError(f"cannot read map file {path}: {e.strerror}") from None
            sub = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            inner = parse_maps(sub)
            rules.modules += inner.modules
            rules.args += inner.args
            continue
        target = rules.modules
        if spec.startswith("arg:"):
            spec, target = spec[4:], rules.args
        a, b = _split_rule(spec)
        try:
            pat = re.compile(a)
            pat.sub(b, "")   # validates group references in the replacement
        except re.error as e:
            raise ValueError(f"bad --map rule {spec!r}: {e}") from None
        target.append((pat, b))
    return rules


# ============================================================================ result types


class Aligned:
    """One table aligned across two traces.

    ``a``/``b`` are global rows in each trace's table (-1 where the node is absent) and
    ``status`` the status code of each aligned node. Rows come as: aligned pairs (in A's
    order), then A-only rows, then B-only rows. ``step`` and ``time`` (an ordering key in A's
    timeline; B-only nodes sit just after their nearest aligned predecessor) are computed on
    first use; :meth:`order` / :meth:`ordered` give the merged execution order.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, status: np.ndarray, step_fn=None, time_fn=None):
        self.a, self.b, self.status = a, b, status
        self._step_fn, self._time_fn = step_fn, time_fn
        self._step = self._time = self._order = None

    def __len__(self) -> int:
        return len(self.a)

    def step_of(self, idx: np.ndarray) -> np.ndarray:
        return self._step_fn(idx) if self._step_fn is not None else np.zeros(len(idx), np.int64)

    def time_of(self, idx: np.ndarray) -> np.ndarray:
        return self._time_fn(idx) if self._time_fn is not None else np.zeros(len(idx), np.int64)

    @property
    def step(self) -> np.ndarray:
        if self._step is None:
            self._step = self.step_of(np.arange(len(self.a)))
        return self._step

    @property
    def time(self) -> np.ndarray:
        if self._time is None:
            self._time = self.time_of(np.arange(len(self.a)))
        return self._time

    def divergent(self) -> np.ndarray:
        return np.nonzero(self.status != SAME)[0]

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.status.astype(np.int64), minlength=5)
        return {STATUS_NAMES[i]: int(c[i]) for i in range(5)}

    def order(self) -> np.ndarray:
        """Indices of the rows in merged execution order."""
        if self._order is None:
            self._order = np.lexsort((self.b, self.a, self.time))
        return self._order

    def ordered(self) -> "Aligned":
        o = self.order()
        st, tm = self.step[o], self.time[o]
        return Aligned(self.a[o], self.b[o], self.status[o], lambda i: st[i], lambda i: tm[i])


@dataclass
class Alignment:
    """The result of :func:`align`."""

    trace_a: Trace
    trace_b: Trace
    ix_a: TraceIndex
    ix_b: TraceIndex
    maps: MapRules
    events: Aligned
    tensors: Aligned
    reshapes: Aligned
    probes: Aligned
    event_status_a: np.ndarray   # per A event row: status (MISSING_B when unaligned)
    event_status_b: np.ndarray   # per B event row
    payload_metrics: dict = field(default_factory=dict)   # tensors index -> (max abs, max rel, cosine)
    rtol_opt: float | None = None
    atol_opt: float | None = None
    module_key_a: np.ndarray = None       # mapped path per A module row

    def tensor_metrics(self, i: int) -> dict:
        """Drift metrics of aligned tensor ``i`` (see :func:`tensor_metrics`)."""
        return tensor_metrics(self, i)

    def status_of(self, side: str, event_row: int) -> int:
        arr = self.event_status_a if side == "a" else self.event_status_b
        return int(arr[event_row])

    def partner(self, side: str, event_row: int) -> int:
        """The aligned event row in the other trace (-1 when none)."""
        m = self.__dict__.get("_partner")
        if m is None:
            ev = self.events
            pa = np.full(len(self.event_status_a), -1, np.int64)
            pb = np.full(len(self.event_status_b), -1, np.int64)
            both = (ev.a >= 0) & (ev.b >= 0)
            pa[ev.a[both]] = ev.b[both]
            pb[ev.b[both]] = ev.a[both]
            m = self.__dict__["_partner"] = (pa, pb)
        return int((m[0] if side == "a" else m[1])[event_row])


# ============================================================================ helpers


def _translate_strings(ix_a: TraceIndex, ix_b: TraceIndex) -> np.ndarray:
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


def _pack(cols: list[np.ndarray]) -> np.ndarray:
    """Pack non-negative integer columns into one int64 key (mixed radix); re-densifies on overflow."""
    n = len(cols[0])
    key = np.zeros(n, np.int64)
    radix_total = 1
    for c in cols:
        c = np.asarray(c, np.int64)
        r = int(c.max()) + 1 if n else 1
        if radix_total * r >= (1 << 62):
            _, key = np.unique(key, return_inverse=True)
            key = key.astype(np.int64).ravel()
            radix_total = int(key.max()) + 1 if n else 1
        key = key * r + c
        radix_total *= r
    return key


def _occurrence(key: np.ndarray) -> np.ndarray:
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


def _match_sorted(ka: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _match(ka: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs (ia, ib) of equal keys and the length ``p`` of the common prefix where they are
    equal row for row (the usual case: both traces have the same structure). Only the rest
    is matched by sorting."""
    n = min(len(ka), len(kb))
    eq = ka[:n] == kb[:n]
    p = n if eq.all() else int(np.argmin(eq))
    if p == len(ka) and p == len(kb):
        r = np.arange(p, dtype=np.int64)
        return r, r, p
    ia, ib = _match_sorted(ka[p:], kb[p:])
    pre = np.arange(p, dtype=np.int64)
    return np.concatenate([pre, ia + p]), np.concatenate([pre, ib + p]), p


def _match_cols(cols_a: list[np.ndarray], cols_b: list[np.ndarray], valid_a: np.ndarray | None = None,
                valid_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Like :func:`_match` on keys made of several non-negative integer columns, without
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
    keys = _pack([np.concatenate([x[p:], y[p:]]) for x, y in zip(cols_a, cols_b)])
    ka, kb = keys[:na - p], keys[na - p:]
    if valid_a is not None:
        ka = np.where(valid_a[p:], ka, -1 - np.arange(na - p))
    if valid_b is not None:
        kb = np.where(valid_b[p:], kb, -(na + 1) - np.arange(nb - p))
    ia, ib = _match_sorted(ka, kb)
    return np.concatenate([pre, ia + p]), np.concatenate([pre, ib + p]), p


def _take(col: np.ndarray, idx: np.ndarray, p: int) -> np.ndarray:
    """``col[idx]`` where ``idx[:p]`` is known to be ``arange(p)``."""
    if p == len(idx):
        return col[:p]
    if p == 0:
        return col[idx]
    return np.concatenate([col[:p], col[idx[p:]]])


def _time_key(step: np.ndarray, t: np.ndarray, sub: int | np.ndarray = 32) -> np.ndarray:
    """Ordering key in one trace's timeline: ``step``, then ``seq``, then a sub-order: outputs of
    calls returning at that seq first (deepest first: 31 - depth), then what starts there (32),
    then a call's inputs (33). Nodes projected from B sit just after their anchor (+1)."""
    return (np.asarray(step, np.int64) << 40) | (np.asarray(t, np.int64) << 6) | np.asarray(sub, np.int64)


def _tensor_time_key(ix: TraceIndex, rows: np.ndarray) -> np.ndarray:
    if not len(rows):
        return np.zeros(0, np.int64)
    e = ix.col("tensors", "event")[rows]
    out = ix.col("tensors", "role")[rows] == ROLE_OUTPUT
    t = np.where(out, ix.col("events", "end_seq")[e], ix.col("events", "seq")[e])
    sub = np.where(out, 31 - np.minimum(ix.col("events", "depth")[e].astype(np.int64), 31), 33)
    return _time_key(ix.col("tensors", "step")[rows], t, sub)


class _Projector:
    """Maps B timeline keys into A's timeline through aligned anchor points."""

    def __init__(self, key_b_fn, key_a_fn):
        # built on first use: most diffs have no node only in B, and never need it
        self._keys = (key_b_fn, key_a_fn)
        self.kb = self.ka = None

    def _build(self) -> None:
        key_b, key_a = self._keys[0](), self._keys[1]()
        o = np.argsort(key_b, kind="stable")
        self.kb = key_b[o]
        # keep monotone A keys (cumulative max) so projections keep B's order
        self.ka = np.maximum.accumulate(key_a[o]) if len(o) else key_a[o]

    def __call__(self, kb: np.ndarray) -> np.ndarray:
        if not len(kb):
            return np.zeros(0, np.int64)
        if self.kb is None:
            self._build()
        if not len(self.kb):
            return kb
        i = np.searchsorted(self.kb, kb, side="right") - 1
        base = np.where(i >= 0, self.ka[np.maximum(i, 0)], (kb >> 40) << 40)
        return base + 1   # just after the anchor


def _assemble(ia, ib, st_pair, n_a, n_b, step_a, step_b, time_a_fn, time_b_fn, proj) -> Aligned:
    """Aligned pairs, then A-only rows, then B-only rows (step and time computed lazily)."""
    if len(ia) == n_a and len(ib) == n_b:      # every row is paired (pairs are one to one)
        a, b, status = ia, ib, np.asarray(st_pair, np.int8)
    else:
        ma = np.ones(n_a, bool)
        ma[ia] = False
        mb = np.ones(n_b, bool)
        mb[ib] = False
        only_a = np.nonzero(ma)[0]
        only_b = np.nonzero(mb)[0]
        a = np.concatenate([ia, only_a, np.full(len(only_b), -1, np.int64)])
        b = np.concatenate([ib, np.full(len(only_a), -1, np.int64), only_b])
        status = np.concatenate([np.asarray(st_pair, np.int8), np.full(len(only_a), MISSING_B, np.int8),
                                 np.full(len(only_b), MISSING_A, np.int8)])

    def by_side(fa, fb):
        """A per-node value: ``fa`` of the A row where there is one, else ``fb`` of the B row."""
        def fn(idx):
            idx = np.asarray(idx, np.int64)
            ra, rb = a[idx], b[idx]
            out = np.zeros(len(idx), np.int64)
            h = ra >= 0
            if h.any():
                out[h] = fa(ra[h])
            if (~h).any():
                out[~h] = fb(rb[~h])
            return out
        return fn

    return Aligned(a, b, status, by_side(lambda r: step_a[r], lambda r: step_b[r]),
                   by_side(time_a_fn, lambda r: proj(time_b_fn(r))))


# ============================================================================ align


def align(trace_a: Trace | str | os.PathLike, trace_b: Trace | str | os.PathLike,
          maps: Iterable[str] | str | MapRules | None = None, *, rtol: float | None = None,
          atol: float | None = None, payloads: bool = True) -> Alignment:
    """Align two traces (see the module docstring). Paths are opened (and stay open on the result)."""
    ta = trace_a if isinstance(trace_a, Trace) else open_trace(trace_a)
    tb = trace_b if isinstance(trace_b, Trace) else open_trace(trace_b)
    rules = parse_maps(maps)
    A, B = index_of(ta), index_of(tb)
    tr = _translate_strings(A, B)

    # ---- module keys (paths of A rewritten by the rules) ------------------------------------
    pa = A.module_paths
    mapped = np.array([rules.map_module(str(p)) for p in pa], dtype=object) if rules.modules else pa
    pb = B.module_paths
    vocab: dict[str, int] = {}
    mk_a = np.fromiter((vocab.setdefault(str(p), len(vocab)) for p in mapped), np.int64, count=len(mapped))
    mk_b = np.fromiter((vocab.setdefault(str(p), len(vocab)) for p in pb), np.int64, count=len(pb))

    # ---- events ------------------------------------------------------------------------------
    na, nb = len(A.events), len(B.events)
    step_ea, step_eb = A.col("events", "step"), B.col("events", "step")
    mod_a = mk_a[A.col("events", "module")] if na else np.zeros(0, np.int64)
    mod_b = mk_b[B.col("events", "module")] if nb else np.zeros(0, np.int64)
    if rules.modules and len(set(mapped.tolist())) < len(mapped):
        nth_a = _occurrence(_pack([step_ea, mod_a]))   # maps merged modules: recount the calls
    else:
        nth_a = A.col("events", "nth")
    ia, ib, p_e = _match_cols([step_ea, mod_a, nth_a], [step_eb, mod_b, B.col("events", "nth")])
    pair_of_a = np.full(na, -1, np.int64)
    pair_of_b = np.full(nb, -1, np.int64)
    pair_of_a[ia] = np.arange(len(ia))
    pair_of_b[ib] = np.arange(len(ib))

    def ev_time(ix):
        return lambda rows: _time_key(ix.col("events", "step")[rows], ix.col("events", "seq")[rows])

    def end_sub(ix, rows):
        return 31 - np.minimum(ix.col("events", "depth")[rows].astype(np.int64), 31)

    def anchors(ix, rows, step):
        return lambda: np.concatenate([_time_key(step[rows], ix.col("events", "seq")[rows]),
                                       _time_key(step[rows], ix.col("events", "end_seq")[rows], end_sub(ix, rows))])

    proj = _Projector(anchors(B, ib, step_eb), anchors(A, ia, step_ea))

    # ---- tensors -----------------------------------------------------------------------------
    nta, ntb = A.n_rows("tensors"), B.n_rows("tensors")
    name_lut = tr
    if rules.args:
        nbs = len(B.strings)
        b_ids = {s: i for i, s in enumerate(B.strings)}
        name_lut = tr.copy()
        for u, name in enumerate(A.strings):
            mapped = rules.map_arg(str(name))
            if mapped != name:
                name_lut[u] = b_ids.get(mapped, nbs + u)
    n_pairs = len(ia)
    r_lut, a_lut = _tolerance_luts(A, rtol, atol)
    p0, pre_status, pre_more = _stream_table(
        A, B, "tensors", p_e, [("role", None), ("name", name_lut)],
        lambda xa, xb: _tensor_block_status(xa, xb, tr, r_lut, a_lut))
    # the rows after the prefix are matched on their compact columns (never read whole)
    t_pair_a, t_pair_b = pair_of_a[A.col("tensors", "event")[p0:]], pair_of_b[B.col("tensors", "event")[p0:]]
    ra, rb, p_t = _match_cols([t_pair_a, A.col("tensors", "role")[p0:] == ROLE_OUTPUT,
                               name_lut[A.col("tensors", "name")[p0:]]],
                              [t_pair_b, B.col("tensors", "role")[p0:] == ROLE_OUTPUT, B.col("tensors", "name")[p0:]],
                              t_pair_a >= 0, t_pair_b >= 0)
    ra, rb = _with_prefix(p0, ra, rb)
    t_status, metrics = _tensor_status(A, B, tr, ra, rb, p0, pre_status, pre_more, r_lut, a_lut,
                                       payloads)
    tensors = _assemble(ra, rb, t_status, nta, ntb, A.col("tensors", "step") if nta else np.zeros(0, np.int64),
                        B.col("tensors", "step") if ntb else np.zeros(0, np.int64),
                        lambda r: _tensor_time_key(A, r), lambda r: _tensor_time_key(B, r), proj)
    # ---- events: status from their tensors ---------------------------------------------------
    ev_rank_a = _event_rank(A, tensors.a, tensors.status)
    ev_rank_b = _event_rank(B, tensors.b, tensors.status)
    rank_to_status = np.array([SAME, DRIFT, SHAPE], np.int8)
    pair_rank = np.maximum(ev_rank_a[ia], ev_rank_b[ib]) if len(ia) else np.zeros(0, np.int8)
    e_status = rank_to_status[np.minimum(pair_rank, 2)]
    events = _assemble(ia, ib, e_status, na, nb, step_ea, step_eb, ev_time(A), ev_time(B), proj)
    status_a = np.full(na, MISSING_B, np.int8)
    status_b = np.full(nb, MISSING_A, np.int8)
    status_a[ia] = e_status
    status_b[ib] = e_status

    reshapes = _align_reshapes(A, B, tr, pair_of_a, pair_of_b, n_pairs, proj, p_e)
    probes = _align_probes(A, B, tr, pair_of_a, pair_of_b, n_pairs, proj, p_e)
    return Alignment(ta, tb, A, B, rules, events, tensors, reshapes, probes, status_a, status_b,
                     payload_metrics=metrics["payload"], rtol_opt=rtol, atol_opt=atol, module_key_a=mapped)


def _event_rank(ix: TraceIndex, rows: np.ndarray, status: np.ndarray) -> np.ndarray:
    """Worst status rank of each call's tensors (tensor rows of a call are contiguous)."""
    ne, nt = len(ix.events), ix.n_rows("tensors")
    out = np.zeros(ne, np.int8)
    if not ne or not nt:
        return out
    rank = STATUS_RANK[status]
    rank = np.where(status >= MISSING_A, STATUS_RANK[SHAPE], rank).astype(np.int8)
    if len(rows) >= nt and (rows[:nt] == np.arange(nt)).all():
        per_row = rank[:nt]                    # aligned row i is table row i (the usual case)
    else:
        per_row = np.zeros(nt, np.int8)
        h = rows >= 0
        per_row[rows[h]] = rank[h]
    # a call's rows are contiguous (a parent's come after its children's: they are flushed
    # when it returns), so each run of one event id in row order is one call's rows
    ev = ix.col("tensors", "event")
    starts = np.flatnonzero(np.concatenate([[True], ev[1:] != ev[:-1]]))
    ok = (ev[starts] >= 0) & (ev[starts] < ne)
    out[ev[starts][ok]] = np.maximum.reduceat(per_row, starts)[ok]
    return out


def _rows_equal(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
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


def _same_string_ids(tr: np.ndarray) -> np.ndarray:
    """Per string id of A: does B use the same id for the same string?"""
    return tr == np.arange(len(tr))


def _block(table: np.ndarray, first: str, names: tuple[str, ...]) -> np.ndarray:
    """``(n, k)`` view of ``k`` consecutive same-typed fields of a structured array (one pass
    over memory instead of k strided ones); a stacked copy when they are not consecutive."""
    f = table.dtype.fields
    off0, dt0 = f[first][1], f[first][0]
    if all(f[nm][0] == dt0 and f[nm][1] == off0 + i * dt0.itemsize for i, nm in enumerate(names)):
        base = table[first]
        return np.lib.stride_tricks.as_strided(base, shape=(len(table), len(names)),
                                               strides=(table.dtype.itemsize, dt0.itemsize), writeable=False)
    return np.stack([table[nm] for nm in names], axis=1)




def _tolerance_luts(ix: TraceIndex, rtol: float | None, atol: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(rtol, atol) per string id of ``ix`` naming a floating dtype (0 for any other id: exact)."""
    strings = ix.strings
    r_lut, a_lut = np.zeros(max(len(strings), 1)), np.zeros(max(len(strings), 1))
    for u in np.nonzero(ix.is_float_dtype_id)[0]:
        tol = DEFAULT_TOLERANCES.get(str(strings[u]).removeprefix("torch."))
        if tol is not None:
            r_lut[u] = tol[0] if rtol is None else rtol
            a_lut[u] = tol[1] if atol is None else atol
    return r_lut, a_lut


def _any1(x: np.ndarray) -> np.ndarray:
    """``x.any(axis=1)`` for a 2-D bool array with a few columns: numpy reduces a short axis
    slowly, so 8 contiguous columns are read as one uint64 and others are OR-ed column by column."""
    if x.shape[1] == 8 and x.flags.c_contiguous:
        return x.view(np.uint64).ravel() != 0
    out = x[:, 0].copy()
    for j in range(1, x.shape[1]):
        out |= x[:, j]
    return out


def _drift(sa: np.ndarray, sb: np.ndarray, na: np.ndarray, nb: np.ndarray, r: np.ndarray,
           at: np.ndarray) -> np.ndarray:
    """The drift test on stats ``(k, 5)`` (min max mean std absmax) and NaN/Inf counts ``(k, 2)``.

    Counts must match exactly; values may differ by ``at + r * magnitude``; non-finite stats are
    equal only when identical (two NaNs, the same infinity)."""
    drift = _any1(na != nb)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mag = np.fmax(np.abs(sa[:, 4]), np.abs(sb[:, 4]))
        mag[~np.isfinite(mag)] = 0.0
        tol = at + r * mag
        d = np.abs(sa - sb)
        bad = ~(d <= tol[:, None])          # also True where d is NaN (a NaN, or inf - inf)
        out = drift | _any1(bad)
        nf = np.nonzero(out & _any1(np.isnan(d)))[0]
        if len(nf):
            x, y = sa[nf], sb[nf]
            same_v = (x == y) | (np.isnan(x) & np.isnan(y))
            out[nf] = drift[nf] | _any1(bad[nf] & ~same_v)
    return out


def _tensor_block_status(xa: np.ndarray, xb: np.ndarray, tr: np.ndarray, r_lut: np.ndarray,
                         a_lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Status of paired tensor rows (paired by name and role, so only shape, dtype and stats
    are compared; stats that are bit for bit equal skip the drift test), and the rows that
    need more (both sides saved a payload)."""
    shape_ne = (xa["ndim"] != xb["ndim"]) | (tr[xa["dtype"]] != xb["dtype"]) | _any1(xa["shape"] != xb["shape"])
    sa, sb = _block(xa, "min", _STATS), _block(xb, "min", _STATS)
    na, nb = _block(xa, "nan", ("nan", "inf")), _block(xb, "nan", ("nan", "inf"))
    stats_ne = _any1(sa.view(np.int64) != sb.view(np.int64)) | _any1(na != nb)   # bit for bit
    st = np.where(shape_ne, SHAPE, SAME).astype(np.int8)
    k = np.nonzero(stats_ne & ~shape_ne)[0]
    if len(k):
        dt = xa["dtype"][k]
        st[k[_drift(sa[k], sb[k], na[k], nb[k], r_lut[dt], a_lut[dt])]] = DRIFT
    return st, np.nonzero((xa["payload"] >= 0) & (xb["payload"] >= 0))[0]


def _tensor_status(A: TraceIndex, B: TraceIndex, tr: np.ndarray, ra: np.ndarray, rb: np.ndarray, p0: int,
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
    for j0 in range(0, len(idx), _BLOCK_ROWS):     # in blocks: the gathered rows stay in cache
        sel = idx[j0:j0 + _BLOCK_ROWS]
        xa, xb = A.fetch("tensors", ra[sel]), B.fetch("tensors", rb[sel])
        st, both = _tensor_block_status(xa, xb, tr, r_lut, a_lut)
        if payloads:
            pa_, pb_, dt_a = xa["payload"], xb["payload"], xa["dtype"]
            for j in both[st[both] != SHAPE]:
                res = _payload_metrics(A, B, int(pa_[j]), int(pb_[j]), float(r_lut[dt_a[j]]), float(a_lut[dt_a[j]]))
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
    r_lut, a_lut = _tolerance_luts(al.ix_a, al.rtol_opt if rtol is None else rtol,
                                   al.atol_opt if atol is None else atol)
    r, at = r_lut[xa["dtype"]], a_lut[xa["dtype"]]
    sa, sb = _block(xa, "min", _STATS)[0], _block(xb, "min", _STATS)[0]
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


def _payload_metrics(A: TraceIndex, B: TraceIndex, pa: int, pb: int, rtol: float, atol: float):
    """(max abs, max rel, cosine, allclose) of two saved tensors, or None when unreadable."""
    try:
        xa = np.asarray(A.trace.payload(pa), np.float64)
        xb = np.asarray(B.trace.payload(pb), np.float64)
    except Exception:  # noqa: BLE001 - a damaged payload falls back to the stats
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


def _pair_col(ix: TraceIndex, table: str, pair_of: np.ndarray, n_pairs: int, side: int, p: int = 0) -> np.ndarray:
    """Aligned-call id of each row (from row ``p`` on); rows outside any module pair by step;
    rows of unaligned calls get -1."""
    ev = ix.col(table, "event")[p:].astype(np.int64)
    step = ix.col(table, "step")[p:].astype(np.int64)
    inside = ev >= 0
    p = np.where(inside, pair_of[np.maximum(ev, 0)] if len(pair_of) else -1, n_pairs + step)
    return p


def _block_prefix(xa: np.ndarray, xb: np.ndarray, p_e: int, keys: list[tuple[str, np.ndarray | None]]) -> int:
    """How many leading rows of two blocks (same start row) pair up row for row: the same event
    row inside the events' row-for-row prefix (its first ``p_e`` rows, where event row i of A
    is aligned with event row i of B), or both outside any module in the same step; and equal
    key fields (``(field, lut)``: A's values go through ``lut``, a string-id translation)."""
    n = min(len(xa), len(xb))
    xa, xb = xa[:n], xb[:n]
    ea, eb = xa["event"], xb["event"]
    eq = (ea == eb) & (ea < p_e)
    outside = ea < 0
    if outside.any():
        eq &= ~outside | (xa["step"] == xb["step"])
    for name, lut in keys:
        x = xa[name]
        eq &= (lut[x] if lut is not None else x) == xb[name]
    return n if eq.all() else int(np.argmin(eq))


def _child_prefix(A: TraceIndex, B: TraceIndex, table: str, p_e: int,
                  keys: list[tuple[str, np.ndarray | None]]) -> int:
    """Length of the leading run of rows of ``table`` that pair up row for row (see
    :func:`_block_prefix`). Two traces of one structure agree on almost every row, so only the
    rows after this prefix need keys, sorting and matching."""
    n = min(A.n_rows(table), B.n_rows(table))
    for s, xa, xb in stream_pair(A, B, table, n):
        q = _block_prefix(xa, xb, p_e, keys)
        if q < len(xa):
            return s + q
    return n


@dataclass
class _Stream:
    """What a streaming pass over one table matches on and where it writes (see
    :func:`_stream_table`): compact columns of both traces, the status of the row-for-row
    prefix, and the prefix rows that need more."""

    p_e: int                      # events' row-for-row prefix
    keys: list                    # (field, string-id lut or None) that must agree row for row
    block_status: object          # (rows_a, rows_b) -> (status, rows needing more)
    ca: dict                      # compact columns of A (field -> array)
    cb: dict
    status: np.ndarray
    more: list = field(default_factory=list)

    def run(self, blocks) -> int | None:
        """Consume ``blocks`` (``(start, rows_a, rows_b)``): copy the compact columns, and while
        the rows pair up row for row, their status. Returns the first row that does not pair up
        (in the blocks' numbering), or None."""
        p0 = None
        for s, xa, xb in blocks:
            e = s + len(xa)
            for f in self.ca:
                self.ca[f][s:e] = xa[f]
                self.cb[f][s:e] = xb[f]
            if p0 is not None:
                continue
            q = _block_prefix(xa, xb, self.p_e, self.keys)
            for b0 in range(0, q, _BLOCK_ROWS):         # in cache-sized pieces
                b1 = min(q, b0 + _BLOCK_ROWS)
                st, m = self.block_status(xa[b0:b1], xb[b0:b1])
                self.status[s + b0:s + b1] = st
                self.more.append(m + s + b0)
            if q < e - s:
                p0 = s + q
        return p0


def _stream_table(A: TraceIndex, B: TraceIndex, table: str, p_e: int, keys, block_status):
    """One pass over both traces' ``table`` (tensors or reshapes), block by block: keeps each
    trace's compact columns (:data:`COMPACT_FIELDS`), finds the row-for-row prefix and, for
    its rows, the status with ``block_status(xa, xb) -> (status, rows needing more)``.

    Returns (prefix length, status of the prefix rows, prefix rows needing more). The tables
    are never held whole: what stays is about a tenth of their size.

    Big tables are cut in two: a forked worker (:class:`_HalfWorker`) does the second half of
    the rows of both traces while this process does the first, so that the pass uses both of
    a small machine's cores. Otherwise trace B is read by a forked reader (``stream_pair``)."""
    na, nb = A.n_rows(table), B.n_rows(table)
    n = min(na, nb)
    out = _Stream(p_e, keys, block_status, compact_columns(A, table, na), compact_columns(B, table, nb),
                  np.zeros(n, np.int8), [np.zeros(0, np.int64)])
    rows = max(A.trace.stream_rows(table, STREAM_BYTES), B.trace.stream_rows(table, STREAM_BYTES))
    worker = _HalfWorker.start(A, B, table, n, rows, out) if n >= 8 * rows else None
    if worker is None:
        p0 = out.run(stream_pair(A, B, table, n))
    else:
        p0 = out.run(_trace_blocks(A, B, table, 0, worker.lo, rows))
        p1 = worker.join(out)
        if p0 is None:
            p0 = p1
    p0 = n if p0 is None else p0
    for ix, c, m in ((A, out.ca, na), (B, out.cb, nb)):
        if m > n:
            rest = ix.rows(table, slice(n, m))
            for f in c:
                c[f][n:] = rest[f]
        ix.set_compact(table, c)
    more_rows = np.concatenate(out.more)
    return p0, out.status[:p0], more_rows[more_rows < p0]


def _trace_blocks(A: TraceIndex, B: TraceIndex, table: str, lo: int, hi: int, rows: int):
    """Blocks of rows ``[lo, hi)`` of both traces, read in this process."""
    cap = min(rows, hi - lo)
    return paired_blocks(block_reader(A.trace, table, cap), block_reader(B.trace, table, cap), lo, hi, rows)


class _HalfWorker:
    """A forked process that streams rows ``[lo, n)`` of both traces' table (see
    :func:`_stream_table`) and leaves its results (compact columns, statuses, rows needing
    more, its first unpaired row) in shared memory. Started only where :func:`fork_allowed`
    says so; if the worker fails, :meth:`join` does its half here."""

    def __init__(self, A: TraceIndex, B: TraceIndex, table: str, lo: int, n: int, rows: int, out: _Stream):
        self.A, self.B, self.table, self.lo, self.n, self.rows = A, B, table, lo, n, rows
        m = n - lo
        self.shm = []

        def shared(dtype, count):
            buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
            self.shm.append(buf)
            return np.frombuffer(buf, dtype=dtype, count=count)

        # the worker's _Stream: the same matching, its outputs in shared memory (rows from lo)
        self.out = _Stream(out.p_e, out.keys, out.block_status, {f: shared(c.dtype, m) for f, c in out.ca.items()},
                           {f: shared(c.dtype, m) for f, c in out.cb.items()}, shared(np.int8, m),
                           [np.zeros(0, np.int64)])
        self.more = shared(np.int64, m)
        self.head = shared(np.int64, 2)          # [number of rows in ``more``, first unpaired row or -1]
        self.pid = -1

    @classmethod
    def start(cls, A: TraceIndex, B: TraceIndex, table: str, n: int, rows: int, out: _Stream) -> "_HalfWorker | None":
        if not fork_allowed() or A.trace.is_loaded(table) or B.trace.is_loaded(table):
            return None
        lo = (n // 2 // rows) * rows
        try:
            self = cls(A, B, table, lo, n, rows, out)
            self.pid = os.fork()
        except OSError:
            return None
        if self.pid == 0:
            self._child()
        return self

    def _child(self) -> None:  # pragma: no cover - runs in the forked process
        code = 1
        try:
            import h5py

            cap = min(self.rows, self.n - self.lo)
            with h5py.File(self.A.trace.path, "r") as fa, h5py.File(self.B.trace.path, "r") as fb:
                q = self.out.run(paired_blocks(dataset_reader(fa[self.table], cap), dataset_reader(fb[self.table], cap),
                                               self.lo, self.n, self.rows, base=self.lo))
                mr = np.concatenate(self.out.more)
                self.more[:len(mr)] = mr
                self.head[0] = len(mr)
                self.head[1] = -1 if q is None else q
            code = 0
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)

    def join(self, out: _Stream) -> int | None:
        """Wait for the worker and take its results into ``out``; returns the first unpaired
        row of its half (absolute), or None."""
        ok = False
        try:
            _, st = os.waitpid(self.pid, 0)
            ok = os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
        except OSError:
            ok = False
        lo, n = self.lo, self.n
        if not ok:                                   # do the half here
            return out.run(_trace_blocks(self.A, self.B, self.table, lo, n, self.rows))
        for f in out.ca:
            out.ca[f][lo:n] = self.out.ca[f]
            out.cb[f][lo:n] = self.out.cb[f]
        out.status[lo:n] = self.out.status
        out.more.append(self.more[:int(self.head[0])] + lo)
        q = int(self.head[1])
        return None if q < 0 else q + lo


def _with_prefix(p: int, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of a tail matched from row ``p`` on, after the ``p`` row-for-row pairs."""
    pre = np.arange(p, dtype=np.int64)
    if not len(ia) and not len(ib):
        return pre, pre
    return np.concatenate([pre, ia + p]), np.concatenate([pre, ib + p])


def _sequence_match(A: TraceIndex, B: TraceIndex, tr: np.ndarray, pa: np.ndarray, pb: np.ndarray,
                    irr_a: np.ndarray, irr_b: np.ndarray, off: int) -> tuple[np.ndarray, np.ndarray]:
    """Align the reshapes of calls whose op sequences differ, call by call, with difflib:
    first on (op, call site), then the leftovers of each changed block by op, in order.
    ``pa``/``irr_a`` (and B's) describe the table rows from ``off`` on; rows returned are global."""
    import difflib

    ra_rows, rb_rows = np.nonzero(irr_a)[0], np.nonzero(irr_b)[0]
    out_a: list[int] = []
    out_b: list[int] = []
    if not len(ra_rows) or not len(rb_rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ga = {}
    for r, k in zip((ra_rows + off).tolist(), pa[ra_rows].tolist()):
        ga.setdefault(k, []).append(r)
    gb = {}
    for r, k in zip((rb_rows + off).tolist(), pb[rb_rows].tolist()):
        gb.setdefault(k, []).append(r)
    seq_a, op_a, file_a, line_a = (A.col("reshapes", f) for f in ("seq", "op", "site_file", "site_line"))
    seq_b, op_b, file_b, line_b = (B.col("reshapes", f) for f in ("seq", "op", "site_file", "site_line"))
    for k, rows_a in ga.items():
        rows_b = gb.get(k)
        if not rows_b:
            continue
        rows_a = sorted(rows_a, key=lambda r: int(seq_a[r]))
        rows_b = sorted(rows_b, key=lambda r: int(seq_b[r]))
        sa = [(int(tr[op_a[r]]), A.s(int(file_a[r])), int(line_a[r])) for r in rows_a]
        sb = [(int(op_b[r]), B.s(int(file_b[r])), int(line_b[r])) for r in rows_b]
        sm = difflib.SequenceMatcher(a=sa, b=sb, autojunk=False)
        for tag, i1, i2, j1, j2 in sm.get_opcodes():
            if tag == "equal":
                out_a += rows_a[i1:i2]
                out_b += rows_b[j1:j2]
            elif tag == "replace":   # same op, in order, pairs up (e.g. a moved call site)
                left = list(range(j1, j2))
                for i in range(i1, i2):
                    for jj, j in enumerate(left):
                        if sa[i][0] == sb[j][0]:
                            out_a.append(rows_a[i])
                            out_b.append(rows_b[j])
                            left = left[jj + 1:]
                            break
    return np.asarray(out_a, np.int64), np.asarray(out_b, np.int64)


def _reshape_status(x: np.ndarray, y: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Status of paired reshape rows: shape (inputs, outputs, dtypes, status), drift (only the
    non-tensor arguments differ) or same."""
    diff = (tr[x["in_shapes"]] != y["in_shapes"]) | (x["out_ndim"] != y["out_ndim"]) | \
        _any1(x["out_shape"] != y["out_shape"]) | (tr[x["in_dtypes"]] != y["in_dtypes"]) | \
        (tr[x["out_dtype"]] != y["out_dtype"]) | (x["n_in"] != y["n_in"]) | (x["n_out"] != y["n_out"]) | \
        (x["status"] != y["status"])
    args_diff = tr[x["args"]] != y["args"]
    return np.where(diff, SHAPE, np.where(args_diff, DRIFT, SAME)).astype(np.int8)


def _reshape_block_status(xa: np.ndarray, xb: np.ndarray, tr: np.ndarray, ok_id: np.ndarray,
                          all_ok: bool) -> tuple[np.ndarray, np.ndarray]:
    """Status of row-for-row paired reshape rows: bit-identical rows (with the same string ids)
    are the same, the others are compared field by field."""
    eq = _rows_equal(xa, xb)
    if not all_ok:
        e = np.nonzero(eq)[0]
        eq[e] = ok_id[xa["in_shapes"][e]] & ok_id[xa["args"][e]] & ok_id[xa["in_dtypes"][e]] & \
            ok_id[xa["out_dtype"][e]]
    st = np.zeros(len(xa), np.int8)
    t = np.nonzero(~eq)[0]
    if len(t):
        st[t] = _reshape_status(xa[t], xb[t], tr)
    return st, np.zeros(0, np.int64)


def _align_reshapes(A: TraceIndex, B: TraceIndex, tr: np.ndarray, pair_of_a, pair_of_b, n_pairs, proj,
                    p_e: int = 0) -> Aligned:
    na, nb = A.n_rows("reshapes"), B.n_rows("reshapes")
    if not na and not nb:
        z = np.zeros(0, np.int64)
        return Aligned(z, z, np.zeros(0, np.int8))
    ok_id = _same_string_ids(tr)
    all_ok = bool(ok_id.all())
    # one streamed pass: the row-for-row prefix (same call, op, occurrence and call site) and
    # its status; then only the rows after it are read whole and matched
    p0, pre_status, _ = _stream_table(
        A, B, "reshapes", p_e, [("op", tr), ("nth", None), ("site_file", tr), ("site_line", None)],
        lambda xa, xb: _reshape_block_status(xa, xb, tr, ok_id, all_ok))
    pa = _pair_col(A, "reshapes", pair_of_a, n_pairs, 0, p0)
    pb = _pair_col(B, "reshapes", pair_of_b, n_pairs, 1, p0)
    ta_, tb_ = na - p0, nb - p0
    keys = _pack([np.concatenate([np.maximum(pa, 0), np.maximum(pb, 0)]),
                  np.concatenate([tr[A.col("reshapes", "op")[p0:]], B.col("reshapes", "op")[p0:]]),
                  np.concatenate([A.col("reshapes", "nth")[p0:], B.col("reshapes", "nth")[p0:]])])
    # calls whose op sequences differ in length (an op inserted or removed) are aligned with a
    # sequence matcher instead, so one extra op does not shift every later occurrence (the
    # prefix holds as many rows of a call on both sides, so counting the tail is enough)
    n_p = int(max(pa.max(initial=-1), pb.max(initial=-1))) + 1
    ca = np.bincount(pa[pa >= 0], minlength=n_p)
    cb = np.bincount(pb[pb >= 0], minlength=n_p)
    irregular = np.nonzero(ca != cb)[0]
    irr_a = np.isin(pa, irregular) if len(irregular) else np.zeros(ta_, bool)
    irr_b = np.isin(pb, irregular) if len(irregular) else np.zeros(tb_, bool)
    ka = np.where((pa >= 0) & ~irr_a, keys[:ta_], -1 - np.arange(ta_))
    kb = np.where((pb >= 0) & ~irr_b, keys[ta_:], -(ta_ + 1) - np.arange(tb_))
    ia, ib, _ = _match(ka, kb)
    ia, ib = _with_prefix(p0, ia, ib)
    if len(irregular):
        xa_, xb_ = _sequence_match(A, B, tr, pa, pb, irr_a, irr_b, p0)
        if len(xa_):
            ia, ib = np.concatenate([ia, xa_]), np.concatenate([ib, xb_])
            o = np.argsort(ia, kind="stable")
            ia, ib = ia[o], ib[o]
    st = np.zeros(len(ia), np.int8)
    st[:p0] = pre_status
    for j0 in range(p0, len(ia), _BLOCK_ROWS):      # in blocks: the gathered rows stay in cache
        j1 = min(len(ia), j0 + _BLOCK_ROWS)
        st[j0:j1] = _reshape_status(A.fetch("reshapes", ia[j0:j1]), B.fetch("reshapes", ib[j0:j1]), tr)
    return _assemble(ia, ib, st, na, nb, A.col("reshapes", "step") if na else np.zeros(0, np.int64),
                     B.col("reshapes", "step") if nb else np.zeros(0, np.int64),
                     lambda r: _time_key(A.col("reshapes", "step")[r], A.col("reshapes", "seq")[r]),
                     lambda r: _time_key(B.col("reshapes", "step")[r], B.col("reshapes", "seq")[r]), proj)


def _blobs_differ(A: TraceIndex, B: TraceIndex, ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
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
    key = _pack([oa[rest], ob[rest], la[rest]])
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


def _align_probes(A: TraceIndex, B: TraceIndex, tr: np.ndarray, pair_of_a, pair_of_b, n_pairs, proj,
                  p_e: int = 0) -> Aligned:
    na, nb = len(A.probes), len(B.probes)
    if not na and not nb:
        z = np.zeros(0, np.int64)
        return Aligned(z, z, np.zeros(0, np.int8))
    PA, PB = A.probes, B.probes
    p0 = _child_prefix(A, B, "probes", p_e, [("kind", tr), ("name", tr)])
    pa = _pair_col(A, "probes", pair_of_a, n_pairs, 0, p0)
    pb = _pair_col(B, "probes", pair_of_b, n_pairs, 1, p0)
    ta_, tb_ = na - p0, nb - p0
    # occurrences counted from the prefix on: the prefix holds the same keys on both sides
    base = _pack([np.concatenate([np.maximum(pa, 0), np.maximum(pb, 0)]),
                  np.concatenate([tr[PA["kind"][p0:]], PB["kind"][p0:]]),
                  np.concatenate([tr[PA["name"][p0:]], PB["name"][p0:]])])
    occ = np.concatenate([_occurrence(base[:ta_]), _occurrence(base[ta_:])])
    keys = _pack([base, occ])
    ka = np.where(pa >= 0, keys[:ta_], -1 - np.arange(ta_))
    kb = np.where(pb >= 0, keys[ta_:], -(ta_ + 1) - np.arange(tb_))
    ia, ib, p = _match(ka, kb)
    ia, ib = _with_prefix(p0, ia, ib)
    p += p0

    def ca(f):
        return _take(A.col("probes", f), ia, p)

    def cb(f):
        return _take(B.col("probes", f), ib, p)

    shape_diff = (ca("ndim") != cb("ndim")) | (ca("shape") != cb("shape")).any(axis=1) | \
        (tr[ca("dtype")] != cb("dtype"))
    enc_a, enc_b = ca("enc"), cb("enc")
    has_data = (enc_a != ENC_NONE) | (enc_b != ENC_NONE)
    val_diff = np.zeros(len(ia), bool)
    hd = np.nonzero(has_data)[0]
    if len(hd):
        val_diff[hd] = _blobs_differ(A, B, ia[hd], ib[hd]) | (enc_a[hd] != enc_b[hd])
    nd = np.nonzero(~has_data)[0]
    val_diff[nd] = tr[ca("info")[nd]] != cb("info")[nd]
    st = np.where(shape_diff, SHAPE, np.where(val_diff, DRIFT, SAME)).astype(np.int8)
    return _assemble(ia, ib, st, na, nb, A.col("probes", "step") if na else np.zeros(0, np.int64),
                     B.col("probes", "step") if nb else np.zeros(0, np.int64),
                     lambda r: _time_key(A.col("probes", "step")[r], A.col("probes", "seq")[r]),
                     lambda r: _time_key(B.col("probes", "step")[r], B.col("probes", "seq")[r]), proj)
