"""Rich renderables for the viewer: tree labels, detail sections, step-context charts.

Pure functions over numpy data (no textual, no HDF5 reads except where a function takes
a :class:`TraceModel` and says so), so they run in worker threads and in unit tests.
"""

from __future__ import annotations

import linecache
import math
import os
from typing import Iterable, Sequence

import numpy as np
from rich.console import RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from vlmscope.trace import ROLE_INPUT, ROLE_KWARG, ROLE_OUTPUT
from vlmscope.tui.data import Item, StepIndex, TraceModel, fmt_num, fmt_shape, short_site

# diff statuses
SAME, SHAPE, DRIFT, ONLY_A, ONLY_B = "same", "shape", "drift", "only_a", "only_b"
STATUS_GLYPH = {SAME: " ", SHAPE: "≠", DRIFT: "~", ONLY_A: "-", ONLY_B: "+"}
STATUS_STYLE = {SAME: "", SHAPE: "bold red", DRIFT: "yellow", ONLY_A: "magenta", ONLY_B: "green"}
STATUS_TEXT = {SAME: "same", SHAPE: "shape/dtype differs", DRIFT: "values drift", ONLY_A: "only in A",
               ONLY_B: "only in B"}

IMAGE_STYLE = "magenta"
SHAPE_STYLE = "cyan"
OP_STYLE = "yellow"
PROBE_STYLE = "magenta"
DIM = "dim"

#: detail sections are cut at these many rows (the tree has them all)
MAX_TENSORS, MAX_RESHAPES, MAX_PROBES = 40, 60, 30


def section(title: str) -> Text:
    return Text.assemble(("── ", DIM), (title, "bold"), (" ──", DIM))


def compact_shapes(s: str) -> str:
    """``"[1, 256, 64] [1, 3, 64]"`` -> ``"[1,256,64] [1,3,64]"``."""
    return s.replace(", ", ",")


def shape_of_row(row: np.void, field: str = "shape", ndim: str = "ndim") -> tuple[int, ...]:
    n = int(row[ndim])
    return tuple(int(d) for d in row[field][:max(0, min(n, 8))])


# --------------------------------------------------------------------------- labels


def probe_summary(tm: TraceModel, row: np.void) -> str:
    """A short summary of a probe from its info JSON (no HDF5 read)."""
    kind = tm.s(int(row["kind"]))
    info = tm.probe_info(row)
    if kind == "position_ids" and info.get("rows"):
        return " ".join(f"{a}..{b}" for a, b in info["rows"])
    if kind == "cache":
        lengths = info.get("lengths") or []
        if lengths and min(lengths) == max(lengths):
            return f"len {lengths[0]}"
        if lengths:
            return f"len {min(lengths)}..{max(lengths)}"
        return str(info.get("type", ""))
    if kind == "attention_mask":
        return str(info.get("style", ""))
    if kind == "input_ids":
        return f"img {info.get('image_tokens', 0)}"
    if kind == "merger_rows":
        return f"rows {info.get('rows')}"
    if "min" in info and "max" in info:
        return f"{info['min']}..{info['max']}"
    return ""


def node_label(tm: TraceModel, idx: StepIndex, item: Item, status: str | None = None) -> Text:
    """The tree label of an item: its name and output shape, a failing-check marker, and in diff
    mode a status glyph and colour."""
    s, kind, i = item
    t = Text(no_wrap=True, overflow="ellipsis")
    failing = False
    if status is not None and status != SAME:
        t.append(STATUS_GLYPH[status] + " ", STATUS_STYLE[status])
    if kind == "s":
        return step_label(tm, s, status)
    elif kind == "e":
        failing = bool(idx.failing_events[i])
        t.append(tm.relative_name(idx, i), STATUS_STYLE.get(status or SAME, "") or "")
        shp = tm.out_shape(idx, i)
        if shp is not None:
            t.append(" " + fmt_shape(shp, compact=True), SHAPE_STYLE)
        if int(idx.status[i]) != 0:
            t.append(" raised", "bold red")
    elif kind == "r":
        failing = bool(idx.failing_rs[i])
        r = idx.reshapes[i]
        t.append("↳ ", DIM)
        t.append(tm.s(int(r["op"])), OP_STYLE)
        t.append(" " + compact_shapes(tm.s(int(r["in_shapes"]))) + " -> ")
        if int(r["status"]) != 0:
            t.append("raised", "bold red")
        else:
            t.append(fmt_shape(shape_of_row(r, "out_shape", "out_ndim"), compact=True), SHAPE_STYLE)
        site = tm.s(int(r["site_file"]))
        if site:
            t.append(f" {os.path.basename(site)}:{int(r['site_line'])}", DIM)
    elif kind == "p":
        failing = bool(idx.failing_pr[i])
        p = idx.probes[i]
        t.append("◆ ", PROBE_STYLE)
        t.append(tm.s(int(p["kind"])), PROBE_STYLE)
        t.append(" " + fmt_shape(shape_of_row(p), compact=True), SHAPE_STYLE)
        summ = probe_summary(tm, p)
        if summ:
            t.append(" " + summ, DIM)
    if failing:
        t.append(" ✗", "bold red")
    return t


