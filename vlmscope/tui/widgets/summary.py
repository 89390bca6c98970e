"""The diff summary line: the first divergence (``g`` jumps to it) and a colour legend."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from vlmscope.analyze.status import Status
from vlmscope.tui.safe import printable
from vlmscope.tui.styles import STATUS_GLYPH, STATUS_SHORT, STATUS_STYLE, STATUS_TEXT


class DiffSummary(Static):
    def show_pending(self) -> None:
        self.update(Text("aligning A and B …", "dim"))

    def show_failed(self, message: str) -> None:
        """The alignment failed: say so (the tree then shows no statuses)."""
        self.update(Text.assemble(("alignment failed: ", "bold red"), printable(message)), layout=False)

    def show_unplaced(self, headline: str) -> None:
        """vlmscope diff found a divergence with no node on A's tree (e.g. a step only B has)."""
        self.update(Text.assemble(("first divergence ", "bold"),
                                  (printable(headline), STATUS_STYLE[Status.MISSING_A] or "bold")),
                    layout=False)

    def show_first(self, where: str | None, status: Status | None, culprit: str | None = None,
                   first_is_culprit: bool = False) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        if culprit:
            # the module whose inputs agree and whose outputs do not, as vlmscope diff names it
            t.append("culprit ", "bold")
            t.append(printable(culprit), "bold red")
            t.append("  ")
        if where is None:
            t.append("no divergence: A and B agree", "bold green")
        else:
            st = status if status is not None else Status.SHAPE
            # two implementations: g goes to the culprit (inputs agree, outputs do not)
            t.append("culprit " if first_is_culprit else "first divergence ", "bold")
            t.append(printable(where), STATUS_STYLE[st] or "bold")
            t.append(f" ({STATUS_TEXT[st]})", STATUS_STYLE[st])
            t.append("  g: go", "dim")
        t.append("   ")
        for st, word in STATUS_SHORT.items():
            t.append(STATUS_GLYPH[st] + " " + word, STATUS_STYLE[st])
            t.append(" ")
        self.update(t, layout=False)
