"""``vlmscope check``: invariants of a multimodal Qwen forward, on every step and layer.

The rules live in :mod:`vlmscope.analyze.rules` (one module per family); this module runs
them. Public API::

    from vlmscope.analyze import check
    report = check(trace_or_path, rules=["mask", "positions.continuity"], golden=None)
    report.violations        # list[Violation], in execution order (step, seq)
    report.errors            # the error-severity ones
    report.to_dict()         # JSON-able
"""

from __future__ import annotations

import os
from typing import Iterable

from vlmscope.trace import Trace, open_trace

from ._index import index_of
from .rules import ERROR, INFO, RULES, WARNING, CheckReport, Rule, Violation, rule, select_rules

__all__ = ["check", "run_checks", "RULES", "CheckReport", "Violation", "select_rules", "Rule", "rule",
           "ERROR", "WARNING", "INFO"]


def check(trace: Trace | str | os.PathLike, rules: Iterable[str] | str | None = None, *,
          golden: str | os.PathLike | None = None) -> CheckReport:
    """Run the selected rules (all by default) on a trace; optionally compare to a golden snapshot."""
    own = not isinstance(trace, Trace)
    t = open_trace(trace) if own else trace
    try:
        ids = select_rules(rules)
        ix = index_of(t)
        out: list[Violation] = []
        for rid in ids:
            out += RULES[rid].fn(ix)
        golden_diff = None
        if golden is not None:
            from .snapshot import compare_golden

            golden_summary, golden_diff = compare_golden(t, golden)
            if golden_diff:
                out.append(_golden_violation(golden, golden_summary))
        out.sort(key=lambda v: (v.step, v.seq if v.seq >= 0 else 1 << 40, v.rule))
        return CheckReport(str(t.path), ids, out, t.status, t.n_steps, golden_diff)
    finally:
        if own:
            t.close()


def _golden_violation(golden: str | os.PathLike, summary: str) -> Violation:
    """The shapes differ from the golden snapshot: one violation, its one-line summary as ``actual``
    (``golden has 4 steps, trace has 8``, ``12 differing lines, first at step 0: ...``)."""
    return Violation("snapshot.golden", -1, "", f"shapes as in {os.fspath(golden)}", summary,
                     "the shapes changed: record as many steps as the golden has (-n) and see the unified "
                     "diff; rewrite the golden file with `vlmscope snapshot -o` if the change is intended")


def run_checks(trace: Trace | str | os.PathLike, rules: Iterable[str] | str | None = None) -> list[Violation]:
    """The violations of the selected rules (all but ``trace.status``, which a summary shows
    itself), in execution order. Used by ``vlmscope summary``."""
    ids = [r for r in select_rules(rules) if r != "trace.status"] if rules is None else select_rules(rules)
    return check(trace, ids).violations
