"""Styles of the viewer, and how each diff status (:class:`vlmscope.analyze.status.Status`) is drawn.

``MISSING_A`` (the node is missing in trace A) is what the viewer calls "only in B", and
``MISSING_B`` "only in A".
"""

from __future__ import annotations

from vlmscope.analyze.status import STATUS_RANK, Status

IMAGE_STYLE = "magenta"
SHAPE_STYLE = "cyan"
OP_STYLE = "yellow"
PROBE_STYLE = "magenta"
DIM = "dim"

STATUS_GLYPH = {Status.SAME: " ", Status.SHAPE: "≠", Status.DRIFT: "~", Status.MISSING_B: "-",
                Status.MISSING_A: "+"}
STATUS_STYLE = {Status.SAME: "", Status.SHAPE: "bold red", Status.DRIFT: "yellow", Status.MISSING_B: "magenta",
                Status.MISSING_A: "green"}
STATUS_TEXT = {Status.SAME: "same", Status.SHAPE: "shape/dtype differs", Status.DRIFT: "values drift",
               Status.MISSING_B: "only in A", Status.MISSING_A: "only in B"}
#: the legend of the diff summary line, in this order
STATUS_SHORT = {Status.SHAPE: "shape", Status.DRIFT: "drift", Status.MISSING_B: "only A", Status.MISSING_A: "only B"}


def worst(codes) -> Status | None:
    """The most severe status among ``codes`` (``STATUS_RANK``: missing, then shape, then drift;
    "only in A" before "only in B" at equal rank), or None when there are none."""
    best: Status | None = None
    for c in codes:
        st = Status(int(c))
        if best is None or (STATUS_RANK[st], st == Status.MISSING_B) > (STATUS_RANK[best], best == Status.MISSING_B):
            best = st
    return best
