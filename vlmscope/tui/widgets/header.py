"""The header: model, prompt, device and dtype, the current step and the trace status."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from vlmscope.tui.data import TraceModel
from vlmscope.tui.items import FILTER_LABELS
from vlmscope.tui.safe import printable, safe_text

STATUS_STYLE = {"complete": "bold green", "incomplete": "bold yellow", "failed": "bold red"}


def _status(tm: TraceModel) -> Text:
    return Text(printable(tm.status), STATUS_STYLE.get(tm.status, "bold yellow"))


class TraceHeader(Static):
    """Two lines: what was recorded, and where the viewer stands."""

    def show_loading(self, names: list[str]) -> None:
        self.update(Text.assemble(("vlmscope ", "bold"),
                                  ("opening " + " and ".join(printable(n) for n in names) + " …", "dim")))

    def show(self, a: TraceModel, step: int, filt: str, b: TraceModel | None = None, query: str = "",
             checks_failed: bool = False) -> None:
        """Every string of the trace (model, prompt, names) is shown as text: escaped, no markup."""
        meta = a.meta if isinstance(a.meta, dict) else {}
        model = printable(meta.get("model") or meta.get("model_class") or "model ?")
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
            line1.append(f"  {model}", "dim")
        dev = " ".join(printable(x) for x in (meta.get("device"), meta.get("dtype"), meta.get("attn_implementation"))
                       if x)
        if dev:
            line1.append("  " + dev, "")
        if b is None:
            line1.append("  ")
            line1.append_text(_status(a))
        line2 = Text(no_wrap=True, overflow="ellipsis")
        line2.append("step ", "dim")
        line2.append(a.step_name(step) if a.n_steps else "none recorded", "bold")
        line2.append(f" ({step + 1}/{a.n_steps})" if a.n_steps else "", "dim")
        line2.append("  filter ", "dim")
        line2.append(FILTER_LABELS.get(filt, filt), "bold" if filt != "all" else "")
        if checks_failed:
            line2.append("  checks failed", "bold red")
        if query:
            line2.append("  search ", "dim")
            line2.append(printable(query))
        prompt = printable(str(meta.get("prompt", "") or "").replace("\n", " "))
        if prompt:
            line2.append("  prompt ", "dim")
            line2.append(prompt)
        both = Text("\n", no_wrap=True, overflow="ellipsis").join([line1, line2])
        both.no_wrap, both.overflow = True, "ellipsis"
        self.update(safe_text(both), layout=False)   # the height is fixed: no layout pass
