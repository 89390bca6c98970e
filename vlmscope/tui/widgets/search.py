"""The search bar (``/``): a module path, glob or substring."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input


class SearchBar(Input):
    BINDINGS = [Binding("escape", "close", "Close", show=False)]

    class Search(Message):
        def __init__(self, query: str) -> None:
            super().__init__()
            self.query = query

    class Closed(Message):
        pass

    def __init__(self, **kwargs) -> None:
        super().__init__(placeholder="module path: glob (layers.*.mlp) or substring; enter: next match", **kwargs)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Search(event.value))

    def action_close(self) -> None:
        self.post_message(self.Closed())


class GotoBar(Input):
    """The go-to-step bar (``:``): a step number (0 is the prefill), enter goes there."""

    DEFAULT_CSS = """
    GotoBar {
        dock: bottom;
        margin-bottom: 1;
        height: 3;
    }
    """
    BINDINGS = [Binding("escape", "close", "Close", show=False)]

    class Goto(Message):
        def __init__(self, step: int) -> None:
            super().__init__()
            self.step = step

    class Closed(Message):
        pass

    def __init__(self, **kwargs) -> None:
        super().__init__(placeholder="go to step: a number (0 is the prefill); enter goes, esc closes",
                         restrict=r"[0-9]{0,9}", **kwargs)

    def open(self, n_steps: int) -> None:
        self.placeholder = f"go to step 0..{max(0, n_steps - 1)} (0 is the prefill); enter goes, esc closes"
        self.value = ""
        self.display = True

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if text:
            self.post_message(self.Goto(int(text)))
        self.post_message(self.Closed())

    def action_close(self) -> None:
        self.post_message(self.Closed())
