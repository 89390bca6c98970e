"""The viewer's diff mode (issue 11): next / previous divergence (d / D), the "divergent only"
filter, g on the exact divergent row, both prompts in the header. Real key presses (Pilot) on the
synthetic demo traces: B's shape differs at layers.1.mlp.down_proj in the prefill, and a NaN in
B's layers.0.self_attn makes its outputs drift in every step."""

from __future__ import annotations

import asyncio

import pytest

import vlmscope

from vlmscope.analyze.diff import diff
from vlmscope.analyze.status import Status
from vlmscope.testing import write_demo_trace
from vlmscope.tui.app import ViewerApp
from vlmscope.tui.pilot import notes_of, press, settle

ATTN, DOWN = "model.language_model.layers.0.self_attn", "model.language_model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffmode")
    return write_demo_trace(d / "a.h5"), write_demo_trace(d / "b.h5", variant="b", nan_in=ATTN)


def path_of(scr, item):
    tm, idx = scr.session.model_for(item)
    return tm.module_path(int(idx.module[idx.event_of(item)]))


def test_d_and_D_walk_the_divergences_of_vlmscope_diff_in_order(pair):
    a, b = pair
    # the calls vlmscope diff names, in its order (one per call)
    want = []
    for dv in diff(a, b).divergences:
        if (dv.step, dv.module) not in want:
            want.append((dv.step, dv.module))
    assert want == [(0, ATTN), (0, DOWN), (1, ATTN), (2, ATTN), (3, ATTN)]

    async def go():
        app = ViewerApp([a, b], checks=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            scr = app.screen
            notes = notes_of(app)
            await pilot.press("d", "d", "d", "d", "d")       # fast: every press lands
            await settle(pilot)
            last = scr.nav.current
            await pilot.press("d")
            await settle(pilot)
            assert "no next divergence" in notes[-1]
            seen = [last]
            for _ in range(4):
                await press(pilot, "D")
                seen.append(scr.nav.current)
            await press(pilot, "D")
            assert "no previous divergence" in notes[-1]
            return [(it[0], path_of(scr, it)) for it in seen], scr.session.diff.status(seen[-1])
    seen, status = asyncio.run(go())
    assert seen[::-1] == want
    assert status == Status.DRIFT


def test_divergent_only_filter_shows_divergences_and_their_ancestors(pair):
    a, b = pair

    async def go():
        app = ViewerApp([a, b], checks=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            scr = app.screen
            for _ in range(5):
                await press(pilot, "f")
            assert scr.session.filter == "divergent"
            shown = []
            await press(pilot, "d", "d")
            node = scr.nav.root
            stack = [node]
            while stack:
                n = stack.pop()
                if n.data is not None and n.data[0] == 0 and n.data[1] == "e":
                    shown.append(path_of(scr, n.data))
                stack.extend(n.children)
            await press(pilot, "f")
            return shown, scr.session.filter
    shown, back = asyncio.run(go())
    assert ATTN in shown and DOWN in shown
    assert all(ATTN.startswith(p) or DOWN.startswith(p) for p in shown), shown
    assert "model.visual" not in shown
    assert back == "all"


def test_g_lands_on_the_divergent_row_and_header_has_both_prompts(pair):
    a, b = pair

    async def go():
        app = ViewerApp([a, b], checks=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot)
            scr = app.screen
            await press(pilot, "g")
            cur = scr.nav.current
            header = scr.query_one("#header").render()
            return path_of(scr, cur), cur, str(header)
    path, cur, header = asyncio.run(go())
    assert path == ATTN and cur[1] == "e"
    assert "prompt A = B Describe this image." in header


def test_header_names_each_runs_model_and_prompt(qwen25_trace_path, qwen2_trace_path):
    """Diffing two models (a port against its reference, Qwen2-VL against Qwen2.5-VL), the
    header names both, not A's twice."""
    async def go():
        app = ViewerApp([qwen25_trace_path, qwen2_trace_path], checks=False)
        async with app.run_test(size=(220, 40)) as pilot:
            await settle(pilot)
            return str(app.screen.query_one("#header").render())
    header = asyncio.run(go())
    with vlmscope.open_trace(qwen25_trace_path) as ta, vlmscope.open_trace(qwen2_trace_path) as tb:
        ma, mb = ta.meta["model"], tb.meta["model"]
    assert ma != mb
    assert f"{ma} vs {mb}" in header, header
