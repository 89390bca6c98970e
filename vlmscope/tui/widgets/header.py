"""The header: model, prompt, device and dtype, the current step, the trace status, and
whether the checks are still running (with their elapsed time)."""

from __future__ import annotations

import time

from rich.text import Text
from textual.timer import Timer
from textual.widgets import Static

from vlmscope.tui.data import TraceModel
from vlmscope.tui.items import FILTER_LABELS
from vlmscope.tui.safe import printable, safe_text
from vlmscope.tui.styles import ERROR_STYLE, OK_STYLE, WARN_STYLE

STATUS_STYLE = {"complete": OK_STYLE, "incomplete": WARN_STYLE, "failed": ERROR_STYLE}
#: the style of the "checking…" indicator
CHECKING_STYLE = "bold #87afd7"


def _status(tm: TraceModel) -> Text:
    return Text(printable(tm.status), STATUS_STYLE.get(tm.status, WARN_STYLE))


def elapsed(seconds: float) -> str:
    """``7s``, ``1m05s``."""
    s = max(0, int(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"


def _model(meta: dict) -> str:
    return printable(meta.get("model") or meta.get("model_class") or "model ?")


def _device(meta: dict) -> str:
    return " ".join(printable(x) for x in (meta.get("device"), meta.get("dtype"), meta.get("attn_implementation"))
                    if x)


def _prompt(meta: dict) -> str:
    return printable(str(meta.get("prompt", "") or "").replace("\n", " "))


def _cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells, an ellipsis marking the cut (an empty prompt: "(none)")."""
    if not text:
        return "(none)"
    t = Text(text)
    if t.cell_len <= width:
        return text
    t.truncate(max(1, width - 1))
    return t.plain + "…"


class TraceHeader(Static):
    """Two lines: what was recorded, and where the viewer stands. While the checks run
    (:meth:`checks_started` .. :meth:`checks_finished`) the second line says ``checking… 12s``,
    updated every second."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checking_since: float | None = None
        self._timer: Timer | None = None
        self._last: tuple | None = None

    def checks_started(self) -> None:
        self.checking_since = time.monotonic()
        if self._timer is None:
            self._timer = self.set_interval(1.0, self._tick)
        self._tick()

    def checks_finished(self) -> None:
        self.checking_since = None
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self._tick()

    def checking_text(self) -> str:
        """What the indicator says now ("" when no check runs)."""
        if self.checking_since is None:
            return ""
        return f"checking… {elapsed(time.monotonic() - self.checking_since)}"

    def _tick(self) -> None:
        if self._last is not None:
            args, kwargs = self._last
            self.show(*args, **kwargs)

    def show_loading(self, names: list[str]) -> None:
        self.update(Text.assemble(("vlmscope ", "bold"),
                                  ("opening " + " and ".join(printable(n) for n in names) + " …", "dim")))

    def show(self, a: TraceModel, step: int, filt: str, b: TraceModel | None = None, query: str = "",
             checks_failed: bool = False, row: tuple[int, int] | None = None) -> None:
        """Every string of the trace (model, prompt, names) is shown as text: escaped, no markup.
        ``row``: (selected batch row, B) of a batched step, shown as ``row 1 (2/3)``."""
        self._last = ((a, step, filt, b, query), {"checks_failed": checks_failed, "row": row})
        meta = a.meta if isinstance(a.meta, dict) else {}
        meta_b = (b.meta if isinstance(b.meta, dict) else {}) if b is not None else {}
        model = _model(meta)
        line1 = Text(no_wrap=True, overflow="ellipsis")
        line1.append("vlmscope ", "bold")
        if b is None:
            line1.append(str(model), "bold cyan")
        else:
            line1.append("A ", "bold")
            line1.append(printable(a.name), "cyan")
            line1.append(" ")
            line1.append_text(_status(a))
            line1.append("  vs  B ", "bold")
            line1.append(printable(b.name), "cyan")
            line1.append(" ")
            line1.append_text(_status(b))
            # each run's model and device (two implementations are often two models)
            model_b = _model(meta_b)
            line1.append(f"  {model}" if model == model_b else f"  {model} vs {model_b}", "dim")
        dev = _device(meta)
        dev_b = _device(meta_b) if b is not None else dev
        if dev_b != dev:
            dev = f"{dev or '?'} vs {dev_b or '?'}"
        if dev:
            line1.append("  " + dev, "")
        if b is None:
            line1.append("  ")
            line1.append_text(_status(a))
        line2 = Text(no_wrap=True, overflow="ellipsis")
        line2.append("step ", "dim")
        line2.append(a.step_name(step) if a.n_steps else "none recorded", "bold")
        line2.append(f" ({step + 1}/{a.n_steps})" if a.n_steps else "", "dim")
        if row is not None:
            line2.append("  row ", "dim")
            line2.append(str(row[0]), "bold")
            line2.append(f" ({row[0] + 1}/{row[1]})", "dim")
        line2.append("  filter ", "dim")
        line2.append(FILTER_LABELS.get(filt, filt), "bold" if filt != "all" else "")
        if checks_failed:
            line2.append("  checks failed", ERROR_STYLE)
        checking = self.checking_text()
        if checking:
            line2.append("  " + checking, CHECKING_STYLE)
        if query:
            line2.append("  search ", "dim")
            line2.append(printable(query))
        prompt = _prompt(meta)
        if b is not None:       # diff mode: both prompts, each cut to its share of the line
            prompt_b = _prompt(meta_b)
            room = max(8, (self.size.width or 120) - line2.cell_len - 16)
            if prompt == prompt_b:
                line2.append("  prompt A = B ", "dim")
                line2.append(_cut(prompt, room))
            else:
                line2.append("  prompt A ", "dim")
                line2.append(_cut(prompt, room // 2))
                line2.append("  B ", "dim")
                line2.append(_cut(prompt_b, room - room // 2))
        elif prompt:
            line2.append("  prompt ", "dim")
            line2.append(prompt)
        both = Text("\n", no_wrap=True, overflow="ellipsis").join([line1, line2])
        both.no_wrap, both.overflow = True, "ellipsis"
        self.update(safe_text(both), layout=False)   # the height is fixed: no layout pass
