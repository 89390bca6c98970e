"""The step-context panel (toggled with ``c``): what the current step fed the text model.

A token strip with the image span, the attention mask as a heatmap (downsampled, image
span highlighted), position ids against token index (one line per M-RoPE row) and the
cache length per layer. Probe values are read and drawn in a worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.console import Group, RenderableType
from rich.text import Text
from textual import work
from textual.worker import get_current_worker

from vlmscope.semantics import fmt_shape, image_spans
from vlmscope.tui.charts import cache_bars, mask_heatmap, position_plot, token_strip
from vlmscope.tui.data import TraceModel
from vlmscope.tui.render import shape_of_row
from vlmscope.tui.stepindex import StepIndex
from vlmscope.tui.styles import DIM, IMAGE_STYLE
from vlmscope.tui.ui import to_ui
from vlmscope.tui.widgets.strips import StripView, render_strips

if TYPE_CHECKING:
    from vlmscope.tui.session import Session

#: masks with more elements than this are not unpacked to draw
MAX_MASK_ELEMENTS = 64_000_000


def prefill_image_spans(tm: TraceModel) -> tuple[list[tuple[int, int]], int | None]:
    """Image spans of the prefill (token positions, first batch row) and the image token id: the
    spans step 0's ``input_ids`` probe recorded, else found in its values
    (:func:`vlmscope.semantics.image_spans`)."""
    idx = tm.cached(0) or tm.index(0)
    k = tm.step_probe(idx, "input_ids")
    image_id = tm.meta.get("image_token_id")
    if k < 0:
        return [], image_id
    p = idx.probes[k]
    spans = [(int(a), int(b)) for _, a, b in (tm.probe_info(p).get("spans") or [])]
    if not spans and image_id is not None:
        ids = tm.probe_value(p)
        if ids is not None and ids.size:
            spans = [(a, b) for row, a, b in image_spans(np.asarray(ids), int(image_id)) if row == 0]
    return spans, image_id


def _tokens(tm: TraceModel, step: int, spans: list[tuple[int, int]], w: int) -> tuple[list, tuple[int, int]]:
    """The token strip: every token fed so far, the image span(s) and this step's tokens."""
    st = tm.steps[step]
    lens = tm.steps["input_len"][: step + 1].astype(np.int64)
    total = int(np.clip(lens, 0, None).sum())
    cur = (total - max(int(st["input_len"]), 0), total)
    n_img = sum(b - a for a, b in spans)
    head = Text.assemble(("tokens ", "bold"), (f"{total}", ""),
                         (f"  image {', '.join(f'[{a}, {b})' for a, b in spans)} = {n_img}" if spans else "  no image",
                          IMAGE_STYLE if spans else DIM),
                         (f"  this step [{cur[0]}, {cur[1]})", "green"))
    return [head, token_strip(np.zeros(total, dtype=np.int64), spans, cur, w)], cur


def _mask(tm: TraceModel, idx: StepIndex, spans: list[tuple[int, int]], w: int) -> list[RenderableType]:
    """The attention mask that reached the decoder layers (the step's mask shape), as a heatmap."""
    st = tm.steps[idx.step]
    k = tm.step_probe(idx, "attention_mask", prefer=tm.meta.get("decoder_layers"), rows=None)
    md = int(st["mask_ndim"])
    if md >= 2:
        want = tuple(int(d) for d in st["mask_shape"][:md])
        cands = [j for j in np.nonzero(idx.probes["kind"] == tm.trace.string_id("attention_mask"))[0]
                 if shape_of_row(idx.probes[j]) == want]
        if cands:
            k = int(cands[0])
    if k < 0:
        return [Text.assemble(("attention mask ", "bold"), ("none reached the decoder layers (e.g. SDPA is_causal)", DIM))]
    p = idx.probes[k]
    shape = shape_of_row(p)
    info = tm.probe_info(p)
    out: list[RenderableType] = [
        Text.assemble(("attention mask ", "bold"), (fmt_shape(shape), "cyan"),
                      (f" {info.get('style', '')} {info.get('dtype', '')}", ""),
                      ("  at " + (tm.module_name(int(p["module"]))), DIM))]
    if int(np.prod(shape)) > MAX_MASK_ELEMENTS:
        return out + [Text("too large to draw here", DIM)]
    m = tm.probe_value(p)
    if m is not None:
        q_off = max(int(st["cache_before"]), 0) if m.ndim >= 2 and m.shape[-2] < m.shape[-1] else 0
        out.append(mask_heatmap(m, spans, w, max_rows=12, q_offset=q_off))
        out.append(Text.assemble(("▀", "#5faf5f"), (" may attend  ", DIM), ("▀", "#d75fd7"),
                                 (" image span  ", DIM), ("▀", "#262626"), (" blocked   rows: queries,"
                                                                           " columns: keys", DIM)))
    return out


