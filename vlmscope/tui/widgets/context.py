"""The step-context panel (toggled with ``c``): what the current step fed the text model.

Position ids against token index (one line per M-RoPE row; when a ``positions.*`` check fails
in the step, what it expected beside what was recorded), the cache length per layer, a token
strip with the image span, and the attention mask as a heatmap (downsampled, image span
highlighted, fewer rows on a short panel). Positions and cache come first, so that they are in
view on an 80x24 terminal; the panel takes the focus (``tab``) and scrolls with the arrow and
page keys. Probe values are read and drawn in a worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work
from textual.worker import get_current_worker

from vlmscope.analyze import rows as batchrows
from vlmscope.analyze.status import Status
from vlmscope.semantics import fmt_shape, image_spans, position_rows
from vlmscope.trace.text import printable
from vlmscope.tui import checks
from vlmscope.tui.charts import cache_bars, mask_heatmap, position_plot, token_strip
from vlmscope.tui.data import TraceModel
from vlmscope.tui.items import Violation
from vlmscope.tui.render import shape_of_row
from vlmscope.tui.stepindex import StepIndex
from vlmscope.tui.styles import (ATTEND_RGB, BLOCKED_RGB, CURRENT_STYLE, DIM, ERROR_STYLE, EXPECTED_STYLE, IMAGE_STYLE,
                                 SHAPE_STYLE, STATUS_STYLE, hex_of)
from vlmscope.tui.ui import to_ui
from vlmscope.tui.widgets.strips import StripView, render_strips

if TYPE_CHECKING:
    from vlmscope.tui.session import Session

#: masks with more elements than this are not unpacked to draw
MAX_MASK_ELEMENTS = 64_000_000


def _title(*parts) -> Text:
    """A chart's title line: cut with an ellipsis rather than wrapped (the charts stay in view)."""
    t = Text.assemble(*parts)
    t.no_wrap, t.overflow = True, "ellipsis"
    return t


def prefill_image_spans(tm: TraceModel, step: int = 0, row: int = 0) -> tuple[list[tuple[int, int]], int | None]:
    """Image spans of batch row ``row`` in the prefill of ``step``'s generate call (token
    positions) and the image token id: the spans the prefill's ``input_ids`` probe recorded, else
    found in its values (:func:`vlmscope.semantics.image_spans`)."""
    first = batchrows.prefill_of(tm.steps, step) if tm.n_steps else 0
    idx = tm.cached(first) or tm.index(first)
    k = tm.step_probe(idx, "input_ids")
    image_id = tm.meta.get("image_token_id")
    if k < 0:
        return [], image_id
    p = idx.probes[k]
    spans = [(int(a), int(b)) for r, a, b in (tm.probe_info(p).get("spans") or []) if r == row]
    if not spans and image_id is not None:
        ids = tm.probe_value(p)
        if ids is not None and ids.size:
            spans = [(a, b) for r, a, b in image_spans(np.asarray(ids), int(image_id)) if r == row]
    return spans, image_id


def _tokens(tm: TraceModel, step: int, spans: list[tuple[int, int]], w: int,
            sig: dict | None = None) -> tuple[list, tuple[int, int]]:
    """The token strip: every token fed so far in this generate call, the image span(s) and this
    step's tokens."""
    st = tm.steps[step]
    first = batchrows.prefill_of(tm.steps, step)
    lens = tm.steps["input_len"][first: step + 1].astype(np.int64)
    total = int(np.clip(lens, 0, None).sum())
    cur = (total - max(int(st["input_len"]), 0), total)
    n_img = sum(b - a for a, b in spans)
    head = _title(("tokens ", "bold"), (f"{total}", ""),
                         (f"  image {', '.join(f'[{a}, {b})' for a, b in spans)} = {n_img}" if spans else "  no image",
                          IMAGE_STYLE if spans else DIM),
                         (f"  this step [{cur[0]}, {cur[1]})", CURRENT_STYLE.replace("bold ", "")))
    if sig is not None:
        sig["tokens"] = (total, tuple(spans), cur)
    return [head, token_strip(np.zeros(total, dtype=np.int64), spans, cur, w)], cur


