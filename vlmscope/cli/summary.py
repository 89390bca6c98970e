"""The short rich summary printed by ``record`` and ``summary``."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmscope.trace import Trace, TraceError
from vlmscope.trace.text import printable


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _pos(st: np.void) -> str:
    rows = int(st["pos_rows"])
    if rows == 0:
        return "-"
    rng = [f"{int(a)}..{int(b)}" for a, b in zip(st["pos_min"][:rows], st["pos_max"][:rows])]
    if rows == 1:
        return rng[0]
    return f"{rng[0]} x{rows}" if len(set(rng)) == 1 else " ".join(rng)


def violations(trace: Trace) -> tuple[list[Any], str | None]:
    """Invariant violations found by ``vlmscope check``, and why the rules could not run (or None)."""
    from vlmscope.analyze.check import run_checks

    try:
        return list(run_checks(trace)), None
    except TraceError as e:  # the file is damaged past what the summary read: say so, not "no violations"
        return [], str(e)
    except Exception as e:  # noqa: BLE001 - damage the reader did not catch: still no verdict, no traceback
        return [], f"{type(e).__name__}: {e}"


def print_summary(trace: Trace, out: Any) -> str | None:
    """Print the summary: header, model line, steps table, generated text, warnings, error, violations.

    ``out`` is a :class:`vlmscope.cli.output.Out` (``rich`` or ``plain``). Every string from the
    trace is shown as text (:func:`_t`): no markup, no escape sequences. Returns why ``vlmscope
    check``'s rules could not run (None when they ran): then the summary is not a verdict, and
    ``vlmscope summary`` exits 3."""
    meta = trace.meta if isinstance(trace.meta, dict) else {}
    status = trace.status
    steps = trace.steps
    out.print(_header(trace, status, steps))
    out.print(_model_line(meta))
    if len(steps):
        out.grid(_steps_table(trace, steps))
    _print_output(meta, out)
    err = trace.error
    if err:
        _print_error(err, out)
    return _print_violations(trace, out)


def summary_dict(trace: Trace) -> tuple[dict, str | None]:
    """The summary as JSON-able data (``summary --json``, ``record --json``), and why the rules
    could not run (None when they ran). Strings are the trace's own, exactly (JSON escapes them)."""
    meta = trace.meta if isinstance(trace.meta, dict) else {}
    steps = trace.steps
    vs, failed = violations(trace)
    img = meta.get("image") if isinstance(meta.get("image"), dict) else None
    return {
        "trace": str(trace.path), "status": trace.status, "n_steps": len(steps),
        "module_calls": trace.n_rows("events"), "reshapes": trace.n_rows("reshapes"),
        "probes": trace.n_rows("probes"), "file_size": trace.file_size,
        "model": meta.get("model") or meta.get("model_class"), "family": meta.get("family"),
        "device": meta.get("device"), "dtype": meta.get("dtype"),
        "attn_implementation": meta.get("attn_implementation"),
        "image": {k: img.get(k) for k in ("path", "size", "resized")} if img else None,
        "steps": _step_dicts(trace, steps),
        "generated_text": meta.get("generated_text"),
        "warnings": _warnings(meta),
        "error": trace.error or None,
        "violations": [v.to_dict() if hasattr(v, "to_dict") else v for v in vs],
        "check_error": failed,
    }, failed


def _step_dicts(trace: Trace, steps: np.ndarray) -> list[dict]:
    """Every step's :func:`step_dict`, with its ``call`` and its batch rows."""
    from vlmscope.analyze import rows as batchrows

    call = batchrows.calls(steps)
    try:    # every step's probes: the whole table once (and the probe bytes), not a read per step
        probes = trace.table("probes")
        trace.table("probe_data")
    except Exception:  # noqa: BLE001 - the user's damaged file: no rows (the check line says why)
        probes = None
    out = []
    for i, st in enumerate(steps):
        d = step_dict(st)
        d["call"] = int(call[i])
        rows = None
        if probes is not None:
            a = int(st["probe_start"])
            rows = _rows(trace, int(st["step"]), probes=probes[a:a + int(st["probe_count"])])
        d["batch_size"] = len(rows) if rows is not None else None
        d["rows"] = [r.to_dict() for r in rows] if rows is not None else None
        out.append(d)
    return out


