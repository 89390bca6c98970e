"""One step of a trace indexed in memory: children lists, subtree flags and output shapes.

A :class:`StepIndex` is built once per step (it reads the step's rows: a worker call); from
then on every navigation question about the step is answered from numpy arrays, fast enough
for the UI thread.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterable

import numpy as np

from vlmscope.analyze import rows as batchrows
from vlmscope.trace import ROLE_OUTPUT
from vlmscope.tui.items import Item, Violation

if TYPE_CHECKING:
    from vlmscope.tui.data import TraceModel

#: Read a step's whole tensor block when it has at most this many rows (else per call).
TENSOR_BLOCK_ROWS = 400_000


def _csr(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group row indexes by ``keys`` in 0..n-1 (order kept): returns (order, offsets)."""
    order = np.argsort(keys, kind="stable")
    offsets = np.searchsorted(keys[order], np.arange(n + 1))
    return order, offsets


class StepIndex:
    """One step's rows, with children lists and subtree flags, all in memory."""

    def __init__(self, tm: "TraceModel", step: int):
        t = tm.trace
        st = tm.steps[step]
        self.step = step
        self.step_row = st
        self.ev_start = int(st["event_start"])
        self._events(tm, t.events(step))
        self.reshapes = t.reshapes(step)
        self.probes = t.probes(step)
        try:        # B: the step's batch rows (from the probes' shapes)
            self.batch = batchrows.batch_size(t, self.probes)
        except Exception:  # noqa: BLE001 - the user's damaged file: one row shown, the step still reads
            self.batch = 1
        self.r_event = self._local_events(self.reshapes["event"])
        self.p_event = self._local_events(self.probes["event"])
        self.r_seq = self.reshapes["seq"].astype(np.int64)
        self.p_seq = self.probes["seq"].astype(np.int64)

        # children, grouped by parent (+1 so that -1, "no module", is slot 0)
        n = self.n
        self._ev_kids = _csr(self.parent + 1, n + 1)
        self._rs_kids = _csr(self.r_event + 1, n + 1)
        self._pr_kids = _csr(self.p_event + 1, n + 1)

        # subtree flags: does an event's call contain a reshape / a probe?
        self.has_reshape = self._contains(np.sort(self.r_seq))
        self.has_probe = self._contains(np.sort(self.p_seq))
        self.failing_events = np.zeros(n, dtype=bool)
        self.failing_sub = np.zeros(n, dtype=bool)
        self.failing_rs = np.zeros(len(self.reshapes), dtype=bool)
        self.failing_pr = np.zeros(len(self.probes), dtype=bool)
        # diff mode: divergent items (and calls holding one), set by the alignment of the step
        self.div_events = np.zeros(n, dtype=bool)
        self.div_sub = np.zeros(n, dtype=bool)
        self.div_rs = np.zeros(len(self.reshapes), dtype=bool)
        self.div_pr = np.zeros(len(self.probes), dtype=bool)
        self._outputs(t, int(st["tensor_start"]), int(st["tensor_count"]))
        self._lock = threading.Lock()

    def _events(self, tm: "TraceModel", ev: np.ndarray) -> None:
        """The module calls: columns, parents (local rows) and the root(s)."""
        self.events = ev
        n = self.n = len(ev)
        self.seq = ev["seq"].astype(np.int64)
        self.end_seq = ev["end_seq"].astype(np.int64)
        self.module = ev["module"].astype(np.int64)
        self.depth = ev["depth"].astype(np.int64)
        self.nth = ev["nth"].astype(np.int64)
        parent = ev["parent"].astype(np.int64)
        self.parent = np.where(parent >= 0, parent - self.ev_start, -1)
        self.parent[(self.parent < -1) | (self.parent >= n)] = -1
        self.status = ev["status"]
        roots = np.nonzero(self.parent < 0)[0]
        # One root call: the step node stands for it. Several (e.g. generate() running the
        # vision tower before the first forward): they are the step node's children, and the
        # top module's call (depth-0 module) names the step's output.
        self.root = int(roots[0]) if len(roots) == 1 else -1
        self.roots = roots
        top = [int(r) for r in roots if 0 <= self.module[r] < len(tm.modules_depth)
               and tm.modules_depth[self.module[r]] == 0]
        self.main_root = self.root if self.root >= 0 else (top[-1] if top else -1)

    def _outputs(self, t, start: int, count: int) -> None:
        """The tensor block (whole when small enough, else read per call on demand) and the first
        output's shape and dtype of every call."""
        n = self.n
        self.t_start = start
        self.tensors = t.tensors(self.step) if count <= TENSOR_BLOCK_ROWS else None
        self.out_ndim = np.full(n, -1, dtype=np.int64)
        self.out_shape = np.full((n, 8), -1, dtype=np.int64)
        self.out_dtype = np.zeros(n, dtype=np.int64)
        if self.tensors is None or not len(self.tensors):
            return
        tr = self.tensors
        outs = np.nonzero(tr["role"] == ROLE_OUTPUT)[0]
        ev_local = tr["event"][outs].astype(np.int64) - self.ev_start
        ok = (ev_local >= 0) & (ev_local < n)
        outs, ev_local = outs[ok], ev_local[ok]
        uniq, first = np.unique(ev_local, return_index=True)
        rows = outs[first]
        self.out_ndim[uniq] = tr["ndim"][rows]
        self.out_shape[uniq] = tr["shape"][rows]
        self.out_dtype[uniq] = tr["dtype"][rows]

    def _local_events(self, ev: np.ndarray) -> np.ndarray:
        loc = ev.astype(np.int64) - self.ev_start
        loc[(ev < 0) | (loc < 0) | (loc >= self.n)] = -1
        return loc

    def _contains(self, sorted_seqs: np.ndarray) -> np.ndarray:
        lo = np.searchsorted(sorted_seqs, self.seq, side="right")
        hi = np.searchsorted(sorted_seqs, self.end_seq, side="left")
        return hi > lo

    def set_failing(self, violations: Iterable[Violation]) -> None:
        """Mark the items the violations are placed on (and the calls that hold them)."""
        fe = np.zeros(self.n, dtype=bool)
        self.failing_rs[:] = False
        self.failing_pr[:] = False
        for v in violations:
            if v.item is None or v.item[0] != self.step:
                continue
            _, kind, i = v.item
            if kind == "s" and self.main_root >= 0:
                fe[self.main_root] = True
            elif kind == "e" and 0 <= i < self.n:
                fe[i] = True
            elif kind in ("r", "p"):
                flags, owner = (self.failing_rs, self.r_event) if kind == "r" else (self.failing_pr, self.p_event)
                if 0 <= i < len(flags):
                    flags[i] = True
                    if owner[i] >= 0:
                        fe[owner[i]] = True
        self.failing_events = fe
        seqs = np.sort(self.seq[fe])
        lo = np.searchsorted(seqs, self.seq, side="left")
        hi = np.searchsorted(seqs, self.end_seq, side="left")
        self.failing_sub = hi > lo

    def set_divergent(self, events: np.ndarray, reshapes: np.ndarray, probes: np.ndarray,
                      holders: np.ndarray) -> None:
        """Diff mode: mark the divergent calls, reshapes and probes (bool per row), and the calls
        that hold an item only in B (``holders``, bool per call); the "divergent" filter shows
        them and the calls that contain them."""
        self.div_events, self.div_rs, self.div_pr = events, reshapes, probes
        seqs = np.sort(np.concatenate([self.seq[events | holders], self.r_seq[reshapes], self.p_seq[probes]]))
        lo = np.searchsorted(seqs, self.seq, side="left")
        hi = np.searchsorted(seqs, self.end_seq, side="left")
        self.div_sub = hi > lo

    def sub_flags(self, filt: str) -> np.ndarray | None:
        """Per call: whether it is visible under ``filt`` because of what it contains (None: all are)."""
        return {"reshapes": self.has_reshape, "probes": self.has_probe, "failing": self.failing_sub,
                "divergent": self.div_sub}.get(filt)

    # children ------------------------------------------------------------
    def _kids(self, csr: tuple[np.ndarray, np.ndarray], parent: int) -> np.ndarray:
        order, off = csr
        return order[off[parent + 1]:off[parent + 2]]

    def visible_event(self, i: int, filt: str) -> bool:
        if filt == "reshapes":
            return bool(self.has_reshape[i])
        if filt == "probes":
            return bool(self.has_probe[i])
        if filt == "failing":
            return bool(self.failing_sub[i])
        if filt == "divergent":
            return bool(self.div_sub[i])
        return True

    def visible(self, item: Item, filt: str) -> bool:
        _, kind, i = item
        if kind == "s":
            return True
        if kind == "e":
            return self.visible_event(i, filt)
        if kind == "r":
            return filt in ("all", "reshapes") or (filt == "failing" and bool(self.failing_rs[i])) \
                or (filt == "divergent" and bool(self.div_rs[i]))
        if kind == "p":
            return filt in ("all", "probes") or (filt == "failing" and bool(self.failing_pr[i])) \
                or (filt == "divergent" and bool(self.div_pr[i]))
        return False

    def children(self, item: Item, filt: str = "all") -> list[Item]:
        """Visible children of a tree item, in execution order."""
        _, kind, i = item
        if kind == "s":
            if self.root >= 0:
                return self.children((self.step, "e", self.root), filt) + \
                    self._children_of(-1, filt, include_events=False)
            return self._children_of(-1, filt)
        if kind != "e":
            return []
        return self._children_of(i, filt)

    def _children_of(self, parent: int, filt: str, include_events: bool = True) -> list[Item]:
        ev = self._kids(self._ev_kids, parent) if include_events else np.zeros(0, dtype=np.int64)
        rs = self._kids(self._rs_kids, parent)
        pr = self._kids(self._pr_kids, parent)
        if filt == "modules":
            rs, pr = rs[:0], pr[:0]
        elif filt == "reshapes":
            ev, pr = ev[self.has_reshape[ev]], pr[:0]
        elif filt == "probes":
            ev, rs = ev[self.has_probe[ev]], rs[:0]
        elif filt == "failing":
            ev, rs, pr = ev[self.failing_sub[ev]], rs[self.failing_rs[rs]], pr[self.failing_pr[pr]]
        elif filt == "divergent":
            ev, rs, pr = ev[self.div_sub[ev]], rs[self.div_rs[rs]], pr[self.div_pr[pr]]
        seqs = np.concatenate([self.seq[ev], self.r_seq[rs], self.p_seq[pr]])
        kinds = ["e"] * len(ev) + ["r"] * len(rs) + ["p"] * len(pr)
        locs = np.concatenate([ev, rs, pr])
        order = np.argsort(seqs, kind="stable")
        s = self.step
        return [(s, kinds[k], int(locs[k])) for k in order]

    def has_children(self, item: Item, filt: str) -> bool:
        _, kind, i = item
        if kind == "s":
            return self.n > 0 or len(self.reshapes) > 0 or len(self.probes) > 0
        if kind != "e":
            return False
        if filt == "all":
            return any(len(self._kids(c, i)) for c in (self._ev_kids, self._rs_kids, self._pr_kids))
        return bool(self._children_of(i, filt))

    def parent_item(self, item: Item) -> Item | None:
        s, kind, i = item
        if kind == "s":
            return None
        if kind == "e":
            p = int(self.parent[i])
        elif kind == "r":
            p = int(self.r_event[i])
        else:
            p = int(self.p_event[i])
        if p < 0 or p == self.root:
            return (s, "s", -1)
        if kind == "e" and i == self.root:
            return None
        return (s, "e", p)

    def canonical(self, item: Item) -> Item:
        """The step node stands for the root call."""
        s, kind, i = item
        if kind == "e" and i == self.root:
            return (s, "s", -1)
        return item

    def ancestors(self, item: Item) -> list[Item]:
        """Items from the step node down to ``item``'s parent."""
        chain: list[Item] = []
        cur = self.canonical(item)
        while True:
            p = self.parent_item(cur)
            if p is None:
                break
            chain.append(p)
            cur = p
        return chain[::-1]

    def seq_of(self, item: Item) -> int:
        _, kind, i = item
        if kind == "s":
            return -1
        return int({"e": self.seq, "r": self.r_seq, "p": self.p_seq}[kind][i])

    def event_of(self, item: Item) -> int:
        """The module call an item belongs to (the call itself for an event; the root for a step)."""
        _, kind, i = item
        if kind == "s":
            return self.main_root
        if kind == "e":
            return i
        return int(self.r_event[i] if kind == "r" else self.p_event[i])

    # tensors ---------------------------------------------------------------
    def event_tensor_rows(self, tm: "TraceModel", i: int) -> tuple[np.ndarray, np.ndarray]:
        """A call's own tensor rows and their global row numbers in the trace's tensor table."""
        ev = self.events[i]
        start, n = int(ev["tensor_start"]), int(ev["tensor_count"])
        a = start - self.t_start
        rows = self.tensors[a:a + n] if self.tensors is not None else tm.trace.event_tensors(self.ev_start + i)
        # The recorder's block for a call runs until it returns (its callees' rows are inside):
        # keep the call's own rows.
        own = np.nonzero(rows["event"] == self.ev_start + i)[0]
        return rows[own], start + own

    def event_tensors(self, tm: "TraceModel", i: int) -> np.ndarray:
        """A call's own tensor rows."""
        return self.event_tensor_rows(tm, i)[0]
