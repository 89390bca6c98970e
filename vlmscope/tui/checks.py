"""Failing check rules, placed on tree items.

Uses the rules of :mod:`vlmscope.analyze` when that package provides them (through
:mod:`vlmscope.tui.analyze_adapter`); otherwise a built-in minimum that needs no analyze
code: module calls and reshapes that raised, and NaN/Inf in a call's outputs.
"""

from __future__ import annotations

import numpy as np

from vlmscope.trace import ROLE_OUTPUT
from vlmscope.tui.data import StepIndex, TraceModel, Violation


def violations(tm: TraceModel, cancelled=lambda: False) -> tuple[list[Violation], str]:
    """All violations of trace ``tm`` and the name of the engine that found them (worker)."""
    try:
        from vlmscope.tui import analyze_adapter
    except Exception:  # noqa: BLE001
        analyze_adapter = None  # type: ignore[assignment]
    if analyze_adapter is not None:
        try:
            found = analyze_adapter.violations(tm, cancelled)
        except Exception:  # noqa: BLE001 - never let a changed analyze API stop the viewer
            found = None
        if found is not None:
            return found, "vlmscope.analyze"
    return builtin_violations(tm, cancelled), "built-in"


def builtin_violations(tm: TraceModel, cancelled=lambda: False) -> list[Violation]:
    out: list[Violation] = []
    for s in range(tm.n_steps):
        if cancelled():
            break
        idx = tm.cached(s) or StepIndex(tm, s)   # do not churn the viewer's step cache
        for i in np.nonzero(idx.status != 0)[0]:
            out.append(Violation(s, "e", int(i), "raised", "this module call raised", seq=int(idx.seq[i])))
        for k in np.nonzero(idx.reshapes["status"] != 0)[0]:
            out.append(Violation(s, "r", int(k), "raised", "this op raised", seq=int(idx.r_seq[k])))
        tr = idx.tensors
        if tr is None:
            continue
        bad = np.nonzero((tr["role"] == ROLE_OUTPUT) & ((tr["nan"] > 0) | (tr["inf"] > 0)))[0]
        seen: set[int] = set()
        for r in bad:
            ev = int(tr["event"][r]) - idx.ev_start
            if 0 <= ev < idx.n and ev not in seen:
                seen.add(ev)
                out.append(Violation(s, "e", ev, "non-finite",
                                     f"output {tm.s(int(tr['name'][r]))} has {int(tr['nan'][r])} NaN, "
                                     f"{int(tr['inf'][r])} Inf", seq=int(idx.seq[ev])))
    return out
