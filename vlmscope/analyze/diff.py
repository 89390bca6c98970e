"""``vlmscope diff``: compare two traces and find the first divergence.

Built on :func:`vlmscope.analyze.align.align`. It reports

- **structural** differences: module calls, tensors or reshapes present on one side only,
  shape and dtype changes;
- **semantic** differences: probe values (position ids, cache lengths, masks, input ids...)
  with the token positions where they differ, and step-table differences;
- **numeric** drift: from the stats (min/max/mean/std/absmax) with dtype-aware tolerances, or
  from max abs / max rel / cosine where both traces saved the tensor as a payload.

Semantic divergences (positions, mask, cache lengths, image spans) are headlined first. Then
the **culprit** (:mod:`.culprit`): the first module, in data-flow order, whose inputs agree with
the other run and whose outputs do not, found on the value sketches where both traces hold
them; and, separately, the **first divergence detected** in execution order (in A's timeline;
nodes only in B are placed after their nearest aligned predecessor), which may lie downstream
of the culprit.

Two implementations with different module names are aligned by an inferred module map
(:mod:`.automap`; ``--map`` rules take precedence); ``only`` / ``ignore`` glob patterns set the
scope of the culprit search and of the listed divergences.

API::

    rep = diff("a.h5", "b.h5", maps=[...], rtol=None, atol=None)
    rep.same, rep.first, rep.divergences, rep.groups, rep.to_dict()
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from vlmscope.semantics import runs
from vlmscope.trace import Trace, open_trace

from ._index import TraceIndex, index_of
from .aligned import Alignment
from .align import align
from .diff_render import Divergence, fmt_tokens, render
from .automap import ModuleMap, in_scope, infer_map
from .compare import blobs_differ
from .culprit import Culprit, localize
from .maps import MapRules, parse_maps
from .worker import TablePrefetch
from .status import DRIFT, MISSING_A, MISSING_B, SAME, SHAPE, STATUS_NAMES  # noqa: F401  (re-exported)

_STEP_FIELDS = ("kind", "status", "input_len", "q_len", "cache_before", "cache_after", "pos_min", "pos_max",
                "mask_shape", "image_tokens")
_KINDS = {0: "prefill", 1: "decode"}
_fmt_tokens = fmt_tokens   # the CLI imports it under this name

#: said under the first tensor divergence when no culprit (the first module whose inputs agree
#: and whose outputs do not) is established: the first node detected may lie downstream
FIRST_CAVEAT = ("the first divergence detected may lie downstream of its cause, and no culprit is established "
                "(see the culprit line)")
#: said instead when a culprit is named but tentative (some of its inputs were compared by summary
#: statistics only, see its note)
FIRST_CAVEAT_TENTATIVE = ("the first divergence detected may lie downstream of its cause, and the culprit named "
                          "is tentative (see its note)")


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
    semantic: list = field(default_factory=list)          # SemanticDivergence, in step order
    semantic_counts: dict[str, int] = field(default_factory=dict)   # field -> step pairs where it differs
    semantic_steps: list[dict] = field(default_factory=list)       # A and B side by side, per differing step
    culprit: Culprit | None = None
    module_map: ModuleMap | None = None
    only: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    cross: bool = False      # two implementations, aligned by an inferred module map

    @property
    def culprit_established(self) -> bool:
        c = self.culprit
        return c is not None and c.status in ("found", "upstream") and c.caveat is None

    @property
    def first_caveat(self) -> str | None:
        """What to say under the first tensor divergence detected, or None when a culprit is
        established (or nothing diverges)."""
        if not self.n_divergent or self.culprit_established:
            return None
        c = self.culprit
        return FIRST_CAVEAT_TENTATIVE if c is not None and c.status in ("found", "upstream") else FIRST_CAVEAT

    @property
    def first_semantic(self):
        return self.semantic[0] if self.semantic else None

    def to_dict(self) -> dict:
        return {
            "a": self.trace_a, "b": self.trace_b, "same": self.same,
            "first_semantic": self.semantic[0].to_dict() if self.semantic else None,
            "semantic": [d.to_dict() for d in self.semantic], "semantic_counts": self.semantic_counts,
            "semantic_steps": self.semantic_steps,
            "culprit": self.culprit.to_dict() if self.culprit else None,
            "first_divergence": self.first.to_dict() if self.first else None,
            "first_divergence_caveat": self.first_caveat,
            "module_map": self.module_map.to_dict() if self.module_map is not None and not self.module_map.identity
            else None,
            "only": self.only, "ignore": self.ignore, "cross_implementation": self.cross,
            "n_divergent": self.n_divergent, "n_steps": list(self.n_steps), "counts": self.counts,
            "steps": self.steps, "groups": self.groups, "divergences": [d.to_dict() for d in self.divergences],
            "rtol": self.rtol, "atol": self.atol, "maps": self.maps,
        }


def diff(trace_a: Trace | str | os.PathLike, trace_b: Trace | str | os.PathLike,
         maps: Iterable[str] | str | MapRules | None = None, *, rtol: float | None = None,
         atol: float | None = None, limit: int = 50, alignment: Alignment | None = None,
         only: Iterable[str] | None = None, ignore: Iterable[str] | None = None, auto_map: bool = True) -> DiffReport:
    """Compare two traces. ``limit`` bounds the individual divergences listed (groups cover all).
    ``only`` / ``ignore``: glob patterns of module paths (either side's) in scope; ``auto_map``
    infers the module map when the two traces' module paths differ."""
    only, ignore = list(only or []), list(ignore or [])
    with ExitStack() as opened:          # the traces opened here are closed on the way out
        ta = trace_a if isinstance(trace_a, Trace) else opened.enter_context(open_trace(trace_a))
        tb = trace_b if isinstance(trace_b, Trace) else opened.enter_context(open_trace(trace_b))
        rules = parse_maps(maps)
        if alignment is None:
            # the probe and sketch tables, read by a helper process while this one reads the
            # strings, the calls and the streamed tables (big traces only)
            pre = TablePrefetch([ta, tb])
            opened.callback(pre.close)
            pre.start()
        A, B = index_of(ta), index_of(tb)
        mm = infer_map(A, B, rules) if auto_map else None
        path_map = _path_map(mm)
        al = alignment or align(ta, tb, rules, rtol=rtol, atol=atol, path_map=path_map)
        rep = _report(al, limit, rtol, atol, maps)
        rep.module_map, rep.only, rep.ignore = mm, only, ignore
        if only or ignore:
            _scope(rep, only, ignore)
        rep.culprit = _culprit(A, B, mm, rep, rtol, atol, only, ignore)
        if path_map is not None:
            _cross(rep)
        return rep


def _cross(rep: DiffReport) -> None:
    """Two implementations: nodes on one side only, and the shape-changing ops, are how two
    implementations differ, not divergences (the report keeps them all: counts, groups, the
    node list). The verdict is the localization's over every paired call, and the semantic
    diff's."""
    rep.cross = True
    c = rep.culprit
    rep.same = (c is not None and c.status == "same" and not rep.semantic and rep.n_steps[0] == rep.n_steps[1])


def cross_view(rep: DiffReport) -> tuple[list, list[dict]]:
    """What a reader of two implementations' diff wants listed: value and semantic divergences of
    the nodes paired across them (the divergences and the groups)."""
    keep = lambda d: d.category == "semantic" or (d.status in ("drift", "shape") and d.category != "structural"  # noqa: E731
                                                  and not d.node.startswith("reshape"))
    return ([d for d in rep.divergences if keep(d)],
            [g for g in rep.groups if g["status"] in ("drift", "shape") and g["table"] in ("tensors", "probes")])


def _path_map(mm: ModuleMap | None) -> dict[int, str] | None:
    if mm is None or mm.identity:
        return None
    return {a: mm.paths_b[b] for a, b in mm.one_to_one().items()}


def diff_alignment(ta: Trace, tb: Trace, maps: Iterable[str] | str | MapRules | None = None, *,
                   rtol: float | None = None, atol: float | None = None) -> Alignment:
    """The node-by-node alignment ``diff`` uses (the inferred module map applied), for the
    viewer's diff mode."""
    rules = parse_maps(maps)
    return align(ta, tb, rules, rtol=rtol, atol=atol, path_map=_path_map(infer_map(index_of(ta), index_of(tb), rules)))


def _scope(rep: DiffReport, only: list[str], ignore: list[str]) -> None:
    """Keep the listed divergences and groups of modules in scope."""
    keep = lambda d: in_scope(d.module or "", only, ignore) or in_scope(d.module_b or "", only, ignore)  # noqa: E731
    rep.divergences = [d for d in rep.divergences if keep(d)]
    rep.groups = [g for g in rep.groups if in_scope(g["module"] if g["module"] != "<outside modules>" else "",
                                                    only, ignore)]
    if rep.first is not None and rep.first.category != "semantic" and not keep(rep.first):
        rep.first = rep.divergences[0] if rep.divergences else None


def _culprit(A: TraceIndex, B: TraceIndex, mm: ModuleMap | None, rep: DiffReport, rtol, atol,
             only: list[str], ignore: list[str]) -> Culprit | None:
    """Localize from the first step pair where anything differs (a port's module map: from the
    first step, since tensors of differently named arguments are not aligned node by node)."""
    if mm is None:
        return None
    sa, sb = _step_pairs(A, B)
    if not len(sa):
        return None
    cross = not mm.identity
    if not cross:
        if rep.n_divergent == 0:
            return localize(A, B, mm, (sa, sb), max_steps=0)
        first_step = min([d.step for d in rep.divergences[:1]] + [s.step for s in rep.semantic[:1]]
                         or [0])
        start = int(np.searchsorted(sa, first_step)) if len(sa) else 0
        c = localize(A, B, mm, (sa, sb), rtol=rtol, atol=atol, only=only, ignore=ignore,
                     start=min(start, len(sa) - 1), max_steps=2)
        if c.status == "same":
            c = Culprit("unknown", int(sa[min(start, len(sa) - 1)]), int(sb[min(start, len(sa) - 1)]),
                        reason="no paired call's outputs differ in value or shape where the divergences begin: "
                               "they are structural (calls, tensors or ops on one side only) or lie in "
                               "tensors no call returns", sketches=c.sketches)
        return c
    return localize(A, B, mm, (sa, sb), rtol=rtol, atol=atol, only=only, ignore=ignore)


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
    semantic, sem_counts, sem_steps = semantic_diff(A, B)
    same = n_div == 0 and not steps and not semantic and A.n_steps == B.n_steps
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
                      [p.pattern + "=" + r for p, r in al.maps.modules] + [f"arg:{p.pattern}={r}" for p, r in al.maps.args],
                      semantic, sem_counts, sem_steps)


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
    # whole columns first: only steps whose raw fields differ can show a difference
    cand = np.zeros(n, bool)
    for f in (*_STEP_FIELDS, "pos_rows", "mask_ndim"):
        d = sa[f] != sb[f]
        cand |= d.reshape(n, -1).any(axis=1)
    out = []
    for s in np.flatnonzero(cand).tolist():
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



