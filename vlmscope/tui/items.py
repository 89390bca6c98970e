"""The viewer's vocabulary: tree items, filters and placed check violations. No textual.

Tree items are plain tuples ``Item = (step, kind, local)``: ``kind`` is ``"s"`` (the step
node: it stands for the step's root module call), ``"e"`` (a module call), ``"r"`` (a
reshape) or ``"p"`` (a probe), and ``local`` is the row within the step's block of the
matching table (-1 for a step node). Diff mode adds ``"b"``, ``"q"`` and ``"o"`` (a module
call, a reshape and a probe only in trace B: rows of B, see :data:`B_KINDS`), the navigator
``"m"`` (more children) and ``"g"`` (a group of decode steps).
"""

from __future__ import annotations

from dataclasses import dataclass

Item = tuple[int, str, int]

#: kinds of the items only in trace B -> the kind of the same row as an item of trace B
B_KINDS = {"b": "e", "q": "r", "o": "p"}
#: and back
ONLY_B_KIND = {v: k for k, v in B_KINDS.items()}

FILTERS = ("all", "modules", "reshapes", "probes", "failing")
#: diff mode adds "divergent": the divergent items and the calls that hold them
DIFF_FILTERS = FILTERS + ("divergent",)
FILTER_LABELS = {"all": "all", "modules": "modules only", "reshapes": "reshapes", "probes": "probes",
                 "failing": "failing checks", "divergent": "divergent only"}


@dataclass
class Violation:
    """One violation of ``vlmscope.analyze.check`` (the fields the viewer shows), with the tree
    item it is placed on."""

    rule: str
    severity: str
    step: int              # the step the check names (may lie outside the trace: see ``item``)
    module: str
    seq: int               # position in the step's execution order, as the check reports it
    message: str           # "expected ..., got ... (hint)"
    item: Item | None      # where the tree shows it; None when no item stands for it
    order: tuple[int, int] = (-1, -1)   # (step, execution position) of ``item``: "next violation"
