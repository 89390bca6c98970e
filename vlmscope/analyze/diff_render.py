"""One divergence of ``vlmscope diff``, rendered: what differs at an aligned node (a module call,
tensor, reshape or probe), on which side, by how much, and at which token positions.

:func:`render` turns a row of an :class:`~.aligned.Alignment` into a :class:`Divergence`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from vlmscope.semantics import fmt_shape
from vlmscope.trace import ROLE_NAMES, ROLE_OUTPUT
from vlmscope.trace.validate import check_tensor_shapes

from ._index import TraceIndex
from .sketchdiff import compare_sketches, sketch_lookup, sketch_table, sketch_tol
from .aligned import Alignment
from .status import MISSING_A, MISSING_B, SHAPE, STATUS_NAMES


@dataclass
class Divergence:
    """One aligned node that differs between A and B."""

    category: str           # structural | semantic | numeric
    node: str               # call | input | output | reshape | probe
    status: str             # shape | drift | missing_in_a | missing_in_b
    step: int
    module: str             # module path (A's; B's when missing in A)
    what: str               # argument name, op, or probe kind
    a: str                  # A's side, rendered
    b: str                  # B's side, rendered
    detail: str = ""        # where / how it differs
    tokens: list[int] | None = None   # absolute token positions (embedding space) involved
    seq_a: int = -1
    seq_b: int = -1
    module_b: str = ""
    origin: str = ""        # for an input: the calling module, which built the value (if no sibling did)
    short: str = ""         # a compact form of ``detail`` for tables

    def to_dict(self) -> dict:
        return asdict(self)

    def headline(self) -> str:
        verb = {"shape": "shape/dtype differs", "drift": "values differ", "missing_in_a": "only in B",
                "missing_in_b": "only in A"}.get(self.status, self.status)
        where = f"step {self.step}, {self.module or '<root>'}"
        if self.node in ("input", "output"):
            where += f" {self.node} {self.what!r}"
            if self.node == "input" and self.origin and self.origin != self.module:
                where += f" (passed in by {self.origin or '<root>'})"
        elif self.node != "call":
            where += f" {self.node} {self.what}"
        tok = ""
        if self.tokens:
            tok = f"; tokens {fmt_tokens(self.tokens)}"
        return f"{where}: {verb} ({self.a} -> {self.b}){tok}" + (f"; {self.detail}" if self.detail else "")


def fmt_tokens(tok: Iterable[int], limit: int = 10) -> str:
    tok = sorted(set(int(t) for t in tok))
    if not tok:
        return ""
    if len(tok) > 2 and tok[-1] - tok[0] == len(tok) - 1:
        return f"{tok[0]}..{tok[-1]}"
    s = ", ".join(str(t) for t in tok[:limit])
    return s + (f", ... ({len(tok)} in all)" if len(tok) > limit else "")


def render(al: Alignment, table: str, i: int) -> Divergence:
    A, B = al.ix_a, al.ix_b
    tbl = getattr(al, table)
    a, b, st, step = int(tbl.a[i]), int(tbl.b[i]), int(tbl.status[i]), int(tbl.step_of(np.array([i]))[0])
    status = STATUS_NAMES[st]
    if table == "events":
        if a >= 0:
            e = A.events[a]
            mod = A.module_path(int(e["module"]))
            return Divergence("structural", "call", status, step, mod, f"call {int(e['nth'])}",
                              f"{A.module_classes[int(e['module'])]} call", "absent",
                              "module call only in A", seq_a=int(e["seq"]))
        e = B.events[b]
        mod = B.module_path(int(e["module"]))
        return Divergence("structural", "call", status, step, mod, f"call {int(e['nth'])}", "absent",
                          f"{B.module_classes[int(e['module'])]} call", "module call only in B", seq_b=int(e["seq"]),
                          module_b=mod)
    if table == "tensors":
        return _render_tensor(al, i, a, b, st, step)
    if table == "reshapes":
        return _render_reshape(al, a, b, st, step)
    return _render_probe(al, a, b, st, step)


def _render_tensor(al: Alignment, i: int, a: int, b: int, st: int, step: int) -> Divergence:
    A, B = al.ix_a, al.ix_b
    status = STATUS_NAMES[st]
    ra = A.rows("tensors", a) if a >= 0 else None
    rb = B.rows("tensors", b) if b >= 0 else None
    row = ra if ra is not None else rb
    ix = A if ra is not None else B
    r = a if ra is not None else b
    mod = ix.module_path(int(ix.event_module[int(row["event"])]))
    mod_b = B.module_path(int(B.event_module[int(rb["event"])])) if rb is not None else ""
    name = ix.s(int(row["name"]))
    node = "output" if int(row["role"]) == ROLE_OUTPUT else "input"
    seq_a = int(A.tensor_time_of(np.array([a]))[0]) if a >= 0 else -1
    seq_b = int(B.tensor_time_of(np.array([b]))[0]) if b >= 0 else -1
    origin = ""
    if node == "input":
        par = int(ix.events["parent"][int(row["event"])])
        origin = (ix.module_path(int(ix.events["module"][par])) or "<root>") if par >= 0 else "<caller>"
    if st in (MISSING_A, MISSING_B):
        side = "A" if st == MISSING_B else "B"
        desc = _tensor_desc(ix, r)
        return Divergence("structural", node, status, step, mod, name, desc if st == MISSING_B else "absent",
                          desc if st == MISSING_A else "absent", f"{ROLE_NAMES.get(int(row['role']), '')} only in {side}",
                          seq_a=seq_a, seq_b=seq_b, module_b=mod_b, origin=origin)
    da, db = _tensor_desc(A, a), _tensor_desc(B, b)
    if st == SHAPE:
        check_tensor_shapes(ra, A.trace.path, "a tensor")     # the shapes shown as the divergence
        check_tensor_shapes(rb, B.trace.path, "a tensor")
        sa = tuple(int(d) for d in ra["shape"][: ra["ndim"]])
        sb = tuple(int(d) for d in rb["shape"][: rb["ndim"]])
        detail, tokens = _shape_detail(A, step, sa, sb)
        if A.s(int(ra["dtype"])) != B.s(int(rb["dtype"])):
            detail = (detail + "; " if detail else "") + f"dtype {A.s(int(ra['dtype']))} -> {B.s(int(rb['dtype']))}"
        return Divergence("structural", node, status, step, mod, name, da, db, detail, tokens, seq_a, seq_b, mod_b,
                          origin or "")
    # drift
    tokens = None
    m = al.tensor_metrics(i)
    if "max_abs" in m:
        detail = (f"max abs {m['max_abs']:.3g}, max rel {m['max_rel']:.3g}, cosine {m['cosine']:.6f} "
                  f"(rtol {m['rtol']:.3g}, atol {m['atol']:.3g})")
        tokens = _payload_tokens(A, B, ra, rb, step, m["rtol"], m["atol"])
    else:
        detail = (f"stats drift {m['stat_err']:.3g} of the magnitude (rtol {m['rtol']:.3g}): "
                  f"{_stats_desc(A, a)} -> {_stats_desc(B, b)} (no payloads: tokens are the step's)")
        tokens = _step_tokens(A, step)
    sk = tensor_sketch_detail(A, B, a, b, ra)
    if sk is not None and "max_abs" not in m:
        # the value sketches see what the statistics may not (a reordering, a shift)
        detail = f"value sketches differ: {sk}; {detail}"
        return Divergence("numeric", node, status, step, mod, name, da, db, detail, tokens, seq_a, seq_b, mod_b,
                          origin or "", f"sketch: {sk}")
    short = (f"max abs {m['max_abs']:.3g}, cos {m['cosine']:.4f}" if "max_abs" in m else
             f"stats drift {m['stat_err']:.3g} (rtol {m['rtol']:.2g}); mean {float(ra['mean']):.4g} -> "
             f"{float(rb['mean']):.4g}" + (f", nan {int(ra['nan'])} -> {int(rb['nan'])}" if ra["nan"] != rb["nan"] else ""))
    return Divergence("numeric", node, status, step, mod, name, da, db, detail, tokens, seq_a, seq_b, mod_b,
                      origin or "", short)


def tensor_sketch_detail(A: TraceIndex, B: TraceIndex, a: int, b: int, ra) -> str | None:
    """What the two tensors' value sketches say differs (None: no sketches, or they agree)."""
    ska, skb = sketch_table(A), sketch_table(B)
    if not len(ska) or not len(skb):
        return None
    ja, jb = int(sketch_lookup(A, ska, np.array([a]))[0]), int(sketch_lookup(B, skb, np.array([b]))[0])
    if ja < 0 or jb < 0:
        return None
    xa, xb = ska[ja], skb[jb]
    va = A.trace.sketch_values(int(xa["off"]), int(xa["rows"]) * int(xa["width"])).reshape(int(xa["rows"]), -1)
    vb = B.trace.sketch_values(int(xb["off"]), int(xb["rows"]) * int(xb["width"])).reshape(int(xb["rows"]), -1)
    return compare_sketches(va, float(xa["scale"]), vb, float(xb["scale"]), sketch_tol(A.s(int(ra["dtype"]))))


