"""Rich renderables for the viewer: tree labels and the detail sections of a node.

Pure functions over numpy data (no textual, no HDF5 reads except where a function takes
a :class:`TraceModel` and says so), so they run in worker threads and in unit tests. The
step-context charts are in :mod:`vlmscope.tui.charts`.
"""

from __future__ import annotations

import linecache
import os
from typing import Iterable, Sequence

import numpy as np
from rich.console import RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from vlmscope.analyze.status import Status
from vlmscope.semantics import fmt_shape, position_row_names
from vlmscope.trace import ROLE_INPUT, ROLE_KWARG, ROLE_OUTPUT
from vlmscope.tui.data import TraceModel, fmt_num, short_site
from vlmscope.tui.items import Item
from vlmscope.tui.stepindex import StepIndex
from vlmscope.tui.styles import (DIM, ERROR_STYLE, IMAGE_STYLE, OP_STYLE, PROBE_STYLE, SHAPE_STYLE, STATUS_GLYPH,
                                  STATUS_STYLE)

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


def node_label(tm: TraceModel, idx: StepIndex, item: Item, status: Status | None = None) -> Text:
    """The tree label of an item: its name and output shape, a failing-check marker, and in diff
    mode a status glyph and colour."""
    s, kind, i = item
    t = Text(no_wrap=True, overflow="ellipsis")
    failing = False
    if status is not None and status != Status.SAME:
        t.append(STATUS_GLYPH[status] + " ", STATUS_STYLE[status])
    if kind == "s":
        return step_label(tm, s, status)
    elif kind == "e":
        failing = bool(idx.failing_events[i])
        t.append(tm.relative_name(idx, i), STATUS_STYLE[status] if status is not None else "")
        shp = tm.out_shape(idx, i)
        if shp is not None:
            t.append(" " + fmt_shape(shp, compact=True), SHAPE_STYLE)
        if int(idx.status[i]) != 0:
            t.append(" raised", ERROR_STYLE)
    elif kind == "r":
        failing = bool(idx.failing_rs[i])
        r = idx.reshapes[i]
        t.append("↳ ", DIM)
        t.append(tm.s(int(r["op"])), OP_STYLE)
        t.append(" " + compact_shapes(tm.s(int(r["in_shapes"]))) + " -> ")
        if int(r["status"]) != 0:
            t.append("raised", ERROR_STYLE)
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
        t.append(" ✗", ERROR_STYLE)
    return t


def step_label(tm: TraceModel, s: int, status: Status | None = None) -> Text:
    """A step node: its name, query length and cache growth (from the steps table, so every step
    reads the same whether it was indexed or not), and a marker when a check fails in it."""
    t = Text(no_wrap=True, overflow="ellipsis")
    if status is not None and status != Status.SAME:
        t.append(STATUS_GLYPH[status] + " ", STATUS_STYLE[status])
    st = tm.steps[s]
    t.append(tm.step_name(s), "bold")
    q = int(st["q_len"]) if int(st["q_len"]) >= 0 else int(st["input_len"])
    t.append(f" q {q}", SHAPE_STYLE)
    cb, ca = int(st["cache_before"]), int(st["cache_after"])
    if ca >= 0:
        t.append(f" kv {max(cb, 0)}→{ca}", DIM)
    if int(st["status"]) != 0:
        t.append(" raised", ERROR_STYLE)
    if s in tm.failing_steps:
        t.append(" ✗", ERROR_STYLE)
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
        extra.append(f"nan {int(r['nan'])} ", ERROR_STYLE)
    if int(r["inf"]):
        extra.append(f"inf {int(r['inf'])} ", ERROR_STYLE)
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
            names = position_row_names(len(info["rows"]))
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


def reshape_line(tm: TraceModel, r: np.void, n: int | None = None) -> Text:
    t = Text()
    if n is not None:
        t.append(f"{n:>2} ", DIM)
    t.append(tm.s(int(r["op"])), OP_STYLE + " bold")
    t.append(" " + tm.s(int(r["in_shapes"])) + " -> ")
    if int(r["status"]) != 0:
        t.append("raised", ERROR_STYLE)
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
    lines = linecache.getlines(path)   # [] when unreadable: linecache catches the IO errors
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
                      # "module call": with several generate calls, "call" names those (the step's)
                      (f" · {tm.step_name(idx.step)} · {'module call' if tm.n_calls > 1 else 'call'} "
                       f"{int(ev['nth']) + 1} · depth {int(ev['depth'])}"
                       f" · {float(ev['dur_us']) / 1000:.2f} ms", DIM)),
    ]
    if int(ev["status"]) != 0:
        out.append(Text("this call raised", ERROR_STYLE))
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
        out.append(Text("out  the op raised", ERROR_STYLE))
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
        names = position_row_names(pr)
        grid.add_row("positions", "  ".join(f"{names[k]} {int(st['pos_min'][k])}..{int(st['pos_max'][k])}"
                                            for k in range(min(pr, 3))))
    md = int(st["mask_ndim"])
    grid.add_row("mask", fmt_shape(st["mask_shape"][:md]) if md else "none (is_causal)")
    it = int(st["image_tokens"])
    grid.add_row("image tokens", "?" if it < 0 else str(it))
    grid.add_row("calls", f"{idx.n} modules · {len(idx.reshapes)} reshapes · {len(idx.probes)} probes")
    if int(st["status"]) != 0:
        grid.add_row("status", Text("the forward raised in this step", ERROR_STYLE))
    out.append(grid)
    if tm.error and int(tm.error.get("step", -1)) == s:
        out += error_lines(tm.error)
    if idx.main_root >= 0:
        out.append(Text(""))
        out += event_detail(tm, idx, idx.main_root, wide)
    return out


def error_lines(err: dict) -> list[RenderableType]:
    out: list[RenderableType] = [section("error"),
                                 Text.assemble((err.get("type", "") + ": ", ERROR_STYLE), err.get("message", ""))]
    stack = err.get("module_stack") or []
    if stack:
        out.append(Text.assemble(("in ", DIM), " > ".join(p or "<root>" for p in stack[-4:])))
    lr = err.get("last_reshape")
    if lr:
        out.append(Text.assemble(("last reshape ", DIM), (str(lr.get("op")), OP_STYLE), " ",
                                 str(lr.get("in_shapes", "")), " ", str(lr.get("args", "")), "  ",
                                 (str(lr.get("site", "")), DIM)))
    return out
