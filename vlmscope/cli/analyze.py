"""``vlmscope check``, ``vlmscope diff`` and ``vlmscope snapshot``: thin click wrappers.

Only click is imported at module level; the analysis (numpy + h5py) and rich are imported
inside the commands. Exit codes: 0 clean / same, 1 violations / differences, 2 usage,
3 unreadable trace (the reader's one-line message on stderr, no traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_TRACE = 0, 1, 2, 3


def _console(stderr: bool = False):
    from rich.console import Console

    kw = {}
    if not (sys.stderr if stderr else sys.stdout).isatty():
        kw["width"] = 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, **kw)


def _fail_trace(e: Exception) -> None:
    from vlmscope.trace.text import printable

    click.echo(f"vlmscope: error: {printable(e)}", err=True)
    sys.exit(EXIT_TRACE)


def _t(value, style: str = ""):
    """A string from a trace (or a path) as Rich text: markup is not parsed and control characters
    are escaped (:func:`vlmscope.trace.text.printable`). Every trace string printed goes through it."""
    from rich.text import Text

    from vlmscope.trace.text import printable

    return Text(printable(value), style=style)


def _usage(msg: str) -> None:
    raise click.UsageError(msg)


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


# ============================================================================ check


@click.command("check")
@click.argument("trace", required=False, type=click.Path(path_type=Path))
@click.option("--rules", "-r", multiple=True, metavar="IDS",
              help="Rules to run: ids or groups, comma separated or repeated (default: all). "
                   "See --list-rules.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for CI).")
@click.option("--golden", type=click.Path(path_type=Path), default=None,
              help="Also compare the trace's shape snapshot with this golden file.")
@click.option("--list-rules", is_flag=True, help="List the rules and exit.")
@click.option("--all-steps", is_flag=True, help="Show every violation (default: repeats of a rule at one "
                                                "module are folded into one row).")
def check(trace: Path | None, rules: tuple[str, ...], as_json: bool, golden: Path | None, list_rules: bool,
          all_steps: bool) -> None:
    """Check the invariants of a multimodal forward on every step and layer.

    Exit status: 0 clean, 1 violations (errors), 2 usage, 3 unreadable trace.
    """
    from vlmscope.analyze.check import RULES, check as run_check, select_rules

    if list_rules:
        if as_json:
            _emit_json({"rules": [{"id": r.id, "description": r.description} for r in RULES.values()]})
        else:
            con = _console()
            from rich.text import Text

            for r in RULES.values():
                con.print(Text.assemble((f"{r.id:24s}", "bold"), " ", r.description))
        return
    if trace is None:
        _usage("missing argument TRACE")
    try:
        selected = select_rules(list(rules) if rules else None)
    except KeyError as e:
        raise click.BadParameter(str(e.args[0]), param_hint="--rules") from None
    if golden is not None and not golden.is_file():
        raise click.BadParameter(f"golden snapshot not found: {golden}", param_hint="--golden")
    from vlmscope.trace import TraceError, preflight

    try:
        preflight(trace)          # a file that hangs HDF5 is refused, not read (docs/trace-format.md)
        report = run_check(trace, selected, golden=golden)
    except TraceError as e:
        _fail_trace(e)
        return
    except ValueError as e:   # a bad golden file
        raise click.BadParameter(str(e), param_hint="--golden") from None
    if as_json:
        _emit_json(report.to_dict())
    else:
        _print_check(report, all_steps)
    sys.exit(EXIT_OK if report.ok else EXIT_FOUND)


def _fold(violations):
    """Fold repeats of (rule, module) into one row: (first violation, steps)."""
    groups: dict[tuple[str, str], list] = {}
    order = []
    for v in violations:
        k = (v.rule, v.module)
        if k not in groups:
            groups[k] = [v, []]
            order.append(k)
        groups[k][1].append(v.step)
    return [groups[k] for k in order]


def _fmt_steps(steps: list[int]) -> str:
    steps = sorted(set(steps))
    if len(steps) == 1:
        return str(steps[0])
    if steps[-1] - steps[0] == len(steps) - 1:
        return f"{steps[0]}-{steps[-1]}"
    return ",".join(str(s) for s in steps[:6]) + ("..." if len(steps) > 6 else "")


def _print_check(report, all_steps: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    from vlmscope.trace.text import printable

    con = _console()
    n_err, n_warn = len(report.errors), len(report.warnings)
    colour = "green" if not report.violations else ("red" if n_err else "yellow")
    head = Text.assemble(("check ", "bold"), _t(report.path, "cyan"),
                         f"  {printable(report.status)}, {report.n_steps} steps, "
                         f"{len(report.rules)} rules: ",
                         (f"{n_err} error(s), {n_warn} warning(s)" if report.violations else "clean", f"bold {colour}"))
    con.print(head)
    if report.violations:
        tbl = Table(header_style="bold", show_lines=False, expand=False)
        for col, kw in (("step", {"justify": "right", "no_wrap": True}), ("rule", {"no_wrap": True}),
                        ("module", {"no_wrap": True}), ("expected", {}), ("actual", {}), ("hint", {"ratio": 1})):
            tbl.add_column(col, **kw)
        rows = [[v, [v.step]] for v in report.violations] if all_steps else _fold(report.violations)
        for v, steps in rows:
            sev = "red" if v.severity == "error" else "yellow"
            step_s = _fmt_steps(steps) if v.step >= 0 else "-"
            if len(steps) > 1:
                step_s += f" ({len(steps)}x)"
            mod = v.module or ("<root>" if v.step >= 0 and v.rule != "snapshot.golden" else "")
            if v.also:
                mod += f" (+{len(v.also)} more)"
            tbl.add_row(step_s, _t(v.rule, sev), _t(mod), _t(v.expected), _t(v.actual), _t(v.hint))
        con.print(tbl)
    if report.golden_diff:
        _print_udiff(con, report.golden_diff)


def _print_udiff(con, text: str, limit: int = 200) -> None:
    from rich.text import Text

    lines = text.splitlines()
    for ln in lines[:limit]:
        style = "green" if ln.startswith("+") else "red" if ln.startswith("-") else "cyan" if ln.startswith("@@") else ""
        con.print(_t(ln, style))
    if len(lines) > limit:
        con.print(Text(f"... {len(lines) - limit} more diff lines"))


# ============================================================================ diff


@click.command("diff")
@click.argument("trace_a", type=click.Path(path_type=Path))
@click.argument("trace_b", type=click.Path(path_type=Path))
@click.option("--map", "maps", multiple=True, metavar="A_REGEX=B_REPL",
              help="Rewrite A's module paths to align with B's (repeatable; applied in order with re.sub). "
                   "'arg:A=B' rewrites argument names. '@FILE' (or a file path) reads one rule per line.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default: per dtype, as torch.testing).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default: per dtype).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=30, show_default=True,
              help="Individual divergences listed (groups cover all).")
def diff(trace_a: Path, trace_b: Path, maps: tuple[str, ...], rtol: float | None, atol: float | None,
         as_json: bool, limit: int) -> None:
    """Compare two traces; headline the first divergence in execution order.

    Exit status: 0 same within tolerance, 1 different, 2 usage, 3 unreadable trace.
    """
    from vlmscope.analyze.align import parse_maps
    from vlmscope.analyze.diff import diff as run_diff
    from vlmscope.trace import TraceError, preflight

    try:
        rules = parse_maps(list(maps))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--map") from None
    for name, v in (("--rtol", rtol), ("--atol", atol)):
        if v is not None and v < 0:
            raise click.BadParameter("must be >= 0", param_hint=name)
    try:
        preflight(trace_a)
        preflight(trace_b)
        report = run_diff(trace_a, trace_b, rules, rtol=rtol, atol=atol, limit=limit)
    except TraceError as e:
        _fail_trace(e)
        return
    if as_json:
        _emit_json(report.to_dict())
    else:
        _print_diff(report)
    sys.exit(EXIT_OK if report.same else EXIT_FOUND)


def _print_diff(rep) -> None:
    from rich.table import Table
    from rich.text import Text

    con = _console()
    con.print(Text.assemble(("diff ", "bold"), _t(rep.trace_a, "cyan"), " vs ", _t(rep.trace_b, "cyan"),
                            f"  ({rep.n_steps[0]} / {rep.n_steps[1]} steps)"))
    c = rep.counts
    summary = ", ".join(f"{k}: {v['same']} same" + "".join(f", {v[s]} {s.replace('_', ' ')}" for s in
                                                            ("shape", "drift", "missing_in_a", "missing_in_b") if v[s])
                        for k, v in c.items())
    if rep.same:
        con.print(Text("same", style="bold green"), Text(f" within tolerance ({summary})"))
        return
    f = rep.first
    con.print(Text.assemble(("first divergence: ", "bold red"), _t(f.headline() if f else "?")))
    con.print(_t(f"{rep.n_divergent} divergent node(s); {summary}", "dim"))
    if rep.divergences:
        tbl = Table(header_style="bold")
        for col, kw in (("#", {"justify": "right"}), ("step", {"justify": "right"}), ("kind", {"no_wrap": True}),
                        ("module", {"no_wrap": True}), ("what", {}), ("status", {}), ("A", {}), ("B", {}),
                        ("tokens / detail", {"ratio": 1})):
            tbl.add_column(col, **kw)
        for i, d in enumerate(rep.divergences):
            st_style = {"shape": "red", "drift": "yellow", "missing_in_a": "magenta", "missing_in_b": "magenta"}
            tok = ""
            if d.tokens:
                from vlmscope.analyze.diff import _fmt_tokens

                tok = f"tokens {_fmt_tokens(d.tokens)}; "
            tbl.add_row(str(i + 1), str(d.step), _t(f"{d.category} {d.node}"), _t(d.module or "<root>"), _t(d.what),
                        _t(d.status, st_style.get(d.status, "")), _t(d.a), _t(d.b), _t(tok + (d.short or d.detail)))
        con.print(tbl)
        if rep.n_divergent > len(rep.divergences):
            con.print(Text(f"... {rep.n_divergent - len(rep.divergences)} more (use --limit or --json)", "dim"))
    if rep.groups:
        g = Table(title="by module", header_style="bold")
        for col in ("table", "module", "status", "count", "steps"):
            g.add_column(col)
        for r in rep.groups[:20]:
            steps = str(r["first_step"]) if r["first_step"] == r["last_step"] else f"{r['first_step']}-{r['last_step']}"
            g.add_row(_t(r["table"]), _t(r["module"] or "<root>"), _t(r["status"]), str(r["count"]), steps)
        con.print(g)
        if len(rep.groups) > 20:
            con.print(Text(f"... {len(rep.groups) - 20} more groups", "dim"))
    if rep.steps:
        s = Table(title="step table", header_style="bold")
        for col in ("step", "field", "A", "B"):
            s.add_column(col)
        for r in rep.steps[:20]:
            s.add_row(str(r["step"]), _t(r["field"]), _t(r["a"]), _t(r["b"]))
        con.print(s)


# ============================================================================ snapshot


def _replaces_other_file(out: Path) -> bool:
    """Whether writing ``out`` would replace something that is not a snapshot (a trace, an
    image, a directory...). An existing snapshot is replaced: regenerating goldens is routine."""
    if not (out.exists() or out.is_symlink()):
        return False
    if not out.is_file():
        return True
    try:
        with open(out, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return True
    return not head.lstrip().startswith(b"{") or b'"vlmscope_snapshot"' not in head


@click.command("snapshot")
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Write the snapshot to this file (default: stdout).")
@click.option("--reshapes", is_flag=True, help="Include the shape-changing ops.")
@click.option("--steps", type=click.IntRange(1, None), default=None, help="Only the first N steps.")
@click.option("--compare", "golden", type=click.Path(path_type=Path), default=None,
              help="Compare with a golden snapshot instead: print a unified diff, exit 1 when it differs.")
@click.option("--force", is_flag=True, help="Replace --out even when it is not a vlmscope snapshot.")
def snapshot(trace: Path, out: Path | None, reshapes: bool, steps: int | None, golden: Path | None,
             force: bool) -> None:
    """Write a reviewable golden shape snapshot (JSON, one entry per line, in execution order)."""
    from vlmscope.analyze.snapshot import compare_to_file, snapshot_text
    from vlmscope.trace import TraceError, open_trace, preflight
    from vlmscope.trace.text import json_printable, printable

    if golden is not None and not golden.is_file():
        raise click.BadParameter(f"golden snapshot not found: {golden}", param_hint="--compare")
    if out is not None and not force and _replaces_other_file(out):
        click.echo(f"vlmscope: error: {printable(out)} exists and is not a vlmscope snapshot; "
                   f"use --force to replace it", err=True)
        sys.exit(EXIT_USAGE)
    try:
        preflight(trace)
        with open_trace(trace) as t:
            if golden is not None:
                try:
                    d = compare_to_file(t, golden)
                except ValueError as e:
                    raise click.BadParameter(str(e), param_hint="--compare") from None
                if d:
                    _print_udiff(_console(), d, limit=10_000)
                    sys.exit(EXIT_FOUND)
                click.echo(f"same shapes as {printable(golden)}")
                return
            # JSON lines; strings from the trace may hold raw C1/DEL characters (ensure_ascii=False):
            # written as \uXXXX escapes, the same JSON values, safe to print
            text = json_printable(snapshot_text(t, reshapes=reshapes, steps=steps))
    except TraceError as e:
        _fail_trace(e)
        return
    if out is None:
        click.echo(text, nl=False)
    else:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            click.echo(f"vlmscope: error: cannot write {printable(out)}: {printable(e.strerror or e)}", err=True)
            sys.exit(EXIT_USAGE)
        click.echo(f"wrote {printable(out)} ({text.count(chr(10))} lines)", err=True)
