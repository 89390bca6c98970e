"""``vlmscope view``: a thin Textual app; the screens do the work."""

from __future__ import annotations

import collections
import datetime
import gc
import importlib.metadata
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Sequence

from textual import events
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.worker import WorkerFailed

from vlmscope.tui.analysis import prepare
from vlmscope.tui.modals import HelpScreen
from vlmscope.tui.safe import printable
from vlmscope.tui.screens import MainScreen
from vlmscope.tui.session import Session

#: the exit status of a viewer that stopped on an unexpected exception (sysexits' EX_SOFTWARE)
EXIT_CRASH = 70
#: key presses and clicks kept for a crash report
KEEP_KEYS = 40


def report_dir() -> Path:
    """Where crash reports go: ``$XDG_STATE_HOME/vlmscope`` (default ``~/.local/state/vlmscope``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "vlmscope"


def _versions() -> str:
    from vlmscope._version import __version__

    parts = [f"vlmscope {__version__}", f"python {platform.python_version()}"]
    for dist in ("textual", "rich", "h5py", "hdf5plugin", "numpy"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except Exception:  # noqa: BLE001 - not installed as a distribution
            parts.append(f"{dist} ?")
    return ", ".join(parts) + f"; {platform.platform()}"


def write_crash_report(error: BaseException, paths: Sequence[os.PathLike | str], keys: Sequence[str],
                       screens: Sequence[str] = ()) -> Path | None:
    """A short report of an unexpected exception: when, versions, traces, last keys, traceback.
    Written under :func:`report_dir` (else the temp dir); returns its path (None if nothing could be written)."""
    now = datetime.datetime.now()
    text = "\n".join([
        "vlmscope view crashed",
        f"time: {now.isoformat(timespec='seconds')}",
        f"versions: {_versions()}",
        f"command: {' '.join(sys.argv)}",
        "traces: " + ", ".join(os.fspath(p) for p in paths),
        "screens: " + " > ".join(screens),
        "last keys (oldest first): " + " ".join(keys),
        "",
        "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    ])
    name = f"crash-{now:%Y%m%d-%H%M%S}-{os.getpid()}.txt"
    for folder in (report_dir(), Path(tempfile.gettempdir()) / "vlmscope"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8", errors="backslashreplace")
            return path
        except OSError:
            continue
    return None


class ViewerApp(App):
    """Step through a vlmscope trace, or diff two."""

    CSS_PATH = "app.tcss"
    TITLE = "vlmscope"
    ENABLE_COMMAND_PALETTE = True      # ctrl+p; its "Save screenshot" is the S key's
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("S", "save_screenshot", "screenshot", show=False),
    ]

    def __init__(self, paths: Sequence[str | os.PathLike], maps: Sequence[str] = (), *, checks: bool = True,
                 freeze_gc: bool = False, **kwargs) -> None:
        """``checks``: run ``vlmscope check``'s rules on trace A (in a process of their own) and
        mark what fails; in diff mode the traces are aligned as ``vlmscope diff`` aligns them
        (``maps``: its ``--map`` rules), also in a process of its own. Those processes are
        started with ``forkserver`` (or ``spawn``), so a script that runs the app must guard
        its entry point with ``if __name__ == "__main__":`` (see :mod:`multiprocessing`).
        ``freeze_gc``: once the trace is open, move everything allocated so far out of the
        garbage collector's sight (``gc.freeze``), so that full collections, which otherwise
        pause the UI for 50-100 ms on big traces, only walk what the session adds. For the
        command line, where the app owns the process."""
        super().__init__(**kwargs)
        paths = list(paths)
        if checks or len(paths) > 1:   # an analysis process will run: its helpers start now,
            prepare()                  # before Textual takes sys.stderr over
        self.session = Session(paths, list(maps), checks=checks)
        self.freeze_gc = freeze_gc
        self.keys: collections.deque[str] = collections.deque(maxlen=KEEP_KEYS)   # for a crash report
        self.crash_report: Path | None = None
        self.crash_line: str | None = None      # the one line shown on exit after a crash

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.InputEvent) and event.is_forwarded:
            pass                    # a key or click bubbling back to the app: recorded on arrival
        elif isinstance(event, events.Key):
            self.keys.append(event.key)
        elif isinstance(event, events.MouseDown):
            self.keys.append(f"click@{event.screen_x},{event.screen_y}")
        await super().on_event(event)

    def _handle_exception(self, error: Exception) -> None:
        """An unexpected exception (a handler, or a worker that did not catch it): write a crash
        report, exit with :data:`EXIT_CRASH` and show one line naming the report, instead of
        Textual's full-screen traceback. Under ``run_test`` the exception is still re-raised."""
        if self.crash_line is not None:     # the first one is the one that matters
            return
        cause = error.error if isinstance(error, WorkerFailed) else error
        try:
            screens = [type(s).__name__ for s in self.screen_stack]
        except Exception:  # noqa: BLE001 - no screen yet
            screens = []
        try:
            self.crash_report = write_crash_report(cause, self.session.paths, list(self.keys), screens)
        except Exception:  # noqa: BLE001 - never fail while reporting a failure
            self.crash_report = None
        what = printable(f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}")
        if len(what) > 160:
            what = what[:159] + "…"
        where = f"report: {self.crash_report}" if self.crash_report is not None else "no report could be written"
        self.crash_line = f"vlmscope: error: the viewer failed ({what}); {where}"
        self._return_code = EXIT_CRASH
        if self._exception is None:       # Pilot (run_test) re-raises it for the test
            self._exception = cause
            self._exception_event.set()
        self._close_messages_no_wait()

    def _print_error_renderables(self) -> None:
        """After a crash, the one line (written as is: the terminal wraps it, Rich would break it)."""
        if self.crash_line is None:
            super()._print_error_renderables()
            return
        self._exit_renderables.clear()
        try:
            sys.__stderr__.write(self.crash_line + "\n")
            sys.__stderr__.flush()
        except (OSError, ValueError, AttributeError):   # no stderr left
            pass

    def on_mount(self) -> None:
        self.push_screen(MainScreen(self.session))

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = True) -> None:
        """Every notification is text: its message and title often quote the trace (module names, an
        error message), so markup is never parsed and control characters are escaped
        (``markup`` is accepted for the signature and ignored)."""
        super().notify(printable(message, newlines=True), title=printable(title), severity=severity,
                       timeout=timeout, markup=False)

    def get_system_commands(self, screen):
        """Textual's commands, its "Screenshot" (saved elsewhere) replaced by ours (the S key)."""
        for cmd in super().get_system_commands(screen):
            if cmd.title != "Screenshot":
                yield cmd
        yield SystemCommand("Save screenshot", "Save the screen as an SVG file in the current directory (S)",
                            lambda: self.set_timer(0.1, self.action_save_screenshot))   # once the palette closed

    def action_save_screenshot(self) -> None:
        """Save the screen as an SVG under a fresh name in the current directory; notify the path."""
        from vlmscope.tui.export import ScreenshotError, save_here

        try:
            path = save_here(self)
        except ScreenshotError as e:
            self.notify(f"screenshot not saved: {e}", severity="error", timeout=6)
            return
        self.notify(f"screenshot saved: {path}", timeout=6)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def on_unmount(self) -> None:
        if self.freeze_gc:
            gc.unfreeze()
        self.session.close()
