"""How ``vlmscope view`` looks: the step-context panel (focus, scrolling, what is in view at 80x24,
expected beside recorded positions), the checks' progress, the palette, the focus border and
the screenshot export (``--screenshot``, the ``S`` key, the command palette).

The real app runs with ``App.run_test()`` and is driven with Pilot key presses. The traces are
the examples in ``traces/examples`` (the MQwen one's decode positions fail
``positions.kv-index``: it computes the past length from the head count) and the demo traces
of :mod:`vlmscope.testing`.
"""

from __future__ import annotations

import asyncio
import html
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.style import Style
from rich.text import Text

from vlmscope.tui import analysis
from vlmscope.tui.app import ViewerApp
from vlmscope.tui.charts import mask_heatmap, token_strip
from vlmscope.tui.screens import MainScreen
from vlmscope.tui.widgets.context import ContextPanel
from vlmscope.tui.widgets.detail import DetailPanel
from vlmscope.tui.widgets.header import TraceHeader
from vlmscope.tui.widgets.navigator import Navigator
from vlmscope.tui.pilot import press as _press, settle as _settle

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "traces" / "examples"
MQWEN, QWEN25 = EXAMPLES / "tiny-mqwen-astronaut.h5", EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5"


async def settle(pilot, timeout: float = 60.0) -> None:
    await _settle(pilot, timeout)


async def press(pilot, *keys: str) -> None:
    await _press(pilot, *keys, timeout=60.0)


def run(coro):
    return asyncio.run(coro)


async def wait_until(pilot, cond, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)
    await pilot.pause()


def header_text(app) -> str:
    content = app.screen.query_one(TraceHeader).content
    return content.plain if isinstance(content, Text) else str(content)


def visible_lines(panel) -> list[str]:
    """The lines of a strip panel that are on the screen now (its scroll position, its height)."""
    lines = panel.plain_text().splitlines()
    y = int(panel.scroll_offset.y)
    return lines[y:y + panel.scrollable_content_region.height]


def rgb(app, style: str | Style | None) -> tuple[int, int, int] | None:
    """The colour a style's foreground is drawn in by this app (ANSI names through its theme)."""
    st = Style.parse(style) if isinstance(style, str) else style
    if st is None or st.color is None:
        return None
    return tuple(st.color.get_truecolor(app.ansi_theme))


# --------------------------------------------------------------------------- the context panel


