"""The diff summary line: the first divergence (``g`` jumps to it) and a colour legend."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from vlmscope.tui.render import DRIFT, ONLY_A, ONLY_B, SHAPE, STATUS_GLYPH, STATUS_STYLE, STATUS_TEXT


SHORT = {SHAPE: "shape", DRIFT: "drift", ONLY_A: "only A", ONLY_B: "only B"}


class DiffSummary(Static):
    def show_pending(self) -> None:
        self.update(Text("aligning A and B …", "dim"))

    def show_first(self, where: str | None, status: str | None, engine: str = "") -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        if where is None:
            t.append("no divergence: A and B agree", "bold green")
        else:
            t.append("first divergence ", "bold")
            t.append(where, STATUS_STYLE.get(status or SHAPE, "") or "bold")
            t.append(f" ({STATUS_TEXT.get(status or SHAPE, status)})", STATUS_STYLE.get(status or SHAPE, ""))
            t.append("  g: go", "dim")
        t.append("   ")
        for st in (SHAPE, DRIFT, ONLY_A, ONLY_B):
            t.append(STATUS_GLYPH[st] + " " + SHORT[st], STATUS_STYLE[st])
            t.append(" ")
        self.update(t, layout=False)