# ============================================================================ semantic comparison
#
# Before any tensor drift: what each step fed the model. Per aligned step pair (steps paired by
# their generate call and their place in it: ``kind == 0`` starts a call), the position ids that
# reached the text model (per batch row and M-RoPE axis), the attention mask that reached the
# decoder layers (its shape, and the keys each query of each row may attend to), the cache length
# before and after, q_len, and the image / video placeholder spans of each row. All read from the
# probes' values (never from their ``info``), so a trace of an older recorder is compared too.

SEM_FIELDS = ("positions", "mask", "cache", "q_len", "image_spans", "video_spans")
SEM_LABELS = {"positions": "positions differ", "mask": "mask differs", "cache": "cache length differs",
              "q_len": "q_len differs", "image_spans": "image spans differ", "video_spans": "video spans differ"}
_SEM_LIMIT = 500     # semantic entries listed (the per-field step counts cover all)


@dataclass
class SemanticDivergence:
    """One semantic difference at one aligned step pair (and batch row, for per-row fields)."""

    step: int                 # A's step
    step_b: int               # B's step (the same place in the same call)
    call: int
    kind: str                 # prefill | decode
    field: str                # one of SEM_FIELDS
    row: int | None           # batch row (None: the step as a whole)
    token: int | None         # first differing token (query, for the mask) within the step
    a: object                 # A's value there (JSON-able; None: not recorded / none)
    b: object
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def headline(self) -> str:
        where = f"step {self.step}" + (f" (B step {self.step_b})" if self.step_b != self.step else "")
        where += f" ({self.kind}" + (f", call {self.call})" if self.call else ")")
        return f"{where}: {SEM_LABELS.get(self.field, self.field)}: {self.detail}"