def test_context_panel_takes_the_focus_and_scrolls_with_keys():
    async def go():
        app = ViewerApp([QWEN25], checks=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            await press(pilot, "c")
            ctx = app.screen.query_one(ContextPanel)
            assert ctx.display and ctx.max_scroll_y > 0          # more than fits: there is something to scroll
            seen = []
            for _ in range(3):
                seen.append(type(app.focused))
                if app.focused is ctx:
                    break
                await press(pilot, "tab")
            assert app.focused is ctx, seen
            assert ctx.scroll_offset.y == 0
            await press(pilot, "down")
            assert ctx.scroll_offset.y == 1
            await press(pilot, "pagedown")
            assert ctx.scroll_offset.y > 1
            await press(pilot, "end")
            assert ctx.scroll_offset.y == ctx.max_scroll_y
            assert any("attention mask" in line for line in visible_lines(ctx))
            await press(pilot, "home")
            assert ctx.scroll_offset.y == 0
            await press(pilot, "tab")
            assert isinstance(app.focused, Navigator)            # the cycle goes on to the tree
    run(go())


@pytest.mark.parametrize("trace", [QWEN25, MQWEN], ids=["qwen2.5-vl", "mqwen"])
def test_positions_and_cache_are_in_view_at_80x24(trace):
    async def go():
        app = ViewerApp([trace], checks=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            await press(pilot, "c")
            ctx = app.screen.query_one(ContextPanel)
            lines = visible_lines(ctx)
            assert any(line.startswith("position ids") for line in lines), lines
            assert any(line.startswith("cache length per layer") for line in lines), lines
            # the rows of the position plot are in view, not only its title
            first = next(i for i, line in enumerate(lines) if line.startswith("position ids"))
            assert re.match(r"(t|pos) \S", lines[first + 1])
            # the heatmap is compact on a short panel, and still drawn (after scrolling)
            text = ctx.plain_text()
            if "attention mask [" in text:
                heat = [line for line in text.splitlines() if "▀" in line and "may attend" not in line]
                assert 1 <= len(heat) <= 4
    run(go())


def test_failing_positions_show_the_expected_value_beside_the_recorded_one():
    async def go():
        app = ViewerApp([MQWEN], checks=True)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            assert app.session.checks_done and not app.session.check_error
            await press(pilot, "c")
            ctx = app.screen.query_one(ContextPanel)
            text = ctx.plain_text()
            assert re.search(r"^pos \S+ 0\.\.278$", text, re.M) and "expected" not in text    # the prefill is fine
            await press(pilot, "right_square_bracket")
            lines = ctx.plain_text().splitlines()
            i = next(i for i, line in enumerate(lines) if line.startswith("pos "))
            assert lines[i].startswith("pos █ 4..4")
            # just below the recorded picture: recorded 4 against the 279 the check expected
            assert re.match(r"✗ recorded 4 +expected 279 \(the positions rotary used\) +positions\.kv-index",
                            lines[i + 1])
            assert "transformer.h.0" in lines[i + 1]
            await press(pilot, "right_square_bracket")
            assert any(re.match(r"✗ recorded 4 +expected 280", line) for line in ctx.plain_text().splitlines())
            # the recorded value is in the error colour, the expected one is not
            strip = next(s for s in ctx._strips if "recorded" in s.text)
            segs = [seg for seg in strip if seg.text.strip()]
            recorded = next(seg for seg in segs if seg.text.strip() == "4")
            expected = next(seg for seg in segs if seg.text.startswith("280"))
            assert rgb(app, recorded.style) == rgb(app, "bold red")
            assert rgb(app, expected.style) != rgb(app, "bold red")
    run(go())


def test_expected_values_appear_when_the_checks_finish_after_the_panel_opened(monkeypatch):
    gate = threading.Event()
    real = analysis.run_job

    def slow(fn, *args, **kwargs):
        gate.wait(30)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(analysis, "run_job", slow)

    async def go():
        app = ViewerApp([MQWEN], checks=True)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.5)
            await pilot.press("c", "right_square_bracket")
            ctx = app.screen.query_one(ContextPanel)
            await wait_until(pilot, lambda: ctx.shown == 1)
            assert "expected" not in ctx.plain_text()
            gate.set()
            await settle(pilot)
            assert "expected 279" in ctx.plain_text()
    run(go())


# --------------------------------------------------------------------------- checks' progress


def test_the_header_says_checking_with_the_time_then_a_notification_counts_the_violations(monkeypatch):
    gate = threading.Event()
    real = analysis.run_job

    def slow(fn, *args, **kwargs):       # the real checks, after the test lets them go
        assert gate.wait(30)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(analysis, "run_job", slow)

    async def go():
        app = ViewerApp([MQWEN], checks=True)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: "checking…" in header_text(app))
            assert re.search(r"checking… 0s", header_text(app))
            await asyncio.sleep(1.3)
            await pilot.pause()
            assert re.search(r"checking… [1-9]\d*s", header_text(app)), header_text(app)
            assert not app._notifications
            gate.set()
            await settle(pilot)
            assert app.session.checks_done
            assert "checking" not in header_text(app)
            messages = [n.message for n in app._notifications]
            assert messages == ["checks done: 3 violations"], messages
    run(go())


