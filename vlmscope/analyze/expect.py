"""Symbolic shape assertions over a trace.

::

    from vlmscope.analyze import expect
    expect(trace, "model.language_model.layers.*.self_attn.q_proj", output="B S 2048")
    expect(trace, "model.visual.merger", inputs="N 256", output="M 2048", M=64)

A shape spec is a string of space (or comma) separated dims, or a list: a **symbol** (an
identifier, e.g. ``B``, ``S``, ``heads``) binds to the dim it first meets and must have the
same value everywhere in its scope (a step by default: ``S`` is the prompt length in the
prefill and 1 in decode steps; ``bind="trace"`` for one value across the whole trace); a
**literal int** must match exactly; ``*`` matches any one dim; ``...`` any number of dims.
Symbols can be fixed up front with keyword arguments (``H=64``).

The module pattern is a glob over dotted module paths: ``*`` matches within one path segment,
``**`` across segments, ``?`` one character, ``[..]`` a class.

``output=`` checks each call's first output tensor (or a dict ``{"out[1]": spec}``);
``inputs=`` its first input (the one named ``hidden_states`` when present) or a dict
``{"attention_mask": spec, ...}``. A failure raises :class:`ShapeMismatch` (an
``AssertionError``) naming the offending module, step, argument, expected and actual shapes;
on success an :class:`ExpectResult` with the bindings is returned.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmscope.trace import ROLE_OUTPUT, Trace, open_trace

from ._index import TraceIndex, index_of, shape_str


class ShapeMismatch(AssertionError):
    """A shape assertion failed. ``details`` holds the structured failure."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


@dataclass
class ExpectResult:
    pattern: str
    modules: list[str]
    checked: int                                   # tensors checked
    bindings: dict[int, dict[str, int]] = field(default_factory=dict)   # scope (step, or -1) -> symbol -> value

    def __bool__(self) -> bool:
        return True


_TOKEN = re.compile(r"\.\.\.|\*|-?\d+|[A-Za-z_][A-Za-z_0-9]*")


def parse_spec(spec: Any) -> list[str | int]:
    """Tokens of a shape spec: ints, symbols, ``*`` and at most one ``...``."""
    if isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        text = str(spec).strip().strip("[]()")
        items = [t for t in re.split(r"[\s,]+", text) if t]
    out: list[str | int] = []
    for it in items:
        if isinstance(it, (int, np.integer)):
            out.append(int(it))
            continue
        it = str(it)
        if not _TOKEN.fullmatch(it):
            raise ValueError(f"bad dim {it!r} in shape spec {spec!r}: use symbols, ints, '*' or '...'")
        out.append(int(it) if re.fullmatch(r"-?\d+", it) else it)
    if out.count("...") > 1:
        raise ValueError(f"shape spec {spec!r} has more than one '...'")
    return out


def glob_to_regex(pattern: str) -> re.Pattern:
    i, n, out = 0, len(pattern), []
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern[i:i + 2] == "**":
                out.append(".*")
                i += 2
                continue
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body + "]")
                i = j + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


def expect(trace: Trace | str | os.PathLike, pattern: str, output: Any = None, inputs: Any = None, *,
           step: int | None = None, bind: str = "step", **known: int) -> ExpectResult:
    """Assert the shapes of every call of the modules matching ``pattern`` (see the module docstring)."""
    own = not isinstance(trace, Trace)
    t = open_trace(trace) if own else trace
    try:
        return _expect(index_of(t), pattern, output, inputs, step, bind, known)
    finally:
        if own:
            t.close()


def _call_repr(pattern: str, output: Any, inputs: Any, known: dict) -> str:
    args = [repr(pattern)]
    if inputs is not None:
        args.append(f"inputs={inputs!r}")
    if output is not None:
        args.append(f"output={output!r}")
    args += [f"{k}={v!r}" for k, v in known.items()]
    return f"expect({', '.join(args)})"


