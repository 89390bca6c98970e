"""Screenshots of the viewer, for bug reports: ``vlmscope view TRACE --screenshot out.svg`` (headless,
at a step, a module selected, the step context open) and the ``S`` key / "Save screenshot" command.

The headless run is the real app driven by Pilot: the same screens, the same checks (it waits
for them, so the ✗ marks are in the picture), then Textual's ``export_screenshot``. A file that
exists is never overwritten unless asked (``--force``).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from vlmscope.trace.text import printable

if TYPE_CHECKING:
    from vlmscope.tui.app import ViewerApp

DEFAULT_SIZE = (120, 40)
MIN_SIZE = (40, 12)


class ScreenshotError(Exception):
    """A screenshot that cannot be taken as asked (one line; the command exits 2)."""


def parse_size(text: str) -> tuple[int, int]:
    """``"120x40"`` -> ``(120, 40)``; raises :class:`ScreenshotError`."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m:
        raise ScreenshotError(f"--size takes WIDTHxHEIGHT (e.g. 120x40), not {printable(text)!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if w < MIN_SIZE[0] or h < MIN_SIZE[1] or w > 1000 or h > 500:
        raise ScreenshotError(f"--size {w}x{h} is out of range ({MIN_SIZE[0]}x{MIN_SIZE[1]} to 1000x500)")
    return w, h


def write_svg(svg: str, path: str | os.PathLike, force: bool = False) -> Path:
    """Write ``svg`` to ``path``; an existing file is refused (:class:`ScreenshotError`) unless ``force``."""
    p = Path(path)
    try:
        with open(p, "w" if force else "x", encoding="utf-8") as f:
            f.write(svg)
    except FileExistsError:
        raise ScreenshotError(f"{printable(os.fspath(p))} exists (--force overwrites it)") from None
    except OSError as e:
        raise ScreenshotError(f"cannot write {printable(os.fspath(p))}: {printable(e.strerror or e)}") from None
    return p


def fresh_name(app: "ViewerApp", folder: str | os.PathLike = ".") -> Path:
    """A file name in ``folder`` that does not exist yet: ``vlmscope-<trace>-<step>.svg`` (then -2, -3, ...)."""
    screen = app.screen
    tm = app.session.a
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", app.session.paths[0].stem)[:60] or "trace"
    step = getattr(screen, "step", None)
    what = ""
    if tm is not None and tm.loaded and step is not None and tm.n_steps:
        what = "-" + re.sub(r"[^A-Za-z0-9._-]+", "-", tm.step_name(step)).strip("-")
    base = Path(folder) / f"vlmscope-{stem}{what}"
    path = base.with_name(base.name + ".svg")
    n = 2
    while path.exists():
        path = base.with_name(f"{base.name}-{n}.svg")
        n += 1
    return path


def save_here(app: "ViewerApp", folder: str | os.PathLike = ".") -> Path:
    """Save the screen as an SVG under a fresh name in ``folder`` (the ``S`` key)."""
    for _ in range(5):      # another process may take the name between the check and the write
        path = fresh_name(app, folder)
        try:
            return write_svg(app.export_screenshot(title=_title(app)), path)
        except ScreenshotError:
            if not path.exists():
                raise
    raise ScreenshotError(f"no free file name for the screenshot in {printable(os.fspath(folder))}")


def _title(app: "ViewerApp") -> str:
    return "vlmscope view " + " ".join(printable(p.name) for p in app.session.paths)


# --------------------------------------------------------------------------- headless


async def _settle(pilot, timeout: float) -> None:
    """Wait until the viewer is idle (``pilot.settle``); a timeout is a ScreenshotError."""
    from vlmscope.tui.pilot import settle

    try:
        await settle(pilot, timeout)
    except TimeoutError as e:
        raise ScreenshotError(str(e)) from None


async def arrange(pilot, step: int | None = None, select: str | None = None, context: bool = False,
                  timeout: float = 600.0) -> None:
    """Bring the running viewer to ``step`` (0 is the first, as ``vlmscope check`` numbers them),
    select the first call of a module matching ``select`` there (a glob, a whole path or a
    substring, as ``/`` searches), and open the step context. Raises :class:`ScreenshotError`."""
    from vlmscope.tui import navigate
    from vlmscope.tui.modals import MessageScreen
    from vlmscope.tui.screens import MainScreen

    app = pilot.app
    await _settle(pilot, timeout)
    screen = app.screen
    if isinstance(screen, MessageScreen):
        return                       # a trace that cannot be read: its message is the picture
    assert isinstance(screen, MainScreen)
    tm = app.session.a
    if tm is None or not tm.loaded:
        raise ScreenshotError("the trace did not open")
    if step is not None or select:
        s = screen.step if step is None else step
        if not 0 <= s < tm.n_steps:
            raise ScreenshotError(f"--step {s}: the trace has steps 0 to {tm.n_steps - 1}"
                                  if tm.n_steps else f"--step {s}: the trace has no step")
        target = (s, "s", -1)
        if select:
            if not app.session.ready(s):
                await asyncio.get_running_loop().run_in_executor(None, app.session.ensure_step, s)
            idx = tm.cached(s)
            assert idx is not None
            item, count = navigate.search(tm, idx, select, -1, "all")
            if item is None:
                raise ScreenshotError(f"--select {printable(select)!r}: no module call matches in "
                                      f"{tm.step_name(s)} (step {s})")
            target = item
        screen._reveal(target)
        await _settle(pilot, timeout)
    if context:
        screen.action_context()
        await _settle(pilot, timeout)
    app.clear_notifications()
    await pilot.pause()


def screenshot(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, size: tuple[int, int] = DEFAULT_SIZE,
               step: int | None = None, select: str | None = None, context: bool = False, force: bool = False,
               maps: Sequence[str] = (), checks: bool = True) -> Path:
    """Run the viewer headless at ``size``, arrange it (:func:`arrange`) and save an SVG at ``out``.
    Raises :class:`ScreenshotError` (one line)."""
    from vlmscope.tui.app import ViewerApp

    out = Path(out)
    if out.exists() and not force:
        raise ScreenshotError(f"{printable(os.fspath(out))} exists (--force overwrites it)")
    app = ViewerApp(list(paths), list(maps), checks=checks)
    result: dict = {}

    async def auto(pilot) -> None:
        try:
            await arrange(pilot, step, select, context)
            result["svg"] = app.export_screenshot(title=_title(app))
        except ScreenshotError as e:
            result["error"] = str(e)
        finally:
            app.exit()

    app.run(headless=True, size=size, auto_pilot=auto)
    if "error" in result:
        raise ScreenshotError(result["error"])
    if "svg" not in result:
        raise ScreenshotError(getattr(app, "crash_line", None) or "the viewer stopped before the screenshot")
    return write_svg(result["svg"], out, force)
