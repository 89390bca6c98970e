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

from vlmscope.semantics import fmt_shape
from vlmscope.trace import ROLE_OUTPUT, Trace, open_trace

from ._index import TraceIndex, index_of


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
    __tracebackhide__ = True   # pytest: a failure shows the test's line and this message, not our frames
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
    """Check every call of the modules matching ``pattern``; raise the earliest failure in execution order."""
    __tracebackhide__ = True
    if output is None and inputs is None:
        raise ValueError("expect() needs output= and/or inputs=")
    if bind not in ("step", "trace"):
        raise ValueError("bind must be 'step' or 'trace'")
    call = _call_repr(pattern, output, inputs, known)
    mods = _matching_modules(ix, pattern, call)
    ev_rows = _called_events(ix, mods, step, call)
    cand = _candidate_tensors(ix, ev_rows)
    targets = _targets(inputs, output)
    failures: list[tuple[int, int, str, dict]] = []   # (time key, tensor row or -1, message, details)
    sym_rows: list[tuple] = []   # (symbol, scope, values, time keys, rows, target, tokens) per symbol dim
    checked = 0
    hs = ix.sid("hidden_states")
    ttime = ix.tensor_time
    for role, name, toks in targets:
        rows = _first_tensor_per_call(ix, _target_rows(ix, cand, role, name, hs))
        what = f"{'output' if role == 'out' else 'input'}" + (f" {name!r}" if name else "")
        failures += _missing_tensor(ix, ev_rows, rows, what)
        if not len(rows):
            continue
        checked += len(rows)
        dim_failures, dim_syms = _check_dims(ix, rows, ttime[rows], toks, what, bind, known)
        failures += dim_failures
        sym_rows += dim_syms
    bindings, sym_failures = _bind_symbols(sym_rows)
    failures += sym_failures
    if failures:
        failures.sort(key=lambda f: f[0])
        raise _failure(ix, call, failures, bindings, known, bind)
    return ExpectResult(pattern, [str(ix.module_paths[m]) for m in mods], checked, bindings)


def _matching_modules(ix: TraceIndex, pattern: str, call: str) -> np.ndarray:
    """Indices of the modules whose path matches the glob ``pattern`` (raises when none does)."""
    __tracebackhide__ = True
    rx = glob_to_regex(pattern)
    mods = np.array([i for i, p in enumerate(ix.module_paths) if rx.match(str(p))], np.int64)
    if not len(mods):
        raise ShapeMismatch(f"{call} failed: no module matches {pattern!r}", {"reason": "no-module"})
    return mods


def _called_events(ix: TraceIndex, mods: np.ndarray, step: int | None, call: str) -> np.ndarray:
    """Event rows of the calls of ``mods`` (in ``step`` when given); raises when there are none."""
    __tracebackhide__ = True
    ev = ix.events
    sel_ev = np.isin(ev["module"], mods)
    if step is not None:
        sel_ev &= ev["step"] == step
    ev_rows = np.nonzero(sel_ev)[0]
    if not len(ev_rows):
        raise ShapeMismatch(f"{call} failed: {len(mods)} module(s) match but none was called"
                            + (f" in step {step}" if step is not None else ""), {"reason": "no-call"})
    return ev_rows


def _candidate_tensors(ix: TraceIndex, ev_rows: np.ndarray) -> np.ndarray:
    """Tensor rows that belong to one of the events ``ev_rows``."""
    te = ix.tensors
    in_ev = np.zeros(len(ix.events), bool)
    in_ev[ev_rows] = True
    return np.nonzero(in_ev[te["event"]])[0] if len(te) else np.zeros(0, np.int64)


def _targets(inputs: Any, output: Any) -> list[tuple[str, str | None, list]]:
    """The checks asked for: (role "in" | "out", argument name or None, spec tokens), inputs first."""
    targets: list[tuple[str, str | None, list]] = []
    for role, spec in (("in", inputs), ("out", output)):
        if spec is None:
            continue
        if isinstance(spec, dict):
            for name, sp in spec.items():
                targets.append((role, str(name), parse_spec(sp)))
        else:
            targets.append((role, None, parse_spec(spec)))
    return targets


def _target_rows(ix: TraceIndex, cand: np.ndarray, role: str, name: str | None, hs: int) -> np.ndarray:
    """The candidate tensors a target checks: its role, its named argument, or the default input.

    ``hs`` is the string id of ``hidden_states`` (-1 when the trace has none).
    """
    te = ix.tensors
    is_out = te["role"][cand] == ROLE_OUTPUT
    rows = cand[is_out] if role == "out" else cand[~is_out]
    if name is not None:
        sid = ix.sid(name)
        rows = rows[te["name"][rows] == sid] if sid >= 0 else rows[:0]
    elif role == "in" and hs >= 0:
        # the hidden_states input where a call has one, else its first input
        named = rows[te["name"][rows] == hs]
        has = np.zeros(len(ix.events), bool)
        has[te["event"][named]] = True
        rows = rows[np.where(has[te["event"][rows]], te["name"][rows] == hs, True)]
    return rows


