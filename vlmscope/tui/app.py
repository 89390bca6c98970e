"""``vlmscope view``: a thin Textual app; the screens do the work."""

from __future__ import annotations

import gc
import os
from typing import Sequence

from textual.app import App
from textual.binding import Binding

from vlmscope.tui.screens import HelpScreen, MainScreen
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

    def __init__(self, paths: Sequence[str | os.PathLike], maps: Sequence[str] = (), *, checks: str = "auto",
                 align: str = "auto", freeze_gc: bool = False, **kwargs) -> None:
        """``checks``: ``"auto"`` (the analyze rules, else the built-in ones), ``"builtin"`` or ``"off"``.
        ``align`` (diff mode): ``"auto"`` (as ``vlmscope diff`` aligns, when the analyze package is
        there; the built-in matcher until its result is in) or ``"builtin"``.
        ``freeze_gc``: once the trace is open, move everything allocated so far out of the
        garbage collector's sight (``gc.freeze``), so that full collections, which otherwise
        pause the UI for 50-100 ms on big traces, only walk what the session adds. For the
        command line, where the app owns the process."""
        super().__init__(**kwargs)
        self.session = Session(list(paths), list(maps), checks=checks, align=align)
        self.freeze_gc = freeze_gc

    def on_mount(self) -> None:
        self.push_screen(MainScreen(self.session))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def on_unmount(self) -> None:
        if self.freeze_gc:
            gc.unfreeze()
        self.session.close()