def step_label(tm: TraceModel, s: int, status: str | None = None) -> Text:
    """A step node: its name, query length and cache growth (from the steps table, so every step
    reads the same whether it was indexed or not), and a marker when a check fails in it."""
    t = Text(no_wrap=True, overflow="ellipsis")
    if status is not None and status != SAME:
        t.append(STATUS_GLYPH[status] + " ", STATUS_STYLE[status])
    st = tm.steps[s]
    t.append(tm.step_name(s), "bold")
    q = int(st["q_len"]) if int(st["q_len"]) >= 0 else int(st["input_len"])
    t.append(f" q {q}", SHAPE_STYLE)
    cb, ca = int(st["cache_before"]), int(st["cache_after"])
    if ca >= 0:
        t.append(f" kv {max(cb, 0)}→{ca}", DIM)
    if int(st["status"]) != 0:
        t.append(" raised", "bold red")
    if s in tm.failing_steps:
        t.append(" ✗", "bold red")
    return t


# --------------------------------------------------------------------------- detail


def tensor_lines(tm: TraceModel, rows: np.ndarray, wide: bool) -> list[RenderableType]:
    """Inputs, keyword arguments and outputs of a call with shape, dtype, device and stats."""
    out: list[RenderableType] = []
    for role, title in ((ROLE_INPUT, "inputs"), (ROLE_KWARG, "kwargs"), (ROLE_OUTPUT, "outputs")):
        sel = rows[rows["role"] == role]
        if not len(sel):
            continue
        out.append(section(title + (f" ({len(sel)}, first {MAX_TENSORS})" if len(sel) > MAX_TENSORS else "")))
        sel = sel[:MAX_TENSORS]
        if wide:
            tab = Table(box=None, pad_edge=False, show_header=True, header_style="dim", expand=False)
            for col in ("name", "shape", "dtype", "device", "min", "max", "mean", "std", ""):
                tab.add_column(col, no_wrap=True, justify="right" if col in ("min", "max", "mean", "std")
                               else "left")
            for r in sel:
                tab.add_row(*_tensor_cells(tm, r))
            out.append(tab)
        else:
            for r in sel:
                name, shape, dtype, device, mn, mx, mean, std, extra = _tensor_cells(tm, r)
                out.append(Text.assemble((name, "bold"), " ", shape, " ", (dtype, ""), " ", (device, DIM)))
                line = Text(" ")
                line.append_text(Text.assemble(("min ", DIM), mn, (" max ", DIM), mx, (" mean ", DIM), mean,
                                               (" std ", DIM), std))
                if extra.plain:
                    line.append(" ")
                    line.append_text(extra)
                out.append(line)
    return out


def _tensor_cells(tm: TraceModel, r: np.void) -> tuple:
    shape = Text(fmt_shape(shape_of_row(r)), SHAPE_STYLE)
    extra = Text()
    if int(r["nan"]):
        extra.append(f"nan {int(r['nan'])} ", "bold red")
    if int(r["inf"]):
        extra.append(f"inf {int(r['inf'])} ", "bold red")
    if int(r["payload"]) >= 0:
        extra.append("[saved: p]", "underline green")
    return (tm.s(int(r["name"])), shape, tm.s(int(r["dtype"])), tm.s(int(r["device"])),
            fmt_num(float(r["min"])), fmt_num(float(r["max"])), fmt_num(float(r["mean"])),
            fmt_num(float(r["std"])), extra)