def _rows(trace: Trace, step: int, probes: np.ndarray | None = None) -> list | None:
    """The step's batch rows (:func:`vlmscope.analyze.rows.row_summaries`); None when its probes
    cannot be read (a damaged trace: the check line says so)."""
    from vlmscope.analyze import rows as batchrows

    try:
        probes = trace.probes(step) if probes is None else probes
        return batchrows.row_summaries(trace, probes)
    except Exception:  # noqa: BLE001 - the user's damaged file: the summary shows what it can read
        return None


def _table_rows(trace: Trace, step: int) -> tuple[list, int | None]:
    """What the step table shows of a step's batch: its rows when B > 1 (else [], and no value is
    read), and its video tokens (None: not counted)."""
    from vlmscope.analyze import rows as batchrows

    try:
        probes = trace.probes(step)
        if batchrows.batch_size(trace, probes) == 1:
            return [], batchrows.recorded_video_tokens(trace, probes)
        rows = batchrows.row_summaries(trace, probes)
    except Exception:  # noqa: BLE001 - the user's damaged file: the summary shows what it can read
        return [], None
    counted = [r.video_tokens for r in rows if r.video_tokens is not None]
    return rows, sum(counted) if counted else None


def step_dict(st: np.void) -> dict:
    """One step's row with its real values only: positions per row, the mask shape (None: no
    mask), -1 fields (not recorded) as None."""
    rows = int(st["pos_rows"])
    md = int(st["mask_ndim"])

    def opt(k: str) -> int | None:
        v = int(st[k])
        return v if v >= 0 else None

    return {
        "step": int(st["step"]), "kind": "prefill" if st["kind"] == 0 else "decode", "raised": bool(st["status"]),
        "input_len": int(st["input_len"]), "q_len": int(st["q_len"]),
        "cache_before": opt("cache_before"), "cache_after": opt("cache_after"),
        "positions": [[int(a), int(b)] for a, b in zip(st["pos_min"][:rows], st["pos_max"][:rows])],
        "mask_shape": [int(d) for d in st["mask_shape"][:md]] if md > 0 else None,
        "image_tokens": opt("image_tokens"), "module_calls": int(st["event_count"]),
        "wall_ms": round(float(st["wall_ms"]), 3),
    }


def _warnings(meta: dict) -> list:
    w = meta.get("warnings") or []
    return w if isinstance(w, list) else [w]


def _t(value: Any, style: str = "") -> Any:
    """A string from the trace as Rich text: markup is not parsed, control characters are escaped."""
    from rich.text import Text

    return Text(printable(value), style=style)


def _header(trace: Trace, status: str, steps: np.ndarray) -> Any:
    """The first line: path, status and the size of the trace."""
    from rich.text import Text

    colour = {"complete": "green", "incomplete": "yellow", "failed": "red"}.get(status, "white")
    return Text.assemble(
        ("trace ", "bold"), (printable(trace.path), "cyan"), "  ",
        (printable(status), f"bold {colour}"), "  ",
        f"{len(steps)} steps, {trace.n_rows('events')} module calls, {trace.n_rows('reshapes')} reshapes, "
        f"{trace.n_rows('probes')} probes, {_fmt_bytes(trace.file_size)}",
    )