def _expect(ix: TraceIndex, pattern: str, output: Any, inputs: Any, step: int | None, bind: str,
            known: dict) -> ExpectResult:
    if output is None and inputs is None:
        raise ValueError("expect() needs output= and/or inputs=")
    if bind not in ("step", "trace"):
        raise ValueError("bind must be 'step' or 'trace'")
    call = _call_repr(pattern, output, inputs, known)
    rx = glob_to_regex(pattern)
    paths = ix.module_paths
    mods = np.array([i for i, p in enumerate(paths) if rx.match(str(p))], np.int64)
    if not len(mods):
        raise ShapeMismatch(f"{call} failed: no module matches {pattern!r}", {"reason": "no-module"})
    ev = ix.events
    sel_ev = np.isin(ev["module"], mods)
    if step is not None:
        sel_ev &= ev["step"] == step
    ev_rows = np.nonzero(sel_ev)[0]
    if not len(ev_rows):
        raise ShapeMismatch(f"{call} failed: {len(mods)} module(s) match but none was called"
                            + (f" in step {step}" if step is not None else ""), {"reason": "no-call"})
    te = ix.tensors
    in_ev = np.zeros(len(ev), bool)
    in_ev[ev_rows] = True
    cand = np.nonzero(in_ev[te["event"]])[0] if len(te) else np.zeros(0, np.int64)

    targets: list[tuple[str, str | None, list]] = []   # (role: in|out, name or None, tokens)
    for role, spec in (("in", inputs), ("out", output)):
        if spec is None:
            continue
        if isinstance(spec, dict):
            for name, sp in spec.items():
                targets.append((role, str(name), parse_spec(sp)))
        else:
            targets.append((role, None, parse_spec(spec)))

    failures: list[tuple[int, int, str, dict]] = []   # (time key, tensor row or -1, message, details)
    sym_rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # symbol, scope, value, time, row
    checked = 0
    hs = ix.sid("hidden_states")
    ttime = ix.tensor_time
    for role, name, toks in targets:
        is_out = te["role"][cand] == ROLE_OUTPUT
        rows = cand[is_out] if role == "out" else cand[~is_out]
        if name is not None:
            sid = ix.sid(name)
            rows = rows[te["name"][rows] == sid] if sid >= 0 else rows[:0]
        elif role == "in" and hs >= 0:
            # the hidden_states input where a call has one, else its first input
            named = rows[te["name"][rows] == hs]
            has = np.zeros(len(ev), bool)
            has[te["event"][named]] = True
            rows = rows[np.where(has[te["event"][rows]], te["name"][rows] == hs, True)]
        # first tensor per call
        if len(rows):
            e = te["event"][rows]
            o = np.lexsort((rows, e))
            rows = rows[o]
            first = np.r_[True, te["event"][rows][1:] != te["event"][rows][:-1]]
            rows = rows[first]
        have = np.zeros(len(ev), bool)
        have[te["event"][rows]] = True
        missing = ev_rows[~have[ev_rows]]
        what = f"{'output' if role == 'out' else 'input'}" + (f" {name!r}" if name else "")
        for e in missing[:1]:
            failures.append((_tkey(ev["step"][e], ev["seq"][e]), -1,
                             f"{ix.module_path(int(ev['module'][e]))} (call {int(ev['nth'][e])}), step "
                             f"{int(ev['step'][e])}: no {what} tensor", {"module": ix.module_path(int(ev['module'][e])),
                                                                         "step": int(ev["step"][e]), "reason": "missing"}))
        if not len(rows):
            continue
        checked += len(rows)
        nd = te["ndim"][rows].astype(np.int64)
        shp = te["shape"][rows]
        tk = _tkey(te["step"][rows], ttime[rows])
        scope = te["step"][rows].astype(np.int64) if bind == "step" else np.full(len(rows), -1, np.int64)
        if "..." in toks:
            k = toks.index("...")
            pre, post = toks[:k], toks[k + 1:]
            bad_rank = nd < len(pre) + len(post)
        else:
            pre, post = toks, []
            bad_rank = nd != len(toks)
        for j in np.nonzero(bad_rank)[0][:1]:
            failures.append((int(tk[j]), int(rows[j]), "rank", {"target": what, "toks": toks}))
        ok = ~bad_rank
        # (token, dim index per row)
        cols = [(tok, np.full(len(rows), d, np.int64)) for d, tok in enumerate(pre)]
        cols += [(tok, nd - len(post) + d) for d, tok in enumerate(post)]
        for tok, di in cols:
            di_c = np.clip(di, 0, 7)
            val = shp[np.arange(len(rows)), di_c]
            if tok == "*" or tok == "...":
                continue
            if isinstance(tok, int):
                bad = ok & (val != tok)
                for j in np.nonzero(bad)[0][:1]:
                    failures.append((int(tk[j]), int(rows[j]), "literal", {"target": what, "toks": toks}))
                continue
            if tok in known:
                bad = ok & (val != int(known[tok]))
                for j in np.nonzero(bad)[0][:1]:
                    failures.append((int(tk[j]), int(rows[j]), "known", {"target": what, "toks": toks}))
                continue
            sym_rows.append((tok, scope[ok], val[ok], tk[ok], rows[ok], what, toks))
    # symbols: the first value in execution order binds, per scope
    bindings: dict[int, dict[str, int]] = {}
    first_src: dict[tuple[int, str], int] = {}
    by_sym: dict[str, list] = {}
    meta: dict[str, list] = {}
    for s, sc, v, tk, r, what, toks in sym_rows:
        by_sym.setdefault(s, []).append((sc, v, tk, r))
        meta.setdefault(s, []).append((what, toks))
    for s, parts in by_sym.items():
        sc = np.concatenate([p[0] for p in parts])
        v = np.concatenate([p[1] for p in parts])
        tk = np.concatenate([p[2] for p in parts])
        r = np.concatenate([p[3] for p in parts])
        part = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)])
        if not len(sc):
            continue
        o = np.lexsort((tk, sc))
        sc, v, tk, r, part = sc[o], v[o], tk[o], r[o], part[o]
        start = np.r_[True, sc[1:] != sc[:-1]]
        gidx = np.maximum.accumulate(np.where(start, np.arange(len(sc)), 0))
        bound = v[gidx]
        for i in np.nonzero(start)[0]:
            bindings.setdefault(int(sc[i]), {})[s] = int(v[i])
            first_src[(int(sc[i]), s)] = int(r[i])
        bad = np.nonzero(v != bound)[0]
        for j in bad[:1]:
            what, toks = meta[s][int(part[j])]
            failures.append((int(tk[j]), int(r[j]), "symbol",
                             {"target": what, "toks": toks, "symbol": s, "bound": int(bound[j]),
                              "bound_row": int(r[gidx[j]]), "scope": int(sc[j])}))
    if failures:
        failures.sort(key=lambda f: f[0])
        raise _failure(ix, call, failures, bindings, known, bind)
    return ExpectResult(pattern, [str(paths[m]) for m in mods], checked, bindings)


