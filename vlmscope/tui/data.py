"""The viewer's data layer: numpy indexes over a lazily read trace. No textual, no torch.

A :class:`TraceModel` wraps one :class:`vlmscope.trace.Trace`. Everything that may read
HDF5 (``load``, ``index``, ``payload``, ``probe_value``) is meant to run in a worker
thread; once a step's :class:`StepIndex` is loaded, every navigation question (children
of a node, the same module in another step, the next layer, search) is answered from
memory, fast enough to run on the UI thread.

Tree items are plain tuples ``Item = (step, kind, local)``: ``kind`` is ``"s"`` (the
step node: it stands for the step's root module call), ``"e"`` (a module call), ``"r"``
(a reshape) or ``"p"`` (a probe), and ``local`` is the row within the step's block of
the matching table (-1 for a step node).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from vlmscope.trace import ROLE_OUTPUT, Trace, TraceError, open_trace

Item = tuple[int, str, int]

FILTERS = ("all", "modules", "reshapes", "probes", "failing")
FILTER_LABELS = {"all": "all", "modules": "modules only", "reshapes": "reshapes", "probes": "probes",
                 "failing": "failing checks"}

#: Read a step's whole tensor block when it has at most this many rows (else per call).
TENSOR_BLOCK_ROWS = 400_000
#: Step indexes kept in memory.
STEP_CACHE = 12

_DIGITS = re.compile(r"(?<![^.])\d+(?![^.])")


def module_pattern(path: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.*.mlp``: the same module in every layer."""
    return _DIGITS.sub("*", path)


def fmt_shape(shape: Iterable[int], compact: bool = False) -> str:
    sep = "," if compact else ", "
    return "[" + sep.join(str(int(d)) for d in shape) + "]"


def fmt_num(x: float) -> str:
    if x != x:  # nan
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.3g}"
    return f"{x:.4g}"