def test_no_indicator_and_no_notice_when_checks_are_off():
    async def go():
        app = ViewerApp([MQWEN], checks=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            assert "checking" not in header_text(app)
            assert not [n for n in app._notifications if "checks" in n.message]
    run(go())


def test_a_clean_trace_is_reported_clean():
    async def go():
        app = ViewerApp([QWEN25], checks=True)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            assert [n.message for n in app._notifications] == ["checks done: no violations"]
    run(go())


# --------------------------------------------------------------------------- palette and focus


def test_red_is_for_errors_only_and_the_image_span_has_one_colour():
    async def go():
        app = ViewerApp([MQWEN], checks=True)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            await press(pilot, "right_square_bracket", "enter")     # decode 1: it fails a check
            scr = app.screen
            session = scr.session
            idx = session.a.cached(1)
            probe = (1, "p", 0)
            label = session.label(probe)
            step = session.label((1, "s", -1))
            diamond = {rgb(app, s.style) for s in label.spans if label.plain[s.start:s.end].startswith("◆")}
            cross = {rgb(app, s.style) for s in step.spans if "✗" in step.plain[s.start:s.end]}
            assert idx is not None and diamond and cross
            assert cross == {rgb(app, "bold red")}                    # wrong is red
            assert not diamond & cross, (diamond, cross)              # a probe is not an error
            # the image span, wherever it is drawn
            await press(pilot, "c")
            ctx = scr.query_one(ContextPanel)
            strip_line = next(s for s, p in zip(ctx._strips, ctx.plain_text().splitlines())
                              if "███" in p and "░" in p)
            image = {rgb(app, seg.style) for seg in strip_line if "█" in seg.text}
            assert len(image) == 1
            assert not image & cross                                  # the image span is not an error
            assert not image & diamond
    run(go())
    # the mask heatmap draws image columns (fully allowed) in the strip's image colour
    import numpy as np

    spans = [(2, 5)]
    heat = mask_heatmap(np.ones((8, 8), bool), spans, 20, max_rows=4)
    strip = token_strip(np.zeros(8, np.int64), spans, (0, 8), 20)
    strip_img = {s.style for s in strip.spans if "█" in strip.plain[s.start:s.end]}
    heat_cols = {Style.parse(s.style).color.triplet for s in heat.spans if heat.plain[s.start:s.end] == "▀"}
    assert len(strip_img) == 1
    img_rgb = Style.parse(next(iter(strip_img))).color.get_truecolor()
    assert tuple(img_rgb) in {tuple(c) for c in heat_cols if c is not None}


def test_the_focused_panel_has_a_bright_border():
    async def go():
        app = ViewerApp([QWEN25], checks=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            await press(pilot, "c")
            scr = app.screen
            panels = [scr.query_one(Navigator), scr.query_one(DetailPanel), scr.query_one(ContextPanel)]
            for k in range(3):
                focused = app.focused
                assert focused in panels
                for p in panels:
                    edge_type, colour = p.styles.border_top
                    if p is focused:
                        assert edge_type == "heavy"
                        focus_colour = colour
                    else:
                        assert edge_type == "round"
                        other_colour = colour
                # a border, and a colour far from the unfocused one (not 234 against 235)
                assert sum(abs(a - b) for a, b in zip(focus_colour.rgb, other_colour.rgb)) > 150
                await press(pilot, "tab")
    run(go())


# --------------------------------------------------------------------------- screenshots


def _svg_text(path: Path) -> str:
    """The text of a Textual SVG screenshot (spaces are non-breaking there)."""
    s = path.read_text(encoding="utf-8")
    return html.unescape(re.sub(r"<[^>]+>", "", s)).replace("\xa0", " ")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=240)


def test_cli_screenshot_at_a_step_with_a_module_selected_and_the_context_open(tmp_path):
    out = tmp_path / "bug.svg"
    res = _cli("view", str(MQWEN), "--screenshot", str(out), "--step", "1", "--select", "transformer.h.0",
               "--context", "--size", "100x34", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    svg = out.read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<svg") and svg.rstrip().endswith("</svg>")
    text = _svg_text(out)
    assert "step decode 1 of 3 (2/4)" in text                     # the step
    assert "MQwenBlock · decode 1 of 3" in text                    # the module's detail
    assert "recorded 4  expected 279" in text                      # the context panel, checks included
    assert "checks done" not in text                               # no toast in the picture
    # 100 columns: the widest line of the picture
    assert 'viewBox="0 0 ' in svg

    # an existing file is refused in one line (exit 2) and left as it was
    before = out.read_bytes()
    res = _cli("view", str(MQWEN), "--screenshot", str(out), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "exists" in res.stderr and "--force" in res.stderr
    assert out.read_bytes() == before
    res = _cli("view", str(MQWEN), "--screenshot", str(out), "--force", "--size", "80x24", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() != before and "step prefill (1/4)" in _svg_text(out)


def test_cli_screenshot_refuses_what_it_cannot_do(tmp_path):
    out = tmp_path / "x.svg"
    for args, words in [(("--screenshot", str(out), "--step", "9"), "steps 0 to 3"),
                        (("--screenshot", str(out), "--select", "no.such.module"), "no module call matches"),
                        (("--screenshot", str(out), "--size", "big"), "WIDTHxHEIGHT"),
                        (("--step", "1"), "only apply with --screenshot")]:
        res = _cli("view", str(MQWEN), *args, cwd=tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        assert words in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
        assert not out.exists()


def test_S_saves_a_screenshot_here_and_says_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vlmscope-tiny-mqwen-astronaut-prefill.svg").write_text("mine")    # never overwritten

    async def go():
        app = ViewerApp([MQWEN], checks=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(pilot)
            await press(pilot, "S")
            new = tmp_path / "vlmscope-tiny-mqwen-astronaut-prefill-2.svg"
            assert new.exists() and "step prefill (1/4)" in _svg_text(new)
            assert (tmp_path / "vlmscope-tiny-mqwen-astronaut-prefill.svg").read_text() == "mine"
            assert any(n.message == f"screenshot saved: {new.relative_to(tmp_path)}" for n in app._notifications)
    run(go())


def test_the_command_palette_saves_a_screenshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    async def go():
        app = ViewerApp([MQWEN], checks=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(pilot)
            await pilot.press("ctrl+p")
            await pilot.pause(0.3)
            await pilot.press(*"save screenshot")
            await pilot.pause(0.5)
            await pilot.press("enter")
            await wait_until(pilot, lambda: list(tmp_path.glob("*.svg")))
            [svg] = list(tmp_path.glob("*.svg"))
            await pilot.pause(0.2)
            assert isinstance(app.screen, MainScreen)
            text = _svg_text(svg)
            assert "step prefill (1/4)" in text and "Save screenshot" not in text    # the viewer, not the palette
    run(go())
