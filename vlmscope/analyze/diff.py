"""``vlmscope diff``: compare two traces and find the first divergence.

Built on :func:`vlmscope.analyze.align.align`. It reports

- **structural** differences: module calls, tensors or reshapes present on one side only,
  shape and dtype changes;
- **semantic** differences: probe values (position ids, cache lengths, masks, input ids...)
  with the token positions where they differ, and step-table differences;
- **numeric** drift: from the stats (min/max/mean/std/absmax) with dtype-aware tolerances, or
  from max abs / max rel / cosine where both traces saved the tensor as a payload.

The headline is the **first divergence in execution order** (in A's timeline; nodes only in
B are placed after their nearest aligned predecessor).

API::

    rep = diff("a.h5", "b.h5", maps=[...], rtol=None, atol=None)
    rep.same, rep.first, rep.divergences, rep.groups, rep.to_dict()
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from vlmscope.trace import Trace, open_trace

from ._index import TraceIndex
from .aligned import Alignment
from .align import align
from .diff_render import Divergence, fmt_tokens, render
from .maps import MapRules
from .status import DRIFT, MISSING_A, MISSING_B, SAME, SHAPE, STATUS_NAMES  # noqa: F401  (re-exported)

_STEP_FIELDS = ("kind", "status", "input_len", "q_len", "cache_before", "cache_after", "pos_min", "pos_max",
                "mask_shape", "image_tokens")
_KINDS = {0: "prefill", 1: "decode"}
_fmt_tokens = fmt_tokens   # the CLI imports it under this name


@dataclass
class DiffReport:
    trace_a: str
    trace_b: str
    same: bool
    first: Divergence | None
    divergences: list[Divergence]
    groups: list[dict]
    counts: dict[str, dict[str, int]]
    steps: list[dict]
    n_steps: tuple[int, int]
    n_divergent: int = 0
    rtol: float | None = None
    atol: float | None = None
    maps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "a": self.trace_a, "b": self.trace_b, "same": self.same,
            "first_divergence": self.first.to_dict() if self.first else None,
            "n_divergent": self.n_divergent, "n_steps": list(self.n_steps), "counts": self.counts,
            "steps": self.steps, "groups": self.groups, "divergences": [d.to_dict() for d in self.divergences],
            "rtol": self.rtol, "atol": self.atol, "maps": self.maps,
        }


def diff(trace_a: Trace | str | os.PathLike, trace_b: Trace | str | os.PathLike,
         maps: Iterable[str] | str | MapRules | None = None, *, rtol: float | None = None,
         atol: float | None = None, limit: int = 50, alignment: Alignment | None = None) -> DiffReport:
    """Compare two traces. ``limit`` bounds the individual divergences listed (groups cover all)."""
    with ExitStack() as opened:          # the traces opened here are closed on the way out
        ta = trace_a if isinstance(trace_a, Trace) else opened.enter_context(open_trace(trace_a))
        tb = trace_b if isinstance(trace_b, Trace) else opened.enter_context(open_trace(trace_b))
        al = alignment or align(ta, tb, maps, rtol=rtol, atol=atol)
        return _report(al, limit, rtol, atol, maps)


# ============================================================================ report


def _candidates(al: Alignment) -> dict[str, np.ndarray]:
    """Indices into each aligned table of the nodes to report (non-same, not inside a missing call)."""
    A, B = al.ix_a, al.ix_b
    out = {"events": np.nonzero(al.events.status >= MISSING_A)[0]}
    for name, tbl in (("tensors", al.tensors), ("reshapes", al.reshapes), ("probes", al.probes)):
        idx = np.nonzero(tbl.status != SAME)[0]
        if len(idx):
            drop = np.zeros(len(idx), bool)
            # drop rows whose module call exists on one side only (already reported as the call)
            for rows, ix, ev_status, missing in ((tbl.a[idx], A, al.event_status_a, MISSING_B),
                                                 (tbl.b[idx], B, al.event_status_b, MISSING_A)):
                if not (ev_status == missing).any():
                    continue
                has = rows >= 0
                if has.any():
                    e = ix.col(name, "event")[rows[has]].astype(np.int64)
                    m = np.zeros(len(e), bool)
                    ok = e >= 0
                    m[ok] = ev_status[e[ok]] == missing
                    drop[np.nonzero(has)[0]] |= m
            idx = idx[~drop]
        out[name] = idx
    return out


def _report(al: Alignment, limit: int, rtol, atol, maps) -> DiffReport:
    A, B = al.ix_a, al.ix_b
    cand = _candidates(al)
    names = ("events", "tensors", "reshapes", "probes")
    tables = {"events": al.events, "tensors": al.tensors, "reshapes": al.reshapes, "probes": al.probes}
    steps_, tids, idxs, b_only = [], [], [], []
    for tid, name in enumerate(names):
        idx = cand[name]
        steps_.append(tables[name].step_of(idx))
        tids.append(np.full(len(idx), tid, np.int64))
        idxs.append(idx)
        b_only.append(tables[name].a[idx] < 0)
    step = np.concatenate(steps_)
    b_only = np.concatenate(b_only)
    tid = np.concatenate(tids)
    idx = np.concatenate(idxs)
    n_div = len(idx)
    k = min(max(limit, 1), n_div)
    # the first k in execution order: time keys (step, then the order within it) are built only
    # for the candidates in the steps up to the k-th candidate's step, and for nodes only in B
    # (placed in A's timeline after their nearest aligned predecessor, possibly a step earlier)
    upto = np.partition(step, k - 1)[k - 1] if n_div else 0
    near = np.nonzero((step <= upto) | b_only)[0]
    key = np.full(n_div, np.iinfo(np.int64).max, np.int64)
    for t, name in enumerate(names):
        sel = near[tid[near] == t]
        key[sel] = tables[name].time_of(idx[sel])
    if len(near) > k:   # everything up to the k-th key (ties included), then exactly k in order
        near = near[key[near] <= np.partition(key[near], k - 1)[k - 1]]
    top = near[np.lexsort((idx[near], tid[near], key[near]))][:k]
    divs = [render(al, names[int(tid[j])], int(idx[j])) for j in top]
    steps = _step_diffs(A, B)
    counts = {"calls": al.events.counts(), "tensors": al.tensors.counts(), "reshapes": al.reshapes.counts(),
              "probes": al.probes.counts()}
    groups = _groups(al, tid, idx, step)
    same = n_div == 0 and not steps and A.n_steps == B.n_steps
    first = divs[0] if divs else None
    if first is None and steps:
        s0 = steps[0]
        first = Divergence("semantic", "step", "drift", s0["step"], "", s0["field"], show_value(s0["a"]),
                           show_value(s0["b"]), "step table differs")
    if first is None and A.n_steps != B.n_steps:
        first = Divergence("structural", "step", "missing_in_b" if A.n_steps > B.n_steps else "missing_in_a",
                           min(A.n_steps, B.n_steps), "", "steps", f"{A.n_steps} steps", f"{B.n_steps} steps",
                           "the traces have a different number of steps")
    return DiffReport(str(al.trace_a.path), str(al.trace_b.path), same, first, divs, groups, counts, steps,
                      (A.n_steps, B.n_steps), n_div, rtol, atol,
                      [p.pattern + "=" + r for p, r in al.maps.modules] + [f"arg:{p.pattern}={r}" for p, r in al.maps.args])


def _groups(al: Alignment, tid: np.ndarray, idx: np.ndarray, step_all: np.ndarray, max_groups: int = 200) -> list[dict]:
    """Divergences summarised per (table, module, status): count, first and last step, in
    order of their first occurrence."""
    if not len(idx):
        return []
    A, B = al.ix_a, al.ix_b
    names = ("events", "tensors", "reshapes", "probes")
    n_mod = max(len(A.module_paths), len(B.module_paths)) + 1
    rows = []
    for t in range(4):
        sel = np.nonzero(tid == t)[0]
        if not len(sel):
            continue
        tbl = getattr(al, names[t])
        i = idx[sel]
        a, b = tbl.a[i], tbl.b[i]
        mod = _node_modules(A, B, names[t], a, b)
        side = (a < 0).astype(np.int64)
        st = tbl.status[i].astype(np.int64)
        step = step_all[sel]
        # a dense group key (side, module, status): counted with bincount, no sorting
        gk = (side * n_mod + mod + 1) * 8 + st
        cnt_all = np.bincount(gk)
        u = np.nonzero(cnt_all)[0]
        cnt = cnt_all[u]
        dense = np.full(len(cnt_all), -1, np.int64)
        dense[u] = np.arange(len(u))
        inv = dense[gk]
        smin = np.full(len(u), np.iinfo(np.int64).max)
        smax = np.full(len(u), -1)
        np.minimum.at(smin, inv, step)
        np.maximum.at(smax, inv, step)
        # first occurrence: the earliest time key among each group's nodes of its first step
        first = np.nonzero((step == smin[inv]) | (a < 0))[0]
        kmin = np.full(len(u), np.iinfo(np.int64).max)
        np.minimum.at(kmin, inv[first], tbl.time_of(i[first]))
        for j in range(len(u)):
            g = int(u[j])
            sd, m = divmod(g // 8, n_mod)
            m -= 1
            path = (A if sd == 0 else B).module_path(m) if m >= 0 else "<outside modules>"
            rows.append({"table": names[t], "module": path, "status": STATUS_NAMES[g % 8],
                         "count": int(cnt[j]), "first_step": int(smin[j]), "last_step": int(smax[j]),
                         "_k": int(kmin[j])})
    rows.sort(key=lambda r: r["_k"])
    for r in rows:
        r.pop("_k")
    return rows[:max_groups]


def _node_modules(A: TraceIndex, B: TraceIndex, table: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The module of each node (A's row where there is one, else B's; -1 outside any module)."""
    mod = np.full(len(a), -1, np.int64)
    for side, ix, rows in ((a >= 0, A, a), (a < 0, B, b)):
        if side.any():
            r = rows[side]
            mod[side] = ix.event_module[ix.col("tensors", "event")[r]] if table == "tensors" else \
                ix.col(table, "module")[r]
    return mod