def _tensor_desc(ix: TraceIndex, r: int) -> str:
    t = ix.rows("tensors", r)
    shape = tuple(int(d) for d in t["shape"][: t["ndim"]])
    return f"{fmt_shape(shape)} {ix.s(int(t['dtype']))}"


def _stats_desc(ix: TraceIndex, r: int) -> str:
    t = ix.rows("tensors", r)
    s = f"mean {t['mean']:.4g} std {t['std']:.4g} absmax {t['absmax']:.4g}"
    if t["nan"] or t["inf"]:
        s += f" nan {int(t['nan'])} inf {int(t['inf'])}"
    return s


def _step_tokens(ix: TraceIndex, step: int) -> list[int] | None:
    if step < 0 or step >= ix.n_steps:
        return None
    st = ix.steps[step]
    cb, q = int(st["cache_before"]), int(st["q_len"])
    if q <= 0:
        return None
    cb = max(cb, 0)
    return list(range(cb, cb + q))


_MAX_TOKENS = 1 << 16   # token positions listed for one divergence (a damaged file may declare 2^31)


def _shape_detail(ix: TraceIndex, step: int, sa: tuple, sb: tuple) -> tuple[str, list[int] | None]:
    if len(sa) != len(sb):
        return f"rank {len(sa)} -> {len(sb)}", None
    dims = [d for d in range(len(sa)) if sa[d] != sb[d]]
    detail = "; ".join(f"dim {d}: {sa[d]} -> {sb[d]}" for d in dims)
    tokens = None
    q = int(ix.steps["q_len"][step]) if 0 <= step < ix.n_steps else -1
    cb = max(int(ix.steps["cache_before"][step]), 0) if 0 <= step < ix.n_steps else 0
    for d in dims:
        if q > 0 and q in (sa[d], sb[d]):
            lo, hi = min(sa[d], sb[d]), max(sa[d], sb[d])
            tokens = list(range(cb + lo, cb + min(hi, lo + _MAX_TOKENS)))   # dims come from the file: bounded
            detail += " (sequence dim)"
            break
        k = cb + q
        if q > 0 and k in (sa[d], sb[d]):
            lo, hi = min(sa[d], sb[d]), max(sa[d], sb[d])
            tokens = list(range(lo, min(hi, lo + _MAX_TOKENS)))
            detail += " (key dim)"
            break
    return detail, tokens


