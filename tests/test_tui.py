"""Behaviour of ``vlmscope view``: the real app driven with ``App.run_test()`` and Pilot keys.

Traces are recorded once per session from the embedded tiny-qwen2.5-vl: A (the merger's
output saved as payloads) and B, the same run with ``model.language_model.layers.1.mlp``
hooked to scale its output and put one NaN in it (values drift there, a non-finite check
fails there). Bad-file handling uses small traces written with ``TraceWriter`` / the demo.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console
from textual.worker import WorkerState

from vlmscope.tui.app import ViewerApp
from vlmscope.tui.data import FILTERS, match_paths, module_pattern
from vlmscope.tui.demo import write_demo_trace
from vlmscope.tui.diffdata import parse_maps
from vlmscope.tui.render import mask_heatmap, position_plot, token_strip
from vlmscope.tui.screens import KEYS, HelpScreen, MainScreen, MessageScreen, PayloadScreen
from vlmscope.tui.widgets.context import ContextPanel
from vlmscope.tui.widgets.header import TraceHeader
from vlmscope.tui.widgets.summary import DiffSummary
from vlmscope.trace import read_strings, write_strings

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "astronaut.png"
HOOKED = "model.language_model.layers.1.mlp"
SIZE = (120, 40)


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


async def settle(pilot, timeout: float = 30.0) -> None:
    """Let workers finish (cancelled ones included) and the screen catch up."""
    app = pilot.app
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    for _ in range(2):
        await pilot.pause()
        while any(w.state in (WorkerState.PENDING, WorkerState.RUNNING) for w in app.workers):
            if loop.time() > end:
                raise TimeoutError("workers did not finish")
            await asyncio.sleep(0.01)
        await pilot.pause()


async def press(pilot, *keys: str) -> None:
    for k in keys:
        await pilot.press(k)
        await settle(pilot)


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
    ev = idx.event_of(scr.session.b_item(item) if item[1] in ("b", "q") else item)
    return tm.module_path(int(idx.module[ev])) if ev >= 0 else ""


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
        app = ViewerApp([trace_a], checks="off")
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
    for key in ("n", "N", "right_square_bracket", "left_square_bracket", "slash", "f", "c", "g", "e", "p", "q",
                "question_mark"):
        assert key in bound
    listed = " ".join(k for k, _ in KEYS)
    for key in ("j", "k", "enter", "n N", "] [", "/", "f", "c", "g", "e", "?", "q"):
        assert key in listed


# --------------------------------------------------------------------------- keys


def test_move_with_jk_and_arrows_then_expand_with_enter(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks="off")
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
        app = ViewerApp([trace_a], checks="off")
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
        app = ViewerApp([trace_a], checks="off")
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
        app = ViewerApp([trace_a], checks="off")
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
        app = ViewerApp([trace_a], checks="off")
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
    async def go():
        app = ViewerApp([trace_a], checks="off")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            await goto_module(pilot, "model.visual.merger")
            seen = []
            for _ in FILTERS:
                await press(pilot, "f")
                seen.append(scr.session.filter)
                node = scr.nav.nodes[(0, "s", -1)]
                items = [it for it in scr.nav.nodes if it[0] == 0 and scr.nav.nodes[it].parent is not None]
                kinds = {it[1] for it in items}
                if scr.session.filter == "modules":
                    assert kinds <= {"e", "s"}
                    assert "modules only" in header_text(scr)
                if scr.session.filter == "reshapes":
                    assert "p" not in kinds
                if scr.session.filter == "probes":
                    assert "r" not in kinds
                assert node is not None
            assert seen == list(FILTERS[1:]) + [FILTERS[0]]
    run(go())


def test_context_panel_toggles_and_draws_the_step(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks="off")
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
    async def go():
        app = ViewerApp([trace_b])         # the analyze rules when present, else the built-in ones
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            assert scr.session.checks_done
            vs = scr.session.a.violations
            assert vs, "B has a NaN from layers.1.mlp on: a check must fail"
            await press(pilot, "e")
            first = (vs[0].step, vs[0].kind, vs[0].local)
            cur = scr.nav.current
            assert cur == scr.session.index(first[0]).canonical(first)
            assert "failing checks" in detail_text(scr)
            assert any(v.step == 0 and HOOKED in path_of(scr, (v.step, v.kind, v.local)) for v in vs)
            assert "✗" in scr.nav.cursor_node.label.plain or "✗" in scr.nav.nodes[(cur[0], "s", -1)].label.plain
            await press(pilot, "e")
            if len(vs) > 1:
                assert scr.nav.current != cur
            # the failing filter keeps the failing calls
            for _ in range(FILTERS.index("failing")):
                await press(pilot, "f")
            assert scr.session.filter == "failing"
    run(go())


def test_payload_view_loads_a_slice_on_demand(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks="off")
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
    run(go())


def test_help_and_quit(trace_a):
    async def go():
        app = ViewerApp([trace_a], checks="off")
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
        app = ViewerApp([trace_a], checks="off")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            target = scr.nav.get_node_at_line(2)
            await pilot.click("#navigator", offset=(6, 2))
            await settle(pilot)
            assert scr.nav.current == target.data and scr.detail.shown == target.data
    run(go())


# --------------------------------------------------------------------------- diff mode


def test_diff_mode_names_and_jumps_to_the_first_divergence(trace_a, trace_b):
    async def go():
        app = ViewerApp([trace_a, trace_b], checks="off")
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot)
            scr = app.screen
            if importlib.util.find_spec("vlmscope.analyze.align") is not None:
                assert scr.session.diff.engine == "vlmscope.analyze"     # the rules of `vlmscope diff`
            summary = plain(scr.query_one(DiffSummary).content)
            assert "first divergence" in summary and HOOKED in summary and "values drift" in summary
            assert "a.h5" in header_text(scr) and "b.h5" in header_text(scr)
            await press(pilot, "g")
            cur = scr.nav.current
            assert path_of(scr, cur) == HOOKED and cur[0] == 0
            assert scr.nav.cursor_node.label.plain.startswith("~ ")     # values drift
            text = detail_text(scr)
            assert "values drift" in text and "deltas (B - A)" in text and "Δmean" in text
            assert " A " in text and " B " in text or ("A" in text and "B" in text)
            # nodes before the hooked module are the same in both
            await goto_module(pilot, "model.visual.merger")
            assert scr.session.diff.status(scr.nav.current) == "same"
            # with decode steps, the same module keeps drifting
            await goto_module(pilot, HOOKED)
            await press(pilot, "right_square_bracket")
            assert scr.session.diff.status(scr.nav.current) == "drift"
    run(go())


def test_diff_mode_shape_difference_and_only_in_b(tmp_path):
    a = write_demo_trace(tmp_path / "a.h5")
    b = write_demo_trace(tmp_path / "b.h5", variant="b")

    async def go():
        app = ViewerApp([a, b], checks="off")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            scr = app.screen
            diff = scr.session.diff
            await goto_module(pilot, "model.language_model.layers.1.mlp.down_proj")
            assert diff.status(scr.nav.current) == "shape"
            assert scr.nav.cursor_node.label.plain.startswith("≠ ")
            assert "[1, 28, 72]" in detail_text(scr)
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

    async def go(maps):
        app = ViewerApp([a, b], maps, checks="off")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            return app.screen.session.diff.first
    first = run(go([]))
    assert first is not None and first[1] in ("only_a", "only_b")
    assert run(go([r"model\.language_model=model.text"])) is None
    with pytest.raises(ValueError):
        parse_maps(["no-equals-sign"])


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
    from vlmscope.cli_view import view

    runner = CliRunner()
    for name, path in _bad_files(tmp_path).items():
        res = runner.invoke(view, [str(path)])
        assert res.exit_code == 3, (name, res.output)
        err = res.stderr.strip() if hasattr(res, "stderr") else res.output.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert err.startswith("vlmscope view: ")
    res = runner.invoke(view, [str(tmp_path / "good.h5"), "--map", "oops"])
    assert res.exit_code == 2


def test_bad_file_inside_the_app_shows_a_message_screen(tmp_path):
    bad = _bad_files(tmp_path)["newer"]

    async def go():
        app = ViewerApp([bad], checks="off")
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
        app = ViewerApp([partial], checks="off")
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
    code = ("import sys; import vlmscope.cli_view, vlmscope.cli; assert 'textual' not in sys.modules, 'textual';"
            "import vlmscope.tui.app, vlmscope.tui.demo; assert 'torch' not in sys.modules, 'torch'")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
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
