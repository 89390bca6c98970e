"""Diff mode data: the alignment of two traces, as the tree needs it, step by step.

The alignment is ``vlmscope.analyze.align``'s (:func:`vlmscope.tui.analysis.align_sides`, run in
a process of its own): per-row partners and statuses of module calls, tensors, reshapes and
probes, and the first divergence as ``vlmscope diff`` names it. Until it arrives, nodes have no
status (``None``). This module only slices it per step and answers the tree's questions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from vlmscope.analyze.status import MISSING_A, MISSING_B, SAME, Status
from vlmscope.tui.analysis import AlignResult, Sides
from vlmscope.tui.data import TraceModel
from vlmscope.tui.items import B_KINDS, ONLY_B_KIND, Item
from vlmscope.tui.navigate import locate
from vlmscope.tui.stepindex import StepIndex
from vlmscope.tui.styles import worst

#: statuses of a diff divergence (``Divergence.status``) as codes
_STATUS_OF_LABEL = {s.label: s for s in Status}


def _local(partner: np.ndarray, start: int, n: int, other_start: int, other_n: int) -> np.ndarray:
    """Partners of rows ``[start, start + n)`` as local rows of the other trace's step block."""
    p = partner[start:start + n]
    return np.where((p >= other_start) & (p < other_start + other_n), p - other_start, -1)


@dataclass
class StepAlign:
    """The alignment of one step of A and B, in local rows of each step's blocks."""

    step: int
    a_to_b: np.ndarray        # per A call: its B call (-1: none)
    b_to_a: np.ndarray        # per B call: its A call (-1: none)
    status_a: np.ndarray      # per A call: status code
    r_a_to_b: np.ndarray      # per A reshape: its B reshape
    r_status: np.ndarray      # per A reshape: status code
    p_a_to_b: np.ndarray      # per A probe: its B probe
    p_status: np.ndarray      # per A probe: status code
    pr_b_to_a: np.ndarray     # per B probe: its A probe
    b_only_pr: set            # B probes with no A partner in an aligned call: shown in A's tree
    rs_b_to_a: np.ndarray     # per B reshape: its A reshape
    b_only_rs: set            # B reshapes with no A partner in an aligned call: shown in A's tree
    divergences: list | None = None   # the divergent items in A's execution order (:func:`_divergences`)
    div_keys: list | None = None      # and their positions in A's execution order

    @classmethod
    def build(cls, res: AlignResult, ia: StepIndex, ib: StepIndex) -> "StepAlign":
        a0, b0 = ia.ev_start, ib.ev_start
        ev = res.events
        ra0, rb0 = _start(ia, "reshape"), _start(ib, "reshape")
        pa0, pb0 = _start(ia, "probe"), _start(ib, "probe")
        na_r, nb_r, na_p, nb_p = len(ia.reshapes), len(ib.reshapes), len(ia.probes), len(ib.probes)
        b_to_a = _local(ev.partner_b, b0, ib.n, a0, ia.n)
        rs_back = _local(res.reshapes.partner_b, rb0, nb_r, ra0, na_r)
        pr_back = _local(res.probes.partner_b, pb0, nb_p, pa0, na_p)
        return cls(ia.step, _local(ev.partner_a, a0, ia.n, b0, ib.n), b_to_a, ev.status_a[a0:a0 + ia.n],
                   _local(res.reshapes.partner_a, ra0, na_r, rb0, nb_r), res.reshapes.status_a[ra0:ra0 + na_r],
                   _local(res.probes.partner_a, pa0, na_p, pb0, nb_p), res.probes.status_a[pa0:pa0 + na_p],
                   pr_back, _shown_in_a(pr_back, ib.p_event, b_to_a),
                   rs_back, _shown_in_a(rs_back, ib.r_event, b_to_a))


