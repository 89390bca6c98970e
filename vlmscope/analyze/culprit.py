"""Localization: the module whose inputs agree with the other run and whose outputs do not.

The first divergence a diff detects is often downstream of its cause: a module that reorders
rows leaves every summary statistic as it was, and the first module whose statistics move is
some later consumer. :func:`localize` walks the module calls of the first step pair where
anything differs in data-flow order (the order calls *finish*: a child before its parent) and
compares, for every call paired across the traces (by the module map, :mod:`.automap`):

- its **outputs**: its first floating output, against the other call's output of the same name
  and shape (else the same shape);
- its **inputs**: each input paired the same way (masks and caches excepted: the semantic diff
  judges those).

Two tensors agree when their shapes are equal, their statistics agree within the dtype's
tolerance, and, when both traces hold value sketches (:mod:`vlmscope.trace.sketch`), every
token's norm and projections agree within the sketch's resolution. The **culprit** is the first
call whose outputs differ while its inputs agree. When the first call whose outputs differ
got inputs that already differ, the walk goes upstream: to the call that produced those inputs
(a module without a counterpart), or, when the caller passed them on, to the caller, until it
reaches the call in whose own code the difference arose (a splice in the model's ``forward``).
Without sketches, or when a call's inputs were not recorded, agreement is not established and
the result says that the cause may lie upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmscope.trace import ROLE_OUTPUT

from ._index import TraceIndex
from .automap import ModuleMap, in_scope
from .compare import STATS, stats_drift
from .sketchdiff import compare_sketches, sketch_lookup, sketch_table, sketch_tol

#: tolerances (rtol on the magnitude, atol) of statistics when two implementations are compared:
#: two correct kernels of one dtype differ by a few ulps per op, which accumulate over a model
PARITY_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-9), "float32": (1e-4, 1e-5), "float16": (1e-2, 1e-4), "bfloat16": (5e-2, 1e-3),
}
_SKIP_INPUTS = ("mask", "cache", "past_key", "layer_past")


@dataclass
class Culprit:
    """Where two runs part: the culprit call (or why none is established)."""

    status: str                     # found | upstream | inputs | unknown | same
    step_a: int = -1
    step_b: int = -1
    module_a: str | None = None
    module_b: str | None = None
    reason: str = ""
    detected_a: str | None = None   # the first call whose outputs differ (data-flow order)
    detected_b: str | None = None
    walked: list[str] = field(default_factory=list)
    sketches: bool = True           # both traces hold value sketches
    caveat: str | None = None
    kind: str = ""
    seq_a: int = -1                 # the culprit call's place in A's step (its ``seq``)

    def headline(self) -> str:
        step = f"step {self.step_a}" + (f" ({self.kind})" if self.kind else "")
        if self.status == "same":
            return "no module computes differently: every paired call agrees within tolerance"
        b = f" (B: {self.module_b or '<root>'})" if self.module_b is not None else " (no counterpart in B)"
        name = self.module_a or "<root>"
        if self.status in ("found", "upstream"):
            # with a caveat (inputs compared by statistics only) the culprit is named, not established
            lead = "culprit" if self.caveat is None else "tentative culprit"
            return f"{lead}: {name}{b} at {step}: {self.reason}"
        if self.status == "inputs":
            return f"no culprit: the runs' own inputs differ at {step} ({self.reason})"
        return f"culprit not established at {step}: {self.reason}"

    def as_divergence(self) -> dict | None:
        """The culprit call as a divergence record (``Divergence.to_dict()``'s keys), for a viewer
        to place it; None unless a culprit is established."""
        if self.status not in ("found", "upstream"):
            return None
        return {"category": "numeric", "node": "call", "status": "drift", "step": self.step_a,
                "module": self.module_a or "", "module_b": self.module_b or "", "what": "culprit",
                "a": "", "b": "", "detail": self.reason, "tokens": None, "seq_a": self.seq_a, "seq_b": -1,
                "origin": "", "short": "culprit"}

    def to_dict(self) -> dict:
        return {"status": self.status, "step_a": self.step_a, "step_b": self.step_b, "kind": self.kind,
                "module_a": self.module_a, "module_b": self.module_b, "reason": self.reason,
                "first_detected_a": self.detected_a, "first_detected_b": self.detected_b,
                "walked_upstream": self.walked, "sketches": self.sketches, "caveat": self.caveat,
                "headline": self.headline()}


# ============================================================================ one trace's step


class _Step:
    """One step of one trace: its calls and their tensors (small: read by block)."""

    def __init__(self, ix: TraceIndex, step: int):
        self.ix = ix
        st = ix.steps[step]
        e0, ne = int(st["event_start"]), int(st["event_count"])
        t0, nt = int(st["tensor_start"]), int(st["tensor_count"])
        self.e0, self.t0 = e0, t0
        self.ev = ix.rows("events", slice(e0, e0 + ne)) if ne else np.zeros(0, ix.trace.dataset_dtype("events"))
        self.tt = ix.rows("tensors", slice(t0, t0 + nt)) if nt else np.zeros(0, ix.trace.dataset_dtype("tensors"))
        self.by_key = {(int(m), int(n)): i for i, (m, n) in enumerate(zip(self.ev["module"], self.ev["nth"]))}
        sk = sketch_table(ix)
        self.sk = sk
        # each local tensor row's sketch row (-1: none), and the step's sketch values, one read
        # (a step's sketches lie together)
        self.sk_of = sketch_lookup(ix, sk, np.arange(t0, t0 + nt)) if len(sk) else np.full(nt, -1, np.int64)
        self.sk_base, self.sk_vals = 0, None
        have = self.sk_of[self.sk_of >= 0]
        if len(have):
            offs = sk["off"][have].astype(np.int64)
            end = offs + sk["rows"][have].astype(np.int64) * sk["width"][have].astype(np.int64)
            self.sk_base = int(offs.min())
            self.sk_vals = ix.trace.sketch_values(self.sk_base, int(end.max()) - self.sk_base)
        strings = ix.strings
        self.names = [str(strings[x]) for x in self.tt["name"]] if nt else []
        self.dtypes = [str(strings[x]).removeprefix("torch.") for x in self.tt["dtype"]] if nt else []

    def tensors_of(self, i: int) -> tuple[list[int], list[int]]:
        """(input rows, output rows), local to the step's tensor block, of call ``i``."""
        s = int(self.ev["tensor_start"][i]) - self.t0
        n = int(self.ev["tensor_count"][i])
        rows = range(max(s, 0), min(s + n, len(self.tt)))
        ins = [r for r in rows if int(self.tt["role"][r]) != ROLE_OUTPUT]
        outs = [r for r in rows if int(self.tt["role"][r]) == ROLE_OUTPUT]
        return ins, outs

    def shape(self, r: int) -> tuple:
        return tuple(int(d) for d in self.tt["shape"][r][: int(self.tt["ndim"][r])])

    def is_float(self, r: int) -> bool:
        return self.dtypes[r].startswith(("float", "bfloat"))

    def sketch(self, r: int) -> tuple[np.ndarray, float, int] | None:
        """(values [N, width] float16, scale, off) of local tensor row ``r``, or None."""
        j = int(self.sk_of[r])
        if j < 0:
            return None
        sk = self.sk
        n, w, off = int(sk["rows"][j]), int(sk["width"][j]), int(sk["off"][j])
        vals = self.sk_vals[off - self.sk_base:off - self.sk_base + n * w].reshape(n, w)
        return vals, float(sk["scale"][j]), off

    def identity(self, r: int) -> tuple:
        """What makes two tensor rows of this step the same tensor: the shared sketch, else the
        shape, dtype and exact statistics."""
        j = int(self.sk_of[r])
        if j >= 0:
            return ("sketch", int(self.sk["off"][j]))
        t = self.tt[r]
        return ("stats", self.shape(r), self.dtypes[r], float(t["min"]), float(t["max"]), float(t["mean"]),
                float(t["std"]))


# ============================================================================ comparing two tensors


def _tol(dtype: str, rtol: float | None, atol: float | None) -> tuple[float, float]:
    r, a = PARITY_TOLERANCES.get(dtype, (5e-2, 1e-3))
    return (r if rtol is None else rtol), (a if atol is None else atol)


def compare_stats(ra: np.void, rb: np.void, dtype: str, rtol: float | None, atol: float | None) -> str | None:
    """None when the statistics agree, else what differs."""
    if int(ra["nan"]) != int(rb["nan"]) or int(ra["inf"]) != int(rb["inf"]):
        return f"NaN/Inf counts {int(ra['nan'])}/{int(ra['inf'])} vs {int(rb['nan'])}/{int(rb['inf'])}"
    r, a = _tol(dtype, rtol, atol)
    sa = np.array([[float(ra[f]) for f in STATS]])
    sb = np.array([[float(rb[f]) for f in STATS]])
    counts = np.array([[int(ra["nan"]), int(ra["inf"])]])
    if not stats_drift(sa, sb, counts, counts, np.array([r]), np.array([a]))[0]:
        return None
    # they differ (the drift test diff uses): name the statistic that moved most
    with np.errstate(invalid="ignore"):
        d = np.nan_to_num(np.abs(sa[0] - sb[0]), nan=np.inf)
    f = STATS[int(np.argmax(d))]
    return f"{f} {float(ra[f]):.6g} vs {float(rb[f]):.6g}"


# ============================================================================ the walk


@dataclass
class _Pair:
    out: str | None = None          # None agree, str: what differs
    out_known: bool = False
    ins_differ: list[tuple[int, str]] = field(default_factory=list)   # (A local tensor row, what)
    ins_known: bool = False
    strong: bool = False            # established with sketches on both sides


def localize(A: TraceIndex, B: TraceIndex, mm: ModuleMap, step_pairs: tuple[np.ndarray, np.ndarray], *,
             rtol: float | None = None, atol: float | None = None, only: list[str] | None = None,
             ignore: list[str] | None = None, start: int = 0, max_steps: int | None = None) -> Culprit:
    """The culprit over the paired steps ``step_pairs`` (A's and B's step indices), from pair
    ``start`` on (see the module docstring)."""
    sa_all, sb_all = step_pairs
    both_sketched = A.trace.has_sketches() and B.trace.has_sketches()
    end = len(sa_all) if max_steps is None else min(len(sa_all), start + max_steps)
    for k in range(start, end):
        res = _localize_step(A, B, mm, int(sa_all[k]), int(sb_all[k]), rtol, atol, only, ignore, both_sketched)
        if res is not None:
            return res
    c = Culprit("same", sketches=both_sketched)
    if not both_sketched:
        c.caveat = ("the traces hold no value sketches: only summary statistics were compared, which do not "
                    "see reordered or shifted values")
    return c


def _localize_step(A, B, mm, sa, sb, rtol, atol, only, ignore, sketched) -> Culprit | None:
    xa, xb = _Step(A, sa), _Step(B, sb)
    na = len(xa.ev)
    pa = A.module_paths
    kind = "prefill" if int(A.steps[sa]["kind"]) == 0 else "decode"
    # data-flow order: calls by when they finish; a parent finishes with its last child (the same
    # counter value), so among equal ends the call that started later (the deeper one) comes first
    order = np.lexsort((-xa.ev["seq"].astype(np.int64), xa.ev["end_seq"])) if na else np.zeros(0, np.int64)
    roots = _root_inputs_differ(xa, xb)
    if roots is not None:
        return Culprit("inputs", sa, sb, reason=roots, sketches=sketched, kind=kind)
    results: dict[int, _Pair] = {}
    for i in order:
        i = int(i)
        m = int(xa.ev["module"][i])
        if not in_scope(str(pa[m]), only, ignore):
            continue
        res = _result_of(xa, xb, mm, results, i, rtol, atol, sketched)
        if res is None or res.out is None:
            continue
        mb = mm.pairs[m]
        # the first call whose outputs differ
        c = Culprit("found", sa, sb, str(pa[m]), str(B.module_paths[mb]), sketches=sketched, kind=kind,
                    seq_a=int(xa.ev["seq"][i]))
        c.detected_a, c.detected_b = c.module_a, c.module_b
        if res.ins_known and not res.ins_differ:
            c.reason = f"inputs agree, outputs differ ({res.out})"
            if not res.strong:
                c.caveat = _weak(sketched)
            return c
        if not res.ins_known:
            c.status = "unknown"
            c.reason = (f"{c.module_a or '<root>'}'s outputs differ ({res.out}) but its inputs were not recorded "
                        "or have no counterpart: the cause may lie upstream")
            return c
        c = _walk(A, B, mm, xa, xb, i, res, c, results, rtol, atol, sketched)
        if c.module_a is not None and c.status in ("found", "upstream") and not in_scope(c.module_a, only, ignore):
            c.status = "unknown"
            c.reason = (f"the difference arises in {c.module_a or '<root>'}, outside the scope (--only / --ignore): "
                        f"{c.reason}")
        return c
    return None


def _root_inputs_differ(xa: _Step, xb: _Step) -> str | None:
    """What differs between the inputs the two root calls got under the same name (token ids,
    pixels, grids): then no module computes differently, the runs were fed differently."""
    pa, pb = xa.ix.module_paths, xb.ix.module_paths
    ra = [i for i in range(len(xa.ev)) if int(xa.ev["parent"][i]) < 0 and pa[int(xa.ev["module"][i])] == ""]
    rb = [i for i in range(len(xb.ev)) if int(xb.ev["parent"][i]) < 0 and pb[int(xb.ev["module"][i])] == ""]
    if not ra or not rb:
        return None
    ins_a, _ = xa.tensors_of(ra[0])
    ins_b, _ = xb.tensors_of(rb[0])
    by_name = {xb.names[r]: r for r in ins_b}
    for r in ins_a:
        name = xa.names[r]
        if name not in by_name or any(s in name for s in _SKIP_INPUTS):
            continue
        q = by_name[name]
        if xa.shape(r) != xb.shape(q):
            return f"{name}: shape {list(xa.shape(r))} vs {list(xb.shape(q))}"
        if not xa.is_float(r):
            what = compare_stats(xa.tt[r], xb.tt[q], xa.dtypes[r], 0.0, 0.0)
            if what is not None:
                return f"{name}: {what}"
    return None


def _counterpart_call(xb: _Step, mm: ModuleMap, xa: _Step, i: int) -> int | None:
    """B's call of the module the map pairs with A's call ``i``, the same call number (None: none)."""
    mb = mm.pairs.get(int(xa.ev["module"][i]))
    return xb.by_key.get((mb, int(xa.ev["nth"][i]))) if mb is not None else None


def _result_of(xa: _Step, xb: _Step, mm: ModuleMap, results: dict, i: int, rtol, atol, sketched) -> "_Pair | None":
    """Call ``i``'s comparison with its counterpart (already made, or made now); None without one."""
    res = results.get(i)
    if res is None:
        j = _counterpart_call(xb, mm, xa, i)
        if j is not None:
            res = results[i] = _compare_call(xa, xb, i, j, rtol, atol, sketched, mm.identity)
    return res


def _weak(sketched: bool) -> str:
    return ("inputs compared by summary statistics only (no value sketches): a reordering or shift upstream "
            "would not show, so the cause may lie upstream" if not sketched else
            "some inputs were compared by summary statistics only: the cause may lie upstream")


def _compare_call(xa: _Step, xb: _Step, i: int, j: int, rtol, atol, sketched: bool, strict: bool = False) -> _Pair:
    ins_a, outs_a = xa.tensors_of(i)
    ins_b, outs_b = xb.tensors_of(j)
    res = _Pair(strong=True)
    # outputs: A's first floating output, against B's of the same name and shape, else shape
    # outputs: each floating output against B's of the same name and shape, else shape (a
    # tower's pooled features against a port's plain tensor); the first that differs is reported
    used_out: set[int] = set()
    for ra in [r for r in outs_a if xa.is_float(r) and xa.shape(r)] or outs_a:
        rb = _partner(xa, xb, ra, [r for r in outs_b if r not in used_out])
        if rb is None:
            if strict:
                # one implementation: the same output with another shape is a divergence
                same = [r for r in outs_b if xb.names[r] == xa.names[ra] and r not in used_out]
                if same:
                    used_out.add(same[0])
                    res.out_known = True
                    if res.out is None:
                        res.out = f"{xa.names[ra]}: shape {list(xa.shape(ra))} vs {list(xb.shape(same[0]))}"
            continue
        used_out.add(rb)
        res.out_known = True
        what, strong = _compare(xa, xb, ra, rb, rtol, atol)
        res.strong &= strong
        if what is not None and res.out is None:
            res.out = what
    # inputs: each (masks and caches aside) against B's of the same name and shape, else the
    # first floating inputs of the same shape, in order
    used: set[int] = set()
    cand_b = [r for r in ins_b if not any(s in xb.names[r] for s in _SKIP_INPUTS)]
    for ra in ins_a:
        if any(s in xa.names[ra] for s in _SKIP_INPUTS):
            continue
        rb = _partner(xa, xb, ra, [r for r in cand_b if r not in used])
        if rb is None:
            continue
        used.add(rb)
        res.ins_known = True
        what, strong = _compare(xa, xb, ra, rb, rtol, atol)
        res.strong &= strong
        if what is not None:
            res.ins_differ.append((ra, f"{xa.names[ra]}: {what}"))
    return res


def _partner(xa: _Step, xb: _Step, ra: int, cands: list[int]) -> int | None:
    name, shape = xa.names[ra], xa.shape(ra)
    for rb in cands:
        if xb.names[rb] == name and xb.shape(rb) == shape:
            return rb
    fl = xa.is_float(ra)
    for rb in cands:
        if xb.shape(rb) == shape and xb.is_float(rb) == fl and (fl or xb.names[rb] == name):
            return rb
    return None


def _compare(xa: _Step, xb: _Step, ra: int, rb: int, rtol, atol) -> tuple[str | None, bool]:
    """(None or what differs, whether it was established token by token: sketches or saved
    values took part)."""
    dtype = xa.dtypes[ra]
    pa, pb = int(xa.tt["payload"][ra]), int(xb.tt["payload"][rb])
    if pa >= 0 and pb >= 0:
        # both saved the tensor: its values decide
        va, vb = xa.ix.trace.payload(pa), xb.ix.trace.payload(pb)
        if va.shape == vb.shape:
            r, a = _tol(dtype, rtol, atol)
            x, y = va.astype(np.float64), vb.astype(np.float64)
            with np.errstate(invalid="ignore", over="ignore"):
                ok = np.isclose(x, y, rtol=r, atol=a, equal_nan=True)
            if ok.all():
                return None, True
            d = np.abs(x - y)[~ok]
            return f"{xa.names[ra]}: {int((~ok).sum())} of {ok.size} values differ (max abs {np.nanmax(d):.3g})", True
    what = compare_stats(xa.tt[ra], xb.tt[rb], dtype, rtol, atol)
    ska, skb = xa.sketch(ra), xb.sketch(rb)
    strong = ska is not None and skb is not None
    if strong:
        tol = sketch_tol(dtype) if rtol is None else max(sketch_tol(dtype), rtol)
        sk = compare_sketches(ska[0], ska[1], skb[0], skb[1], tol)
        if sk is not None:
            return (f"{xa.names[ra]}: {sk}"), True
    elif not xa.is_float(ra):
        strong = True  # integer tensors: exact statistics of ids or positions
    if what is not None:
        return f"{xa.names[ra]}: {what}", strong
    return None, strong


def _walk(A, B, mm: ModuleMap, xa: _Step, xb: _Step, i: int, res: _Pair, c: Culprit, results: dict,
          rtol, atol, sketched) -> Culprit:
    """Upstream from call ``i``, whose inputs already differ (see the module docstring)."""
    pa = A.module_paths
    ev = xa.ev
    cur, cur_res = i, res
    row = cur_res.ins_differ[0][0]
    while True:
        ident = xa.identity(row)
        p_local = int(ev["parent"][cur]) - xa.e0
        c.walked.append(str(pa[int(ev["module"][cur])]) or "<root>")
        if p_local < 0 or p_local >= len(ev):
            c.status = "inputs"
            c.module_a = c.module_b = None
            c.reason = f"the root call's {cur_res.ins_differ[0][1]}"
            return c
        ins_p, _ = xa.tensors_of(p_local)
        passed = [r for r in ins_p if xa.identity(r) == ident]
        if passed:
            cur, row = p_local, passed[0]
            pres = _result_of(xa, xb, mm, results, cur, rtol, atol, sketched) or _Pair()
            cur_res = pres if pres.ins_differ else _Pair(ins_differ=[(row, cur_res.ins_differ[0][1])], ins_known=True)
            continue
        # not the caller's input: made by an earlier call under the caller, or by the caller's own code
        seq = int(ev["seq"][cur])
        producer = None
        for k in range(len(ev)):
            if int(ev["end_seq"][k]) <= seq and int(ev["seq"][p_local]) < int(ev["seq"][k]) < seq:
                _, outs = xa.tensors_of(k)
                if any(xa.identity(r) == ident for r in outs):
                    producer = k
        where = producer if producer is not None else p_local
        m = int(ev["module"][where])
        c.seq_a = int(ev["seq"][where])
        c.module_a = str(pa[m])
        c.module_b = mm.counterpart(m)
        c.status = "upstream"
        child = str(pa[int(ev["module"][cur])]) or "<root>"
        if producer is not None:
            c.reason = (f"its output feeds {child}, whose {cur_res.ins_differ[0][1]}; it has no counterpart to compare "
                        "with, so the cause lies in it or upstream")
        else:
            pres = _result_of(xa, xb, mm, results, where, rtol, atol, sketched)
            if pres is not None and pres.ins_differ:
                # the caller's own inputs differ too: keep walking from the caller
                cur, cur_res = where, pres
                row = pres.ins_differ[0][0]
                continue
            agree = "its inputs agree" if pres is not None and pres.ins_known else "its inputs have no counterpart"
            c.reason = (f"{agree}, and its own code (not a recorded submodule) makes the {cur_res.ins_differ[0][1].split(':')[0]} "
                        f"that {child} gets, which differs: {cur_res.ins_differ[0][1].partition(': ')[2]}")
            if pres is None or not pres.strong or not sketched:
                c.caveat = _weak(sketched)
        return c