def _row_of(a: np.ndarray | None, row: int, batch: int, axis: int) -> np.ndarray | None:
    """Batch row ``row`` of ``a`` along ``axis`` (kept as a size-1 axis), when ``a`` has ``batch`` there."""
    if a is None or a.ndim <= axis or a.shape[axis] != batch or batch <= 1:
        return a
    return np.take(a, [row], axis=axis)


def _mask(tm: TraceModel, idx: StepIndex, spans: list[tuple[int, int]], w: int,
          max_rows: int = 12, row: int = 0, sig: dict | None = None) -> list[RenderableType]:
    """The attention mask that reached the decoder layers (the step's mask shape), as a heatmap
    (of batch row ``row``)."""
    st = tm.steps[idx.step]
    k = tm.step_probe(idx, "attention_mask", prefer=tm.meta.get("decoder_layers"), rows=None)
    md = int(st["mask_ndim"])
    if md >= 2:
        want = tuple(int(d) for d in st["mask_shape"][:md])
        cands = [j for j in np.nonzero(idx.probes["kind"] == tm.trace.string_id("attention_mask"))[0]
                 if shape_of_row(idx.probes[j]) == want]
        if cands:
            k = int(cands[0])
    if sig is not None:
        sig["mask"] = None
    if k < 0:
        return [_title(("attention mask ", "bold"), ("none reached the decoder layers (e.g. SDPA is_causal)", DIM))]
    p = idx.probes[k]
    shape = shape_of_row(p)
    info = tm.probe_info(p)
    out: list[RenderableType] = [
        _title(("attention mask ", "bold"), (fmt_shape(shape), SHAPE_STYLE),
                      (f" {info.get('style', '')} {info.get('dtype', '')}", ""),
                      ("  at " + (tm.module_name(int(p["module"]))), DIM))]
    if sig is not None:
        sig["mask"] = (shape,)
    if int(np.prod(shape)) > MAX_MASK_ELEMENTS:
        return out + [Text("too large to draw here", DIM)]
    m = _row_of(tm.probe_value(p), row, idx.batch, 0)
    if sig is not None and m is not None:
        sig["mask"] = (shape, np.asarray(m, dtype=bool).tobytes())
    if m is not None:
        q_off = max(int(st["cache_before"]), 0) if m.ndim >= 2 and m.shape[-2] < m.shape[-1] else 0
        out.append(mask_heatmap(m, spans, w, max_rows=max_rows, q_offset=q_off))
        out.append(Text.assemble(("▀", hex_of(ATTEND_RGB)), (" may attend  ", DIM), ("▀", IMAGE_STYLE),
                                 (" image span  ", DIM), ("▀", hex_of(BLOCKED_RGB)), (" blocked   rows: queries,"
                                                                                   " columns: keys", DIM)))
    return out


def _strip_common(expected: str, actual: str) -> tuple[str, str]:
    """``position_ids 279 (...)``, ``position_ids 4`` -> ``279 (...)``, ``4`` (their shared first word)."""
    e, a = expected.split(" ", 1), actual.split(" ", 1)
    if len(e) == 2 and len(a) == 2 and e[0] == a[0]:
        return e[1], a[1]
    return expected, actual


def expected_lines(violations: list[Violation], width: int = 80, limit: int = 3) -> list[RenderableType]:
    """Per failing positions check, what was recorded beside what the check expected: one line
    (``✗ recorded 4  expected 279 (…)  rule at module``), or two when that does not fit."""
    out: list[RenderableType] = []
    for v in violations[:limit]:
        exp, act = _strip_common(getattr(v, "expected", ""), getattr(v, "actual", ""))
        where = Text(f"  {v.rule}" + (f" at {v.module}" if v.module else ""), DIM)
        recorded = Text.assemble(("✗ ", ERROR_STYLE), ("recorded ", DIM), (act or "?", ERROR_STYLE))
        expected = Text.assemble(("  expected ", DIM), (exp or v.message, EXPECTED_STYLE))
        one = Text.assemble(recorded, expected, where)
        lines = [one] if one.cell_len <= width else [Text.assemble(recorded, where), Text.assemble(" ", expected)]
        for t in lines:
            t.no_wrap, t.overflow = True, "ellipsis"
        out += lines
    if len(violations) > limit:
        out.append(Text(f"… {len(violations) - limit} more failing position checks (e: next ✗)", DIM))
    return out