def probe_lines(tm: TraceModel, rows: Iterable[np.void]) -> list[RenderableType]:
    """Probes a call received: position-id ranges per M-RoPE row, cache length and layout,
    mask shape, dtype and fill."""
    out: list[RenderableType] = []
    for p in rows:
        kind = tm.s(int(p["kind"]))
        name = tm.s(int(p["name"]))
        info = tm.probe_info(p)
        head = Text.assemble(("◆ ", PROBE_STYLE), (kind, PROBE_STYLE + " bold"), " ",
                             (fmt_shape(shape_of_row(p)), SHAPE_STYLE), " ", (tm.s(int(p["dtype"])), ""),
                             (f"  (as {name})" if name and name != kind else "", DIM))
        out.append(head)
        body = Text("  ")
        if kind in ("position_ids", "rope_positions") and info.get("rows"):
            names = row_names(len(info["rows"]))
            for nm, (a, b) in zip(names, info["rows"]):
                body.append(f"{nm} ", DIM)
                body.append(f"{a}..{b}  ")
        elif kind == "cache":
            lengths = info.get("lengths") or []
            body.append(f"{info.get('type', '?')} ", "bold")
            body.append(f"layout {info.get('layout', '?')}  ")
            body.append(f"layers {info.get('n_layers', len(lengths))}  ")
            if lengths:
                body.append("len " + (str(lengths[0]) if min(lengths) == max(lengths)
                                      else ",".join(map(str, lengths[:16])) + ("…" if len(lengths) > 16 else "")))
            if info.get("key_shape"):
                body.append(f"  key {fmt_shape(info['key_shape'])}")
        elif kind == "attention_mask":
            body.append(f"style {info.get('style', '?')}  dtype {info.get('dtype', '?')}  ")
            body.append(f"fill {fmt_num(float(info['fill'])) if isinstance(info.get('fill'), (int, float)) else info.get('fill')}")
        elif kind == "input_ids":
            spans = info.get("spans") or []
            body.append(f"image tokens {info.get('image_tokens', 0)}")
            if spans:
                body.append("  spans " + ", ".join(f"[{a}, {b})" for _, a, b in spans[:4]), IMAGE_STYLE)
        elif info:
            body.append(", ".join(f"{k} {v}" for k, v in info.items())[:200])
        if body.plain.strip():
            out.append(body)
    return out


def row_names(n: int) -> list[str]:
    if n == 3:
        return ["t", "h", "w"]
    if n == 4:
        return ["text", "t", "h", "w"]
    if n == 1:
        return ["pos"]
    return [f"r{k}" for k in range(n)]


def reshape_line(tm: TraceModel, r: np.void, n: int | None = None) -> Text:
    t = Text()
    if n is not None:
        t.append(f"{n:>2} ", DIM)
    t.append(tm.s(int(r["op"])), OP_STYLE + " bold")
    t.append(" " + tm.s(int(r["in_shapes"])) + " -> ")
    if int(r["status"]) != 0:
        t.append("raised", "bold red")
    else:
        t.append(fmt_shape(shape_of_row(r, "out_shape", "out_ndim")), SHAPE_STYLE)
        if int(r["n_out"]) > 1:
            t.append(f" ×{int(r['n_out'])}", DIM)
    args = tm.s(int(r["args"]))
    if args:
        t.append("  " + args, DIM)
    return t


def site_of(tm: TraceModel, r: np.void) -> tuple[str, int, str]:
    return tm.s(int(r["site_file"])), int(r["site_line"]), tm.s(int(r["site_func"]))


def source_snippet(path: str, line: int, context: int = 1) -> RenderableType | None:
    """The source around ``path:line`` with syntax highlighting, or None when unreadable (file IO)."""
    if not path or line <= 0 or not os.path.isfile(path):
        return None
    try:
        lines = linecache.getlines(path)
    except Exception:  # noqa: BLE001
        return None
    if not lines or line > len(lines):
        return None
    a, b = max(1, line - context), min(len(lines), line + context)
    code = "".join(lines[a - 1:b])
    return Syntax(code, "python", line_numbers=True, start_line=a, highlight_lines={line},
                  theme="monokai", word_wrap=False, background_color="default", indent_guides=False)


