"""The viewer's palette (the one place its colours are chosen), and how each diff status
(:class:`vlmscope.analyze.status.Status`) is drawn.

Red means wrong and nothing else: a failing check (✗), a call that raised, NaN/Inf, a shape
that differs from the other trace, a failed analysis. Everything else has a colour of its own,
given as an RGB value rather than an ANSI name: Textual's default ANSI theme draws ``magenta``
in the same colour as ``red``. The image span has one colour everywhere (the token strip, the
mask heatmap, the position plot, the detail panel).

``MISSING_A`` (the node is missing in trace A) is what the viewer calls "only in B", and
``MISSING_B`` "only in A".
"""

from __future__ import annotations

from vlmscope.analyze.status import STATUS_RANK, Status


def hex_of(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


#: something is wrong (the only use of red)
ERROR_STYLE = "bold red"
#: a warning (an incomplete trace)
WARN_STYLE = "bold yellow"
OK_STYLE = "bold green"

#: the image span: tokens, mask columns and rows, positions (gold)
IMAGE_RGB = (255, 215, 95)
IMAGE_STYLE = hex_of(IMAGE_RGB)
#: probes (◆), values the recorder read on the way (violet)
PROBE_STYLE = "#af87ff"
SHAPE_STYLE = "cyan"
OP_STYLE = "yellow"
DIM = "dim"
#: this step's tokens in the token strip, and "may attend" in the mask heatmap
CURRENT_STYLE = "bold green"
ATTEND_RGB = (95, 175, 95)
BLOCKED_RGB = (38, 38, 38)
#: text tokens in the token strip
TEXT_TOKEN_STYLE = "grey50"
#: the expected value beside a recorded one that fails a check
EXPECTED_STYLE = "bold green"

STATUS_GLYPH = {Status.SAME: " ", Status.SHAPE: "≠", Status.DRIFT: "~", Status.MISSING_B: "-",
                Status.MISSING_A: "+"}
STATUS_STYLE = {Status.SAME: "", Status.SHAPE: ERROR_STYLE, Status.DRIFT: "yellow", Status.MISSING_B: "#d787d7",
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