def _model_line(meta: dict) -> Any:
    """Model, family, device, dtype, attention implementation and image of the run."""
    model = meta.get("model") or meta.get("model_class")
    img = meta.get("image") or {}
    line = f"model {model} ({meta.get('family') or '?'}) on {meta.get('device')} {meta.get('dtype')}"
    if meta.get("attn_implementation"):
        line += f", attn {meta['attn_implementation']}"
    calls = meta.get("calls") if isinstance(meta.get("calls"), list) else []
    calls = [c for c in calls if isinstance(c, dict)]
    sizes = [c.get("batch_size") for c in calls if isinstance(c.get("batch_size"), int)]
    if len(calls) > 1 or any(b > 1 for b in sizes):
        side = calls[0].get("padding_side") if calls else None
        line += (f"; {len(calls)} generate calls" if len(calls) > 1 else "")
        line += f"; batch of {'/'.join(str(b) for b in sizes)} rows" + (f", padding {side}" if isinstance(side, str) else "")
    elif isinstance(img, dict) and img:
        line += f"; image {img.get('path')} {img.get('size')}"
        if img.get("resized"):
            line += f" -> {img['resized']}"
    if len(calls) == 1 and sizes == [1]:
        line += _video_words(calls[0])
    return _t(line)


def _video_words(call: dict) -> str:
    """"; video PATH [w, h], F frames at R fps -> grid t x h x w" for a one-row call with a video."""
    rows = call.get("rows") if isinstance(call.get("rows"), list) else []
    media = rows[0].get("media") if rows and isinstance(rows[0], dict) and isinstance(rows[0].get("media"), list) else []
    for m in media:
        if isinstance(m, dict) and m.get("kind") == "video":
            words = f"; video {m.get('path')} {m.get('size')}"
            if isinstance(m.get("frames"), int):
                words += f", {m['frames']} frames" + (f" at {m['fps']:g} fps" if isinstance(m.get("fps"), (int, float)) else "")
            grid = m.get("grid_thw")
            if isinstance(grid, list) and all(isinstance(g, int) for g in grid):
                words += " -> grid " + "x".join(str(g) for g in grid)
            return words
    return ""


#: batch rows shown under a step in the step table (the rest: ``--json``)
MAX_TABLE_ROWS = 8


def _steps_table(trace: Trace, steps: np.ndarray) -> Any:
    """One line per step (the first 6 and last 5 past 12 steps). A trace of several ``generate``
    calls gets a ``call`` column; a batched step (B > 1) one line per batch row under its own
    line: the row's tokens (padding left out), its position ranges, its padding (when the step is
    padded) and its image (and video) tokens."""
    from rich.text import Text

    from vlmscope.cli.output import Grid
    from vlmscope.analyze import rows as batchrows

    show = list(range(len(steps)))
    if len(show) > 12:
        show = show[:6] + [-1] + show[-5:]
    call = batchrows.calls(steps)
    several = bool(len(call)) and int(call[-1]) > 0
    got = {i: _table_rows(trace, i) for i in show if i >= 0}
    video = any(v for _, v in got.values())
    cols = (["step"] + (["call"] if several else []) + ["kind", "input", "q_len", "cache", "positions", "mask",
                                                         "image tok"]
            + (["video tok"] if video else []) + ["calls", "ms"])
    tbl = Grid([(col, {"justify": "right" if col not in ("kind", "positions", "mask") else "left"}) for col in cols],
               box=None, pad_edge=False)

    def add(step: str, c: str, *cells: Any, img: str = "", vid: str = "", tail: tuple = ("", "")) -> None:
        tbl.add_row(step, *([c] if several else []), *cells, img, *([vid] if video else []), *tail)

    for i in show:
        if i < 0:
            tbl.add_row("...", *[""] * (len(cols) - 1))
            continue
        st = steps[i]
        mask = "x".join(str(int(d)) for d in st["mask_shape"][: int(st["mask_ndim"])]) or "-"
        cache = "-" if st["cache_after"] < 0 else f"{int(st['cache_before'])}->{int(st['cache_after'])}"
        kind = Text("prefill" if st["kind"] == 0 else "decode")
        if st["status"]:
            kind.append(" raised", "red")
        brows, vid = got[i]
        add(str(int(st["step"])), str(int(call[i])), kind, str(int(st["input_len"])), str(int(st["q_len"])), cache,
            _pos(st), mask, img=str(int(st["image_tokens"])) if st["image_tokens"] >= 0 else "-", vid=_opt(vid),
            tail=(str(int(st["event_count"])), f"{float(st['wall_ms']):.0f}"))
        padded = any(r.pad for r in brows)
        for r in brows[:MAX_TABLE_ROWS]:
            add("", "", f"  row {r.row}", _opt(r.tokens), "", "", batchrows.fmt_ranges(r.positions),
                f"pad {r.pad}" if padded and r.pad is not None else "", img=_opt(r.image_tokens),
                vid=_opt(r.video_tokens))
        if len(brows) > MAX_TABLE_ROWS:
            add("", "", f"  +{len(brows) - MAX_TABLE_ROWS} rows", "", "", "", "(--json)", "")
    return tbl


