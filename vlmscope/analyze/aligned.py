"""The results of :func:`vlmscope.analyze.align.align`: one :class:`Aligned` per table and the
:class:`Alignment` holding them, and how a table's matched pairs become an :class:`Aligned`
(:func:`assemble`), placed on A's timeline (nodes only in B are projected through the aligned
calls, :class:`Projector`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmscope.trace import ROLE_OUTPUT, Trace

from ._index import TraceIndex
from .compare import tensor_metrics
from .maps import MapRules
from .status import MISSING_A, MISSING_B, SAME, STATUS_NAMES


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
    """The result of :func:`vlmscope.analyze.align.align`."""

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
    module_key_a: np.ndarray | None = None   # A's module paths as the --map rules rewrote them

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


def time_key(step: np.ndarray, t: np.ndarray, sub: int | np.ndarray = 32) -> np.ndarray:
    """Ordering key in one trace's timeline: ``step``, then ``seq``, then a sub-order: outputs of
    calls returning at that seq first (deepest first: 31 - depth), then what starts there (32),
    then a call's inputs (33). Nodes projected from B sit just after their anchor (+1)."""
    return (np.asarray(step, np.int64) << 40) | (np.asarray(t, np.int64) << 6) | np.asarray(sub, np.int64)


def tensor_time_key(ix: TraceIndex, rows: np.ndarray) -> np.ndarray:
    if not len(rows):
        return np.zeros(0, np.int64)
    e = ix.col("tensors", "event")[rows]
    out = ix.col("tensors", "role")[rows] == ROLE_OUTPUT
    t = np.where(out, ix.col("events", "end_seq")[e], ix.col("events", "seq")[e])
    sub = np.where(out, 31 - np.minimum(ix.col("events", "depth")[e].astype(np.int64), 31), 33)
    return time_key(ix.col("tensors", "step")[rows], t, sub)


class Projector:
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


def assemble(ia, ib, st_pair, n_a, n_b, step_a, step_b, time_a_fn, time_b_fn, proj) -> Aligned:
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