def show_value(v) -> str:
    """A step-table value as shown: None (not recorded, no mask) is "-"."""
    if v is None:
        return "-"
    if isinstance(v, list):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    return str(v)


def _step_diffs(A: TraceIndex, B: TraceIndex, limit: int = 200) -> list[dict]:
    """The step-table fields that differ, with their real values only: the positions' ranges of the
    rows used (``pos_min`` / ``pos_max``, one value per position row), the mask's shape without
    its padding (None when the step has no mask), None for a count not recorded (-1)."""
    n = min(A.n_steps, B.n_steps)
    if not n:
        return []
    sa, sb = A.steps[:n], B.steps[:n]
    out = []
    for s in range(n):
        ra, rb = _step_values(sa[s]), _step_values(sb[s])
        for f in _STEP_FIELDS:
            if ra[f] != rb[f]:
                out.append({"step": s, "field": f, "a": ra[f], "b": rb[f]})
                if len(out) >= limit:
                    return out
    return out


def _step_values(st: np.void) -> dict:
    """One step row's fields as shown: padding stripped, unused rows omitted, -1 as None."""
    rows = max(int(st["pos_rows"]), 0)
    md = int(st["mask_ndim"])

    def opt(k: str) -> int | None:
        v = int(st[k])
        return v if v >= 0 else None

    return {
        "kind": _KINDS.get(int(st["kind"]), int(st["kind"])), "status": int(st["status"]),
        "input_len": opt("input_len"), "q_len": opt("q_len"),
        "cache_before": opt("cache_before"), "cache_after": opt("cache_after"),
        "pos_min": [int(x) for x in st["pos_min"][:rows]] or None,
        "pos_max": [int(x) for x in st["pos_max"][:rows]] or None,
        "mask_shape": [int(d) for d in st["mask_shape"][:md]] if md > 0 else None,
        "image_tokens": opt("image_tokens"),
    }


__all__ = ["diff", "DiffReport", "Divergence", "SAME", "SHAPE", "DRIFT", "MISSING_A", "MISSING_B"]
