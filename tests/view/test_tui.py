"""Behaviour of ``vlmscope view``: the real app driven with ``App.run_test()`` and Pilot keys.

Traces are recorded once per session from the embedded tiny-qwen2.5-vl: A (the merger's
output saved as payloads) and B, the same run with ``model.language_model.layers.1.mlp``
hooked to scale its output and put one NaN in it (values drift there, a non-finite check
fails there). Bad-file handling uses small traces written with ``TraceWriter`` / the demo.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from vlmscope.analyze.maps import parse_maps
from vlmscope.analyze.status import Status
from vlmscope.cli import main as cli_main
from vlmscope.tui import analysis
from vlmscope.tui.app import ViewerApp
from vlmscope.tui.charts import mask_heatmap, position_plot, token_strip
from vlmscope.tui.data import match_paths, module_pattern
from vlmscope.testing import write_demo_trace
from vlmscope.tui.items import B_KINDS, FILTER_LABELS, FILTERS
from vlmscope.tui.modals import KEYS, HelpScreen, MessageScreen, PayloadScreen
from vlmscope.tui.screens import MainScreen
from vlmscope.tui.widgets.context import ContextPanel
from vlmscope.tui.widgets.detail import WIDE
from vlmscope.tui.widgets.header import TraceHeader
from vlmscope.tui.widgets.summary import DiffSummary
from vlmscope.trace import read_strings, write_strings
from vlmscope.tui.pilot import notes_of, press, settle

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples" / "astronaut.png"
HOOKED = "model.language_model.layers.1.mlp"
SIZE = (120, 40)
EXAMPLES = ROOT / "traces" / "examples"
MQWEN, QWEN25 = EXAMPLES / "tiny-mqwen-astronaut.h5", EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5"
#: mqwen's attention modules as Qwen2.5-VL names them (README: diffing two implementations)
MQWEN_MAP = r"transformer\.h\.(\d+)\.attn=model.language_model.layers.\1.self_attn"


# --------------------------------------------------------------------------- traces


@pytest.fixture(scope="session")
def view_traces(tmp_path_factory) -> tuple[Path, Path]:
    """(A, B) recorded from tiny-qwen2.5-vl; B differs from layers.1.mlp on (drift + one NaN)."""
    import torch
    import vlmscope_models
    from vlmscope.recorder import record

    d = tmp_path_factory.mktemp("view")
    model, proc = vlmscope_models.load_embedded("tiny-qwen2.5-vl")
    a = record(model, proc, image=str(IMAGE), prompt="Describe this image.", out=d / "a.h5",
               max_new_tokens=4, save_tensors=["model.visual.merger"])

    def hook(module, args, output):
        out = output * 1.5
        out.view(-1)[0] = float("nan")
        return out

    handle = model.get_submodule(HOOKED).register_forward_hook(hook)
    try:
        with torch.no_grad():
            b = record(model, proc, image=str(IMAGE), prompt="Describe this image.", out=d / "b.h5",
                       max_new_tokens=4)
    finally:
        handle.remove()
    return Path(a), Path(b)


@pytest.fixture(scope="session")
def trace_a(view_traces) -> Path:
    return view_traces[0]


@pytest.fixture(scope="session")
def trace_b(view_traces) -> Path:
    return view_traces[1]


# --------------------------------------------------------------------------- helpers


def run(coro):
    return asyncio.run(coro)


async def press_no_wait(pilot, *keys: str) -> None:
    for k in keys:
        await pilot.press(k)
        await pilot.pause()


def plain(renderable, width: int = 160) -> str:
    c = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    c.print(renderable)
    return c.export_text()


def detail_text(scr: MainScreen) -> str:
    return scr.detail.plain_text()


def header_text(scr: MainScreen) -> str:
    return plain(scr.query_one(TraceHeader).content)


def path_of(scr: MainScreen, item) -> str:
    tm, idx = scr.session.model_for(item)
    ev = idx.event_of(scr.session.b_item(item) if item[1] in B_KINDS else item)
    return tm.module_path(int(idx.module[ev])) if ev >= 0 else ""


def cli_json(*args: str) -> dict:
    """``vlmscope ARGS --json``, parsed."""
    res = CliRunner().invoke(cli_main, [*args, "--json"])
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.stdout)


def tree_items(session, item):
    """Every item of the tree under ``item`` (all filters off), depth first."""
    for child in session.children(item):
        yield child
        if child[1] in ("e", "b"):
            yield from tree_items(session, child)


@pytest.fixture
def helper_jobs(tmp_path, monkeypatch):
    """A module, importable by the analysis processes, with a job that hangs and one that fails."""
    (tmp_path / "vlmscope_test_jobs.py").write_text(
        "import time\n\n\ndef hang(*args):\n    time.sleep(300)\n\n\n"
        "def fail(*args):\n    raise RuntimeError('a rule exploded')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vlmscope_test_jobs

    return vlmscope_test_jobs


async def goto_module(pilot, path: str, step: int = 0):
    """Put the cursor on the first call of ``path`` in ``step`` (through the search bar)."""
    scr = pilot.app.screen
    await press(pilot, "slash")
    scr.query_one("#search").value = path      # typing is covered by test_search_by_glob_and_substring
    await press(pilot, "enter", "escape")
    assert path_of(scr, scr.nav.current) == path, (path, scr.nav.current)
    return scr.nav.current


# --------------------------------------------------------------------------- opening


def test_first_screen_shows_header_tree_and_detail(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            assert isinstance(scr, MainScreen)
            head = header_text(scr)
            meta = scr.session.a.meta
            for part in (str(meta.get("model") or meta["model_class"]), "cpu", "float32", "complete", "prefill",
                         "Describe this image."):
                assert part in head
            a = scr.session.a
            steps = [it for it in scr.nav.nodes if it[1] == "s"]
            assert len(steps) == a.n_steps == 4
            assert scr.nav.current == (0, "s", -1)
            assert scr.detail.shown == (0, "s", -1)
            text = detail_text(scr)
            assert "q_len" in text and "cache" in text and "0 -> " in text
            # the prefill is expanded: its children carry output shapes
            labels = [n.label.plain for it, n in scr.nav.nodes.items() if it[0] == 0 and it[1] == "e"]
            assert any(lab.startswith("Qwen2_5_VLForConditionalGeneration [1,1,152064]") for lab in labels)
            assert any(lab.startswith("model.visual [") for lab in labels)
    run(go())


def test_every_key_of_the_help_screen_is_bound(trace_a):
    bound = {b.key for b in MainScreen.BINDINGS} | {b.key for b in ViewerApp.BINDINGS}
    for key in ("n", "N", "right_square_bracket", "left_square_bracket", "colon", "home", "end", "G", "slash", "f",
                "c", "r", "R", "g", "e", "p", "q", "question_mark", "S"):
        assert key in bound
    assert ViewerApp.ENABLE_COMMAND_PALETTE and ViewerApp.COMMAND_PALETTE_BINDING == "ctrl+p"
    assert [k for k, _ in KEYS] == ["j k / ↑ ↓", "enter / click", "n N", "] [", ":", "Home End G", "/", "f", "c", "r R",
                                    "g", "e", "p", "tab", "S", "ctrl+p", "?", "q"]


# --------------------------------------------------------------------------- keys


def test_move_with_jk_and_arrows_then_expand_with_enter(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            nav = scr.nav
            start = nav.current
            await press(pilot, "j")
            first = nav.current
            assert first != start and scr.detail.shown == first
            await press(pilot, "down")
            second = nav.current
            assert second != first
            await press(pilot, "k")
            assert nav.current == first
            await press(pilot, "up")
            assert nav.current == start
            # the root call (collapsed, with children): expand it with enter
            for _ in range(10):
                if path_of(scr, nav.current) == "" and nav.current[1] == "e":
                    break
                await press(pilot, "j")
            node = nav.cursor_node
            assert node.allow_expand and not node.is_expanded
            await press(pilot, "enter")
            assert node.is_expanded and len(node.children) >= 3
            kinds = {c.data[1] for c in node.children}
            assert {"e", "p"} <= kinds             # calls and probes, in call order
            await press(pilot, "enter")
            assert not node.is_expanded
    run(go())


def test_reshape_nodes_show_op_shapes_and_call_site_with_source(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await goto_module(pilot, "model.visual.merger")
            await press(pilot, "enter")
            node = scr.nav.cursor_node
            rs = [c for c in node.children if c.data[1] == "r"]
            assert rs, "the merger reshapes its input"
            lab = rs[0].label.plain
            assert "->" in lab and ".py:" in lab          # op, in -> out, call site
            scr.nav.move_to(rs[0])
            await settle(pilot)
            text = detail_text(scr)
            assert "call site" in text and "modeling_qwen2_5_vl.py" in text
            # transformers is installed here: the source line is shown
            assert "source not readable" not in text
    run(go())


def test_n_and_N_move_to_the_next_layer(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await goto_module(pilot, "model.language_model.layers.0.self_attn")
            await press(pilot, "n")
            assert path_of(scr, scr.nav.current) == "model.language_model.layers.1.self_attn"
            assert scr.detail.shown == scr.nav.current
            await press(pilot, "N")
            assert path_of(scr, scr.nav.current) == "model.language_model.layers.0.self_attn"
            await goto_module(pilot, "model.language_model.layers.0")
            await press(pilot, "n")
            assert path_of(scr, scr.nav.current) == "model.language_model.layers.1"
    run(go())


def test_step_keys_keep_the_module_selected(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await goto_module(pilot, "model.language_model.layers.1.mlp")
            await press(pilot, "right_square_bracket")
            cur = scr.nav.current
            assert cur[0] == 1 and path_of(scr, cur) == "model.language_model.layers.1.mlp"
            assert "decode 1 of 3" in header_text(scr)
            await press(pilot, "right_square_bracket", "right_square_bracket")
            assert scr.nav.current[0] == 3
            await press(pilot, "right_square_bracket")      # no step 4: stays
            assert scr.nav.current[0] == 3
            await press(pilot, "left_square_bracket", "left_square_bracket", "left_square_bracket")
            cur = scr.nav.current
            assert cur[0] == 0 and path_of(scr, cur) == "model.language_model.layers.1.mlp"
            assert "prefill" in header_text(scr)
            # a prefill-only module (the vision tower) falls back to its nearest ancestor
            await goto_module(pilot, "model.visual.merger")
            await press(pilot, "right_square_bracket")
            assert scr.nav.current[0] == 1
            assert not path_of(scr, scr.nav.current).startswith("model.visual")
    run(go())


def test_search_by_glob_and_substring(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await press(pilot, "slash")
            bar = scr.query_one("#search")
            assert bar.display and bar.has_focus
            await pilot.press(*list("*layers.*.mlp"))
            await press(pilot, "enter")
            assert path_of(scr, scr.nav.current) == "model.language_model.layers.0.mlp"
            await press(pilot, "enter")                      # enter again: next match
            assert path_of(scr, scr.nav.current) == "model.language_model.layers.1.mlp"
            await press(pilot, "escape")
            assert not bar.display and scr.nav.has_focus
            await goto_module(pilot, "model.visual.merger")   # substring of a path
            assert "search" in header_text(scr)
    run(go())


def test_filter_cycles_through_the_modes(trace_a):
    # the kinds of node each filter leaves in the prefill's tree, around model.visual.merger; checks
    # are off here, so nothing fails: the tree is empty and the cursor climbs to the step node, where
    # it stays back in "all" (the tree shows the step's children then)
    expect = {"modules": {"e"}, "reshapes": {"e", "r"}, "probes": {"e", "p"}, "failing": set()}

    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await goto_module(pilot, "model.visual.merger")
            seen = []
            for _ in FILTERS:
                await press(pilot, "f")
                filt = scr.session.filter
                seen.append(filt)
                idx = scr.session.index(0)
                items = [it for it in scr.nav.nodes if it[0] == 0 and it[1] != "s"]
                if filt in expect:
                    assert {it[1] for it in items} == expect[filt], filt
                calls = [it[2] for it in items if it[1] == "e"]
                if filt == "reshapes":
                    assert all(idx.has_reshape[i] for i in calls)
                if filt == "probes":
                    assert all(idx.has_probe[i] for i in calls)
                assert f"filter {FILTER_LABELS[filt]}" in header_text(scr)
                if filt in ("failing", "all"):
                    assert scr.nav.current == (0, "s", -1)
                    assert items == scr.session.children((0, "s", -1))
                else:
                    assert path_of(scr, scr.nav.current) == "model.visual.merger"
            assert seen == list(FILTERS[1:]) + [FILTERS[0]]
    run(go())


def test_context_panel_toggles_and_draws_the_step(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot)
            scr = app.screen
            ctx = scr.query_one(ContextPanel)
            assert not ctx.display
            await press(pilot, "c")
            await settle(pilot)
            assert ctx.display and ctx.shown == 0
            text = ctx.plain_text()
            assert "tokens" in text and "image [15, 271) = 256" in text
            assert "attention mask [1, 1, 281, 281]" in text
            assert "position ids" in text and "cache length per layer" in text
            await press(pilot, "right_square_bracket")
            await settle(pilot)
            assert ctx.shown == 1
            text = ctx.plain_text()
            assert "this step [281, 282)" in text
            await press(pilot, "c")
            assert not ctx.display
    run(go())


def test_e_goes_to_the_next_check_violation(trace_b):
    want = cli_json("check", str(trace_b))["violations"]
    assert any(v["rule"] == "numbers.nonfinite" and v["module"] == HOOKED for v in want)

    async def go():
        app = ViewerApp([trace_b])
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            assert scr.session.checks_done and scr.session.check_error is None
            vs = scr.session.a.violations
            assert [(v.rule, v.step, v.module, v.seq) for v in vs] == \
                [(v["rule"], v["step"], v["module"], v["seq"]) for v in want]
            # e visits them in tree order, then wraps around
            for k in range(len(vs) + 1):
                await press(pilot, "e")
                v = vs[k % len(vs)]
                assert scr.nav.current == v.item
                assert path_of(scr, scr.nav.current) == v.module
                assert scr.nav.cursor_node.label.plain.endswith(" ✗")
                assert f"✗ {v.rule}" in detail_text(scr)
            # the failing filter keeps the failing calls and what holds them, nothing else
            for _ in range(FILTERS.index("failing")):
                await press(pilot, "f")
            assert scr.session.filter == "failing"
            idx = scr.session.index(0)
            shown = [it for it in scr.nav.nodes if it[0] == 0 and it[1] == "e"]
            assert shown and all(idx.failing_sub[i] for _, _, i in shown)
    run(go())


def test_violations_are_those_of_vlmscope_check():
    """The example trace has 3 violations (positions.kv-index in each decode step): the viewer
    shows exactly those of ``vlmscope check``, each on the call of its module in its step."""
    want = cli_json("check", str(MQWEN))["violations"]
    assert len(want) == 3

    async def go():
        app = ViewerApp([MQWEN])
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            session = scr.session
            assert session.check_error is None
            got = session.violations
            assert [(v.rule, v.step, v.module, v.seq, v.severity) for v in got] == \
                [(v["rule"], v["step"], v["module"], v["seq"], v["severity"]) for v in want]
            for v in got:
                session.ensure_step(v.step)
                assert v.item[0] == v.step and path_of(scr, v.item) == v.module
            failing_steps = {v.step for v in got}
            assert failing_steps == {1, 2, 3}
            for s in range(session.a.n_steps):
                assert scr.nav.nodes[(s, "s", -1)].label.plain.endswith(" ✗") == (s in failing_steps)
            for v in got:
                await press(pilot, "e")
                assert scr.nav.current == v.item
                assert scr.nav.cursor_node.label.plain.endswith(" ✗")
                text = detail_text(scr)
                assert "failing checks (1)" in text and f"✗ {v.rule}" in text
    run(go())


def test_failing_checks_are_reported_not_hidden(trace_a, helper_jobs, monkeypatch):
    monkeypatch.setattr(analysis, "check_rows", helper_jobs.fail)

    async def go():
        app = ViewerApp([trace_a])
        notes = notes_of(app)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            assert scr.session.check_error == "RuntimeError: a rule exploded"
            assert "checks failed" in header_text(scr)
            assert "checks failed: RuntimeError: a rule exploded" in notes
            assert not any("✗" in n.label.plain for n in scr.nav.nodes.values())
            await press(pilot, "e")
            assert notes[-1] == "checks failed: RuntimeError: a rule exploded"
    run(go())


def test_closing_the_viewer_kills_the_analysis_process(trace_a, helper_jobs, monkeypatch):
    monkeypatch.setattr(analysis, "check_rows", helper_jobs.hang)

    async def go():
        app = ViewerApp([trace_a])
        notes = notes_of(app)
        async with app.run_test(size=SIZE) as pilot:
            session = app.session
            for _ in range(500):
                if session._jobs and all(j.alive() for j in session._jobs):
                    break
                await asyncio.sleep(0.02)
            jobs = list(session._jobs)
            assert len(jobs) == 1 and jobs[0].alive()
            await press_no_wait(pilot, "e")
            assert notes[-1] == "checks are still running …"
        return jobs

    t0 = time.monotonic()
    jobs = run(go())
    for _ in range(100):
        if not jobs[0].alive():
            break
        time.sleep(0.05)
    assert not jobs[0].alive() and jobs[0].killed
    assert time.monotonic() - t0 < 60       # not the 300 s the job would take


def test_closing_a_session_cancels_its_running_analysis(trace_a, helper_jobs, monkeypatch):
    """What the viewer does when its screen closes or it moves to another trace: the session's
    analysis process is killed at once, and the worker waiting on it gets Cancelled."""
    import threading

    from vlmscope.tui.session import Session

    monkeypatch.setattr(analysis, "check_rows", helper_jobs.hang)
    analysis.prepare()
    session = Session([trace_a])
    session.open()
    outcome: list = []

    def worker():
        try:
            session.run_checks()
            outcome.append("finished")
        except analysis.Cancelled:
            outcome.append("cancelled")

    th = threading.Thread(target=worker)
    th.start()
    for _ in range(500):
        if session._jobs and all(j.alive() for j in session._jobs):
            break
        time.sleep(0.02)
    jobs = list(session._jobs)
    assert len(jobs) == 1
    t0 = time.monotonic()
    session.close()
    th.join(10)
    assert outcome == ["cancelled"] and time.monotonic() - t0 < 10
    for _ in range(100):
        if not jobs[0].alive():
            break
        time.sleep(0.05)
    assert not jobs[0].alive()
    # a worker's own cancellation (textual cancels workers of a closing screen) kills it too
    t0 = time.monotonic()
    with pytest.raises(analysis.Cancelled):
        analysis.run_job(helper_jobs.hang, cancelled=lambda: time.monotonic() - t0 > 0.5)
    assert time.monotonic() - t0 < 10


def test_payload_view_loads_a_slice_on_demand(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        notes = notes_of(app)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await goto_module(pilot, "model.visual.merger")
            assert "[saved: p]" in detail_text(scr)
            await press(pilot, "p")
            assert isinstance(app.screen, PayloadScreen)
            view = app.screen.query_one("#payload-view")
            assert view.loaded_window == ((), 0, 0)
            text = plain(view.content)
            assert "slice [0:16, 0:8]" in text
            await press(pilot, "down", "right")
            assert view.loaded_window == ((), 1, 1)
            await press(pilot, "escape")
            assert isinstance(app.screen, MainScreen)
            await goto_module(pilot, "lm_head")
            await press(pilot, "p")                            # nothing saved here: a notice
            assert isinstance(app.screen, MainScreen)
            assert notes[-1] == "no saved tensor here (record with --save-tensors GLOB)"
    run(go())


def test_help_and_quit(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            await press(pilot, "question_mark")
            assert isinstance(app.screen, HelpScreen)
            await press(pilot, "escape")
            assert isinstance(app.screen, MainScreen)
            await press(pilot, "q")
            assert not app.is_running
    run(go())


def test_mouse_click_selects_a_node(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            target = scr.nav.get_node_at_line(2)
            top = scr.nav.content_region.y - scr.nav.region.y      # the panel's border
            await pilot.click("#navigator", offset=(6, 2 + top))
            await settle(pilot)
            assert scr.nav.current == target.data and scr.detail.shown == target.data
    run(go())


# --------------------------------------------------------------------------- diff mode


def test_diff_mode_names_and_jumps_to_the_first_divergence(trace_a, trace_b):
    first = cli_json("diff", str(trace_a), str(trace_b))["first_divergence"]
    assert (first["step"], first["module"], first["status"]) == (0, HOOKED, "drift")

    async def go():
        app = ViewerApp([trace_a, trace_b], checks=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot)
            scr = app.screen
            assert scr.session.diff.result is not None and scr.session.diff.error is None
            summary = plain(scr.query_one(DiffSummary).content)
            assert summary.startswith(f"first divergence prefill {HOOKED} (values drift)  g: go")
            assert "a.h5" in header_text(scr) and "b.h5" in header_text(scr)
            await press(pilot, "g")
            cur = scr.nav.current
            assert path_of(scr, cur) == HOOKED and cur[0] == 0
            assert scr.nav.cursor_node.label.plain.startswith("~ ")     # values drift
            text = detail_text(scr)
            assert text.startswith("~ values drift") and "deltas (B - A)" in text and "Δmean" in text
            # wide enough for A and B side by side, under one header line
            assert scr.detail._width() >= WIDE
            assert any(re.fullmatch(r"A\s+B", line) for line in text.splitlines())
            # nodes before the hooked module are the same in both
            await goto_module(pilot, "model.visual.merger")
            assert scr.session.diff.status(scr.nav.current) == Status.SAME
            assert detail_text(scr).startswith("same")
            # with decode steps, the same module keeps drifting
            await goto_module(pilot, HOOKED)
            await press(pilot, "right_square_bracket")
            assert scr.nav.current[0] == 1 and scr.session.diff.status(scr.nav.current) == Status.DRIFT
    run(go())


def test_diff_mode_shape_difference(tmp_path):
    a = write_demo_trace(tmp_path / "a.h5")
    b = write_demo_trace(tmp_path / "b.h5", variant="b")

    async def go():
        app = ViewerApp([a, b], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            diff = scr.session.diff
            await goto_module(pilot, "model.language_model.layers.1.mlp.down_proj")
            assert diff.status(scr.nav.current) == Status.SHAPE
            assert scr.nav.cursor_node.label.plain.startswith("≠ ")
            text = detail_text(scr)
            assert "out  [1, 28, 64] float32 -> [1, 28, 72] float32" in text
    run(go())


def test_diff_statuses_are_those_of_vlmscope_diff():
    """Two implementations (the example traces, mqwen against Qwen2.5-VL, attention mapped): every
    node of the tree carries the status ``vlmscope diff`` gives it, nodes only in B included."""
    rep = cli_json("diff", str(MQWEN), str(QWEN25), "--map", MQWEN_MAP)
    table_of = {"s": "calls", "e": "calls", "b": "calls", "r": "reshapes", "q": "reshapes", "p": "probes",
                "o": "probes"}

    async def go():
        app = ViewerApp([MQWEN, QWEN25], [MQWEN_MAP], checks=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot)
            scr = app.screen
            session, diff = scr.session, scr.session.diff
            counts = {t: collections.Counter() for t in ("calls", "reshapes", "probes")}
            missing_calls = collections.Counter()
            for s in range(session.a.n_steps):
                session.ensure_step(s)
                for it in [(s, "s", -1), *tree_items(session, (s, "s", -1))]:
                    st = diff.status(it)
                    counts[table_of[it[1]]][st.label] += 1
                    if it[1] in ("s", "e", "b") and st in (Status.MISSING_A, Status.MISSING_B):
                        missing_calls[(path_of(scr, it), st.label)] += 1
            for table, got in counts.items():
                assert {k: v for k, v in rep["counts"][table].items() if v} == dict(got), table
            groups = {(g["module"], g["status"]): g["count"] for g in rep["groups"] if g["table"] == "events"}
            assert dict(missing_calls) == groups
            # the two vision towers are paired by the inferred module map (transformer.visual is
            # mqwen's recorded vision tower): the first divergence is the root's input_ids, 24
            # tokens against 281 (mqwen has one placeholder per image); no culprit is claimed
            first = rep["first_divergence"]
            assert (first["step"], first["module"], first["what"], first["status"]) == (0, "", "input_ids", "shape")
            assert rep["culprit"]["status"] == "inputs"
            pairs = {p["a"]: p["b"] for p in rep["module_map"]["pairs"]}
            assert pairs["transformer.visual"] == "model.visual" and pairs["transformer.wte"].endswith("embed_tokens")
            summary = plain(scr.query_one(DiffSummary).content)
            assert summary.startswith("first divergence prefill") and "(shape/dtype differs)" in summary
            await press(pilot, "g")
            cur = scr.nav.current
            assert cur[:2] == (0, "s")     # an input of the root call: the step's own row
            # the vision towers: paired, so not "only in B"
            await goto_module(pilot, "transformer.visual")
            assert diff.status(scr.nav.current) != Status.MISSING_B
            # mqwen's second MLP input projection has no counterpart in B
            await goto_module(pilot, "transformer.h.0.mlp.w2")
            assert diff.status(scr.nav.current) == Status.MISSING_B
            assert scr.nav.cursor_node.label.plain.startswith("- ")
            assert "missing in B" in detail_text(scr)
    run(go())


def test_failing_alignment_is_reported_not_hidden(tmp_path, helper_jobs, monkeypatch):
    monkeypatch.setattr(analysis, "align_sides", helper_jobs.fail)
    a = write_demo_trace(tmp_path / "a.h5")
    b = write_demo_trace(tmp_path / "b.h5", variant="b")

    async def go():
        app = ViewerApp([a, b], checks=False)
        notes = notes_of(app)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            assert plain(scr.query_one(DiffSummary).content).strip() == \
                "alignment failed: RuntimeError: a rule exploded"
            assert scr.session.diff.status((0, "s", -1)) is None
            await press(pilot, "g")
            assert notes[-1] == "alignment failed: RuntimeError: a rule exploded"
    run(go())


def _renamed_copy(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of a trace whose module paths say ``new`` where they said ``old`` (another implementation)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        write_strings(f, [s.replace(old, new) if s.startswith("model.") else s for s in read_strings(f)])
    return dst


def test_map_rewrites_paths_before_aligning(tmp_path):
    a = write_demo_trace(tmp_path / "a.h5")
    b = _renamed_copy(a, tmp_path / "b.h5", "model.language_model", "model.text")
    want = cli_json("diff", str(a), str(b))["first_divergence"]

    async def go(maps):
        app = ViewerApp([a, b], maps, checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            first = scr.session.diff.first
            return first, (path_of(scr, first[0]) if first else None), plain(scr.query_one(DiffSummary).content)
    # without a map, diff infers one (the renamed language model is recognised by the recorded
    # structure): nothing differs, and the viewer says what diff says
    assert want is None
    first, _, summary = run(go([]))
    assert first is None and summary.startswith("no divergence: A and B agree")
    first, _, summary = run(go([r"model\.language_model=model.text"]))
    assert first is None and summary.startswith("no divergence: A and B agree")
    with pytest.raises(ValueError, match="bad --map rule"):
        parse_maps(["no-equals-sign"])


def test_a_divergence_with_no_node_in_a_is_named_never_agree(tmp_path):
    """B has a decode step A lacks: vlmscope diff's first divergence lies in that step, where A's
    tree has no node. The summary and g name it; they never say that A and B agree."""
    a = write_demo_trace(tmp_path / "a.h5", n_decode=2)
    b = write_demo_trace(tmp_path / "b.h5", n_decode=3)
    want = cli_json("diff", str(a), str(b))
    assert want["same"] is False and want["first_divergence"]["step"] == 3

    async def go():
        app = ViewerApp([a, b], checks=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            summary = plain(scr.query_one(DiffSummary).content)
            notes = notes_of(app)
            await press(pilot, "g")
            return scr.session.diff, summary, notes
    diff, summary, notes = run(go())
    assert diff.first is None and diff.unplaced is not None
    assert summary.startswith("first divergence step 3") and "agree" not in summary
    assert any(n.startswith("first divergence (no node to go to): step 3") for n in notes)
    assert not any("agree" in n for n in notes)


# --------------------------------------------------------------------------- bad and partial files


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = write_demo_trace(tmp_path / "good.h5", n_decode=1)
    out = {}
    trunc = tmp_path / "truncated.h5"
    data = good.read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    out["truncated"] = trunc
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    out["foreign"] = foreign
    newer = tmp_path / "newer.h5"
    shutil.copy(good, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    out["newer"] = newer
    text = tmp_path / "notes.h5"
    text.write_text("hello\n")
    out["text"] = text
    out["missing"] = tmp_path / "missing.h5"
    return out


def test_cli_bad_files_give_one_line_and_exit_3(tmp_path):
    from vlmscope.cli.view import view

    runner = CliRunner()
    for name, path in _bad_files(tmp_path).items():
        res = runner.invoke(view, [str(path)])
        assert res.exit_code == 3, (name, res.output)
        err = res.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert err.startswith("vlmscope: error: ")
    res = runner.invoke(view, [str(tmp_path / "good.h5"), "--map", "oops"])
    assert res.exit_code == 2


def test_bad_file_inside_the_app_shows_a_message_screen(tmp_path):
    bad = _bad_files(tmp_path)["newer"]

    async def go():
        app = ViewerApp([bad], checks=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            assert isinstance(app.screen, MessageScreen)
            assert "newer" in plain(app.screen.query_one("#message-text").content)
            await press(pilot, "q")
            assert not app.is_running
    run(go())


def test_incomplete_trace_opens_marked_incomplete(tmp_path):
    p = write_demo_trace(tmp_path / "cut.h5", n_decode=2)
    partial = tmp_path / "cut.h5.partial"
    shutil.copy(p, partial)
    with h5py.File(partial, "r+") as f:     # as a crashed recorder leaves it
        f.attrs["status"] = "recording"

    async def go():
        app = ViewerApp([partial], checks=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            scr = app.screen
            assert isinstance(scr, MainScreen)
            assert "incomplete" in header_text(scr)
            await press(pilot, "right_square_bracket")
            assert scr.nav.current[0] == 1
    run(go())


# --------------------------------------------------------------------------- small units and hygiene


def test_viewer_imports_no_torch_and_cli_help_no_textual():
    code = ("import sys; import vlmscope.cli.view, vlmscope.cli; assert 'textual' not in sys.modules, 'textual';"
            # what the analysis processes import (the fork server preloads it): no textual either
            "import vlmscope.tui.analysis; assert 'textual' not in sys.modules, 'textual in analysis';"
            "import vlmscope.tui.app; assert 'torch' not in sys.modules, 'torch'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr


def test_helpers():
    assert module_pattern("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert module_pattern("model.visual.merger.mlp.0") == "model.visual.merger.mlp.*"
    paths = np.array(["model.layers.0.mlp", "model.layers.1.mlp", "model.visual.merger"], dtype=object)
    assert match_paths(paths, "*layers.*.mlp").tolist() == [0, 1]
    assert match_paths(paths, "merger").tolist() == [2]
    strip = token_strip(np.zeros(300), [(10, 266)], (0, 300), 100).plain.splitlines()
    assert len(strip[0]) == 100 and "█" in strip[0] and strip[1].startswith("0")
    m = np.tril(np.ones((300, 300), dtype=bool))[None, None]
    heat = mask_heatmap(m, [(10, 266)], 80, max_rows=6).plain.splitlines()
    assert 1 <= len(heat) <= 6 and all(len(line) <= 80 for line in heat)
    pos = np.stack([np.arange(50)] * 3)[:, None, :]
    assert len(position_plot(pos, [], 60).plain.splitlines()) == 3
