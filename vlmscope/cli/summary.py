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


def print_summary(trace: Trace, console: Any) -> str | None:
    """Print the summary: header, model line, steps table, generated text, warnings, error, violations.

    Every string from the trace is shown as text (:func:`_t`): no markup, no escape sequences.
    Returns why ``vlmscope check``'s rules could not run (None when they ran): then the summary
    is not a verdict, and ``vlmscope summary`` exits 3."""
    meta = trace.meta if isinstance(trace.meta, dict) else {}
    status = trace.status
    steps = trace.steps
    console.print(_header(trace, status, steps))
    console.print(_model_line(meta))
    if len(steps):
        console.print(_steps_table(steps))
    _print_output(meta, console)
    err = trace.error
    if err:
        _print_error(err, console)
    return _print_violations(trace, console)


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
    if isinstance(img, dict) and img:
        line += f"; image {img.get('path')} {img.get('size')}"
        if img.get("resized"):
            line += f" -> {img['resized']}"
    return _t(line)


def _steps_table(steps: np.ndarray) -> Any:
    """One row per step (the first 6 and last 5 past 12 steps)."""
    from rich.table import Table
    from rich.text import Text

    tbl = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("step", "kind", "input", "q_len", "cache", "positions", "mask", "image tok", "calls", "ms"):
        tbl.add_column(col, justify="right" if col not in ("kind", "positions", "mask") else "left")
    show = list(range(len(steps)))
    if len(show) > 12:
        show = show[:6] + [-1] + show[-5:]
    for i in show:
        if i < 0:
            tbl.add_row("...", *[""] * 9)
            continue
        st = steps[i]
        mask = "x".join(str(int(d)) for d in st["mask_shape"][: int(st["mask_ndim"])]) or "-"
        cache = "-" if st["cache_after"] < 0 else f"{int(st['cache_before'])}->{int(st['cache_after'])}"
        kind = Text("prefill" if st["kind"] == 0 else "decode")
        if st["status"]:
            kind.append(" raised", "red")
        tbl.add_row(
            str(int(st["step"])), kind,
            str(int(st["input_len"])), str(int(st["q_len"])), cache, _pos(st), mask,
            str(int(st["image_tokens"])) if st["image_tokens"] >= 0 else "-",
            str(int(st["event_count"])), f"{float(st['wall_ms']):.0f}",
        )
    return tbl


def _print_output(meta: dict, console: Any) -> None:
    """The generated text and the recorder's warnings."""
    from rich.text import Text

    text = meta.get("generated_text")
    if text is not None:
        console.print(Text.assemble(("generated: ", "bold"), printable(repr(text))))
    warnings = meta.get("warnings") or []
    for w in warnings if isinstance(warnings, list) else [warnings]:
        console.print(Text.assemble(("warning:", "yellow"), " ", printable(w)))


def _print_error(err: dict, console: Any) -> None:
    """What the forward raised: the exception, the module stack and the last shape op."""
    from rich.text import Text

    msg = str(err.get("message") or "")
    console.print(Text.assemble(("forward raised ", "bold red"), (f"{printable(err.get('type'))}: ", "red"),
                                printable(msg.splitlines()[0] if msg else "")))
    stack = err.get("module_stack")
    if stack and isinstance(stack, list):
        console.print(_t(f"  in module  {stack[-1] or '<root>'}  (stack: "
                         f"{' > '.join(str(p or '<root>') for p in stack)})"))
    lr = err.get("last_reshape")
    if isinstance(lr, dict) and lr:
        args = f" {lr['args']}" if lr.get("args") else ""
        console.print(_t(f"  last op  {lr.get('op')} {lr.get('in_shapes')}{args} "
                         f"at {lr.get('site')} in {lr.get('module') or '<root>'}"))


def _print_violations(trace: Trace, console: Any) -> str | None:
    """The invariant violations (the first 8), or why the checks could not run (returned)."""
    from rich.text import Text

    vs, failed = violations(trace)
    if failed:
        console.print(Text.assemble(("check could not run: ", "bold red"), printable(failed)))
    if vs:
        console.print(Text.assemble((f"{len(vs)} invariant violation(s)", "bold yellow"),
                                    f" (vlmscope check {printable(trace.path)}):"))
        for v in vs[:8]:
            console.print(_t(f"  {_violation_line(v)}"))
        if len(vs) > 8:
            console.print(Text(f"  ... {len(vs) - 8} more"))
    return failed


def _violation_line(v: Any) -> str:
    get = (lambda k: v.get(k)) if isinstance(v, dict) else (lambda k: getattr(v, k, None))
    return (f"[{get('rule')}] step {get('step')} {get('module') or ''}: expected {get('expected')}, "
            f"got {get('actual')}  ({get('hint') or ''})")
