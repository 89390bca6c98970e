"""The modal screens: help (``?``), the payload viewer (``p``), and the message screen that
replaces the main screen when a trace cannot be read."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

from vlmscope.analyze.status import Status
from vlmscope.tui.data import TraceModel
from vlmscope.tui.safe import printable
from vlmscope.tui.styles import DIM, ERROR_STYLE, IMAGE_STYLE, PROBE_STYLE, STATUS_GLYPH, STATUS_STYLE
from vlmscope.tui.widgets.payload import PayloadView

#: every key, as the help screen lists it
KEYS: list[tuple[str, str]] = [
    ("j k / ↑ ↓", "move"),
    ("enter / click", "expand or collapse"),
    ("n N", "next / previous module at the same depth (next layer)"),
    ("] [", "next / previous step, same module selected"),
    (":", "go to step: type its number (0 is the prefill), enter"),
    ("Home End G", "first / last step (End and G: the last), same module selected"),
    ("/", "search a module path: glob or substring; enter: next"),
    ("f", "filter: all, modules, reshapes, probes, failing checks (diff mode: divergent only)"),
    ("c", "toggle the step context (positions, cache, tokens, mask)"),
    ("r R", "next / previous batch row of a batched step (header and context show it)"),
    ("g", "go to the first divergence (diff mode; d D: next / previous divergence, across steps)"),
    ("e", "next check violation"),
    ("p", "values of the selected module's saved tensor"),
    ("tab", "next panel: its border lights up; arrows and page keys scroll it"),
    ("S", "save a screenshot (SVG, in the current directory)"),
    ("ctrl+p", "commands (save screenshot, theme, keys, quit)"),
    ("?", "this help (esc closes)"),
    ("q", "quit"),
]


#: the diff statuses in the help's legend
HELP_WORDS = {Status.SHAPE: "shape/dtype", Status.DRIFT: "values drift", Status.MISSING_B: "only A",
              Status.MISSING_A: "only B"}


class MessageScreen(Screen):
    """A clear message instead of a traceback (a trace that cannot be read)."""

    BINDINGS = [Binding("q", "app.quit", "quit"), Binding("escape", "app.quit", "quit", show=False)]

    def __init__(self, title: str, message: str) -> None:
        super().__init__()
        self.title_text, self.message = title, message

    def compose(self) -> ComposeResult:
        with Vertical(id="message-box"):
            yield Static(Text(printable(self.title_text), ERROR_STYLE), id="message-title")
            yield Static(Text(printable(self.message, newlines=True)), id="message-text")
            yield Static(Text("press q to quit", "dim"))


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss", "close"), Binding("question_mark", "dismiss", "close", show=False),
                Binding("q", "dismiss", "close", show=False)]

    def compose(self) -> ComposeResult:
        tab = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2))
        tab.add_column(style="bold cyan", no_wrap=True)
        tab.add_column()
        for key, what in KEYS:
            tab.add_row(key, what)
        legend = Text.assemble(
            ("tree  ", "bold"), ("✗", ERROR_STYLE), " failing check  ", ("↳", DIM), " reshape  ",
            ("◆", PROBE_STYLE), " probe  ", ("█", IMAGE_STYLE), " image span\n", ("diff  ", "bold"),
            *[part for st, word in HELP_WORDS.items()
              for part in ((STATUS_GLYPH[st], STATUS_STYLE[st]), f" {word}" + ("" if st == Status.MISSING_A else "  "))])
        with VerticalScroll(id="help-box"):
            yield Static(Text("vlmscope view: keys", "bold"), id="help-title")
            yield Static(tab)
            yield Static(legend)


class PayloadScreen(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss", "close"), Binding("q", "dismiss", "close", show=False),
                Binding("up", "move(-1, 0)", show=False), Binding("down", "move(1, 0)", show=False),
                Binding("k", "move(-1, 0)", show=False), Binding("j", "move(1, 0)", show=False),
                Binding("left", "move(0, -1)", show=False), Binding("right", "move(0, 1)", show=False),
                Binding("pageup", "move(-16, 0)", show=False), Binding("pagedown", "move(16, 0)", show=False),
                Binding("right_square_bracket", "lead(1)", "next slice"),
                Binding("left_square_bracket", "lead(-1)", "prev slice"),
                Binding("n", "next_tensor", "next saved tensor")]

    def __init__(self, tm: TraceModel, payloads: list[tuple[int, str, tuple]]) -> None:
        super().__init__()
        self.tm, self.payloads, self.k = tm, payloads, 0

    def compose(self) -> ComposeResult:
        pid, name, shape = self.payloads[0]
        with Vertical(id="payload-box"):
            yield PayloadView(self.tm, pid, name, shape, id="payload-view")
            yield Static(Text("arrows / j k move · [ ] leading index · n next saved tensor · esc close", "dim"))

    def action_move(self, dr: int, dc: int) -> None:
        self.query_one(PayloadView).move(dr, dc)

    def action_lead(self, d: int) -> None:
        self.query_one(PayloadView).move(dlead=d)

    def action_next_tensor(self) -> None:
        self.k = (self.k + 1) % len(self.payloads)
        pid, name, shape = self.payloads[self.k]
        self.query_one(PayloadView).show_tensor(pid, name, shape)    # in place: no remount