def _positions(tm: TraceModel, idx: StepIndex, spans: list[tuple[int, int]], cur: tuple[int, int],
               w: int) -> list[RenderableType]:
    """Position ids against token index, one line per M-RoPE row."""
    st = tm.steps[idx.step]
    k = tm.step_probe(idx, "position_ids", prefer=tm.meta.get("text_model"),
                      rows=int(st["pos_rows"]) if int(st["pos_rows"]) > 1 else None)
    if k < 0:
        return [Text.assemble(("position ids ", "bold"), ("not recorded", DIM))]
    p = idx.probes[k]
    out: list[RenderableType] = [
        Text.assemble(("position ids ", "bold"), (fmt_shape(shape_of_row(p)), "cyan"),
                      ("  at " + tm.module_name(int(p["module"])) + "  vs token index", DIM))]
    pos = tm.probe_value(p)
    if pos is not None and pos.size:
        off = cur[0] if pos.shape[-1] == cur[1] - cur[0] else 0
        local_spans = [(a - off, b - off) for a, b in spans if b - off > 0]
        out.append(position_plot(pos, local_spans, w))
    return out


def _cache(tm: TraceModel, idx: StepIndex, w: int) -> list[RenderableType]:
    """The cache length of every layer, after the step."""
    k = tm.step_probe(idx, "cache", output=True, last=True)
    if k < 0:
        st = tm.steps[idx.step]
        cb, ca = int(st["cache_before"]), int(st["cache_after"])
        return [Text.assemble(("cache ", "bold"), ("none" if cb < 0 and ca < 0 else f"{cb} -> {ca}", DIM))]
    p = idx.probes[k]
    info = tm.probe_info(p)
    lengths = [int(x) for x in (info.get("lengths") or [])]
    if not lengths:
        v = tm.probe_value(p)
        lengths = [int(x) for x in v.ravel()] if v is not None else []
    name = tm.s(int(p["name"]))
    when = "after the step" if name.startswith("out") else f"as {tm.module_name(int(p['module']))} received it"
    return [Text.assemble(("cache length per layer ", "bold"),
                          (f"{info.get('type', '?')} {info.get('layout', '?')}  {when}", DIM)),
            cache_bars(lengths, w)]


def build(session: "Session", step: int, width: int) -> RenderableType:
    """All four charts for ``step`` of trace A (reads probe data: worker)."""
    tm = session.a
    assert tm is not None
    idx = tm.cached(step) or tm.index(step)
    w = max(20, width - 2)
    spans, _ = prefill_image_spans(tm)
    parts, cur = _tokens(tm, step, spans, w)
    parts += [Text("")] + _mask(tm, idx, spans, w)
    parts += [Text("")] + _positions(tm, idx, spans, cur, w)
    parts += [Text("")] + _cache(tm, idx, w)
    return Group(*parts)


class ContextPanel(StripView):
    """Charts of the current step; hidden until toggled."""

    def __init__(self, session: "Session", **kwargs) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.step: int | None = None
        self.shown: int | None = None
        self.renderable: RenderableType = Text("")
        self._width = 0

    def _content_width(self) -> int:
        return max(20, self.scrollable_content_region.width or self.size.width or 80)

    def show_step(self, step: int, force: bool = False) -> None:
        if not self.display:
            self.step = step
            return
        width = self._content_width()
        if step == self.shown and width == self._width and not force:
            return
        self.step = step
        self._width = width
        self._load(step, width)

    def on_resize(self) -> None:
        if self.display and self.step is not None:
            self.show_step(self.step)

    @work(thread=True, exit_on_error=False, exclusive=True, group="context")
    def _load(self, step: int, width: int) -> None:
        worker = get_current_worker()
        try:
            content = build(self.session, step, width)
        except Exception as e:  # noqa: BLE001 - the user's file (damaged probes): a message, not a traceback
            content = Text(f"cannot draw the step context: {type(e).__name__}: {e}", "bold red")
        strips = render_strips(content, width)
        if not worker.is_cancelled:
            to_ui(self.app, self._set, step, content, strips)

    def _set(self, step: int, content: RenderableType, strips) -> None:
        if step != self.step:
            return
        self.renderable = content
        self.set_strips(strips, keep_scroll=self.shown == step)
        self.shown = step