def sources(tm: TraceModel, rows: Sequence[np.void], limit: int = 8) -> list[RenderableType]:
    out: list[RenderableType] = []
    seen: set[tuple[str, int]] = set()
    for r in rows:
        path, line, func = site_of(tm, r)
        if not path or (path, line) in seen:
            continue
        seen.add((path, line))
        if len(seen) > limit:
            out.append(Text(f"… {len(rows) - limit} more call sites", DIM))
            break
        out.append(Text.assemble((f"{short_site(path)}:{line}", "underline"), (f" in {func}" if func else "", DIM)))
        snip = source_snippet(path, line)
        out.append(snip if snip is not None else Text("  (source not readable here)", DIM))
    return out


def event_detail(tm: TraceModel, idx: StepIndex, i: int, wide: bool) -> list[RenderableType]:
    """Everything about one module call (reads its tensor rows: call from a worker)."""
    ev = idx.events[i]
    mod = int(ev["module"])
    cls = str(tm.mod_cls[mod]) if 0 <= mod < len(tm.mod_cls) else "?"
    out: list[RenderableType] = [
        Text(tm.module_name(mod), "bold"),
        Text.assemble((cls if tm.module_path(mod) else "root module", "green"),
                      (f" · {tm.step_name(idx.step)} · call {int(ev['nth']) + 1} · depth {int(ev['depth'])}"
                       f" · {float(ev['dur_us']) / 1000:.2f} ms", DIM)),
    ]
    if int(ev["status"]) != 0:
        out.append(Text("this call raised", "bold red"))
    out += tensor_lines(tm, idx.event_tensors(tm, i), wide)
    probes = [idx.probes[k] for k in np.nonzero(idx.p_event == i)[0]]
    if probes:
        out.append(section(f"probes ({len(probes)})"))
        out += probe_lines(tm, probes[:MAX_PROBES])
        if len(probes) > MAX_PROBES:
            out.append(Text(f"… {len(probes) - MAX_PROBES} more", DIM))
    rs_rows = [idx.reshapes[k] for k in np.nonzero(idx.r_event == i)[0]]
    if rs_rows:
        out.append(section(f"reshape chain ({len(rs_rows)})"))
        out += [reshape_line(tm, r, n + 1) for n, r in enumerate(rs_rows[:MAX_RESHAPES])]
        if len(rs_rows) > MAX_RESHAPES:
            out.append(Text(f"… {len(rs_rows) - MAX_RESHAPES} more (they are children in the tree)", DIM))
        out.append(section("source"))
        out += sources(tm, rs_rows)
    return out


def reshape_detail(tm: TraceModel, idx: StepIndex, i: int) -> list[RenderableType]:
    r = idx.reshapes[i]
    ev = int(idx.r_event[i])
    owner = tm.module_name(int(idx.module[ev])) if ev >= 0 else "(outside any module)"
    path, line, func = site_of(tm, r)
    out: list[RenderableType] = [
        Text.assemble(("reshape ", DIM), (tm.s(int(r["op"])), OP_STYLE + " bold"),
                      (f"  #{int(r['nth']) + 1} in this call", DIM)),
        Text.assemble(("in ", DIM), owner),
        section("shapes"),
        Text.assemble(("in   ", DIM), (tm.s(int(r["in_shapes"])), SHAPE_STYLE), "  ", (tm.s(int(r["in_dtypes"])), DIM)),
    ]
    if int(r["status"]) != 0:
        out.append(Text("out  the op raised", "bold red"))
    else:
        out.append(Text.assemble(("out  ", DIM), (fmt_shape(shape_of_row(r, "out_shape", "out_ndim")), SHAPE_STYLE),
                                 (f" ×{int(r['n_out'])}" if int(r["n_out"]) > 1 else "", DIM), "  ",
                                 (tm.s(int(r["out_dtype"])), DIM)))
    args = tm.s(int(r["args"]))
    out.append(Text.assemble(("args ", DIM), args or "-"))
    out.append(section("call site"))
    if path:
        out.append(Text.assemble((f"{short_site(path)}:{line}", "underline"), (f" in {func}" if func else "", DIM)))
        snip = source_snippet(path, line, context=3)
        out.append(snip if snip is not None else Text("(source not readable here)", DIM))
    else:
        out.append(Text("unknown", DIM))
    return out


