"""Check violations on the tree: ``vlmscope.analyze.check`` results placed on tree items.

The violations come from :func:`vlmscope.tui.analysis.check_rows` (the rules of ``vlmscope
check``, all of them, in a process of their own); this module only decides where each one is
shown. A violation lands on the call of its module that spans its execution-order position
(:func:`vlmscope.tui.navigate.locate`); one about the trace as a whole (an interrupted
recording names the step after the last) lands on the nearest step node; one with no step at
all (a golden-snapshot finding) stays off the tree but counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmscope.trace.text import printable
from vlmscope.tui.data import TraceModel
from vlmscope.tui.items import Item, Violation
from vlmscope.tui.navigate import locate
from vlmscope.tui.stepindex import StepIndex


@dataclass
class CheckViolation(Violation):
    """A placed violation that also keeps what the check expected and what the trace recorded
    (printable), for the pictures that show them side by side (the step context)."""

    expected: str = ""
    actual: str = ""


def message(row: dict) -> str:
    """``expected X, got Y (hint)``: what a violation says (printable: it quotes the trace)."""
    msg = f"expected {row.get('expected')}, got {row.get('actual')}"
    return printable(msg + (f" ({row['hint']})" if row.get("hint") else ""))


def place(tm: TraceModel, rows: list[dict]) -> list[Violation]:
    """The violations ``rows`` (dicts of :data:`vlmscope.tui.analysis.CHECK_FIELDS`), each on the
    tree item that stands for it. Reads the steps it needs (worker)."""
    out: list[Violation] = []
    indexes: dict[int, StepIndex] = {}
    for row in rows:
        step, seq, module = int(row["step"]), int(row.get("seq", -1)), str(row.get("module") or "")
        item: Item | None = None
        order = (-1, -1)
        if 0 <= step < tm.n_steps:
            idx = indexes.get(step) or tm.cached(step) or StepIndex(tm, step)   # not churning the step cache
            indexes[step] = idx
            kind, local = locate(tm, idx, seq, module)
            item = (step, kind, local)
            order = (step, idx.seq_of(item))
        elif tm.n_steps and step >= 0:
            item = (tm.n_steps - 1, "s", -1)
            order = (tm.n_steps - 1, -1)
        out.append(CheckViolation(printable(row["rule"]), str(row.get("severity", "error")), step, module, seq,
                                  message(row), item, order, expected=printable(str(row.get("expected", ""))),
                                  actual=printable(str(row.get("actual", "")))))
    return out


def done_message(violations: list[Violation]) -> tuple[str, str]:
    """The notification when the checks finish, and its severity: ``checks done: 3 violations``."""
    n = len(violations)
    if not n:
        return "checks done: no violations", "information"
    errors = sum(v.severity == "error" for v in violations)
    text = f"checks done: {n} violation{'s' if n != 1 else ''}"
    if errors != n:
        text += f" ({errors} error{'s' if errors != 1 else ''})"
    return text, "warning"


def in_step(violations: list[Violation], step: int, family: str) -> list[Violation]:
    """The violations of rules ``family.*`` that name ``step``."""
    return [v for v in violations if v.step == step and v.rule.startswith(family + ".")]
