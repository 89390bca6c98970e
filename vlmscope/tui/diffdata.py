"""Diff mode data: the alignment of two traces, per step, as the viewer needs it.

Node statuses follow ``vlmscope diff``: same, shape/dtype differs, values drift, missing on
one side. When :mod:`vlmscope.analyze` provides ``align(trace_a, trace_b, maps=...)`` its
per-node statuses are used; otherwise (or for what it does not cover) a private fallback
matches module calls by (mapped module path, call number), reshapes by (call, op,
occurrence) and probes by (call, kind, name), and compares tensor shapes, dtypes and stats.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import numpy as np

from vlmscope.trace import ROLE_OUTPUT
from vlmscope.tui.data import Item, StepIndex, TraceModel
from vlmscope.tui.render import DRIFT, ONLY_A, ONLY_B, SAME, SHAPE

RTOL, ATOL = 1e-3, 1e-5

class _Maps:
    """Module-path rewrite rules for trace A (``a_regex=b_replacement``, applied in order)."""

    def __init__(self, rules: list[tuple[re.Pattern, str]]):
        self.modules = rules

    def map_module(self, path: str) -> str:
        for rx, repl in self.modules:
            path = rx.sub(repl, path)
        return path


def parse_maps(maps: list[str] | tuple[str, ...] | None):
    """``--map`` rules as ``vlmscope diff`` reads them (the analyze package's parser when present).
    Returns an object with ``map_module(path)``; raises ValueError with a one-line message."""
    try:
        from vlmscope.analyze.align import parse_maps as analyze_parse_maps
    except ImportError:
        analyze_parse_maps = None
    if analyze_parse_maps is not None:
        return analyze_parse_maps(list(maps or []))
    out: list[tuple[re.Pattern, str]] = []
    for m in maps or ():
        if "=" not in m:
            raise ValueError(f"bad --map rule {m!r}: expected 'a_regex=b_replacement'")
        rx, repl = m.split("=", 1)
        try:
            out.append((re.compile(rx), repl))
        except re.error as e:
            raise ValueError(f"bad --map rule {m!r}: {e}") from None
    return _Maps(out)


def apply_maps(path: str, maps) -> str:
    return maps.map_module(path)


@dataclass
class StepAlign:
    """Alignment of step ``step`` of A and B (local rows)."""
    step: int
    a_to_b: np.ndarray
    b_to_a: np.ndarray
    status_a: np.ndarray          # object array of statuses per A event
    r_a_to_b: np.ndarray
    r_status: np.ndarray
    p_a_to_b: np.ndarray
    p_status: np.ndarray
    b_only_rs: np.ndarray         # B reshape rows with no A partner
    first: Item | None = None     # first divergence in this step (post-order)
    first_status: str = SAME
    counts: dict = field(default_factory=dict)


def _tensor_sig(idx: StepIndex, tm: TraceModel, i: int) -> list[tuple]:
    rows = idx.event_tensors(tm, i)
    out = []
    for r in rows:
        nd = int(r["ndim"])
        out.append((int(r["role"]), tm.s(int(r["name"])), tuple(int(d) for d in r["shape"][:nd]),
                    tm.s(int(r["dtype"])), float(r["min"]), float(r["max"]), float(r["mean"]), float(r["std"]),
                    int(r["nan"]), int(r["inf"])))
    return out


def _close(x: float, y: float) -> bool:
    if x != x and y != y:
        return True
    if x in (float("inf"), float("-inf")) or y in (float("inf"), float("-inf")):
        return x == y
    return abs(x - y) <= ATOL + RTOL * max(abs(x), abs(y))


def compare_calls(sig_a: list[tuple], sig_b: list[tuple]) -> str:
    """Status of a matched pair of module calls from their tensor rows."""
    outs_a = [s for s in sig_a if s[0] == ROLE_OUTPUT]
    outs_b = [s for s in sig_b if s[0] == ROLE_OUTPUT]
    if len(outs_a) != len(outs_b):
        return SHAPE
    for x, y in zip(outs_a, outs_b):
        if x[2] != y[2] or x[3] != y[3]:
            return SHAPE
    for x, y in zip(outs_a, outs_b):
        if x[8] != y[8] or x[9] != y[9]:
            return DRIFT
        if not all(_close(x[k], y[k]) for k in (4, 5, 6, 7)):
            return DRIFT
    return SAME


class DiffModel:
    """Lazily aligned pair of traces. ``step_align`` reads tensors: call it from a worker."""

    def __init__(self, a: TraceModel, b: TraceModel, maps: list[str] | tuple[str, ...] = ()):
        self.a, self.b = a, b
        self.maps_raw = list(maps or ())
        self.maps = parse_maps(self.maps_raw)
        self._cache: dict[int, StepAlign] = {}
        self._lock = threading.Lock()
        self.first: tuple[Item, str] | None = None
        self.first_done = False
        self.engine = "built-in"
        self._external = None

    def prepare(self) -> None:
        """Map A's module paths with the ``--map`` rules (B's are the reference)."""
        self.a_paths = np.array([apply_maps(str(p), self.maps) for p in self.a.mod_paths], dtype=object)
        self.b_paths = np.asarray(self.b.mod_paths, dtype=object)

    def set_external(self, ext) -> None:
        """Switch to the analyze package's alignment (``analyze_adapter.ExternalAlignment``): the
        steps aligned so far are redone from it, later ones use it directly."""
        with self._lock:
            self._external = ext
            self.engine = "vlmscope.analyze"
            for step, al in list(self._cache.items()):
                ia, ib = self.a.cached(step), self.b.cached(step)
                if ia is None or ib is None:
                    del self._cache[step]
                    continue
                new = self._align(ia, ib)
                ext.refine(new, ia, ib)
                self._cache[step] = new

    @property
    def n_steps(self) -> int:
        return min(self.a.n_steps, self.b.n_steps)

    def cached(self, step: int) -> StepAlign | None:
        return self._cache.get(step)

    def step_align(self, step: int) -> StepAlign | None:
        with self._lock:
            if step in self._cache:
                return self._cache[step]
        if step >= self.n_steps:
            return None
        ia, ib = self.a.index(step), self.b.index(step)
        al = self._align(ia, ib)
        ext = self._external
        if ext is not None:
            try:
                ext.refine(al, ia, ib)
            except Exception:  # noqa: BLE001 - keep the built-in alignment of this step
                pass
        with self._lock:
            self._cache[step] = al
        return al

    def _align(self, ia: StepIndex, ib: StepIndex) -> StepAlign:
        a, b = self.a, self.b
        # events: key (mapped path, nth)
        kb: dict[tuple[str, int], int] = {}
        for j in range(ib.n):
            kb.setdefault((self.b_paths[ib.module[j]], int(ib.nth[j])), j)
        a_to_b = np.full(ia.n, -1, dtype=np.int64)
        b_to_a = np.full(ib.n, -1, dtype=np.int64)
        for i in range(ia.n):
            j = kb.get((self.a_paths[ia.module[i]], int(ia.nth[i])), -1)
            if j >= 0 and b_to_a[j] < 0:
                a_to_b[i], b_to_a[j] = j, i
        status = np.empty(ia.n, dtype=object)
        for i in range(ia.n):
            j = a_to_b[i]
            status[i] = ONLY_A if j < 0 else compare_calls(_tensor_sig(ia, a, i), _tensor_sig(ib, b, int(j)))
        # reshapes: (matched call, op, nth)
        rkey: dict[tuple, list[int]] = {}
        for k in range(len(ib.reshapes)):
            r = ib.reshapes[k]
            rkey.setdefault((int(ib.r_event[k]), b.s(int(r["op"])), int(r["nth"])), []).append(k)
        r_a_to_b = np.full(len(ia.reshapes), -1, dtype=np.int64)
        r_status = np.empty(len(ia.reshapes), dtype=object)
        used = np.zeros(len(ib.reshapes), dtype=bool)
        for k in range(len(ia.reshapes)):
            r = ia.reshapes[k]
            ev = int(ia.r_event[k])
            evb = int(a_to_b[ev]) if ev >= 0 else -1
            queue = rkey.get((evb, a.s(int(r["op"])), int(r["nth"]))) if (ev < 0 or evb >= 0) else None
            if not queue:
                r_status[k] = ONLY_A
                continue
            kk = queue.pop(0)
            used[kk] = True
            r_a_to_b[k] = kk
            rb = ib.reshapes[kk]
            same = (a.s(int(r["in_shapes"])) == b.s(int(rb["in_shapes"])) and
                    tuple(r["out_shape"][:int(r["out_ndim"])]) == tuple(rb["out_shape"][:int(rb["out_ndim"])]))
            r_status[k] = SAME if same else SHAPE
        b_only_rs = np.nonzero(~used & ((ib.r_event < 0) | (b_to_a[np.maximum(ib.r_event, 0)] >= 0)))[0]
        # probes: (matched call, kind, name)
        pkey: dict[tuple, list[int]] = {}
        for k in range(len(ib.probes)):
            p = ib.probes[k]
            pkey.setdefault((int(ib.p_event[k]), b.s(int(p["kind"])), b.s(int(p["name"]))), []).append(k)
        p_a_to_b = np.full(len(ia.probes), -1, dtype=np.int64)
        p_status = np.empty(len(ia.probes), dtype=object)
        for k in range(len(ia.probes)):
            p = ia.probes[k]
            ev = int(ia.p_event[k])
            evb = int(a_to_b[ev]) if ev >= 0 else -1
            queue = pkey.get((evb, a.s(int(p["kind"])), a.s(int(p["name"])))) if (ev < 0 or evb >= 0) else None
            if not queue:
                p_status[k] = ONLY_A
                continue
            kk = queue.pop(0)
            p_a_to_b[k] = kk
            pb = ib.probes[kk]
            same = (tuple(p["shape"][:int(p["ndim"])]) == tuple(pb["shape"][:int(pb["ndim"])]) and
                    a.s(int(p["info"])) == b.s(int(pb["info"])))
            p_status[k] = SAME if same else SHAPE
        al = StepAlign(ia.step, a_to_b, b_to_a, status, r_a_to_b, r_status, p_a_to_b, p_status, b_only_rs)
        self._find_first(al, ia, ib)
        return al

    def _find_first(self, al: StepAlign, ia: StepIndex, ib: StepIndex) -> None:
        """The first divergence of the step: the first call to return that differs (post-order),
        so that a difference is named where it starts rather than at every caller."""
        # key: (return position, deeper first) -- nested calls can return at the same counter value
        best: tuple[tuple[int, int], Item, str] | None = None
        for i in range(ia.n):
            st = al.status_a[i]
            if st != SAME:
                key = (int(ia.end_seq[i]), -int(ia.depth[i]))
                if best is None or key < best[0]:
                    best = (key, ia.canonical((ia.step, "e", i)), st)
        for j in np.nonzero(al.b_to_a < 0)[0]:
            key = (int(ib.end_seq[j]), -int(ib.depth[j]))
            if best is None or key < best[0]:
                best = (key, (ib.step, "b", int(j)), ONLY_B)
        for k in range(len(ia.reshapes)):
            if al.r_status[k] != SAME:
                key = (int(ia.r_seq[k]), -1 << 20)
                if best is None or key < best[0]:
                    best = (key, (ia.step, "r", k), al.r_status[k])
        counts = {SAME: 0, SHAPE: 0, DRIFT: 0, ONLY_A: 0, ONLY_B: int((al.b_to_a < 0).sum())}
        for st in al.status_a:
            counts[st] += 1
        al.counts = counts
        if best is not None:
            al.first, al.first_status = best[1], best[2]

    def find_first(self, cancelled=lambda: False) -> tuple[Item, str] | None:
        """The first divergence: as ``vlmscope diff`` names it when the analyze alignment is in,
        else the first step's first call (in return order) that differs (worker)."""
        if self._external is not None:
            try:
                self.first = self._external.first(self.a, self.b)
            except Exception:  # noqa: BLE001
                self.first = None
            if self.first is not None:
                if self.first[0][0] < self.n_steps:
                    self.step_align(self.first[0][0])
                self.first_done = True
                return self.first
        for s in range(self.n_steps):
            if cancelled():
                return None
            al = self.step_align(s)
            if al is not None and al.first is not None:
                self.first = (al.first, al.first_status)
                break
        self.first_done = True
        return self.first

    # tree support ----------------------------------------------------------------
    def step_status(self, step: int) -> str | None:
        """The worst status of a step's calls (None while unknown)."""
        al = self._cache.get(step)
        codes: set[str] = set()
        if al is not None:
            codes = set(al.status_a.tolist())
            if (al.b_to_a < 0).any():
                codes.add(ONLY_B)
        elif self._external is not None and step < self.n_steps:
            st = self.a.steps[step]
            a0, n = int(st["event_start"]), int(st["event_count"])
            raw = self._external.x["ev_status_a"][a0:a0 + n]
            codes = {self._external_status(int(c)) for c in np.unique(raw)}
        else:
            return None
        for st in (SHAPE, ONLY_A, ONLY_B, DRIFT):
            if st in codes:
                return st
        return SAME

    @staticmethod
    def _external_status(code: int) -> str:
        return {0: SAME, 1: SHAPE, 2: DRIFT, 3: ONLY_B, 4: ONLY_A}.get(code, DRIFT)

    def status(self, item: Item) -> str:
        s, kind, i = item
        al = self._cache.get(s)
        if al is None:
            return SAME
        if kind == "s":
            ia = self.a.cached(s)
            if ia is None or ia.main_root < 0:
                return SAME
            return al.status_a[ia.main_root]
        if kind == "e":
            return al.status_a[i]
        if kind == "r":
            return al.r_status[i]
        if kind == "p":
            return al.p_status[i]
        return ONLY_B

    def partner(self, item: Item) -> Item | None:
        """The B item aligned with an A item."""
        s, kind, i = item
        al = self._cache.get(s)
        if al is None:
            return None
        if kind == "s":
            ib = self.b.cached(s)
            return (s, "s", -1) if ib is not None else None
        if kind == "e":
            j = int(al.a_to_b[i])
            return (s, "e", j) if j >= 0 else None
        if kind == "r":
            j = int(al.r_a_to_b[i])
            return (s, "r", j) if j >= 0 else None
        if kind == "p":
            j = int(al.p_a_to_b[i])
            return (s, "p", j) if j >= 0 else None
        return None

    def b_only_children(self, item: Item, filt: str) -> list[tuple[Item, Item | None]]:
        """B-only items under an A item, each with the A sibling it follows (None: first)."""
        s, kind, i = item
        al = self._cache.get(s)
        ia, ib = self.a.cached(s), self.b.cached(s)
        if al is None or ia is None or ib is None:
            return []
        if kind == "s":
            pb = ib.root
        elif kind == "e":
            pb = int(al.a_to_b[i])
            if pb < 0:
                return []
        else:
            return []
        out: list[tuple[Item, Item | None]] = []
        anchor: Item | None = None
        b_kids = ib.children((s, "e", pb) if pb >= 0 else (s, "s", -1), "all" if filt == "failing" else filt)
        for child in b_kids:
            _, ck, j = child
            if ck == "e":
                a_i = int(al.b_to_a[j])
                if a_i >= 0:
                    anchor = ia.canonical((s, "e", a_i))
                else:
                    out.append(((s, "b", j), anchor))
            elif ck == "r":
                if j in set(al.b_only_rs.tolist()):
                    out.append(((s, "q", j), anchor))
                else:
                    ka = np.nonzero(al.r_a_to_b == j)[0]
                    if len(ka):
                        anchor = (s, "r", int(ka[0]))
        return out


def external_alignment(a: TraceModel, b: TraceModel, maps: list[str], cancelled=lambda: False):
    """The analyze package's alignment (see ``analyze_adapter.alignment``), or None (worker)."""
    try:
        from vlmscope.tui import analyze_adapter

        return analyze_adapter.alignment(a, b, maps, cancelled)
    except Exception:  # noqa: BLE001 - a broken or changed analyze API never stops the viewer
        return None