def _positions(tm: TraceModel, idx: StepIndex, spans: list[tuple[int, int]], cur: tuple[int, int],
               w: int, row: int = 0, sig: dict | None = None) -> list[RenderableType]:
    """Position ids (of batch row ``row``) against token index, one line per M-RoPE row, then what
    the failing ``positions.*`` checks of the step expected."""
    failing = checks.in_step(tm.violations, idx.step, "positions")
    st = tm.steps[idx.step]
    k = tm.step_probe(idx, "position_ids", prefer=tm.meta.get("text_model"),
                      rows=int(st["pos_rows"]) if int(st["pos_rows"]) > 1 else None)
    if sig is not None:
        sig["positions"] = None
    if k < 0:
        return [Text.assemble(("position ids ", "bold"), ("not recorded", DIM))] + expected_lines(failing, w)
    p = idx.probes[k]
    out: list[RenderableType] = [
        _title(("position ids ", "bold"), (fmt_shape(shape_of_row(p)), SHAPE_STYLE),
                      ("  at " + tm.module_name(int(p["module"])) + "  vs token index", DIM))]
    pos = tm.probe_value(p)
    if pos is not None and pos.ndim >= 2:
        pos = _row_of(pos, row, idx.batch, pos.ndim - 2)
    if sig is not None and pos is not None:
        # what the rotary embedding sees: 1-D positions and equal M-RoPE axes are the same ids
        sig["positions"] = [list(r) for r in dict.fromkeys(tuple(r) for r in position_rows(pos).tolist())]
    if pos is not None and pos.size:
        off = cur[0] if pos.shape[-1] == cur[1] - cur[0] else 0
        local_spans = [(a - off, b - off) for a, b in spans if b - off > 0]
        out.append(position_plot(pos, local_spans, w))
    return out + expected_lines(failing, w)


def _cache(tm: TraceModel, idx: StepIndex, w: int, sig: dict | None = None) -> list[RenderableType]:
    """The cache length of every layer, after the step."""
    k = tm.step_probe(idx, "cache", output=True, last=True)
    st = tm.steps[idx.step]
    cb, ca = int(st["cache_before"]), int(st["cache_after"])
    if sig is not None:
        sig["cache"] = (cb, ca, (ca,))
    if k < 0:
        return [Text.assemble(("cache ", "bold"), ("none" if cb < 0 and ca < 0 else f"{cb} -> {ca}", DIM))]
    p = idx.probes[k]
    info = tm.probe_info(p)
    lengths = [int(x) for x in (info.get("lengths") or [])]
    if not lengths:
        v = tm.probe_value(p)
        lengths = [int(x) for x in v.ravel()] if v is not None else []
    if sig is not None:
        sig["cache"] = (cb, ca, tuple(sorted(set(lengths))) or (ca,))
    name = tm.s(int(p["name"]))
    when = "after the step" if name.startswith("out") else f"as {tm.module_name(int(p['module']))} received it"
    about = Text(f"  {info.get('type', '?')} {info.get('layout', '?')}  {when}", DIM)
    if lengths and min(lengths) == max(lengths):     # one line: the length is in view with its title
        head = Text.assemble(("cache length per layer ", "bold"), cache_bars(lengths, w), about)
        head.no_wrap, head.overflow = True, "ellipsis"
        return [head]
    head = Text.assemble(("cache length per layer", "bold"), about)
    head.no_wrap, head.overflow = True, "ellipsis"
    return [head, cache_bars(lengths, w)]


