"""``vlmscope view``: a thin Textual app; the screens do the work."""

from __future__ import annotations

import gc
import os
from typing import Sequence

from textual.app import App
from textual.binding import Binding

from vlmscope.tui.analysis import prepare
from vlmscope.tui.modals import HelpScreen
from vlmscope.tui.safe import printable
from vlmscope.tui.screens import MainScreen
from vlmscope.tui.session import Session


class ViewerApp(App):
    """Step through a vlmscope trace, or diff two."""

    CSS_PATH = "app.tcss"
    TITLE = "vlmscope"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help", key_display="?"),
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

    def on_mount(self) -> None:
        self.push_screen(MainScreen(self.session))

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = True) -> None:
        """Every notification is text: its message and title often quote the trace (module names, an
        error message), so markup is never parsed and control characters are escaped
        (``markup`` is accepted for the signature and ignored)."""
        super().notify(printable(message, newlines=True), title=printable(title), severity=severity,
                       timeout=timeout, markup=False)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def on_unmount(self) -> None:
        if self.freeze_gc:
            gc.unfreeze()
        self.session.close()
