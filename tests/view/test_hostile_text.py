"""The viewer shows a trace's strings as text (issue 13): markup in a module name, class name,
prompt, tensor name, error message or check hint is shown literally, and terminal escape sequences
(OSC title, CSI colours, the one-byte C1 CSI) never reach the screen, driven with Pilot keys.

The hostile traces come from ``tests/cli/test_hostile_text.py`` (:func:`hostile_trace`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
from pathlib import Path

import pytest

from vlmscope.tui.app import ViewerApp
from vlmscope.tui.modals import MessageScreen, PayloadScreen
from vlmscope.tui.screens import MainScreen
from vlmscope.tui.widgets.context import ContextPanel
from vlmscope.tui.widgets.header import TraceHeader
from vlmscope.tui.widgets.summary import DiffSummary
from vlmscope.tui.pilot import press as _press, settle as _settle

_spec = importlib.util.spec_from_file_location(
    "hostile_traces", Path(__file__).resolve().parents[1] / "cli" / "test_hostile_text.py")
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

SIZE = (200, 50)
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")      # nothing but text on screen (not even \n)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("hostile_view")
    return H.hostile_trace(d / "a.h5", "a"), H.hostile_trace(d / "b.h5", "b")


async def settle(pilot, timeout: float = 60.0) -> None:
    await _settle(pilot, timeout)


async def press(pilot, *keys: str) -> None:
    await _press(pilot, *keys, timeout=60.0)


def run(coro):
    return asyncio.run(coro)


def screen_text(app) -> str:
    """What the terminal would show now, as text: every segment of a full repaint of the screen
    (toasts included). Asserts that none carries a control character or a hyperlink."""
    update = app.screen._compositor.render_full_update()
    lines = []
    for chops in update.strips:                 # one screen line: the strips of its chops
        line = []
        for strip in chops:
            for seg in strip:
                assert not seg.control, seg
                bad = CONTROL.search(seg.text)
                assert bad is None, (bad.group(), seg.text)
                assert seg.style is None or not seg.style.link, (seg.style, seg.text)
                line.append(seg.text)
        lines.append("".join(line))
    for t in (app.title, app.sub_title, app.screen.title or "", app.screen.sub_title or ""):
        assert CONTROL.search(t) is None, t           # the terminal's title stays ours
    return "\n".join(lines)


def assert_shown_literally(text: str, *parts: str) -> None:
    flat = " ".join(text.split())
    for p in parts:
        assert p in flat, (p, flat[:3000])


def test_viewer_shows_hostile_strings_as_text(hostile):
    a, _ = hostile

    async def go():
        app = ViewerApp([a])
        sent: list[str] = []

        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await settle(pilot)
            scr = app.screen
            assert isinstance(scr, MainScreen), type(scr)
            assert scr.session.checks_done and scr.session.check_error is None, scr.session.check_error
            # the header: model and prompt, as written
            head = " ".join(str(scr.query_one(TraceHeader).content).split())
            assert "tiny" + H.LINK in head and "Describe " + H.LINK in head and "\\x1b]0;pwned\\x07" in head
            assert H.STYLE + " " + H.LONE in head
            # the first step's detail: the error record (type, message, module stack, last reshape)
            screen_text(app)
            detail = scr.detail.plain_text()
            assert_shown_literally(detail, "RuntimeError" + H.LINK, "boom " + H.LINK, H.STYLE + " " + H.LONE,
                                   "\\x1b]0;pwned\\x07", "\\x1b[31m", "\\x9b31m", "in <root> > model > " + H.LEAF)
            assert CONTROL.search(detail.replace("\n", "")) is None

            # e: the next check violation, the NaN out of the hostile module; its note quotes the hint
            orig_notify = app.notify

            def spy(message, **kw):
                sent.append(str(message))
                return orig_notify(message, **kw)

            app.notify = spy
            n = len(scr.session.a.violations)
            for _ in range(n):
                await press(pilot, "e")
                if sent and sent[-1].startswith("✗ numbers.nonfinite"):
                    break
            item = scr.nav.current
            assert item is not None and item[1] == "e"
            tm, idx = scr.session.model_for(item)
            assert tm.module_path(int(idx.module[item[2]])) == H.HOSTILE_MODULE
            label = scr.nav.cursor_node.label.plain
            assert label.startswith("mlp" + H.LINK) and "\\x1b]0;pwned" in label and label.endswith(" ✗")
            assert sent and sent[-1].startswith("✗ numbers.nonfinite")
            text = screen_text(app)                             # the toast is on screen, as text
            assert_shown_literally(text, "✗ numbers.nonfinite")
            # its detail: module path, class, the failing check, the output tensor's name
            detail = scr.detail.plain_text()
            assert_shown_literally(detail, H.LEAF + H.LINK, "Qwen2MLP" + H.LINK, "✗ numbers.nonfinite",
                                   "out" + H.LINK, H.STYLE + " " + H.LONE, "\\x9b31m")
            assert CONTROL.search(detail.replace("\n", "")) is None
            # enter: expand it; its children's labels are text too
            await press(pilot, "enter")
            kids = [n.label.plain for it, n in scr.nav.nodes.items() if it[0] == item[0] and it[1] == "e"
                    and tm.module_path(int(idx.module[it[2]])).startswith(H.HOSTILE_MODULE + ".")]
            assert kids and all(CONTROL.search(k) is None for k in kids)
            await press(pilot, "j")
            screen_text(app)
            # c: the step context panel
            await press(pilot, "c")
            ctx = scr.query_one(ContextPanel)
            assert ctx.display and ctx.shown == item[0]
            assert "attention mask" in ctx.plain_text()
            screen_text(app)
            # the help screen and back
            await press(pilot, "question_mark")
            screen_text(app)
            await press(pilot, "escape")
            assert app.screen is scr

    run(go())


def test_notifications_are_never_markup(hostile):
    """ViewerApp.notify hands Textual plain text: a message with ``[/]`` and escape sequences
    (a check hint, an error message) is shown as written."""
    a, _ = hostile

    async def go():
        app = ViewerApp([a], checks=False)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await settle(pilot)
            app.notify("checks failed: " + H.EVIL, severity="error", timeout=30)
            await settle(pilot)
            text = screen_text(app)
            assert_shown_literally(text, "checks failed: " + H.LINK, H.STYLE + " " + H.LONE, "\\x1b]0;pwned\\x07")

    run(go())


def test_payload_modal_names_are_text(hostile):
    """p on a call with a saved tensor: the modal's title is the tensor's name, as text."""
    a, _ = hostile

    async def go():
        app = ViewerApp([a], checks=False)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await settle(pilot)
            scr = app.screen
            await press(pilot, "slash")
            for ch in "lm_head":
                await pilot.press(ch)
            await press(pilot, "enter", "escape")
            await press(pilot, "p")
            assert isinstance(app.screen, PayloadScreen), app.screen
            text = screen_text(app)
            assert_shown_literally(text, "out" + H.LINK)
            await press(pilot, "escape")
            assert app.screen is scr

    run(go())


def test_diff_mode_shows_hostile_strings_as_text(hostile):
    a, b = hostile

    async def go():
        app = ViewerApp([a, b], checks=False)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await settle(pilot)
            scr = app.screen
            summary = " ".join(str(scr.query_one(DiffSummary).content).split())
            assert "first divergence" in summary and H.LEAF + H.LINK in summary, summary
            screen_text(app)
            await press(pilot, "g")                    # to the first divergence
            item = scr.nav.current
            tm, idx = scr.session.model_for(item)
            assert tm.module_path(int(idx.module[idx.event_of(item)])).startswith(H.HOSTILE_MODULE)
            detail = scr.detail.plain_text()
            assert_shown_literally(detail, "out" + H.LINK, "\\x1b]0;pwne")
            assert CONTROL.search(detail.replace("\n", "")) is None
            text = screen_text(app)
            assert_shown_literally(text, "first divergence", H.LEAF + H.LINK)

    run(go())


def test_unreadable_trace_message_is_text(tmp_path):
    """The message screen for a file that cannot be read names the file: as text."""
    bad = tmp_path / f"bad{H.OSC_TITLE}{H.STYLE[:-3]}{H.CSI}.h5"      # no "/" in a file name
    bad.write_bytes(b"not an hdf5 file at all" * 10)

    async def go():
        app = ViewerApp([bad], checks=False)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await settle(pilot)
            assert isinstance(app.screen, MessageScreen), app.screen
            text = screen_text(app)
            assert_shown_literally(text, "cannot open the trace", "bad\\x1b]0;pwned\\x07[bold", "red]X\\x1b[31m.h5")

    run(go())
