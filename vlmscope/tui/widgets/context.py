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

from vlmscope.tui.data import TraceModel, fmt_shape
from vlmscope.tui.render import (
    DIM, IMAGE_STYLE, cache_bars, mask_heatmap, position_plot, shape_of_row, token_strip,
)
from vlmscope.tui.ui import to_ui
from vlmscope.tui.widgets.strips import StripView, render_strips

if TYPE_CHECKING:
    from vlmscope.tui.session import Session

#: masks with more elements than this are not unpacked to draw
MAX_MASK_ELEMENTS = 64_000_000


def image_spans(tm: TraceModel) -> tuple[list[tuple[int, int]], int]:
    """Image spans of the prefill (token positions) and the image token id, from step 0's input_ids probe."""
    idx = tm.cached(0) or tm.index(0)
    k = tm.step_probe(idx, "input_ids")
    image_id = tm.meta.get("image_token_id")
    if k < 0:
        return [], image_id
    p = idx.probes[k]
    info = tm.probe_info(p)
    spans = [(int(a), int(b)) for _, a, b in (info.get("spans") or []) if True]
    if not spans and image_id is not None:
        ids = tm.probe_value(p)
        if ids is not None and ids.size:
            row = ids.reshape(-1, ids.shape[-1])[0]
            img = np.nonzero(row == int(image_id))[0]
            if len(img):
                # contiguous runs
                breaks = np.nonzero(np.diff(img) != 1)[0]
                starts = np.r_[img[0], img[breaks + 1]]
                ends = np.r_[img[breaks], img[-1]] + 1
                spans = [(int(a), int(b)) for a, b in zip(starts, ends)]
    return spans, image_id


def build(session: "Session", step: int, width: int) -> RenderableType:
    """All four charts for ``step`` of trace A (reads probe data: worker)."""
    tm = session.a
    assert tm is not None
    idx = tm.cached(step) or tm.index(step)
    st = tm.steps[step]
    meta = tm.meta
    parts: list[RenderableType] = []
    w = max(20, width - 2)

    # tokens ---------------------------------------------------------------------
    spans, image_id = image_spans(tm)
    lens = tm.steps["input_len"][: step + 1].astype(np.int64)
    total = int(np.clip(lens, 0, None).sum())
    cur = (total - max(int(st["input_len"]), 0), total)
    n_img = sum(b - a for a, b in spans)
    head = Text.assemble(("tokens ", "bold"), (f"{total}", ""),
                         (f"  image {', '.join(f'[{a}, {b})' for a, b in spans)} = {n_img}" if spans else "  no image",
                          IMAGE_STYLE if spans else DIM),
                         (f"  this step [{cur[0]}, {cur[1]})", "green"))
    parts += [head, token_strip(np.zeros(total, dtype=np.int64), spans, cur, w)]

    # attention mask -----------------------------------------------------------------
    k = tm.step_probe(idx, "attention_mask", prefer=meta.get("decoder_layers"), rows=None)
    md = int(st["mask_ndim"])
    if md >= 2:
        want = tuple(int(d) for d in st["mask_shape"][:md])
        cands = [j for j in np.nonzero(idx.probes["kind"] == tm.trace.string_id("attention_mask"))[0]
                 if shape_of_row(idx.probes[j]) == want]
        if cands:
            k = int(cands[0])
    parts.append(Text(""))
    if k >= 0:
        p = idx.probes[k]
        shape = shape_of_row(p)
        info = tm.probe_info(p)
        parts.append(Text.assemble(("attention mask ", "bold"), (fmt_shape(shape), "cyan"),
                                   (f" {info.get('style', '')} {info.get('dtype', '')}", ""),
                                   ("  at " + (tm.module_name(int(p["module"]))), DIM)))
        if int(np.prod(shape)) > MAX_MASK_ELEMENTS:
            parts.append(Text("too large to draw here", DIM))
        else:
            m = tm.probe_value(p)
            if m is not None:
                q_off = max(int(st["cache_before"]), 0) if m.ndim >= 2 and m.shape[-2] < m.shape[-1] else 0
                parts.append(mask_heatmap(m, spans, w, max_rows=12, q_offset=q_off))
                parts.append(Text.assemble(("▀", "#5faf5f"), (" may attend  ", DIM), ("▀", "#d75fd7"),
                                           (" image span  ", DIM), ("▀", "#262626"), (" blocked   rows: queries,"
                                                                                     " columns: keys", DIM)))
    else:
        parts.append(Text.assemble(("attention mask ", "bold"),
                                   ("none reached the decoder layers (e.g. SDPA is_causal)", DIM)))

    # position ids ---------------------------------------------------------------------
    parts.append(Text(""))
    k = tm.step_probe(idx, "position_ids", prefer=meta.get("text_model"),
                      rows=int(st["pos_rows"]) if int(st["pos_rows"]) > 1 else None)
    if k >= 0:
        p = idx.probes[k]
        parts.append(Text.assemble(("position ids ", "bold"), (fmt_shape(shape_of_row(p)), "cyan"),
                                   ("  at " + tm.module_name(int(p["module"])) + "  vs token index", DIM)))
        pos = tm.probe_value(p)
        if pos is not None and pos.size:
            off = cur[0] if pos.shape[-1] == cur[1] - cur[0] else 0
            local_spans = [(a - off, b - off) for a, b in spans if b - off > 0]
            parts.append(position_plot(pos, local_spans, w))
    else:
        parts.append(Text.assemble(("position ids ", "bold"), ("not recorded", DIM)))

    # cache ------------------------------------------------------------------------------
    parts.append(Text(""))
    k = tm.step_probe(idx, "cache", output=True, last=True)
    if k >= 0:
        p = idx.probes[k]
        info = tm.probe_info(p)
        lengths = [int(x) for x in (info.get("lengths") or [])]
        if not lengths:
            v = tm.probe_value(p)
            lengths = [int(x) for x in v.ravel()] if v is not None else []
        name = tm.s(int(p["name"]))
        when = "after the step" if name.startswith("out") else f"as {tm.module_name(int(p['module']))} received it"
        parts.append(Text.assemble(("cache length per layer ", "bold"),
                                   (f"{info.get('type', '?')} {info.get('layout', '?')}  {when}", DIM)))
        parts.append(cache_bars(lengths, w))
    else:
        cb, ca = int(st["cache_before"]), int(st["cache_after"])
        parts.append(Text.assemble(("cache ", "bold"), ("none" if cb < 0 and ca < 0 else f"{cb} -> {ca}", DIM)))
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
        except Exception as e:  # noqa: BLE001
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
