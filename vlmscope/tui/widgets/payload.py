"""The payload viewer: a window of a saved tensor's values, read on demand."""

from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.widgets import Static
from textual.worker import get_current_worker

from vlmscope.semantics import fmt_shape
from vlmscope.tui.data import TraceModel, fmt_num
from vlmscope.tui.safe import printable
from vlmscope.tui.ui import to_ui


class PayloadView(Static):
    """Shows ``payload[lead..., r0:r0+rows, c0:c0+cols]``; only that slice is read from the file."""

    ROWS, COLS = 16, 8

    def __init__(self, tm: TraceModel, payload: int, name: str, shape: tuple, **kwargs) -> None:
        super().__init__(Text("loading …", "dim"), **kwargs)
        self.tm, self.payload, self.tensor_name, self.shape = tm, payload, name, tuple(shape)
        self.lead = [0] * max(0, len(self.shape) - 2)
        self.r0 = self.c0 = 0
        self.loaded_window: tuple | None = None

    def on_mount(self) -> None:
        self.reload()

    def show_tensor(self, payload: int, name: str, shape: tuple) -> None:
        """Show another saved tensor, from its first window."""
        self.payload, self.tensor_name, self.shape = payload, name, tuple(shape)
        self.lead = [0] * max(0, len(self.shape) - 2)
        self.r0 = self.c0 = 0
        self.loaded_window = None
        self.update(Text("loading …", "dim"))
        self.reload()

    @property
    def n_rows(self) -> int:
        return self.shape[-2] if len(self.shape) >= 2 else 1

    @property
    def n_cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    def move(self, dr: int = 0, dc: int = 0, dlead: int = 0) -> None:
        self.r0 = int(np.clip(self.r0 + dr, 0, max(0, self.n_rows - 1)))
        self.c0 = int(np.clip(self.c0 + dc, 0, max(0, self.n_cols - 1)))
        if dlead and self.lead:
            # odometer over the leading dimensions
            k = len(self.lead) - 1
            self.lead[k] += dlead
            while k > 0 and not 0 <= self.lead[k] < self.shape[k]:
                self.lead[k] %= self.shape[k]
                self.lead[k - 1] += dlead
                k -= 1
            self.lead[0] %= max(1, self.shape[0])
        self.reload()

    def reload(self) -> None:
        self._load(self.payload, self.shape, tuple(self.lead), self.r0, self.c0)

    @work(thread=True, exclusive=True, group="payload")
    def _load(self, payload: int, shape: tuple, lead: tuple, r0: int, c0: int) -> None:
        worker = get_current_worker()
        nd = len(shape)
        try:
            if nd == 0:
                index = ()
            elif nd == 1:
                index = (slice(c0, c0 + self.COLS * 4),)
            else:
                index = tuple(lead) + (slice(r0, r0 + self.ROWS), slice(c0, c0 + self.COLS))
            values = self.tm.trace.payload(payload, index)
        except Exception as e:  # noqa: BLE001 - the user's file (a damaged or missing payload): shown
            if not worker.is_cancelled:
                to_ui(self.app, self.update, Text(f"cannot read payload: {printable(e)}", "bold red"))
            return
        if not worker.is_cancelled:
            to_ui(self.app, self._show, payload, lead, r0, c0, np.asarray(values))

    def _show(self, payload: int, lead: tuple, r0: int, c0: int, values: np.ndarray) -> None:
        if payload != self.payload:     # a window of the tensor shown before
            return
        self.loaded_window = (lead, r0, c0)
        title = Text.assemble((printable(self.tensor_name), "bold"), " ", (fmt_shape(self.shape), "cyan"),
                              (f"  payload #{self.payload}", "dim"))
        if values.ndim == 0:
            self.update(Text.assemble(title, "\n", fmt_num(float(values))))
            return
        two = values.reshape(1, -1) if values.ndim == 1 else values
        col0 = c0
        tab = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        tab.add_column("", style="dim", justify="right")
        for c in range(two.shape[1]):
            tab.add_column(str(col0 + c), justify="right")
        for r in range(two.shape[0]):
            tab.add_row(str(r0 + r if values.ndim > 1 else ""), *(fmt_num(float(x)) for x in two[r]))
        where = "[" + ", ".join([*(str(x) for x in lead),
                                 *( [f"{r0}:{r0 + two.shape[0]}"] if values.ndim > 1 else []),
                                 f"{c0}:{c0 + two.shape[1]}"]) + "]"
        self.update(Group(title, Text("slice " + where + "  (arrows move, [ ] change the leading index)", "green"), tab))
