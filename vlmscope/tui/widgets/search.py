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