def _payload_tokens(A: TraceIndex, B: TraceIndex, ra, rb, step: int, rtol: float, atol: float) -> list[int] | None:
    try:
        xa = np.asarray(A.trace.payload(int(ra["payload"])), np.float64)
        xb = np.asarray(B.trace.payload(int(rb["payload"])), np.float64)
    except Exception:  # noqa: BLE001 - a damaged payload in the user's trace: no token positions
        return None
    if xa.shape != xb.shape or xa.ndim < 2:
        return None
    q = int(A.steps["q_len"][step]) if 0 <= step < A.n_steps else -1
    cb = max(int(A.steps["cache_before"][step]), 0) if 0 <= step < A.n_steps else 0
    dims = [d for d in range(xa.ndim) if xa.shape[d] == q] or [1 if xa.ndim >= 3 else 0]
    d = dims[0]
    rt = rtol if np.isfinite(rtol) else 1e-5
    atv = atol if np.isfinite(atol) else 1e-5
    with np.errstate(invalid="ignore"):
        bad = ~((np.abs(xa - xb) <= atv + rt * np.abs(xb)) | (np.isnan(xa) & np.isnan(xb)) | (xa == xb))
    axes = tuple(k for k in range(xa.ndim) if k != d)
    per = bad.any(axis=axes)
    return [cb + int(t) for t in np.nonzero(per)[0]]


