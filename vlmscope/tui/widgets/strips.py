"""A scrollable view of pre-rendered lines (the base of the detail and context panels).

Rich renderables are rendered to :class:`Strip` lines in a worker thread, at the panel's
width; the UI thread only crops the visible lines (as textual's ``Log`` does), so a cursor
move costs a few lines of work however long or table-heavy the content is.
"""

from __future__ import annotations

import io

from rich.console import Console, RenderableType
from rich.segment import Segment
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from vlmscope.tui.safe import safe_lines


def render_strips(renderable: RenderableType, width: int) -> list[Strip]:
    """Render ``renderable`` at ``width`` columns into strips (thread-safe: a private console).
    The text is made printable on the way (:func:`vlmscope.tui.safe.safe_lines`): whatever string
    of the trace got into ``renderable``, no escape sequence reaches the terminal."""
    console = Console(width=width, file=io.StringIO(), color_system="truecolor", force_terminal=True,
                      legacy_windows=False, highlight=False, emoji=False, markup=False)
    options = console.options.update(width=width, highlight=False)
    lines = safe_lines(console.render_lines(renderable, options, pad=False))
    return [Strip(line, Segment.get_line_length(line)) for line in lines]


class StripView(ScrollView, can_focus=True):
    """Shows a list of strips; ``set_strips`` replaces them."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._strips: list[Strip] = []

    def set_strips(self, strips: list[Strip], keep_scroll: bool = False) -> None:
        self._strips = strips
        width = max((s.cell_length for s in strips), default=0)
        self.virtual_size = Size(width, len(strips))
        if not keep_scroll:
            self.scroll_to(0, 0, animate=False)
        self.refresh()

    def plain_text(self) -> str:
        """The content as plain text (for tests and copy)."""
        return "\n".join("".join(seg.text for seg in strip).rstrip() for strip in self._strips)

    def render_lines(self, crop):
        # the widget's style is the same for every line: compute it once per paint
        self._paint_style = self.rich_style
        try:
            return super().render_lines(crop)
        finally:
            self._paint_style = None

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        i = scroll_y + y
        style = getattr(self, "_paint_style", None) or self.rich_style
        if i >= len(self._strips):
            return Strip.blank(width, style)
        return self._strips[i].crop_extend(scroll_x, scroll_x + width, style).apply_style(style)