def _first_tensor_per_call(ix: TraceIndex, rows: np.ndarray) -> np.ndarray:
    """Keep the first (lowest) tensor row of each call, ordered by event."""
    if not len(rows):
        return rows
    te = ix.tensors
    e = te["event"][rows]
    o = np.lexsort((rows, e))
    rows = rows[o]
    first = np.r_[True, te["event"][rows][1:] != te["event"][rows][:-1]]
    return rows[first]


def _missing_tensor(ix: TraceIndex, ev_rows: np.ndarray, rows: np.ndarray, what: str) -> list:
    """A failure for the first call that has no tensor for the target (empty list when all have one)."""
    ev, te = ix.events, ix.tensors
    have = np.zeros(len(ev), bool)
    have[te["event"][rows]] = True
    missing = ev_rows[~have[ev_rows]]
    out = []
    for e in missing[:1]:
        mod = ix.module_path(int(ev["module"][e]))
        out.append((_tkey(ev["step"][e], ev["seq"][e]), -1,
                    f"{mod} (call {int(ev['nth'][e])}), step {int(ev['step'][e])}: no {what} tensor",
                    {"module": mod, "step": int(ev["step"][e]), "reason": "missing"}))
    return out


def _check_dims(ix: TraceIndex, rows: np.ndarray, times: np.ndarray, toks: list, what: str, bind: str,
                known: dict) -> tuple[list, list]:
    """Check rank, literal and known dims of the target's tensors ``rows`` (executed at ``times``).

    Returns the first failure of each check, and for each symbol dim the values to bind later.
    """
    failures: list[tuple[int, int, str, dict]] = []
    sym_rows: list[tuple] = []
    te = ix.tensors
    nd = te["ndim"][rows].astype(np.int64)
    shp = te["shape"][rows]
    tk = _tkey(te["step"][rows], times)
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
        val = shp[np.arange(len(rows)), np.clip(di, 0, 7)]
        if tok == "*" or tok == "...":
            continue
        if isinstance(tok, int) or tok in known:
            kind, want = ("literal", tok) if isinstance(tok, int) else ("known", int(known[tok]))
            for j in np.nonzero(ok & (val != want))[0][:1]:
                failures.append((int(tk[j]), int(rows[j]), kind, {"target": what, "toks": toks}))
            continue
        sym_rows.append((tok, scope[ok], val[ok], tk[ok], rows[ok], what, toks))
    return failures, sym_rows


def _bind_symbols(sym_rows: list) -> tuple[dict[int, dict[str, int]], list]:
    """Bind each symbol to its first value in execution order, per scope.

    Returns the bindings (scope -> symbol -> value) and the first conflicting use of each symbol.
    """
    bindings: dict[int, dict[str, int]] = {}
    failures: list[tuple[int, int, str, dict]] = []
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
        for j in np.nonzero(v != bound)[0][:1]:
            what, toks = meta[s][int(part[j])]
            failures.append((int(tk[j]), int(r[j]), "symbol",
                             {"target": what, "toks": toks, "symbol": s, "bound": int(bound[j]),
                              "bound_row": int(r[gidx[j]]), "scope": int(sc[j])}))
    return bindings, failures


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
             f"  actual:   {fmt_shape(actual)} {ix.s(int(row['dtype']))}"]
    if kind == "rank":
        lines.append(f"  reason:   rank {len(actual)} does not fit the {len([t for t in toks if t != '...'])}-dim spec")
    elif kind == "symbol":
        src = d["bound_row"]
        src_mod = ix.module_path(int(ix.events["module"][int(te["event"][src])]))
        lines.append(f"  reason:   {d['symbol']} is bound to {d['bound']} (by {src_mod}, "
                     f"{'step ' + str(int(te['step'][src])) if bind == 'step' else 'first match'}) "
                     f"but is {_sym_value(actual, toks, d['symbol'], d['bound'])}")
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


def _sym_value(actual: tuple, toks: list, sym: str, bound: int) -> str:
    """The value ``sym`` has in ``actual`` where it conflicts, and its dim: ``"1 here (dim 1)"``."""
    dims = [(i, v) for i, (t, v) in enumerate(_dims_for(actual, toks)) if t == sym]
    dims = [d for d in dims if d[1] != bound] or dims
    return f"{dims[0][1]} here (dim {_dim_index(actual, toks, dims[0][0])})" if dims else "? here"


def _dim_index(actual: tuple, toks: list, k: int) -> int:
    """The dim of ``actual`` that the ``k``-th entry of :func:`_dims_for` is (after a ``...``, from the end)."""
    if "..." in toks and k >= toks.index("..."):
        return len(actual) - (len(toks) - 1 - k)
    return k


def _literal_reasons(actual: tuple, toks: list, known: dict) -> list[str]:
    out = []
    dims = _dims_for(actual, toks)
    for k, (t, v) in enumerate(dims):
        i = _dim_index(actual, toks, k)
        if isinstance(t, int) and t != v:
            out.append(f"dim {i}: expected {t}, got {v}")
        elif isinstance(t, str) and t in known and int(known[t]) != v:
            out.append(f"dim {i}: expected {t}={known[t]}, got {v}")
    return out or ["shape differs"]