def _tkey(step, t):
    return (np.asarray(step, np.int64) << 32) + np.asarray(t, np.int64)


def _failure(ix: TraceIndex, call: str, failures: list, bindings: dict, known: dict, bind: str) -> ShapeMismatch:
    _, r, kind, d = failures[0]
    if r < 0:
        return ShapeMismatch(f"{call} failed: {kind}", d)
    te = ix.tensors
    row = te[r]
    e = int(row["event"])
    ev = ix.events[e]
    mod = ix.module_path(int(ev["module"]))
    s = int(row["step"])
    actual = tuple(int(x) for x in row["shape"][: row["ndim"]])
    toks = d["toks"]
    scope = s if bind == "step" else -1
    b = dict(bindings.get(scope, {}))
    b.update({k: int(v) for k, v in known.items()})
    if kind == "symbol":
        b[d["symbol"]] = d["bound"]
    exp_vals = []
    for tok in toks:
        if isinstance(tok, int) or tok in ("*", "..."):
            exp_vals.append(str(tok))
        else:
            exp_vals.append(f"{tok}={b[tok]}" if tok in b else str(tok))
    expected = "[" + ", ".join(str(t) for t in toks) + "]"
    lines = [f"{call} failed:",
             f"  module:   {mod} (call {int(ev['nth'])}), step {s}, {d['target']} {ix.s(int(row['name']))!r}",
             f"  expected: {expected}" + (f" = [{', '.join(exp_vals)}]" if exp_vals != [str(t) for t in toks] else ""),
             f"  actual:   {shape_str(actual)} {ix.s(int(row['dtype']))}"]
    if kind == "rank":
        lines.append(f"  reason:   rank {len(actual)} does not fit the {len([t for t in toks if t != '...'])}-dim spec")
    elif kind == "symbol":
        src = d["bound_row"]
        src_mod = ix.module_path(int(ix.events["module"][int(te["event"][src])]))
        lines.append(f"  reason:   {d['symbol']} is bound to {d['bound']} (by {src_mod}, "
                     f"{'step ' + str(int(te['step'][src])) if bind == 'step' else 'first match'}) "
                     f"but is {_sym_value(actual, toks, d['symbol'])} here")
    elif kind in ("literal", "known"):
        lines.append("  reason:   " + "; ".join(_literal_reasons(actual, toks, known)))
    if len(failures) > 1:
        lines.append(f"  ({len(failures) - 1} more failing check(s))")
    details = {"module": mod, "step": s, "argument": ix.s(int(row["name"])), "expected": expected,
               "actual": list(actual), "reason": kind, "bindings": b}
    return ShapeMismatch("\n".join(lines), details)


def _dims_for(actual: tuple, toks: list) -> list[tuple[Any, int]]:
    if "..." in toks:
        k = toks.index("...")
        pre, post = toks[:k], toks[k + 1:]
        return list(zip(pre, actual[:len(pre)])) + list(zip(post, actual[len(actual) - len(post):]))
    return list(zip(toks, actual))


def _sym_value(actual: tuple, toks: list, sym: str) -> str:
    vals = [v for t, v in _dims_for(actual, toks) if t == sym]
    return str(vals[0]) if vals else "?"


def _literal_reasons(actual: tuple, toks: list, known: dict) -> list[str]:
    out = []
    dims = _dims_for(actual, toks)
    for i, (t, v) in enumerate(dims):
        if isinstance(t, int) and t != v:
            out.append(f"dim {i}: expected {t}, got {v}")
        elif isinstance(t, str) and t in known and int(known[t]) != v:
            out.append(f"dim {i}: expected {t}={known[t]}, got {v}")
    return out or ["shape differs"]
