"""The viewer's batch rows (issue 10): ``r`` / ``R`` select a batch row, the header says which
("row 1 (2/3)"), the context panel (``c``) shows that row's mask, spans, positions and rope
delta, and a trace of several generate calls names the call of every step.

Real recordings (tests/view/batch_traces.py): tiny-qwen2-vl, call 0 a left-padded batch of three
rows (one image; text only; two images), call 1 one row; tiny-qwen2.5-vl with a video row. What
each row must show comes from the processor's inputs and the model's own ``get_rope_index``.
Keys are real Pilot key presses, quick (no waiting between them) and slow (settled after each).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from rich.console import Console

from vlmscope.tui.app import ViewerApp
from vlmscope.tui.modals import KEYS, HelpScreen
from vlmscope.tui.pilot import notes_of, press, settle
from vlmscope.tui.screens import MainScreen
from vlmscope.tui.widgets.header import TraceHeader

ROOT = Path(__file__).resolve().parents[2]
B1 = ROOT / "traces" / "examples" / "tiny-qwen2.5-vl-astronaut.h5"
SIZE = (120, 40)


@pytest.fixture(scope="module")
def batch(batch_rows_trace) -> dict:
    return batch_rows_trace      # tests/conftest.py: recorded once per session


@pytest.fixture(scope="module")
def video(batch_video_trace) -> dict:
    return batch_video_trace


def run(coro):
    return asyncio.run(coro)


def plain(renderable, width: int = 160) -> str:
    c = Console(file=io.StringIO(), width=width, color_system=None)
    c.print(renderable)
    return c.file.getvalue()


def header(scr: MainScreen) -> str:
    return " ".join(plain(scr.query_one(TraceHeader).content).split())


def context(scr: MainScreen) -> str:
    return plain(scr.context.renderable)


def rng(r: list[int]) -> str:
    return f"{r[0]}..{r[1]}"


def ranges(rs: list[list[int]]) -> str:
    """Ranges per axis as the viewer writes them: ``0..28 x3`` when equal, else ``t .. h .. w ..``."""
    if len({tuple(r) for r in rs}) == 1:
        return f"{rng(rs[0])} x{len(rs)}"
    return " ".join(f"{n} {rng(r)}" for n, r in zip("thw", rs))


def assert_row(scr: MainScreen, b: int, want: dict, n_rows: int = 3) -> None:
    """Header and context panel show prefill row ``b`` as the processor and the model made it."""
    assert f"row {b} ({b + 1}/{n_rows})" in header(scr), header(scr)
    text = context(scr)
    assert f"batch row {b} ({b + 1}/{n_rows})" in text, text
    pad = want["pad"]
    mask_line = f"mask  {want['length']} keys: {want['keys']} allowed, {pad} padding"
    assert mask_line in text, text
    if pad:
        assert f"pad     [0, {pad})       {pad} tok" in text and f"padding [0, {pad})" in text, text
    else:
        assert "pad     [" not in text, text
    assert f"rope_deltas  {want['rope_delta']}  [{n_rows}, 1]" in text, text
    assert f"positions  {ranges(want['positions'])}  t h w, padding left out" in text, text
    lines = [ln.strip() for ln in text.splitlines()]
    images = [ln for ln in lines if ln.startswith("image ") and "tok" in ln]
    assert len(images) == len(want["image_spans"]), text
    for k, ((a, e), line) in enumerate(zip(want["image_spans"], images)):
        assert line.startswith(f"image {k} [{a}, {e})") and f"{e - a} tok" in line, line
        assert f"grid {'x'.join(str(g) for g in want['grids'][k])}" in line, line
        assert ranges(want["span_positions"][k]) in line, line


# --------------------------------------------------------------------------- r and R


def test_r_and_R_walk_the_rows_and_wrap_around(batch):
    rows = batch["calls"][0]["rows"]

    async def go():
        app = ViewerApp([batch["path"]], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await press(pilot, "c")
            assert_row(scr, 0, rows[0])
            for b in (1, 2, 0):                    # r: next row, wrapping from the last to the first
                await press(pilot, "r")
                assert_row(scr, b, rows[b])
            await press(pilot, "R")                # R from the first: the last
            assert_row(scr, 2, rows[2])
            await press(pilot, "R")
            assert_row(scr, 1, rows[1])
    run(go())


def test_quick_presses_land_on_the_right_row(batch):
    rows = batch["calls"][0]["rows"]

    async def go():
        app = ViewerApp([batch["path"]], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await pilot.press("c")
            for k in ("r", "r", "r", "r", "r"):     # no waiting: 5 mod 3
                await pilot.press(k)
            await settle(pilot)
            assert_row(scr, 2, rows[2])
            for k in ("R", "r", "R", "R", "R", "r", "R"):   # -3: back to 2
                await pilot.press(k)
            await settle(pilot)
            assert_row(scr, 2, rows[2])
            for k in ("r", "right_square_bracket", "left_square_bracket", "r"):   # rows and steps mixed
                await pilot.press(k)
            await settle(pilot)
            assert scr.step == 0
            assert_row(scr, 1, rows[1])
    run(go())


def test_the_row_follows_the_steps_of_its_call(batch):
    """A decode step shows the selected row's new token (its position: the row's prefill maximum
    + 1) and the row's images in the call's prefill; call 1 has one row (no row selector), and
    coming back to call 0 shows the row selected before."""
    rows = batch["calls"][0]["rows"]

    async def go():
        app = ViewerApp([batch["path"]], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            notes = notes_of(app)
            scr = app.screen
            await press(pilot, "c", "r", "r", "right_square_bracket")
            assert scr.step == 1 and "step call 0 decode 1 of 1 (2/4)" in header(scr), header(scr)
            assert "row 2 (3/3)" in header(scr)
            text = context(scr)
            nxt = max(hi for _, hi in rows[2]["positions"]) + 1
            assert f"positions  {nxt}..{nxt} x3" in text and "text    [0, 1)        1 tok" in text, text
            assert f"mask  {rows[2]['length'] + 1} keys: {rows[2]['keys'] + 1} allowed, 0 padding" in text, text
            assert "images and videos of this row in the call's prefill (step 0):" in text, text
            for k, (a, e) in enumerate(rows[2]["image_spans"]):
                assert f"image {k} [{a}, {e})" in text, text
            await press(pilot, "r")                  # row 0 in the decode step: its padding stays masked
            text = context(scr)
            pad = rows[0]["pad"]
            assert f"{rows[0]['keys'] + 1} allowed, {pad} padding [0, {pad})" in text, text
            await press(pilot, "R", "right_square_bracket")          # call 1: one row
            assert "step call 1 prefill (3/4)" in header(scr) and "row " not in header(scr), header(scr)
            assert "batch row" not in context(scr)
            await press(pilot, "r")
            assert notes[-1] == "this step has one batch row"
            await press(pilot, "left_square_bracket", "left_square_bracket")    # back in call 0: row 2 again
            assert scr.step == 0
            assert_row(scr, 2, rows[2])
    run(go())


def test_the_tree_names_the_call_of_every_step(batch):
    async def go():
        app = ViewerApp([batch["path"]], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            labels = [scr.session.label((s, "s", -1)).plain.split(" q ")[0] for s in range(4)]
            assert labels == ["call 0 prefill", "call 0 decode 1 of 1", "call 1 prefill", "call 1 decode 1 of 1"]
            await press(pilot, "G")
            assert scr.step == 3 and "step call 1 decode 1 of 1 (4/4)" in header(scr), header(scr)
    run(go())


def test_a_video_row_shows_its_grid_and_second_per_grid_ts(video):
    async def go():
        app = ViewerApp([video["path"]], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await press(pilot, "c")
            assert "row 0 (1/2)" in header(scr)
            (a, e), = video["video_span"]
            line = next(ln.strip() for ln in context(scr).splitlines() if ln.strip().startswith("video 0"))
            assert line.startswith(f"video 0 [{a}, {e})") and f"{e - a} tok" in line, line
            assert f"grid {'x'.join(str(g) for g in video['video_grid'][0])}" in line, line
            assert f"second_per_grid_ts {video['second_per_grid_ts'][0]:g}" in line, line
            await press(pilot, "r")
            text = context(scr)
            assert "batch row 1 (2/2)" in text and "video 0" not in text and "image 0 [" in text, text
    run(go())


# --------------------------------------------------------------------------- B = 1 and every key


def test_one_row_changes_nothing():
    """B=1: no row in the header or the context panel, and r / R say why they do nothing."""

    async def go():
        app = ViewerApp([B1], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            notes = notes_of(app)
            scr = app.screen
            await press(pilot, "c")
            before_head, before_ctx = header(scr), context(scr)
            assert "row" not in before_head and "batch row" not in before_ctx
            assert "step prefill (1/4)" in before_head
            await press(pilot, "r", "R")
            assert (header(scr), context(scr)) == (before_head, before_ctx)
            assert notes == ["this step has one batch row"] * 2
    run(go())


#: every key of the help screen and the bindings (S, the screenshot, writes into the cwd)
EVERY_KEY = ("j", "enter", "n", "N", "right_square_bracket", "left_square_bracket", "r", "R", "colon", "1", "enter",
             "home", "G", "slash", "m", "escape", "f", "c", "r", "g", "e", "p", "escape", "tab", "R", "S",
             "question_mark", "escape", "r", "r", "r", "R", "end", "c")
#: pressed again one at a time, the viewer settled after each
SLOW_KEYS = ("c", "r", "right_square_bracket", "r", "R", "home", "R", "f", "r", "c", "r")


@pytest.mark.parametrize("which", ["b1", "b3"])
def test_no_key_crashes_the_viewer(which, batch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = B1 if which == "b1" else batch["path"]
    assert [k for k, _ in KEYS if k == "r R"] == ["r R"]          # the help lists the row keys

    async def go():
        app = ViewerApp([path], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            for k in EVERY_KEY:
                await pilot.press(k)                # quick
            await settle(pilot)
            await press(pilot, *SLOW_KEYS)          # slow
            assert isinstance(app.screen, MainScreen) and app.screen.opened
            await press(pilot, "question_mark")
            assert isinstance(app.screen, HelpScreen)
            await press(pilot, "escape", "q")
        assert app.return_code in (0, None), app.crash_line
    run(go())