def _render_reshape(al: Alignment, a: int, b: int, st: int, step: int) -> Divergence:
    A, B = al.ix_a, al.ix_b
    status = STATUS_NAMES[st]

    def desc(ix: TraceIndex, r: int) -> str:
        x = ix.rows("reshapes", r)
        outs = tuple(int(d) for d in x["out_shape"][: x["out_ndim"]])
        args = ix.s(int(x["args"]))
        args = args if args.startswith("(") else f"({args})"
        return f"{ix.s(int(x['op']))}{args} {ix.s(int(x['in_shapes']))} -> {fmt_shape(outs)} " \
               f"{ix.s(int(x['out_dtype']))}"

    def site(ix: TraceIndex, r: int) -> str:
        x = ix.rows("reshapes", r)
        return f"{ix.s(int(x['site_file']))}:{int(x['site_line'])}"

    if a >= 0:
        x = A.rows("reshapes", a)
        mod = A.module_path(int(x["module"])) if x["module"] >= 0 else ""
        op = A.s(int(x["op"]))
    else:
        x = B.rows("reshapes", b)
        mod = B.module_path(int(x["module"])) if x["module"] >= 0 else ""
        op = B.s(int(x["op"]))
    mod_b = B.module_path(int(B.col("reshapes", "module")[b])) if b >= 0 and B.col("reshapes", "module")[b] >= 0 else ""
    seq_a = int(A.col("reshapes", "seq")[a]) if a >= 0 else -1
    seq_b = int(B.col("reshapes", "seq")[b]) if b >= 0 else -1
    if st in (MISSING_A, MISSING_B):
        return Divergence("structural", "reshape", status, step, mod, op, desc(A, a) if a >= 0 else "absent",
                          desc(B, b) if b >= 0 else "absent",
                          f"only in {'A' if a >= 0 else 'B'} at {site(A, a) if a >= 0 else site(B, b)}",
                          seq_a=seq_a, seq_b=seq_b, module_b=mod_b)
    xa, xb = A.rows("reshapes", a), B.rows("reshapes", b)
    sa = tuple(int(d) for d in xa["out_shape"][: xa["out_ndim"]])
    sb = tuple(int(d) for d in xb["out_shape"][: xb["out_ndim"]])
    detail, tokens = _shape_detail(A, step, sa, sb) if sa != sb else ("", None)
    detail = (detail + "; " if detail else "") + f"at {site(A, a)}"
    return Divergence("structural", "reshape", status, step, mod, op, desc(A, a), desc(B, b), detail, tokens,
                      seq_a, seq_b, mod_b)