def _divergences(al: StepAlign, ia: StepIndex, ib: StepIndex) -> tuple[list[Item], list[float]]:
    """The divergent items of a step, in A's execution order (the tree's order), and mark them on
    ``ia`` for the "divergent" filter. Divergent, as ``vlmscope diff`` counts them: calls whose own
    tensors differ or that one side lacks; reshapes and probes that differ, except inside a call
    one side lacks (that call is the divergence); items only in B, placed after the last of B's
    aligned calls that started or ended before them (their position in A's timeline)."""
    s = ia.step
    ev = al.status_a != SAME
    rs = al.r_status != SAME
    pr = al.p_status != SAME
    only_a = al.status_a == MISSING_B
    for flags, owner in ((rs, ia.r_event), (pr, ia.p_event)):
        has = owner >= 0
        flags[has] &= ~only_a[owner[has]]
    # B: calls without an A partner, and reshapes / probes only in B inside aligned calls
    b_calls = np.nonzero(al.b_to_a < 0)[0]
    b_rs = np.array(sorted(al.b_only_rs), dtype=np.int64)
    b_pr = np.array(sorted(al.b_only_pr), dtype=np.int64)
    b_seq = np.concatenate([ib.seq[b_calls], ib.r_seq[b_rs], ib.p_seq[b_pr]]).astype(np.int64)
    # where they fall in A's timeline: after the A partners of B's aligned calls that started (or
    # returned) before them
    aligned = np.nonzero(al.b_to_a >= 0)[0]
    key_b = np.full(len(b_seq), -1.0)
    for b_at, a_at in ((ib.seq, ia.seq), (ib.end_seq, ia.end_seq)):
        order = aligned[np.argsort(b_at[aligned], kind="stable")]
        if len(order):
            run = np.maximum.accumulate(a_at[al.b_to_a[order]])
            k = np.searchsorted(b_at[order], b_seq, side="left") - 1
            ok = k >= 0
            key_b[ok] = np.maximum(key_b[ok], run[k[ok]])
    key_b += 0.5
    # the A calls under which the tree shows B's items (for the filter): walk up B's parents to an
    # aligned call
    holders = np.zeros(ia.n, dtype=bool)
    owners = np.concatenate([ib.parent[b_calls], ib.r_event[b_rs], ib.p_event[b_pr]]).astype(np.int64)
    for _ in range(64):
        up = (owners >= 0) & (al.b_to_a[np.maximum(owners, 0)] < 0)
        if not up.any():
            break
        owners[up] = ib.parent[owners[up]]
    a_hold = al.b_to_a[owners[owners >= 0]]
    holders[a_hold[a_hold >= 0]] = True
    ia.set_divergent(ev.copy(), rs, pr, holders)
    items: list[Item] = [ia.canonical((s, "e", int(i))) for i in np.nonzero(ev)[0]]
    items += [(s, "r", int(i)) for i in np.nonzero(rs)[0]] + [(s, "p", int(i)) for i in np.nonzero(pr)[0]]
    keys = [float(ia.seq[i]) for i in np.nonzero(ev)[0]] + [float(ia.r_seq[i]) for i in np.nonzero(rs)[0]] + \
        [float(ia.p_seq[i]) for i in np.nonzero(pr)[0]]
    items += [(s, "b", int(j)) for j in b_calls] + [(s, "q", int(j)) for j in b_rs] + [(s, "o", int(j)) for j in b_pr]
    keys += key_b.tolist()
    order = sorted(range(len(items)), key=lambda k: keys[k])
    return [items[k] for k in order], [keys[k] for k in order]


def _shown_in_a(back: np.ndarray, owner: np.ndarray, b_to_a: np.ndarray) -> set:
    """B reshapes or probes without a partner that A's tree shows: those of aligned calls (or of no
    call). Those of a B-only call are shown under that call, in B's own subtree."""
    in_aligned = owner < 0
    has = ~in_aligned
    in_aligned[has] = b_to_a[owner[has]] >= 0
    return set(np.nonzero((back < 0) & in_aligned)[0].tolist())


