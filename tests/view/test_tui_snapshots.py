"""SVG snapshots of ``vlmscope view`` (pytest-textual-snapshot) at 80x24 and 160x48.

The traces are the viewer's demo traces (:mod:`vlmscope.testing`): every number in them is
fixed, their call sites point at files that do not exist (no source lines that change with
the installed transformers), and the file names are fixed, so the pictures are the same on
every machine. Checks and the diff alignment are ``vlmscope check``'s and ``vlmscope diff``'s (the
viewer has no rules of its own). Update with ``.venv/bin/pytest tests/view/test_tui_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import asyncio

import pytest
from textual.worker import WorkerState

from vlmscope.tui.app import ViewerApp
from vlmscope.testing import write_demo_trace

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("snap")
    a = write_demo_trace(d / "a.h5", nan_in="model.language_model.layers.1.mlp.down_proj")
    clean = d / "clean"
    clean.mkdir()
    a_clean = write_demo_trace(clean / "a.h5")
    b = write_demo_trace(clean / "b.h5", variant="b")
    return {"a": a, "a_clean": a_clean, "b": b}


async def settle(pilot) -> None:
    app = pilot.app
    for _ in range(2):
        await pilot.pause()
        while any(w.state in (WorkerState.PENDING, WorkerState.RUNNING) for w in app.workers):
            await asyncio.sleep(0.01)
        await pilot.pause()


def keys_then_settle(*keys: str):
    async def run_before(pilot) -> None:
        await settle(pilot)
        for k in keys:
            await pilot.press(k)
            await settle(pilot)
        pilot.app.clear_notifications()    # "checks done: …" stays 5 s: not in the picture, whatever the timing
        await pilot.pause()
    return run_before


#: the prefill's "model" call, expanded, cursor on its first child
MAIN_KEYS = ("j", "j", "j", "enter", "j", "j")


@pytest.mark.parametrize("size", SIZES)
def test_main_screen(snap_compare, demo, size):
    app = ViewerApp([demo["a"]], checks=True)
    assert snap_compare(app, terminal_size=size, run_before=keys_then_settle(*MAIN_KEYS))


@pytest.mark.parametrize("size", SIZES)
def test_context_panel(snap_compare, demo, size):
    app = ViewerApp([demo["a"]], checks=True)
    assert snap_compare(app, terminal_size=size, run_before=keys_then_settle(*MAIN_KEYS, "c"))


@pytest.mark.parametrize("size", SIZES)
def test_diff_mode(snap_compare, demo, size):
    app = ViewerApp([demo["a_clean"], demo["b"]], checks=False)
    assert snap_compare(app, terminal_size=size, run_before=keys_then_settle("g"))


@pytest.mark.parametrize("size", SIZES)
def test_help(snap_compare, demo, size):
    app = ViewerApp([demo["a"]], checks=False)
    assert snap_compare(app, terminal_size=size, run_before=keys_then_settle("question_mark"))