def _opt(v: int | None) -> str:
    return "-" if v is None else str(v)


def _print_output(meta: dict, out: Any) -> None:
    """The generated text and the recorder's warnings."""
    from rich.text import Text

    text = meta.get("generated_text")
    if text is not None:
        out.print(Text.assemble(("generated: ", "bold"), printable(repr(text))))
    for w in _warnings(meta):
        out.print(Text.assemble(("warning:", "yellow"), " ", printable(w)))


def _print_error(err: dict, out: Any) -> None:
    """What the forward raised: the exception, the module stack and the last shape op."""
    from rich.text import Text

    msg = str(err.get("message") or "")
    out.print(Text.assemble(("forward raised ", "bold red"), (f"{printable(err.get('type'))}: ", "red"),
                            printable(msg.splitlines()[0] if msg else "")))
    stack = err.get("module_stack")
    if stack and isinstance(stack, list):
        out.print(_t(f"  in module  {stack[-1] or '<root>'}  (stack: "
                         f"{' > '.join(str(p or '<root>') for p in stack)})"))
    lr = err.get("last_reshape")
    if isinstance(lr, dict) and lr:
        args = f" {lr['args']}" if lr.get("args") else ""
        out.print(_t(f"  last op  {lr.get('op')} {lr.get('in_shapes')}{args} "
                         f"at {lr.get('site')} in {lr.get('module') or '<root>'}"))


def _print_violations(trace: Trace, out: Any) -> str | None:
    """The invariant violations, repeats of a rule at one module folded into one line as
    ``vlmscope check`` folds them (the first 8 lines), or why the checks could not run (returned)."""
    from rich.text import Text

    vs, failed = violations(trace)
    if failed:
        out.print(Text.assemble(("check could not run: ", "bold red"), printable(failed)))
    if vs:
        out.print(Text.assemble((f"{len(vs)} invariant violation(s)", "bold yellow"),
                                f" (vlmscope check {printable(trace.path)}):"))
        rows = fold(vs)
        for v, steps in rows[:8]:
            out.print(_t(f"  {_violation_line(v, steps)}"))
        if len(rows) > 8:
            out.print(Text(f"  ... {len(rows) - 8} more"))
    return failed


def fold(violations: Any) -> list[list]:
    """Repeats of (rule, module) folded into one row: ``[first violation, [its steps]]``, in order
    of the first occurrence. ``vlmscope check`` shows its table the same way."""
    groups: dict[tuple, list] = {}
    for v in violations:
        k = (v.rule, v.module)
        if k not in groups:
            groups[k] = [v, []]
        groups[k][1].append(v.step)
    return list(groups.values())


def fmt_steps(steps: list[int]) -> str:
    """``3``, ``1-7`` or ``1,3,5`` (at most 6 listed)."""
    steps = sorted(set(steps))
    if len(steps) == 1:
        return str(steps[0])
    if steps[-1] - steps[0] == len(steps) - 1:
        return f"{steps[0]}-{steps[-1]}"
    return ",".join(str(s) for s in steps[:6]) + ("..." if len(steps) > 6 else "")


def _violation_line(v: Any, steps: list[int] | None = None) -> str:
    steps = steps or [v.step]
    where = f"step {steps[0]}" if len(set(steps)) == 1 else f"steps {fmt_steps(steps)} ({len(steps)}x)"
    mod = v.module or ""
    if v.also:
        mod += f" (+{len(v.also)} more)"
    return f"[{v.rule}] {where} {mod}: expected {v.expected}, got {v.actual}  ({v.hint or ''})"