def _exact_row(idx: StepIndex, node: str, seq: int) -> tuple[str, int] | None:
    """The reshape or probe row at execution position ``seq`` that a divergence of that ``node``
    kind names (None for other nodes, or when no row is there)."""
    seqs = {"reshape": idx.r_seq, "probe": idx.p_seq}.get(node)
    if seqs is None or seq < 0:
        return None
    hit = np.nonzero(seqs == seq)[0]
    return ("r" if node == "reshape" else "p", int(hit[0])) if len(hit) else None


def _start(idx: StepIndex, table: str) -> int:
    return int(idx.step_row[f"{table}_start"])


class DiffModel:
    """Two traces and their alignment (once :meth:`set_result` has it)."""

    def __init__(self, a: TraceModel, b: TraceModel, maps: list[str] | tuple[str, ...] = ()):
        self.a, self.b = a, b
        self.maps = list(maps or ())
        self.result: AlignResult | None = None
        self.error: str | None = None          # why the alignment failed
        self.first: tuple[Item, Status] | None = None
        self.unplaced: str | None = None
        self._cache: dict[int, StepAlign] = {}
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        """The alignment arrived or failed."""
        return self.result is not None or self.error is not None

    @property
    def n_steps(self) -> int:
        return min(self.a.n_steps, self.b.n_steps)

    def set_result(self, res: AlignResult) -> None:
        """Take the alignment and place the first divergence on the tree (reads steps: worker)."""
        with self._lock:
            self._cache.clear()
        self.result = res           # placing reads it (B-only items)
        try:
            self.first = self._place_first(res.first)
        except BaseException:
            self.result = None      # not done: the caller reports the failure
            raise
        # vlmscope diff found a divergence that has no node on these trees (e.g. a step only B
        # has): its headline is shown, never "A and B agree"
        self.unplaced = res.headline if not res.same and self.first is None else None

    def fail(self, message: str) -> None:
        self.error = message

    # per step --------------------------------------------------------------------------
    def cached(self, step: int) -> StepAlign | None:
        """The step's alignment when both steps are indexed and the alignment is in (memory)."""
        with self._lock:
            al = self._cache.get(step)
        if al is not None or self.result is None or step >= self.n_steps:
            return al
        ia, ib = self.a.cached(step), self.b.cached(step)
        if ia is None or ib is None:
            return None
        al = StepAlign.build(self.result, ia, ib)
        al.divergences, al.div_keys = _divergences(al, ia, ib)
        with self._lock:
            self._cache[step] = al
        return al

    def divergences(self, step: int) -> list[Item] | None:
        """The divergent items of ``step`` in execution order (next / previous divergence); None
        until the step is indexed and the alignment is in. A step only A has: its step node."""
        if self.result is None:
            return None
        if step >= self.n_steps:
            return [(step, "s", -1)] if step < self.a.n_steps else []
        al = self.cached(step)
        return al.divergences if al is not None else None

    def divergence_keys(self, step: int) -> list[float]:
        """The positions in A's execution order of :meth:`divergences` (step node: -1)."""
        al = self.cached(step) if step < self.n_steps else None
        return list(al.div_keys) if al is not None else [-1.0] * len(self.divergences(step) or [])

    def has_divergence(self, step: int) -> bool:
        """Whether ``step`` holds a divergent item of A's tree (from the global rows: no indexing)."""
        res = self.result
        if res is None or step >= self.a.n_steps:
            return False
        if step >= self.b.n_steps:
            return True
        sa, sb = self.a.steps[step], self.b.steps[step]
        for sides, table in ((res.events, "event"), (res.reshapes, "reshape"), (res.probes, "probe")):
            a0, b0 = int(sa[f"{table}_start"]), int(sb[f"{table}_start"])
            if (sides.status_a[a0:a0 + int(sa[f"{table}_count"])] != SAME).any() or \
                    (sides.status_b[b0:b0 + int(sb[f"{table}_count"])] == MISSING_A).any():
                return True
        return False

    def step_status(self, step: int) -> Status | None:
        """The worst status of a step's calls (A's, and B's only in B), or None while unknown."""
        res = self.result
        if res is None:
            return None
        codes = set()
        if step < self.a.n_steps:
            st = self.a.steps[step]
            a0 = int(st["event_start"])
            codes |= set(np.unique(res.events.status_a[a0:a0 + int(st["event_count"])]).tolist())
        if step < self.b.n_steps:
            st = self.b.steps[step]
            b0 = int(st["event_start"])
            if (res.events.status_b[b0:b0 + int(st["event_count"])] == MISSING_A).any():
                codes.add(int(MISSING_A))
        return worst(codes) if codes else Status.SAME

    def status(self, item: Item) -> Status | None:
        """The status of an item of the tree (B-only items: MISSING_A), None while unknown."""
        s, kind, i = item
        if kind in B_KINDS:
            return Status.MISSING_A
        res = self.result
        if res is None:
            return None
        al = self.cached(s)
        if al is None:
            return self._status_beyond(item)
        if kind == "s":
            ia = self.a.cached(s)
            return Status(int(al.status_a[ia.main_root])) if ia is not None and ia.main_root >= 0 else Status.SAME
        table = {"e": al.status_a, "r": al.r_status, "p": al.p_status}.get(kind)
        return Status(int(table[i])) if table is not None else None

    def _status_beyond(self, item: Item) -> Status | None:
        """Items of A's steps that B does not have: from the global rows."""
        s, kind, i = item
        ia = self.a.cached(s)
        if ia is None or s < self.n_steps:
            return None
        sides: Sides | None = {"e": self.result.events, "s": self.result.events, "r": self.result.reshapes,
                               "p": self.result.probes}.get(kind)
        if sides is None:
            return None
        if kind == "s":
            if ia.main_root < 0:
                return None
            kind, i = "e", ia.main_root
        start = ia.ev_start if kind == "e" else _start(ia, "reshape" if kind == "r" else "probe")
        return Status(int(sides.status_a[start + i]))

    def partner(self, item: Item) -> Item | None:
        """The B item aligned with an A item."""
        s, kind, i = item
        al = self.cached(s)
        if al is None:
            return None
        if kind == "s":
            return (s, "s", -1) if self.b.cached(s) is not None else None
        table = {"e": al.a_to_b, "r": al.r_a_to_b, "p": al.p_a_to_b}.get(kind)
        if table is None:
            return None
        j = int(table[i])
        return (s, kind, j) if j >= 0 else None

    def tensor_pairs(self, ia: StepIndex, ib: StepIndex, a_ev: int, b_ev: int) -> tuple[list, list]:
        """The tensors of an aligned pair of calls as the alignment pairs them: ``([(A row, B row
        or None, status)], [B rows only in B])`` (structured rows; reads tensor rows: worker)."""
        res = self.result
        assert res is not None
        rows_a, glob_a = ia.event_tensor_rows(self.a, a_ev)
        rows_b, glob_b = ib.event_tensor_rows(self.b, b_ev)
        where_b = {int(g): k for k, g in enumerate(glob_b)}
        pairs, used = [], set()
        for r, g in zip(rows_a, glob_a):
            k = where_b.get(int(res.tensors.partner_a[g]), -1)
            used.add(k)
            pairs.append((r, rows_b[k] if k >= 0 else None, Status(int(res.tensors.status_a[g]))))
        only_b = [rows_b[k] for k in range(len(rows_b)) if k not in used]
        return pairs, only_b

    def b_only_children(self, item: Item, filt: str) -> list[tuple[Item, Item | None]]:
        """B-only items under an A item, each with the A sibling it follows (None: first)."""
        s, kind, i = item
        al = self.cached(s)
        ia, ib = self.a.cached(s), self.b.cached(s)
        if al is None or ia is None or ib is None or kind not in ("s", "e"):
            return []
        if kind == "s":
            # B's top level; and when B's step has several roots but A's one, what B's call of
            # A's root holds (generate() ran B's vision tower before the forward, say)
            parents = [(s, "s", -1)]
            if ib.root < 0 and ia.root >= 0 and al.a_to_b[ia.root] >= 0:
                parents.append((s, "e", int(al.a_to_b[ia.root])))
        elif al.a_to_b[i] >= 0:
            parents = [(s, "e", int(al.a_to_b[i]))]
        else:
            return []
        out: list[tuple[Item, Item | None]] = []
        anchor: Item | None = None
        for parent in parents:
            for _, ck, j in ib.children(parent, "all" if filt in ("failing", "divergent") else filt):
                if ck == "e":
                    a_i = int(al.b_to_a[j])
                    if a_i >= 0:
                        anchor = ia.canonical((s, "e", a_i))
                    else:
                        out.append(((s, "b", j), anchor))
                else:   # a reshape or probe: B-only ones are shown, aligned ones anchor the next
                    only, a_to_b = (al.b_only_rs, al.r_a_to_b) if ck == "r" else (al.b_only_pr, al.p_a_to_b)
                    if j in only:
                        out.append(((s, ONLY_B_KIND[ck], j), anchor))
                    else:
                        ka = np.nonzero(a_to_b == j)[0]
                        if len(ka):
                            anchor = (s, ck, int(ka[0]))
        return out

    def b_children(self, item: Item, filt: str) -> list[Item]:
        """The children of a B-only call (``"b"`` item) that are only in B too: its B-only calls
        (``"b"``), reshapes (``"q"``) and probes (``"o"``). A child call aligned with one of A is in
        A's tree."""
        s, _, j = item
        al, ib = self.cached(s), self.b.cached(s)
        if al is None or ib is None:
            return []
        out: list[Item] = []
        for _, k, c in ib.children((s, "e", j), "all" if filt in ("failing", "divergent") else filt):
            if k == "e" and al.b_to_a[c] < 0:
                out.append((s, "b", c))
            elif (k == "r" and al.rs_b_to_a[c] < 0) or (k == "p" and al.pr_b_to_a[c] < 0):
                out.append((s, ONLY_B_KIND[k], c))
        return out

    # the first divergence ----------------------------------------------------------------
    def _place_first(self, f: dict | None) -> tuple[Item, Status] | None:
        """``vlmscope diff``'s first divergence as a tree item of A (or a B-only item)."""
        if not f:
            return None
        step = int(f.get("step", -1))
        status = _STATUS_OF_LABEL.get(str(f.get("status")), Status.DRIFT)
        if status == Status.MISSING_A and 0 <= step < self.b.n_steps:
            item = self._place_in_b(step, f)
            if item is not None:
                return item, status
        if not 0 <= step < self.a.n_steps:
            return None
        ia = self.a.cached(step) or self.a.index(step)
        seq = int(f.get("seq_a", -1))
        kind, local = locate(self.a, ia, seq, str(f.get("module") or ""))
        exact = _exact_row(ia, str(f.get("node") or ""), seq)
        if exact is not None:   # the reshape or probe itself, not the call that holds it
            kind, local = exact
        return (step, kind, local), status

    def _place_in_b(self, step: int, f: dict) -> Item | None:
        """A divergence only in B: its B-only call or reshape, or the A call aligned with the B call
        that holds it; None when it must be placed in A."""
        ib = self.b.cached(step) or self.b.index(step)
        kind, local = locate(self.b, ib, int(f.get("seq_b", -1)), str(f.get("module_b") or f.get("module") or ""))
        exact = _exact_row(ib, str(f.get("node") or ""), int(f.get("seq_b", -1)))
        if exact is not None:
            kind, local = exact
        if kind in ("r", "p"):
            sides, table = (self.result.reshapes, "reshape") if kind == "r" else (self.result.probes, "probe")
            if sides.partner_b[_start(ib, table) + local] < 0:
                return (step, ONLY_B_KIND[kind], local)
        ev = ib.event_of((step, kind, local))
        if ev < 0:
            return None
        a_row = int(self.result.events.partner_b[ib.ev_start + ev])
        if a_row < 0:
            return (step, "b", ev) if ev != ib.root else None
        ia = self.a.cached(step) or self.a.index(step)
        return ia.canonical((step, "e", a_row - ia.ev_start))