def probe_detail(tm: TraceModel, idx: StepIndex, i: int, width: int) -> list[RenderableType]:
    """A probe, with a preview of its stored values (reads probe data: call from a worker)."""
    p = idx.probes[i]
    ev = int(idx.p_event[i])
    owner = tm.module_name(int(idx.module[ev])) if ev >= 0 else "(outside any module)"
    out: list[RenderableType] = [Text.assemble(("probe ", DIM), (tm.s(int(p["kind"])), PROBE_STYLE + " bold")),
                                 Text.assemble(("received by ", DIM), owner)]
    out += probe_lines(tm, [p])
    val = tm.probe_value(p)
    if val is not None:
        out.append(section("values"))
        out.append(array_preview(val, width))
    return out


def array_preview(a: np.ndarray, width: int, max_rows: int = 12) -> Text:
    """A few leading rows of an array, flattened to 2-D, numbers cut to the width."""
    if a.ndim == 0:
        return Text(str(a.item()))
    if a.dtype == bool:
        a = a.astype(np.int8)
    two = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)
    t = Text(no_wrap=True, overflow="ellipsis")
    for r in range(min(len(two), max_rows)):
        line = " ".join(_num(x) for x in two[r][: max(4, width // 4)])
        t.append(line[: max(10, width - 2)] + "\n")
    if len(two) > max_rows:
        t.append(f"… {len(two) - max_rows} more rows", DIM)
    return t


def _num(x) -> str:
    if isinstance(x, (np.floating, float)):
        return fmt_num(float(x))
    return str(x)


def step_detail(tm: TraceModel, idx: StepIndex, wide: bool) -> list[RenderableType]:
    s = idx.step
    st = tm.steps[s]
    out: list[RenderableType] = [Text.assemble((tm.step_name(s), "bold"), (f"  step {s}", DIM))]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style=DIM)
    grid.add_column()
    grid.add_row("input_len", str(int(st["input_len"])))
    grid.add_row("q_len", str(int(st["q_len"])))
    cb, ca = int(st["cache_before"]), int(st["cache_after"])
    grid.add_row("cache", "none" if cb < 0 and ca < 0 else f"{cb} -> {ca}")
    pr = int(st["pos_rows"])
    if pr:
        names = row_names(pr)
        grid.add_row("positions", "  ".join(f"{names[k]} {int(st['pos_min'][k])}..{int(st['pos_max'][k])}"
                                            for k in range(min(pr, 3))))
    md = int(st["mask_ndim"])
    grid.add_row("mask", fmt_shape(st["mask_shape"][:md]) if md else "none (is_causal)")
    it = int(st["image_tokens"])
    grid.add_row("image tokens", "?" if it < 0 else str(it))
    grid.add_row("calls", f"{idx.n} modules · {len(idx.reshapes)} reshapes · {len(idx.probes)} probes")
    if int(st["status"]) != 0:
        grid.add_row("status", Text("the forward raised in this step", "bold red"))
    out.append(grid)
    if tm.error and int(tm.error.get("step", -1)) == s:
        out += error_lines(tm.error)
    if idx.main_root >= 0:
        out.append(Text(""))
        out += event_detail(tm, idx, idx.main_root, wide)
    return out


def error_lines(err: dict) -> list[RenderableType]:
    out: list[RenderableType] = [section("error"),
                                 Text.assemble((err.get("type", "") + ": ", "bold red"), err.get("message", ""))]
    stack = err.get("module_stack") or []
    if stack:
        out.append(Text.assemble(("in ", DIM), " > ".join(p or "<root>" for p in stack[-4:])))
    lr = err.get("last_reshape")
    if lr:
        out.append(Text.assemble(("last reshape ", DIM), (str(lr.get("op")), OP_STYLE), " ",
                                 str(lr.get("in_shapes", "")), " ", str(lr.get("args", "")), "  ",
                                 (str(lr.get("site", "")), DIM)))
    return out


# --------------------------------------------------------------------------- context charts

_BLOCKS = " ▁▂▃▄▅▆▇█"


def downsample_idx(n: int, width: int) -> np.ndarray:
    """Bin edges splitting ``n`` items into at most ``width`` bins."""
    bins = max(1, min(n, width))
    return np.linspace(0, n, bins + 1).astype(np.int64)


def in_spans(lo: int, hi: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(a < hi and lo < b for a, b in spans)


def token_strip(ids: np.ndarray, spans: Sequence[tuple[int, int]], current: tuple[int, int], width: int,
                image_token_id: int | None = None) -> Text:
    """One cell per token (several for short sequences, one per bin for long ones): text ░,
    image █ (magenta), this step's tokens ▄ (green); a ruler marks 0, the image span and the end."""
    n = len(ids)
    width = max(8, width)
    t = Text(no_wrap=True)
    if n == 0:
        return Text("no input_ids recorded", DIM)
    if image_token_id is not None and not spans:
        img = np.nonzero(ids == image_token_id)[0]
        if len(img):
            spans = [(int(img[0]), int(img[-1]) + 1)]
    rep = max(1, min(3, width // n))
    edges = downsample_idx(n, width // rep)
    for a, b in zip(edges[:-1], edges[1:]):
        img = in_spans(a, b, spans)
        cur = current[0] < b and a < current[1]
        ch = "█" if img else "▄" if cur else "░"
        style = IMAGE_STYLE if img else "bold green" if cur else "grey50"
        t.append(ch * rep, style)
    t.append("\n")
    # ruler: 0, span bounds, n
    marks = {0: "0"}
    for a, b in spans:
        marks[a] = str(a)
        marks[b] = str(b)
    marks[n] = str(n)
    bins = len(edges) - 1
    ruler = [" "] * (bins * rep + 8)
    for pos, label in sorted(marks.items()):
        if pos < n:
            col = (int(np.searchsorted(edges, pos, side="right") - 1)) * rep
        else:
            col = bins * rep - len(label)
        col = min(max(col, 0), len(ruler) - len(label))
        if all(c == " " for c in ruler[max(0, col - 1):col + len(label) + 1]):
            ruler[col:col + len(label)] = list(label)
    t.append("".join(ruler).rstrip(), DIM)
    return t


def _lerp(c0: tuple[int, int, int], c1: tuple[int, int, int], f: float) -> str:
    r, g, b = (int(c0[k] + (c1[k] - c0[k]) * f) for k in range(3))
    return f"#{r:02x}{g:02x}{b:02x}"


_OFF = (38, 38, 38)
_ON = (95, 175, 95)
_ON_IMG = (215, 95, 215)


def mask_heatmap(mask: np.ndarray, spans: Sequence[tuple[int, int]], width: int, max_rows: int = 12,
                 q_offset: int = 0) -> Text:
    """The allowed-to-attend matrix (query rows × key columns), downsampled with half blocks.

    Key columns in the image span are drawn magenta; a left margin marks query rows in it."""
    m = np.asarray(mask, dtype=bool)
    while m.ndim > 2:
        m = m[0]
    if m.ndim == 1:
        m = m[None, :]
    q, k = m.shape
    width = max(8, width - 2)
    rep = max(1, min(3, width // max(k, 1)))
    cols = downsample_idx(k, width // rep)
    ncols = len(cols) - 1
    # aim for a square-ish picture: a cell is about twice as tall as wide, a half block square
    want_rows = max(1, min(max_rows * 2, int(round(q * ncols * rep / max(k, 1))) if q > 1 else 1))
    rows = downsample_idx(q, want_rows)
    csum = np.zeros((q + 1, k + 1), dtype=np.float64)
    csum[1:, 1:] = np.cumsum(np.cumsum(m, 0, dtype=np.float64), 1)
    r0, r1 = rows[:-1], rows[1:]
    c0, c1 = cols[:-1], cols[1:]
    tot = (csum[np.ix_(r1, c1)] - csum[np.ix_(r0, c1)] - csum[np.ix_(r1, c0)] + csum[np.ix_(r0, c0)])
    area = np.outer(r1 - r0, c1 - c0).astype(np.float64)
    frac = np.repeat(tot / np.maximum(area, 1), rep, axis=1)
    img_c = np.repeat(np.array([in_spans(a, b, spans) for a, b in zip(c0, c1)]), rep)
    nr = len(r0)
    rep_r = max(1, min(rep, (max_rows * 2) // max(nr, 1))) if q > 1 else 1
    frac = np.repeat(frac, rep_r, axis=0)
    img_r = np.repeat(np.array([in_spans(a + q_offset, b + q_offset, spans) for a, b in zip(r0, r1)]), rep_r)
    nr = frac.shape[0]
    t = Text(no_wrap=True)

    def colour(r: int, c: int) -> str:
        return _lerp(_OFF, _ON_IMG if img_c[c] else _ON, float(frac[r, c]))

    for top in range(0, nr, 2):
        bot = top + 1 if top + 1 < nr else None
        up_img, lo_img = bool(img_r[top]), bool(img_r[bot]) if bot is not None else False
        if up_img or lo_img:
            t.append("▀" if up_img and not lo_img else "▄" if lo_img and not up_img else "█", IMAGE_STYLE)
        else:
            t.append(" ")
        t.append(" ")
        for c in range(frac.shape[1]):
            up = colour(top, c)
            if bot is not None:
                t.append("▀", f"{up} on {colour(bot, c)}")
            else:
                t.append("▀", up)
        t.append("\n")
    t.rstrip()
    return t


def position_plot(pos: np.ndarray, spans: Sequence[tuple[int, int]], width: int) -> Text:
    """Position ids against token index: one sparkline per row (M-RoPE t/h/w), one shared scale."""
    p = np.asarray(pos)
    if p.ndim == 3:       # [R, B, S]
        p = p[:, 0, :]
    elif p.ndim == 2:     # [B, S]
        p = p[:1, :]
    elif p.ndim == 1:
        p = p[None, :]
    R, S = p.shape
    names = row_names(R)
    label_w = max(len(nm) for nm in names) + 1
    rng_w = len(f"{int(p.min())}..{int(p.max())}") + 1
    plot_w = max(8, width - label_w - rng_w - 2)
    edges = downsample_idx(S, plot_w)
    lo, hi = float(p.min()), float(p.max())
    span = max(hi - lo, 1.0)
    t = Text(no_wrap=True)
    for r in range(R):
        t.append(names[r].ljust(label_w), "bold")
        row = p[r]
        for a, b in zip(edges[:-1], edges[1:]):
            v = float(row[a:b].max()) if b > a else lo
            level = 1 + int(round((v - lo) / span * 7)) if S > 1 or hi > lo else 8
            t.append(_BLOCKS[min(8, max(1, level))], IMAGE_STYLE if in_spans(a, b, spans) else "cyan")
        t.append(f" {int(row.min())}..{int(row.max())}\n", DIM)
    t.rstrip()
    return t


def cache_bars(lengths: Sequence[int], width: int, max_lines: int = 40) -> Text:
    """The cache length of every layer, as horizontal bars (one line when they are all equal)."""
    t = Text(no_wrap=True)
    n = len(lengths)
    if n == 0:
        return Text("no cache", DIM)
    mx = max(max(lengths), 1)
    if min(lengths) == max(lengths):
        t.append(f"all {n} layers ", DIM)
        t.append(str(lengths[0]), "bold")
        return t
    lab = len(f"L{n - 1}") + 1
    num = len(str(mx)) + 1
    bar_w = max(4, width - lab - num - 1)
    step = max(1, math.ceil(n / max_lines))
    for k in range(0, n, step):
        v = int(lengths[k])
        full = v / mx * bar_w
        t.append(f"L{k}".ljust(lab), DIM)
        t.append("█" * int(full) + ("▌" if full - int(full) >= 0.5 else ""), "green")
        t.append(" " * (bar_w - int(full) - (1 if full - int(full) >= 0.5 else 0) + 1))
        t.append(f"{v}\n")
    t.rstrip()
    return t