def mask_rows(height: int) -> int:
    """Text rows of the mask heatmap on a panel ``height`` lines high: a compact picture on a
    short panel (it comes last, below what must be in view)."""
    return 12 if height >= 24 else max(3, min(12, height // 3))


def _ranges(ranges: list[list[int]], names: list[str]) -> str:
    return batchrows.fmt_ranges(ranges, names if len(names) == len(ranges) else None)


def _span_line(sp: batchrows.Span, names: list[str], w: int) -> Text:
    """One span of a row: ``image 1 (#3)  [273, 449)  176 tok  grid 1x22x32  t 33..33 h 33..43 w 33..48``."""
    style = IMAGE_STYLE if sp.kind in ("image", "video") else DIM if sp.kind == "pad" else ""
    name = sp.kind if sp.index < 0 else f"{sp.kind} {sp.index}"
    t = Text.assemble(("  " + name.ljust(8), style or "bold"), (f"[{sp.start}, {sp.end})".ljust(13), ""),
                      (f" {sp.length} tok", DIM))
    if sp.number >= 0:
        t.append(f"  #{sp.number} of the call", DIM)
    if sp.grid is not None:
        t.append("  grid " + "x".join(str(g) for g in sp.grid), SHAPE_STYLE)
    if sp.kind == "video":
        t.append("  second_per_grid_ts ", DIM)
        t.append("not recorded" if sp.second is None else f"{sp.second:g}", DIM if sp.second is None else "")
    if sp.positions:
        t.append("  " + _ranges(sp.positions, names))
    t.no_wrap, t.overflow = True, "ellipsis"
    return t


#: spans listed per row (the rest counted)
MAX_SPANS = 12


def row_section(tm: TraceModel, idx: StepIndex, row: int, w: int, sig: dict | None = None) -> list[RenderableType]:
    """The selected batch row of a batched step: its mask (padding keys, key length), its spans
    with their positions (text, image k, video k with the grid and ``second_per_grid_ts``), its
    recorded ``rope_deltas``, and, on a decode step, its images and videos in the call's prefill."""
    first = batchrows.prefill_of(tm.steps, idx.step)
    pre = None
    if first != idx.step:
        pidx = tm.cached(first) or tm.index(first)
        pre = pidx.probes
    d = batchrows.row_detail(tm.trace, idx.step, row, idx.probes, pre)
    names = d.pos_names
    if sig is not None:
        sig["row"] = (d.keys, d.allowed, tuple(d.pad_keys), d.rope_delta, _ranges(d.positions, names),
                      tuple((sp.kind, sp.start, sp.end, sp.grid) for sp in d.spans))
    out: list[RenderableType] = [_title(
        ("batch row ", "bold"), (f"{d.row}", "bold"), (f" ({d.row + 1}/{d.batch})", DIM),
        (f"  call {d.call}" if tm.n_calls > 1 else "", DIM), ("   r R: other rows", DIM))]
    if d.keys is None:
        out.append(Text.assemble(("  mask  ", "bold"), ("no token mask [B, K] recorded", DIM)))
    else:
        pad = d.keys - (d.allowed or 0)
        m = Text.assemble(("  mask  ", "bold"), f"{d.keys} keys: {d.allowed} allowed, ",
                          (f"{pad} padding", "bold" if pad else ""))
        if d.pad_keys:
            more = " …" if len(d.pad_keys) > 4 else ""
            m.append(" " + ", ".join(f"[{a}, {b})" for a, b in d.pad_keys[:4]) + more, DIM)
        m.no_wrap, m.overflow = True, "ellipsis"
        out.append(m)
    if d.rope_delta is None:
        out.append(Text.assemble(("  rope_deltas  ", "bold"), ("not recorded", DIM)))
    else:
        src = "the model's, after the step" if d.rope_delta_from == "state" \
            else f"argument {printable(d.rope_delta_from)}"
        out.append(_title(("  rope_deltas  ", "bold"), (" ".join(str(x) for x in d.rope_delta), ""),
                          (f"  {fmt_shape(d.rope_delta_shape or ())} ({src})", DIM)))
    out.append(_title(("  positions  ", "bold"), (_ranges(d.positions, names), ""),
                      (f"  {' '.join(names)}, padding left out" if names else "  not recorded", DIM)))
    out.append(Text("  spans of this step", DIM))
    out += [_span_line(sp, names, w) for sp in d.spans[:MAX_SPANS]]
    if len(d.spans) > MAX_SPANS:
        out.append(Text(f"  … {len(d.spans) - MAX_SPANS} more spans", DIM))
    if first != idx.step:
        out.append(Text(f"  images and videos of this row in the call's prefill (step {first})"
                        + (":" if d.media else ": none"), DIM))
        out += [_span_line(sp, names, w) for sp in d.media[:MAX_SPANS]]
    return out


def _sections(tm: TraceModel, step: int, w: int, height: int, row: int) -> tuple[list[tuple[str, list]], dict]:
    """The panel's sections for ``step`` of ``tm`` (row, positions, cache, tokens, mask; each a
    list of renderables whose first is its title), and what each shows, to compare with the other
    trace's (reads probe data: worker)."""
    idx = tm.cached(step) or tm.index(step)
    row = max(0, min(row, idx.batch - 1))
    sig: dict = {}
    spans, _ = prefill_image_spans(tm, step, row)
    tokens, cur = _tokens(tm, step, spans, w, sig)
    out: list[tuple[str, list]] = [("row", row_section(tm, idx, row, w, sig))] if idx.batch > 1 else []
    out += [("positions", _positions(tm, idx, spans, cur, w, row, sig)), ("cache", _cache(tm, idx, w, sig)),
            ("tokens", tokens), ("mask", _mask(tm, idx, spans, w, max_rows=mask_rows(height), row=row, sig=sig))]
    return out, sig


def _join(sections: list[tuple[str, list]], gap: list) -> list[RenderableType]:
    out: list[RenderableType] = []
    for k, (_, parts) in enumerate(sections):
        out += (gap if k else []) + parts
    return out


def build(session: "Session", step: int, width: int, height: int = 40, row: int = 0,
          side_by_side: bool = False) -> RenderableType:
    """All four charts for ``step`` of trace A, positions and cache first (reads probe data:
    worker); a batched step's selected row ``row`` first, and the charts show that row. In diff
    mode, B's step paired with it beside A's (:func:`build_pair`)."""
    tm = session.a
    assert tm is not None
    if session.b is not None:
        return build_pair(session, step, width, height, row, side_by_side)
    w = max(20, width - 2)
    gap = [Text("")] if height >= 16 else []      # a short panel spends no line on spacing
    return Group(*_join(_sections(tm, step, w, height, row)[0], gap))


# ---------------------------------------------------------------------------- diff mode: A beside B

#: a value that differs between A and B (not wrong: red means wrong only)
DIFFERENT_STYLE = STATUS_STYLE[Status.DRIFT]
DIFFERENT_GLYPH = "≠"
#: a terminal this wide shows A and B side by side; a narrower one stacks them (A, then B)
SIDE_BY_SIDE_COLUMNS = 160


def _name(tm: TraceModel) -> str:
    return printable(tm.path.name)


def step_fields(tm: TraceModel, step: int, row: int) -> dict[str, str]:
    """The step fields the A-vs-B table compares, as text: q_len, input length, cache before ->
    after, positions of the selected batch row per axis, mask shape, image tokens (reads the
    step's probes: worker)."""
    st = tm.steps[step]
    idx = tm.cached(step) or tm.index(step)
    row = max(0, min(row, idx.batch - 1))
    cb, ca = int(st["cache_before"]), int(st["cache_after"])
    md = int(st["mask_ndim"])
    try:
        first = batchrows.prefill_of(tm.steps, step)
        pre = (tm.cached(first) or tm.index(first)).probes if first != step else None
        d = batchrows.row_detail(tm.trace, step, row, idx.probes, pre)
        positions = _ranges(d.positions, d.pos_names) if d.positions else None
    except Exception:  # noqa: BLE001 - the user's file: fall back on the step table's range
        positions = None
    if positions is None:
        lo, hi = int(st["pos_min"]), int(st["pos_max"])
        positions = f"{lo}..{hi} (step)" if hi >= lo else "not recorded"
    img = int(st["image_tokens"])
    return {"q_len": str(int(st["q_len"])), "input length": str(int(st["input_len"])),
            "cache before -> after": "none" if cb < 0 and ca < 0 else f"{cb} -> {ca}",
            f"positions (row {row})" if idx.batch > 1 else "positions": positions,
            "mask shape": fmt_shape(st["mask_shape"][:md]) if md > 0 else "none",
            "image tokens": str(img) if img >= 0 else "-"}


def _same_positions(a: str, b: str) -> bool:
    """``4..4`` and ``4..4 x3``: 1-D RoPE and M-RoPE with equal axes give the same ids."""
    strip = lambda t: t.rsplit(" x", 1)[0] if " x" in t and t.rsplit(" x", 1)[1].isdigit() else t  # noqa: E731
    return strip(a) == strip(b)


def compare_table(a: TraceModel, b: TraceModel | None, step: int, row: int, w: int) -> list[RenderableType]:
    """The A-vs-B table of the step fields, a ``≠`` marking those that differ."""
    fa = step_fields(a, step, row)
    fb = step_fields(b, step, row) if b is not None and step < b.n_steps else {}
    keys = list(fa) + [k for k in fb if k not in fa]
    lab = max(len(k) for k in keys) + 2
    wants = [len(v) for v in (*fa.values(), *fb.values())] + [len(_name(a)) + 2]
    col = max(12, min(max(wants) + 2, (w - lab - 2) // 2))
    head = Text.assemble(("  " + "step".ljust(lab), "bold"), (f"A {_name(a)}"[:col - 1].ljust(col), "bold"),
                         (f"B {_name(b)}" if b is not None else "B", "bold"))
    head.no_wrap, head.overflow = True, "ellipsis"
    out: list[RenderableType] = [_title(("A vs B ", "bold"), (f"step {step}", ""),
                                        ("" if fb else "  B has no such step", DIFFERENT_STYLE if not fb else DIM)),
                                 head]
    for k in keys:
        va, vb = fa.get(k, "-"), fb.get(k, "-")
        same = va == vb or (k.startswith("positions") and _same_positions(va, vb))
        t = Text.assemble(("  " if same else DIFFERENT_GLYPH + " ", DIFFERENT_STYLE), (k.ljust(lab), DIM),
                          (va[:col - 1].ljust(col), "" if same else DIFFERENT_STYLE), (vb, "" if same else DIFFERENT_STYLE))
        t.no_wrap, t.overflow = True, "ellipsis"
        out.append(t)
    return out


def _marked(parts: list[RenderableType]) -> list[RenderableType]:
    """A section whose values differ from the other trace's: its title marked ``≠``."""
    if not parts or not isinstance(parts[0], Text):
        return parts
    t = Text.assemble((DIFFERENT_GLYPH + " ", DIFFERENT_STYLE), parts[0])
    t.no_wrap, t.overflow = True, "ellipsis"
    return [t] + parts[1:]


def _side_title(which: str, tm: TraceModel, step: int, w: int) -> Text:
    t = Text.assemble((f" {which} ", "reverse bold"), (" " + _name(tm), "bold"), (f"  step {step}", DIM))
    t.no_wrap, t.overflow = True, "ellipsis"
    return t


def build_pair(session: "Session", step: int, width: int, height: int = 40, row: int = 0,
               side_by_side: bool = False) -> RenderableType:
    """Diff mode: the A-vs-B table of the step fields, then A's context and the context of B's
    step paired with it (the same step number), side by side or stacked (A, then B), each titled
    with its trace name; the sections whose values differ marked ``≠``. The selected batch row
    applies to both (each clamped to its step's rows)."""
    a, b = session.a, session.b
    assert a is not None and b is not None
    w = max(20, width - 2)
    gap = [Text("")] if height >= 16 else []
    col_w = max(20, (w - 3) // 2) if side_by_side else w
    sec_a, sig_a = _sections(a, step, col_w, height, row)
    if step < b.n_steps:
        sec_b, sig_b = _sections(b, step, col_w, height, row)
        keys = {k for k, _ in sec_a} | {k for k, _ in sec_b}
        differ = {k for k in keys if sig_a.get(k) != sig_b.get(k)}
        sec_a = [(k, _marked(p) if k in differ else p) for k, p in sec_a]
        sec_b = [(k, _marked(p) if k in differ else p) for k, p in sec_b]
        side_b: list[RenderableType] = [_side_title("B", b, step, col_w)] + _join(sec_b, gap)
    else:
        side_b = [_side_title("B", b, step, col_w),
                  Text(f"B has {b.n_steps} steps: no step {step} to pair with A's", DIFFERENT_STYLE)]
    side_a: list[RenderableType] = [_side_title("A", a, step, col_w)] + _join(sec_a, gap)
    head = compare_table(a, b, step, row, w) + gap
    if side_by_side:
        grid = Table.grid(padding=(0, 3, 0, 0))
        grid.add_column(width=col_w, no_wrap=True)
        grid.add_column(width=col_w, no_wrap=True)
        grid.add_row(Group(*side_a), Group(*side_b))
        return Group(*head, grid)
    return Group(*head, *side_a, *gap, *side_b)


class ContextPanel(StripView):
    """Charts of the current step; hidden until toggled."""

    def __init__(self, session: "Session", **kwargs) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.step: int | None = None
        self.shown: int | None = None
        self.row = 0            # the batch row drawn (session.row as the step has it)
        self._shown_row = 0
        self.renderable: RenderableType = Text("")
        self._width = 0
        self._height = 0
        self._wide = False

    def _content_width(self) -> int:
        """The width to draw at: the content region less the vertical scrollbar, whether or not it
        shows yet (it appears once the content is taller than the panel, which does not resize it)."""
        reserve = self.styles.scrollbar_size_vertical
        shown = reserve if self.show_vertical_scrollbar else 0
        return max(20, (self.scrollable_content_region.width + shown - reserve) or self.size.width or 80)

    def show_step(self, step: int, force: bool = False) -> None:
        if not self.display:
            self.step = step
            return
        width = self._content_width()
        height = self.scrollable_content_region.height or self.size.height or 24
        row = self.session.row_for(step)
        wide = self.session.b is not None and self.app.size.width >= SIDE_BY_SIDE_COLUMNS
        if step == self.shown and row == self._shown_row and width == self._width and height == self._height \
                and wide == self._wide and not force:
            return
        self.step, self.row = step, row
        self._width, self._height, self._wide = width, height, wide
        self._load(step, width, height, row, wide)

    def on_resize(self) -> None:
        if self.display and self.step is not None:
            self.show_step(self.step)

    @work(thread=True, exit_on_error=False, exclusive=True, group="context")
    def _load(self, step: int, width: int, height: int = 40, row: int = 0, wide: bool = False) -> None:
        worker = get_current_worker()
        try:
            content = build(self.session, step, width, height, row, side_by_side=wide)
        except Exception as e:  # noqa: BLE001 - the user's file (damaged probes): a message, not a traceback
            content = Text(f"cannot draw the step context: {type(e).__name__}: {e}", ERROR_STYLE)
        strips = render_strips(content, width)
        if not worker.is_cancelled:
            to_ui(self.app, self._set, step, content, strips, row)

    def _set(self, step: int, content: RenderableType, strips, row: int = 0) -> None:
        if step != self.step or row != self.row:
            return
        self.renderable = content
        self.set_strips(strips, keep_scroll=self.shown == step)
        self.shown, self._shown_row = step, row