def _step_pairs(A: TraceIndex, B: TraceIndex) -> tuple[np.ndarray, np.ndarray]:
    """A's and B's steps at the same place: the same call, the same step within it."""
    def keys(ix: TraceIndex) -> np.ndarray:
        n = ix.n_steps
        if not n:
            return np.zeros(0, np.int64)
        call = np.maximum(ix.call_of_step, 0)
        first = ix.call_first_steps
        start = first[call] if len(first) else np.zeros(n, np.int64)
        start = np.where(ix.call_of_step >= 0, start, 0)
        return call * (1 << 32) + (np.arange(n) - start)

    ka, kb = keys(A), keys(B)
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    o = np.argsort(ia, kind="stable")
    return ia[o].astype(np.int64), ib[o].astype(np.int64)


def _pick(ix: TraceIndex, rows: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Per step, the probe row of lowest ``score`` (then the earliest; a negative score never):
    -1 where the step has none."""
    out = np.full(ix.n_steps, -1, np.int64)
    ok = score >= 0
    rows, score = rows[ok], score[ok]
    if not len(rows):
        return out
    step = ix.probes["step"][rows].astype(np.int64)
    o = np.lexsort((rows, score, step))
    r, s = rows[o], step[o]
    first = np.r_[True, s[1:] != s[:-1]]
    r, s = r[first], s[first]
    valid = (s >= 0) & (s < ix.n_steps)
    out[s[valid]] = r[valid]
    return out


def _module_flags(ix: TraceIndex, rows: np.ndarray, flags: np.ndarray) -> np.ndarray:
    m = ix.probes["module"][rows].astype(np.int64)
    ok = (m >= 0) & (m < len(flags))
    out = np.zeros(len(rows), bool)
    out[ok] = flags[m[ok]]
    return out


def _chosen(ix: TraceIndex) -> dict[str, np.ndarray]:
    """The probe row read for each semantic field in each step (-1: none), chosen as the summary
    and the viewer choose them (:mod:`.rows`)."""
    p = ix.probes
    out = {}
    # positions: [3|4, B, S] before [B, S]; the text model's own first; never the vision tower's
    rows = ix.probe_rows("position_ids", text_only=False)
    nd, sh0 = p["ndim"][rows].astype(np.int64), p["shape"][rows, 0].astype(np.int64)
    m3 = (nd == 3) & np.isin(sh0, (3, 4))
    score = np.where(m3, 0, np.where(nd == 2, 2, -100))
    score = score + (p["module"][rows] != ix.text_model_module)
    score[_module_flags(ix, rows, ix.in_vision)] = -1
    out["positions"] = _pick(ix, rows, score)
    # the mask that reached the decoder layers: a 4-D [B, H, Q, K] one before a 2-D token mask, a
    # decoder layer's first; never the vision tower's (by shape first: a trace whose module names
    # its structure metadata does not know still picks the same mask)
    rows = ix.probe_rows("attention_mask", text_only=False)
    nd = p["ndim"][rows].astype(np.int64)
    score = np.where(nd == 4, 0, np.where(nd == 2, 2, -100)) + ~_module_flags(ix, rows, ix.layer_of_module >= 0)
    score[_module_flags(ix, rows, ix.in_vision)] = -1
    out["mask"] = _pick(ix, rows, score)
    # the step's tokens: the first 2-D input_ids (the outermost module's)
    rows = ix.probe_rows("input_ids", text_only=False)
    out["ids"] = _pick(ix, rows, np.where(p["ndim"][rows] == 2, 0, -1))
    return out


def _same_raw_many(A: TraceIndex, ra: np.ndarray, B: TraceIndex, rb: np.ndarray) -> np.ndarray:
    """Per pair of probe rows: do they hold the very same values (same encoding, shape and
    bytes; two absent probes count as the same)? The bytes are compared by :func:`blobs_differ`."""
    ra, rb = np.asarray(ra, np.int64), np.asarray(rb, np.int64)
    out = (ra < 0) & (rb < 0)
    both = np.flatnonzero((ra >= 0) & (rb >= 0))
    if not len(both):
        return out
    x, y = ra[both], rb[both]
    pa, pb = A.probes, B.probes
    nd = pa["ndim"][x].astype(np.int64)
    live = np.arange(pa["shape"].shape[1])[None, :] < nd[:, None]
    same = (pa["enc"][x] == pb["enc"][y]) & (nd == pb["ndim"][y]) & \
        ~((pa["shape"][x] != pb["shape"][y]) & live).any(axis=1)
    same &= ~blobs_differ(A, B, x, y)
    out[both] = same
    return out


def _val(ix: TraceIndex, row: int) -> np.ndarray | None:
    if row < 0:
        return None
    try:
        return ix.value(row)
    except Exception:  # noqa: BLE001 - a damaged probe: read as not recorded
        return None


def _axes(v: np.ndarray | None) -> np.ndarray | None:
    """Position ids as [R, B, S]: the t/h/w axes of M-RoPE (a text row of [4, B, S] left out, as
    in the step table), one row for 1-D RoPE."""
    if v is None or v.ndim not in (2, 3):
        return None
    v = np.asarray(v, np.int64)
    v = v[None] if v.ndim == 2 else v
    return v[1:] if v.shape[0] == 4 else v


_AXIS_NAMES = {1: "pos", 3: "t/h/w"}


def _cmp_positions(pa: np.ndarray | None, pb: np.ndarray | None) -> list[tuple]:
    """(row, token, a, b, detail) for each batch row whose positions differ. 1-D positions are
    compared with each M-RoPE axis (1-D RoPE is M-RoPE with t = h = w)."""
    if pa is None or pb is None:
        if pa is None and pb is None:
            return []
        got = pa if pa is not None else pb
        return [(None, None, None if pa is None else list(pa.shape), None if pb is None else list(pb.shape),
                 f"recorded in {'A' if pa is not None else 'B'} only ({_AXIS_NAMES.get(got.shape[0], 'rows')}, "
                 f"{got.shape[-1]} tokens)")]
    note = ""
    if pa.shape[0] != pb.shape[0]:
        if 1 in (pa.shape[0], pb.shape[0]):
            n = max(pa.shape[0], pb.shape[0])
            note = f" ({'A' if pa.shape[0] == 1 else 'B'}'s 1-D positions compared on each axis)"
            pa, pb = np.broadcast_to(pa, (n,) + pa.shape[1:]), np.broadcast_to(pb, (n,) + pb.shape[1:])
        else:
            return [(None, None, pa.shape[0], pb.shape[0], f"{pa.shape[0]} vs {pb.shape[0]} position rows")]
    out = []
    names = _AXIS_NAMES.get(pa.shape[0], f"{pa.shape[0]} rows")
    for b in range(min(pa.shape[1], pb.shape[1])):
        S = min(pa.shape[-1], pb.shape[-1])
        bad = (pa[:, b, :S] != pb[:, b, :S]).any(axis=0)
        if bad.any():
            t = int(np.argmax(bad))
            va, vb = pa[:, b, t].tolist(), pb[:, b, t].tolist()
            out.append((b, t, va, vb, f"row {b} {names} {va} vs {vb} at token {t}{note}"))
        elif pa.shape[-1] != pb.shape[-1]:
            out.append((b, S, pa.shape[-1], pb.shape[-1],
                        f"row {b}: {pa.shape[-1]} vs {pb.shape[-1]} tokens, the same up to token {S}{note}"))
    if pa.shape[1] != pb.shape[1]:
        out.append((None, None, pa.shape[1], pb.shape[1], f"{pa.shape[1]} vs {pb.shape[1]} batch rows"))
    return out


def _allowed(v: np.ndarray | None, st: np.void) -> tuple[np.ndarray | None, str]:
    """Keys allowed per batch row and query ([B, Q]) and the mask's shape as shown. Without a mask
    (SDPA's ``is_causal``) the implicit causal mask: query i sees the cache and tokens 0..i."""
    if v is None:
        q, cb = int(st["q_len"]), max(int(st["cache_before"]), 0)
        if q <= 0:
            return None, "-"
        return (cb + np.arange(1, q + 1))[None], "- (causal)"
    v = np.asarray(v, bool)
    shape = "x".join(str(d) for d in v.shape)
    if v.ndim == 2:                       # [B, K]: one row of keys per batch row
        return v.sum(axis=-1)[:, None], shape
    if v.ndim == 4:                       # [B, H, Q, K]: the first head (heads share it)
        return v[:, 0].sum(axis=-1), shape
    return None, shape


def _cmp_mask(va, vb, sta: np.void, stb: np.void) -> list[tuple]:
    ca, sha = _allowed(va, sta)
    cb, shb = _allowed(vb, stb)
    out = []
    if va is not None and vb is not None and va.shape != vb.shape:
        out.append((None, None, list(va.shape), list(vb.shape), f"shape {sha} vs {shb}"))
    if ca is None or cb is None:      # a side whose mask is not known (not recorded, no q_len): no verdict
        return out
    bcast = ca.shape[0] == 1 or cb.shape[0] == 1
    for b in range(max(ca.shape[0], cb.shape[0]) if bcast else min(ca.shape[0], cb.shape[0])):
        ra, rb = ca[min(b, ca.shape[0] - 1)], cb[min(b, cb.shape[0] - 1)]
        Q = min(len(ra), len(rb))
        bad = ra[:Q] != rb[:Q]
        if not bad.any() and len(ra) != len(rb):
            out.append((b, Q, len(ra), len(rb), f"row {b}: {len(ra)} vs {len(rb)} queries ({sha} vs {shb}), "
                                                f"the same keys allowed up to query {Q}"))
        elif bad.any():
            t = int(np.argmax(bad))
            ka = int(ra[t]) if t < len(ra) else None
            kb = int(rb[t]) if t < len(rb) else None
            out.append((b, t, ka, kb, f"row {b} query {t}: {show_value(ka)} ({sha}) vs {show_value(kb)} ({shb}) "
                                       "keys allowed"))
    return out


def _spans_of(ids: np.ndarray | None, tok: int | None) -> list[list[list[int]]] | None:
    """Per batch row, the [start, end) runs of placeholder token ``tok``."""
    if ids is None or ids.ndim != 2 or tok is None:
        return None
    return [[[a, e] for a, e in runs(row)] for row in np.asarray(ids) == tok]


def _cmp_spans(sa, sb) -> list[tuple]:
    if sa is None or sb is None:
        return []                       # not recorded (or no token id) on one side: nothing to say
    out = []
    for b in range(min(len(sa), len(sb))):
        if sa[b] != sb[b]:
            k = next((i for i, (x, y) in enumerate(zip(sa[b], sb[b])) if x != y), min(len(sa[b]), len(sb[b])))
            tok = (sa[b][k] if k < len(sa[b]) else sb[b][k])[0]
            out.append((b, tok, sa[b], sb[b], f"row {b} {_fmt_spans(sa[b])} vs {_fmt_spans(sb[b])}"))
    return out


def _fmt_spans(sp: list[list[int]] | None, limit: int = 3) -> str:
    if sp is None:
        return "-"
    if not sp:
        return "none"
    s = ", ".join(f"{a}..{e - 1}" for a, e in sp[:limit])
    return s + (f" (+{len(sp) - limit})" if len(sp) > limit else "")


def _token_ids(ix: TraceIndex) -> tuple[int | None, int | None]:
    """(image, video) placeholder token ids: the recognised structure's, the rope config's, the
    model config's."""
    rope = ix.rope_config

    def first(*vals):
        return next((int(v) for v in vals if isinstance(v, (int, np.integer)) and not isinstance(v, bool)), None)

    cfg = ix.config if isinstance(ix.config, dict) else {}
    return (first(ix.meta.get("image_token_id"), rope.get("image_token_id"), cfg.get("image_token_id")),
            first(rope.get("video_token_id"), cfg.get("video_token_id")))


def _fmt_positions(p: np.ndarray | None, limit: int = 2) -> str:
    """Per row, the range of each axis over the step's tokens (``0..40 x3``)."""
    if p is None:
        return "-"
    from .rows import fmt_ranges

    names = ["t", "h", "w"] if p.shape[0] == 3 else None
    cells = []
    for b in range(min(p.shape[1], limit)):
        r = [[int(x.min()), int(x.max())] for x in p[:, b]] if p.shape[-1] else []
        cells.append(fmt_ranges(r, names))
    s = "; ".join(cells) if p.shape[1] == 1 else "; ".join(f"r{b} {c}" for b, c in enumerate(cells))
    return s + (f"; +{p.shape[1] - limit} rows" if p.shape[1] > limit else "")


def _fmt_mask(v: np.ndarray | None, st: np.void) -> str:
    c, shape = _allowed(v, st)
    if c is None:
        return shape
    lo, hi = int(c.min()), int(c.max())
    return f"{shape}, keys {lo}" + (f"..{hi}" if hi != lo else "")


def _fmt_cache(st: np.void) -> str:
    a, b = int(st["cache_before"]), int(st["cache_after"])
    return f"{a if a >= 0 else '-'} -> {b if b >= 0 else '-'}"


def semantic_diff(A: TraceIndex, B: TraceIndex, limit: int = _SEM_LIMIT,
                  table_limit: int = 50) -> tuple[list[SemanticDivergence], dict[str, int], list[dict]]:
    """The semantic differences of every aligned step pair, in A's step order (then field, then row);
    the number of step pairs where each field differs; and, for the first ``table_limit`` step pairs
    that differ, every field of A and B side by side (``{"step", "step_b", "call", "kind", "cells":
    [{"field", "a", "b", "differs"}]}``)."""
    out: list[SemanticDivergence] = []
    counts = {f: 0 for f in SEM_FIELDS}
    table: list[dict] = []
    sa_idx, sb_idx = _step_pairs(A, B)
    if not len(sa_idx):
        return out, counts, table
    ca, cb = _chosen(A), _chosen(B)
    ida, idb = _token_ids(A), _token_ids(B)
    stA, stB = A.steps, B.steps
    calls = np.maximum(A.call_of_step, 0)
    # whole-column comparisons first: the per-step work is only for the steps that may differ
    # -1 is "not recorded" (an imported dump, a model without a cache): only known values differ
    def differ(f: str) -> np.ndarray:
        a, b = stA[f][sa_idx], stB[f][sb_idx]
        return (a != b) & (a >= 0) & (b >= 0)

    q_d = differ("q_len")
    c_d = differ("cache_before") | differ("cache_after")
    # the probes read, compared for every step pair at once (both none: the same, e.g. causal)
    same = {k: _same_raw_many(A, ca[k][sa_idx], B, cb[k][sb_idx]) for k in ("positions", "mask", "ids")}
    same["ids"] &= ida == idb
    todo = ~(same["positions"] & same["mask"] & same["ids"]) | q_d | c_d
    for j in np.flatnonzero(todo).tolist():
        s, t = int(sa_idx[j]), int(sb_idx[j])
        ra, rb = {k: int(v[s]) for k, v in ca.items()}, {k: int(v[t]) for k, v in cb.items()}
        same_pos, same_mask, same_ids = bool(same["positions"][j]), bool(same["mask"][j]), bool(same["ids"][j])
        sta, stb = stA[s], stB[t]
        kind = _KINDS.get(int(sta["kind"]), str(int(sta["kind"])))
        pa = _axes(_val(A, ra["positions"])) if not same_pos else None
        pb = _axes(_val(B, rb["positions"])) if not same_pos else None
        ma = _val(A, ra["mask"]) if not same_mask else None
        mb = _val(B, rb["mask"]) if not same_mask else None
        found: dict[str, list[tuple]] = {
            "positions": [] if same_pos else _cmp_positions(pa, pb),
            "mask": [] if same_mask else _cmp_mask(ma, mb, sta, stb),
            "cache": [(None, None, [int(sta["cache_before"]), int(sta["cache_after"])],
                       [int(stb["cache_before"]), int(stb["cache_after"])],
                       f"{_fmt_cache(sta)} vs {_fmt_cache(stb)}")] if c_d[j] else [],
            "q_len": [(None, None, int(sta["q_len"]), int(stb["q_len"]),
                       f"{int(sta['q_len'])} vs {int(stb['q_len'])} tokens")] if q_d[j] else [],
        }
        ia = ib = None
        if not same_ids:
            ia, ib = _val(A, ra["ids"]), _val(B, rb["ids"])
        spans = {}
        for f, k in (("image_spans", 0), ("video_spans", 1)):
            spans[f] = (_spans_of(ia, ida[k]), _spans_of(ib, idb[k])) if not same_ids else (None, None)
            found[f] = _cmp_spans(*spans[f])
        if not any(found.values()):
            continue
        call = int(calls[s]) if s < len(calls) else 0
        for f in SEM_FIELDS:
            if found[f]:
                counts[f] += 1
            for row, tok, a, b, detail in found[f]:
                if len(out) < limit:
                    out.append(SemanticDivergence(s, t, call, kind, f, row, tok, a, b, detail))
        if len(table) < table_limit:
            if same_pos:
                pa = pb = _axes(_val(A, ra["positions"]))
            if same_mask:
                ma, mb = _val(A, ra["mask"]), _val(B, rb["mask"])
            cells = [("positions", _fmt_positions(pa), _fmt_positions(pb)),
                     ("mask", _fmt_mask(ma, sta), _fmt_mask(mb, stb)),
                     ("cache", _fmt_cache(sta), _fmt_cache(stb)),
                     ("q_len", show_value(int(sta["q_len"]) if sta["q_len"] >= 0 else None),
                      show_value(int(stb["q_len"]) if stb["q_len"] >= 0 else None))]
            for f in ("image_spans", "video_spans"):
                xa, xb = spans[f]
                if same_ids:
                    xa = xb = _spans_of(_val(A, ra["ids"]), ida[0 if f == "image_spans" else 1])
                if f == "video_spans" and not found[f] and not any(xa or []) and not any(xb or []):
                    continue            # no video on either side: no row for it
                cells.append((f, "; ".join(_fmt_spans(r) for r in xa) if xa is not None else "-",
                              "; ".join(_fmt_spans(r) for r in xb) if xb is not None else "-"))
            table.append({"step": s, "step_b": t, "call": call, "kind": kind,
                          "cells": [{"field": f, "a": x, "b": y, "differs": bool(found[f])} for f, x, y in cells]})
    return out, counts, table


__all__ = ["diff", "DiffReport", "Divergence", "SemanticDivergence", "semantic_diff", "SEM_FIELDS", "SAME",
           "SHAPE", "DRIFT", "MISSING_A", "MISSING_B"]
