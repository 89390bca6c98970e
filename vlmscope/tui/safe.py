"""Strings from a trace, as the viewer shows them: text, never markup or escape sequences.

The viewer builds ``rich.text.Text`` from trace strings (never markup strings), and the data
layer (:class:`vlmscope.tui.data.TraceModel`) hands out names already made printable
(:func:`vlmscope.trace.text.printable`). The helpers here are the last line at the places where
text meets the terminal: a widget's content (:func:`safe_text`), the pre-rendered lines of the
detail and context panels (:func:`safe_lines`), and notifications (``ViewerApp.notify``).
"""

from __future__ import annotations

from typing import Any

from rich.segment import Segment
from rich.text import Span, Text

from vlmscope.trace.text import has_unsafe, printable

__all__ = ["safe_text", "safe_lines", "printable"]


def safe_text(text: Any, newlines: bool = True) -> Text:
    """``text`` as a ``Text`` whose characters are all printable: a ``str`` is taken literally (no
    markup), a ``Text`` keeps its styles (returned as is when there is nothing to escape)."""
    if not isinstance(text, Text):
        return Text(printable(text, newlines))
    plain = text.plain
    if not has_unsafe(plain, newlines):
        return text
    spans = text.spans
    cuts = sorted({0, len(plain), *(s.start for s in spans), *(s.end for s in spans)})
    out = Text(style=text.style, justify=text.justify, overflow=text.overflow, no_wrap=text.no_wrap,
               end=text.end, tab_size=text.tab_size)
    new_spans: list[Span] = []
    for a, b in zip(cuts, cuts[1:]):
        if not 0 <= a < b <= len(plain):
            continue
        piece = printable(plain[a:b], newlines)
        start = len(out)
        out.append(piece)
        new_spans += [Span(start, start + len(piece), s.style) for s in spans if s.start <= a and b <= s.end]
    out.spans = new_spans     # in the original order: where spans overlap, the later one wins
    return out


def safe_lines(lines: list[list[Segment]]) -> list[list[Segment]]:
    """Rendered lines with every control character in their text escaped (one scan per line; a
    line that needs it is rebuilt, without control segments: the viewer's panels emit none)."""
    out = []
    for line in lines:
        if has_unsafe("".join([seg.text for seg in line])):
            line = [Segment(printable(seg.text), seg.style) for seg in line if not seg.control]
        out.append(line)
    return out
