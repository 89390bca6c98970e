"""The viewer's diff mode (issue 11): the step context panel (``c``) shows B's context for the step
paired with A's beside A's -- side by side on a wide terminal, stacked (A, then B) on a narrow one,
each titled with its trace name -- after an A-vs-B table of the step fields; what differs is
marked ``≠`` in the non-red "different" style. Real key presses (Pilot) on the README pair: MQwen's
decode positions are 1-D ``[4, ...]``, Qwen2.5-VL's M-RoPE ``[41, ...]``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from rich.style import Style

from vlmscope.tui.app import ViewerApp
from vlmscope.tui.pilot import press, settle
from vlmscope.tui.widgets.context import ContextPanel

EXAMPLES = Path(__file__).resolve().parents[2] / "traces" / "examples"
MQWEN, QWEN25 = EXAMPLES / "tiny-mqwen-astronaut.h5", EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5"


def _context_at_decode_step(size: tuple[int, int]) -> tuple[str, list, int]:
    """Press ``c`` and ``]`` (step 1, the first decode step): the panel's text, its rendered strips
    and the step shown."""
    async def go():
        app = ViewerApp([MQWEN, QWEN25], checks=False)
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            await press(pilot, "c", "right_square_bracket")
            ctx = app.screen.query_one(ContextPanel)
            assert ctx.display
            return ctx.plain_text(), list(ctx._strips), ctx.shown
    return asyncio.run(go())


def _marker_styles(strips: list) -> list[Style]:
    return [seg.style for strip in strips for seg in strip if "≠" in seg.text and seg.style is not None]


@pytest.mark.parametrize("size, layout", [((80, 24), "stacked"), ((160, 48), "side by side")],
                         ids=["narrow-80x24", "wide-160x48"])
def test_context_in_diff_mode_shows_b_beside_a_with_the_differences_marked(size, layout):
    text, strips, shown = _context_at_decode_step(size)
    lines = text.splitlines()
    assert shown == 1
    # the A-vs-B table first: the positions row carries both values, marked as differing
    pos_row = next(line for line in lines if "positions" in line and "4..4" in line)
    assert pos_row.startswith("≠ ") and "41..41" in pos_row, pos_row
    q_len = next(line for line in lines if line.lstrip("≠ ").startswith("q_len"))
    assert not q_len.startswith("≠"), q_len                 # both feed one token: not marked
    assert lines.index(pos_row) < next(i for i, line in enumerate(lines) if "position ids" in line)
    # each side titled with its trace name; both traces' position plots, their titles marked ≠
    a_title = next(i for i, line in enumerate(lines) if " A  tiny-mqwen-astronaut.h5" in line)
    b_title = next(i for i, line in enumerate(lines) if " B  tiny-qwen2.5-vl-astronaut.h5" in line)
    a_pos = next(i for i, line in enumerate(lines) if "pos █ 4..4" in line)
    b_pos = next(i for i, line in enumerate(lines) if "t █ 41..41" in line)
    assert sum(line.count("≠ position ids") for line in lines) == 2
    seen = "side by side" if a_title == b_title and a_pos == b_pos else \
        "stacked" if a_title < a_pos < b_title < b_pos else "neither"     # stacked: A, then B
    assert seen == layout, text
    # the marker is drawn in the "different" style, never red (red means wrong)
    styles = _marker_styles(strips)
    assert len(styles) >= 4
    assert all(s.color is not None and "red" not in s.color.name for s in styles), styles