def _render_probe(al: Alignment, a: int, b: int, st: int, step: int) -> Divergence:
    A, B = al.ix_a, al.ix_b
    status = STATUS_NAMES[st]
    ix, r = (A, a) if a >= 0 else (B, b)
    p = ix.probes[r]
    kind = ix.s(int(p["kind"]))
    mod = ix.module_path(int(p["module"]))
    mod_b = B.module_path(int(B.probes["module"][b])) if b >= 0 else ""
    seq_a = int(A.probes["seq"][a]) if a >= 0 else -1
    seq_b = int(B.probes["seq"][b]) if b >= 0 else -1

    def sdesc(ix_: TraceIndex, r_: int) -> str:
        q = ix_.probes[r_]
        return f"{fmt_shape(q['shape'][: q['ndim']])} {ix_.s(int(q['dtype']))}"

    if st in (MISSING_A, MISSING_B):
        return Divergence("semantic", "probe", status, step, mod, kind, sdesc(A, a) if a >= 0 else "absent",
                          sdesc(B, b) if b >= 0 else "absent", f"{kind} only in {'A' if a >= 0 else 'B'}",
                          seq_a=seq_a, seq_b=seq_b, module_b=mod_b)
    va, vb = A.value(a), B.value(b)
    cb = max(int(A.steps["cache_before"][step]), 0) if 0 <= step < A.n_steps else 0
    if st == SHAPE:
        sa = tuple(int(d) for d in A.probes[a]["shape"][: A.probes[a]["ndim"]])
        sb = tuple(int(d) for d in B.probes[b]["shape"][: B.probes[b]["ndim"]])
        detail, tokens = _shape_detail(A, step, sa, sb)
        if kind == "attention_mask" and va is not None and vb is not None and va.ndim == vb.ndim and va.ndim >= 2:
            ka, kb = va.shape[-1], vb.shape[-1]
            detail += f"; key length {ka} -> {kb}"
        return Divergence("semantic", "probe", status, step, mod, kind, sdesc(A, a), sdesc(B, b), detail, tokens,
                          seq_a, seq_b, mod_b)
    # values differ
    detail, tokens, da, db = _value_detail(kind, va, vb, cb, A.info(a), B.info(b))
    return Divergence("semantic", "probe", status, step, mod, kind, da or sdesc(A, a), db or sdesc(B, b), detail,
                      tokens, seq_a, seq_b, mod_b)


def _show(v) -> str:
    """A value as shown: None (not recorded) is "-"."""
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return str(v)


def _info_detail(ia: dict, ib: dict) -> str:
    """What the probes' info records say differently: only the keys that differ, real values
    (None shown as "-"), e.g. ``fill - -> -3.4e+38``."""
    keys = [k for k in dict.fromkeys([*ia, *ib]) if k != "lengths" and ia.get(k) != ib.get(k)]
    if not keys:
        return "values differ"
    return "; ".join(f"{k} {_show(ia.get(k))} -> {_show(ib.get(k))}" for k in keys)


def _value_detail(kind: str, va, vb, cb: int, ia: dict, ib: dict):
    if va is None or vb is None or va.shape != vb.shape:
        return _info_detail(ia, ib), None, "", ""
    ne = va != vb
    if kind == "attention_mask":
        q_axis = va.ndim - 2 if va.ndim >= 2 else 0
        rows = np.nonzero(ne.any(axis=tuple(k for k in range(va.ndim) if k != q_axis)))[0] if va.ndim >= 2 else []
        cols = np.nonzero(ne.any(axis=tuple(range(va.ndim - 1))))[0]
        q = va.shape[q_axis] if va.ndim >= 2 else 1
        toks = [cb + int(t) for t in rows] if va.ndim >= 3 else None
        kv = fmt_tokens(cols.tolist())
        return (f"allowed keys differ for {int(ne.sum())} (query, key) pairs; keys {kv}"
                + (f"; queries {fmt_tokens([int(t) for t in rows])} of {q}" if va.ndim >= 3 else ""),
                toks, f"{int(va.sum())} allowed", f"{int(vb.sum())} allowed")
    if kind == "cache":
        layers = np.nonzero(ne.ravel())[0]
        return (f"cache length differs in layer(s) {', '.join(str(int(x)) for x in layers[:8])}", None,
                f"lengths {va.ravel()[:8].tolist()}", f"lengths {vb.ravel()[:8].tolist()}")
    # positions, ids and other token-indexed values: the last dim is the token axis
    last = np.nonzero(ne.reshape(-1, va.shape[-1]).any(axis=0))[0] if va.ndim else np.array([0])
    first = int(last[0]) if len(last) else 0
    pick = (slice(None),) * (va.ndim - 1) + (first,)
    return (f"{kind} differ at {len(last)} token(s)", [cb + int(t) for t in last[:256]],
            f"{np.asarray(va[pick]).ravel()[:4].tolist()} at token {cb + first}",
            f"{np.asarray(vb[pick]).ravel()[:4].tolist()}")
