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
        out.grid(_steps_table(steps))
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
        "steps": [step_dict(st) for st in steps],
        "generated_text": meta.get("generated_text"),
        "warnings": _warnings(meta),
        "error": trace.error or None,
        "violations": [v.to_dict() if hasattr(v, "to_dict") else v for v in vs],
        "check_error": failed,
    }, failed


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
    if isinstance(img, dict) and img:
        line += f"; image {img.get('path')} {img.get('size')}"
        if img.get("resized"):
            line += f" -> {img['resized']}"
    return _t(line)


def _steps_table(steps: np.ndarray) -> Any:
    """One row per step (the first 6 and last 5 past 12 steps)."""
    from rich.text import Text

    from vlmscope.cli.output import Grid

    tbl = Grid([(col, {"justify": "right" if col not in ("kind", "positions", "mask") else "left"})
                for col in ("step", "kind", "input", "q_len", "cache", "positions", "mask", "image tok",
                            "calls", "ms")], box=None, pad_edge=False)
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