def short_site(path: str) -> str:
    """A call-site file as a person reads it: relative to site-packages or the cwd when it can be."""
    if not path:
        return ""
    for marker in ("site-packages/", "dist-packages/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + len(marker):]
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel
    except ValueError:
        pass
    return path


def is_glob(query: str) -> bool:
    return any(c in query for c in "*?[")


def match_paths(paths: np.ndarray, query: str) -> np.ndarray:
    """Indexes of module paths matching ``query``: a glob when it has ``*?[``, the module itself when
    it is a whole path, else a substring."""
    q = query.strip()
    if not q:
        return np.zeros(0, dtype=np.int64)
    if is_glob(q):
        rx = re.compile(fnmatch.translate(q))
        hits = [i for i, p in enumerate(paths) if rx.match(p)]
    else:
        # a whole path means that module; anything else is a substring
        hits = [i for i, p in enumerate(paths) if p == q] or [i for i, p in enumerate(paths) if q in p]
    return np.asarray(hits, dtype=np.int64)


@dataclass
class Violation:
    """A failing check rule at one place of a trace (adapter over the analyze package)."""
    step: int
    kind: str          # "e", "r" or "p"
    local: int
    rule: str
    message: str
    severity: str = "error"
    seq: int = -1      # position in the step's execution order (for "next violation")


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
        ev = t.events(step)
        self.events = ev
        n = len(ev)
        self.n = n
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

        self.reshapes = t.reshapes(step)
        self.probes = t.probes(step)
        self.r_event = self._local_events(self.reshapes["event"])
        self.p_event = self._local_events(self.probes["event"])
        self.r_seq = self.reshapes["seq"].astype(np.int64)
        self.p_seq = self.probes["seq"].astype(np.int64)

        # children, grouped by parent (+1 so that -1, "no module", is slot 0)
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

        # tensors: the whole block when small enough, else read per call on demand
        count = int(st["tensor_count"])
        self.t_start = int(st["tensor_start"])
        self.tensors = t.tensors(step) if count <= TENSOR_BLOCK_ROWS else None
        self.out_ndim = np.full(n, -1, dtype=np.int64)
        self.out_shape = np.full((n, 8), -1, dtype=np.int64)
        self.out_dtype = np.zeros(n, dtype=np.int64)
        if self.tensors is not None and len(self.tensors):
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
        self._lock = threading.Lock()

    def _local_events(self, ev: np.ndarray) -> np.ndarray:
        loc = ev.astype(np.int64) - self.ev_start
        loc[(ev < 0) | (loc < 0) | (loc >= self.n)] = -1
        return loc

    def _contains(self, sorted_seqs: np.ndarray) -> np.ndarray:
        lo = np.searchsorted(sorted_seqs, self.seq, side="right")
        hi = np.searchsorted(sorted_seqs, self.end_seq, side="left")
        return hi > lo

    def set_failing(self, violations: Iterable[Violation]) -> None:
        fe = np.zeros(self.n, dtype=bool)
        for v in violations:
            if v.step != self.step:
                continue
            if v.kind == "s" and self.main_root >= 0:
                fe[self.main_root] = True
            elif v.kind == "e" and 0 <= v.local < self.n:
                fe[v.local] = True
            elif v.kind == "r" and 0 <= v.local < len(self.reshapes):
                self.failing_rs[v.local] = True
                ev = self.r_event[v.local]
                if ev >= 0:
                    fe[ev] = True
            elif v.kind == "p" and 0 <= v.local < len(self.probes):
                self.failing_pr[v.local] = True
                ev = self.p_event[v.local]
                if ev >= 0:
                    fe[ev] = True
        self.failing_events = fe
        seqs = np.sort(self.seq[fe])
        lo = np.searchsorted(seqs, self.seq, side="left")
        hi = np.searchsorted(seqs, self.end_seq, side="left")
        self.failing_sub = hi > lo

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
        return True

    def visible(self, item: Item, filt: str) -> bool:
        _, kind, i = item
        if kind == "s":
            return True
        if kind == "e":
            return self.visible_event(i, filt)
        if kind == "r":
            return filt in ("all", "reshapes") or (filt == "failing" and bool(self.failing_rs[i]))
        if kind == "p":
            return filt in ("all", "probes") or (filt == "failing" and bool(self.failing_pr[i]))
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
    def event_tensors(self, tm: "TraceModel", i: int) -> np.ndarray:
        ev = self.events[i]
        a = int(ev["tensor_start"]) - self.t_start
        n = int(ev["tensor_count"])
        rows = self.tensors[a:a + n] if self.tensors is not None else tm.trace.event_tensors(self.ev_start + i)
        # The recorder's block for a call runs until it returns (its callees' rows are inside):
        # keep the call's own rows.
        return rows[rows["event"] == self.ev_start + i]


class TraceModel:
    """One trace, as the viewer sees it. ``load()`` and ``index()`` read HDF5: call them in workers."""

    def __init__(self, path: str | os.PathLike, trace: Trace | None = None):
        self.path = Path(path)
        self.name = self.path.name
        self.trace = trace if trace is not None else open_trace(path)
        self._steps_cache: OrderedDict[int, StepIndex] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[int, threading.Event] = {}
        self.violations: list[Violation] = []
        self.failing_steps: set[int] = set()
        self.loaded = False

    # loading (worker) --------------------------------------------------------
    def load(self) -> "TraceModel":
        t = self.trace
        self.steps = t.steps
        self.n_steps = len(self.steps)
        self.status = t.status
        self.meta = t.meta
        self.error = t.error
        self.strings = t.strings
        modules = t.modules
        self.modules_depth = modules["depth"].astype(np.int64) if len(modules) else np.zeros(0, np.int64)
        self.mod_paths = np.asarray(t.module_paths, dtype=object)
        self.mod_cls = self.strings[modules["cls"]] if len(modules) else np.array([], dtype=object)
        patterns = [module_pattern(p) for p in self.mod_paths]
        uniq: dict[str, int] = {}
        self.mod_pattern = np.array([uniq.setdefault(p, len(uniq)) for p in patterns], dtype=np.int64)
        self.loaded = True
        return self

    def close(self) -> None:
        self.trace.close()

    def s(self, i: int) -> str:
        i = int(i)
        return str(self.strings[i]) if 0 <= i < len(self.strings) else ""

    def index(self, step: int) -> StepIndex:
        """The step's index (reads HDF5 the first time: call from a worker). Two workers asking
        for the same step read it once."""
        while True:
            with self._lock:
                idx = self._steps_cache.get(step)
                if idx is not None:
                    self._steps_cache.move_to_end(step)
                    return idx
                pending = self._loading.get(step)
                if pending is None:
                    pending = self._loading[step] = threading.Event()
                    break
            pending.wait()
        try:
            idx = StepIndex(self, step)
            if self.violations:
                idx.set_failing(self.violations)
            with self._lock:
                self._steps_cache[step] = idx
                while len(self._steps_cache) > STEP_CACHE:
                    self._steps_cache.popitem(last=False)
            return idx
        finally:
            with self._lock:
                self._loading.pop(step, None)
            pending.set()

    def cached(self, step: int) -> StepIndex | None:
        with self._lock:
            return self._steps_cache.get(step)

    def set_violations(self, violations: list[Violation]) -> None:
        self.violations = sorted(violations, key=lambda v: (v.step, v.seq, v.kind != "e", v.local))
        self.failing_steps = {v.step for v in self.violations}
        with self._lock:
            for idx in self._steps_cache.values():
                idx.set_failing(self.violations)

    # naming --------------------------------------------------------------------
    def step_name(self, step: int) -> str:
        if step < 0 or step >= self.n_steps:
            return "-"
        st = self.steps[step]
        if int(st["kind"]) == 0 and step == 0:
            return "prefill"
        n_dec = self.n_steps - 1
        return f"decode {step} of {n_dec}"

    def module_path(self, module: int) -> str:
        return str(self.mod_paths[module]) if 0 <= module < len(self.mod_paths) else ""

    def module_name(self, module: int) -> str:
        """A path for display: the root module is shown by its class."""
        p = self.module_path(module)
        if p:
            return p
        return str(self.mod_cls[module]) if 0 <= module < len(self.mod_cls) else "<root>"

    def relative_name(self, idx: StepIndex, i: int) -> str:
        """An event's path relative to its calling module's path (``layers.0`` under the text model)."""
        path = self.module_path(int(idx.module[i]))
        if not path:
            return str(self.mod_cls[int(idx.module[i])])
        p = int(idx.parent[i])
        ppath = self.module_path(int(idx.module[p])) if p >= 0 else ""
        if ppath and path.startswith(ppath + "."):
            path = path[len(ppath) + 1:]
        if int(idx.nth[i]) > 0:
            path += f" #{int(idx.nth[i]) + 1}"
        return path

    def out_shape(self, idx: StepIndex, i: int) -> tuple[int, ...] | None:
        if idx.tensors is not None:
            nd = int(idx.out_ndim[i])
            return tuple(int(d) for d in idx.out_shape[i][:nd]) if nd >= 0 else None
        rows = idx.event_tensors(self, i)
        outs = rows[rows["role"] == ROLE_OUTPUT]
        if not len(outs):
            return None
        nd = int(outs[0]["ndim"])
        return tuple(int(d) for d in outs[0]["shape"][:nd])

    # navigation (in memory once the step is indexed) ----------------------------
    def same_in_step(self, src: StepIndex, item: Item, dst: StepIndex) -> Item:
        """The item of ``dst`` that matches ``item`` of ``src``: same module (and call number),
        same op / probe kind; falls back to the nearest match, then the step node."""
        s = dst.step
        if item[1] == "s" or src.n == 0:
            return (s, "s", -1)
        ev = src.event_of(item)
        if ev < 0:
            return (s, "s", -1)
        mod, nth = int(src.module[ev]), int(src.nth[ev])
        cand = np.nonzero(dst.module == mod)[0]
        if len(cand) == 0:
            pat = self.mod_pattern[mod] if mod < len(self.mod_pattern) else -1
            cand = np.nonzero(self.mod_pattern[dst.module] == pat)[0] if dst.n else cand
            if len(cand) == 0:
                # walk up to the nearest ancestor that exists in dst
                p = int(src.parent[ev])
                while p >= 0:
                    c = np.nonzero(dst.module == src.module[p])[0]
                    if len(c):
                        return dst.canonical((s, "e", int(c[0])))
                    p = int(src.parent[p])
                return (s, "s", -1)
        same = cand[dst.nth[cand] == nth]
        target = int(same[0]) if len(same) else int(cand[min(nth, len(cand) - 1)])
        if item[1] == "e" or item[1] == "s":
            return dst.canonical((s, "e", target))
        # a reshape or probe: same op / kind and occurrence in the matched call
        if item[1] == "r":
            r = src.reshapes[item[2]]
            kids = np.nonzero(dst.r_event == target)[0]
            for k in kids:
                if dst.reshapes[k]["op"] == r["op"] and dst.reshapes[k]["nth"] == r["nth"]:
                    return (s, "r", int(k))
            for k in kids:
                if dst.reshapes[k]["op"] == r["op"]:
                    return (s, "r", int(k))
        else:
            p = src.probes[item[2]]
            kids = np.nonzero(dst.p_event == target)[0]
            for k in kids:
                if dst.probes[k]["kind"] == p["kind"] and dst.probes[k]["name"] == p["name"]:
                    return (s, "p", int(k))
        return dst.canonical((s, "e", target))

    def next_same_depth(self, idx: StepIndex, item: Item, forward: bool, filt: str) -> Item | None:
        """The next (or previous) call at the same depth of the same kind of module: the next layer.

        "Same kind" is the module path with layer numbers wildcarded; when no such call follows,
        any module call at the same depth. Reshapes and probes move to the matching one in the
        next layer."""
        s, kind, i = item
        if kind == "s" or idx.n == 0:
            return None
        ev = idx.event_of(item)
        if ev < 0:
            return None
        depth, pat = idx.depth[ev], self.mod_pattern[idx.module[ev]]
        seq = idx.seq[ev]
        same_depth = idx.depth == depth
        after = (idx.seq > seq) if forward else (idx.seq < seq)
        vis = np.ones(idx.n, dtype=bool)
        if filt in ("reshapes", "probes", "failing"):
            vis = {"reshapes": idx.has_reshape, "probes": idx.has_probe, "failing": idx.failing_sub}[filt]
        for extra in (self.mod_pattern[idx.module] == pat, np.ones(idx.n, dtype=bool)):
            cand = np.nonzero(same_depth & after & vis & extra)[0]
            if len(cand):
                j = int(cand[np.argmin(idx.seq[cand])] if forward else cand[np.argmax(idx.seq[cand])])
                if kind == "e":
                    return idx.canonical((s, "e", j))
                # reshape / probe: the matching child of the next layer's call
                return self._child_like(idx, item, j)
        return None

    def _child_like(self, idx: StepIndex, item: Item, j: int) -> Item:
        s, kind, i = item
        if kind == "r":
            r = idx.reshapes[i]
            for k in np.nonzero(idx.r_event == j)[0]:
                if idx.reshapes[k]["op"] == r["op"] and idx.reshapes[k]["nth"] == r["nth"]:
                    return (s, "r", int(k))
        elif kind == "p":
            p = idx.probes[i]
            for k in np.nonzero(idx.p_event == j)[0]:
                if idx.probes[k]["kind"] == p["kind"] and idx.probes[k]["name"] == p["name"]:
                    return (s, "p", int(k))
        return idx.canonical((s, "e", j))

    def search(self, idx: StepIndex, query: str, after_seq: int, filt: str) -> tuple[Item | None, int]:
        """First call in the step whose module path matches ``query`` after ``after_seq`` (wrapping).
        Returns (item, number of matches in the step)."""
        mods = match_paths(self.mod_paths, query)
        if len(mods) == 0 or idx.n == 0:
            return None, 0
        hit = np.isin(idx.module, mods)
        if filt in ("reshapes", "probes", "failing"):
            hit &= {"reshapes": idx.has_reshape, "probes": idx.has_probe, "failing": idx.failing_sub}[filt]
        cand = np.nonzero(hit)[0]
        if len(cand) == 0:
            return None, 0
        cand = cand[np.argsort(idx.seq[cand])]
        later = cand[idx.seq[cand] > after_seq]
        j = int(later[0]) if len(later) else int(cand[0])
        return idx.canonical((idx.step, "e", j)), len(cand)

    # probes ----------------------------------------------------------------------
    def probe_value(self, row: np.void) -> np.ndarray | None:
        return self.trace.probe_value(row)

    def probe_info(self, row: np.void) -> dict:
        try:
            return json.loads(self.s(int(row["info"]))) if int(row["info"]) > 0 else {}
        except json.JSONDecodeError:
            return {}

    def step_probe(self, idx: StepIndex, kind: str, prefer: str | None = None,
                   rows: int | None = None, output: bool | None = None, last: bool = False) -> int:
        """Pick one probe of ``kind`` in the step: preferring modules under ``prefer``, a number of
        leading ``rows``, an output (``out...``) name. Returns a local probe row or -1."""
        kid = self.trace.string_id(kind)
        cand = np.nonzero(idx.probes["kind"] == kid)[0] if kid >= 0 else np.zeros(0, dtype=np.int64)
        if not len(cand):
            return -1
        scored = []
        for k in cand:
            p = idx.probes[k]
            score = 0
            path = self.module_path(int(p["module"]))
            if prefer and (path == prefer or path.startswith(prefer + ".")):
                score += 4
            if rows is not None and int(p["ndim"]) >= 1 and int(p["shape"][0]) == rows:
                score += 2
            if output is not None and self.s(int(p["name"])).startswith("out") == output:
                score += 1
            scored.append((-score, -int(k) if last else int(k)))
        scored.sort()
        return abs(scored[0][1])


def open_model(path: str | os.PathLike) -> TraceModel:
    """Open a trace for the viewer; raises :class:`TraceError` (one line) on bad files."""
    return TraceModel(path)


__all__ = ["FILTERS", "FILTER_LABELS", "Item", "StepIndex", "TraceError", "TraceModel", "Violation",
           "fmt_num", "fmt_shape", "is_glob", "match_paths", "module_pattern", "open_model", "short_site"]
