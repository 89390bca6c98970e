"""``vlmscope check``, ``vlmscope diff`` and ``vlmscope snapshot``: thin click wrappers.

Only click is imported at module level; the analysis (numpy + h5py) and rich are imported
inside the commands. Exit codes: 0 clean / same, 1 violations / differences, 2 usage,
3 unreadable trace (the reader's one-line message on stderr, no traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vlmscope.cli.output import Command, Grid, Out, emit_json, fail, format_options, resolve_format

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_TRACE = 0, 1, 2, 3


def _fail_trace(e: Exception) -> None:
    fail(e, EXIT_TRACE)


def _t(value, style: str = ""):
    """A string from a trace (or a path) as Rich text: markup is not parsed and control characters
    are escaped (:func:`vlmscope.trace.text.printable`). Every trace string printed goes through it."""
    from rich.text import Text

    from vlmscope.trace.text import printable

    return Text(printable(value), style=style)


def _usage(msg: str) -> None:
    raise click.UsageError(msg)


# ============================================================================ check


@click.command("check", cls=Command)
@click.argument("trace", required=False, type=click.Path(path_type=Path))
@click.option("--rules", "-r", multiple=True, metavar="IDS",
              help="Rules to run: ids or groups, comma separated or repeated (default: all). "
                   "See --list-rules.")
@format_options
@click.option("--golden", type=click.Path(path_type=Path), default=None,
              help="Also compare the trace's shape snapshot with this golden file.")
@click.option("--list-rules", is_flag=True, help="List the rules and exit.")
@click.option("--all-steps", is_flag=True, help="Show every violation (default: repeats of a rule at one "
                                                "module are folded into one row).")
def check(trace: Path | None, rules: tuple[str, ...], fmt: str, as_json: bool, golden: Path | None,
          list_rules: bool, all_steps: bool) -> None:
    """Check the invariants of a multimodal forward on every step and layer.

    Exit status: 0 clean, 1 violations (errors), 2 usage, 3 unreadable trace.
    """
    from vlmscope.analyze.check import RULES, check as run_check, select_rules

    mode = resolve_format(fmt, as_json)
    if list_rules:
        if mode == "json":
            emit_json({"rules": [{"id": r.id, "description": r.description} for r in RULES.values()]})
        else:
            from rich.text import Text

            out = Out(mode)
            for r in RULES.values():
                out.print(Text(f"{r.id:24s}", "bold"), " ", r.description)
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
    if mode == "json":
        emit_json(report.to_dict())
    else:
        _print_check(report, all_steps, Out(mode))
    sys.exit(EXIT_OK if report.ok else EXIT_FOUND)


def _print_check(report, all_steps: bool, out) -> None:
    from rich.text import Text

    from vlmscope.cli.summary import fmt_steps, fold
    from vlmscope.trace.text import printable

    n_err, n_warn = len(report.errors), len(report.warnings)
    colour = "green" if not report.violations else ("red" if n_err else "yellow")
    out.print(Text("check ", "bold"), _t(report.path, "cyan"),
              f"  {printable(report.status)}, {report.n_steps} steps, {len(report.rules)} rules: ",
              Text(f"{n_err} error(s), {n_warn} warning(s)" if report.violations else "clean", f"bold {colour}"))
    if report.violations:
        tbl = Grid((("step", {"justify": "right", "no_wrap": True}), ("rule", {"no_wrap": True}),
                    ("module", {"no_wrap": True}), ("expected", {}), ("actual", {}), ("hint", {"ratio": 1})),
                   show_lines=False, expand=False)
        rows = [[v, [v.step]] for v in report.violations] if all_steps else fold(report.violations)
        for v, steps in rows:
            sev = "red" if v.severity == "error" else "yellow"
            step_s = fmt_steps(steps) if v.step >= 0 else "-"
            if len(steps) > 1:
                step_s += f" ({len(steps)}x)"
            mod = v.module or ("<root>" if v.step >= 0 and v.rule != "snapshot.golden" else "")
            if v.also:
                mod += f" (+{len(v.also)} more)"
            tbl.add_row(step_s, _t(v.rule, sev), _t(mod), _t(v.expected), _t(v.actual), _t(v.hint))
        out.grid(tbl)
    if report.golden_diff and report.golden_diff.startswith("---"):   # else it is the one-line summary above
        _print_udiff(out, report.golden_diff)


def _print_udiff(out, text: str, limit: int = 200) -> None:
    from rich.text import Text

    lines = text.splitlines()
    for ln in lines[:limit]:
        style = "green" if ln.startswith("+") else "red" if ln.startswith("-") else "cyan" if ln.startswith("@@") else ""
        out.print(_t(ln, style))
    if len(lines) > limit:
        out.print(Text(f"... {len(lines) - limit} more diff lines"))


# ============================================================================ diff


@click.command("diff", cls=Command)
@click.argument("trace_a", type=click.Path(path_type=Path))
@click.argument("trace_b", type=click.Path(path_type=Path))
@click.option("--map", "maps", multiple=True, metavar="A_REGEX=B_REPL",
              help="Rewrite A's module paths to align with B's (repeatable; applied in order with re.sub). "
                   "'arg:A=B' rewrites argument names. '@FILE' (or a file path) reads one rule per line.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default: per dtype, as torch.testing).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default: per dtype).")
@format_options
@click.option("--limit", type=click.IntRange(1, 100_000), default=30, show_default=True,
              help="Individual divergences listed (groups cover all).")
@click.option("--show-map", is_flag=True,
              help="Print the module map used (inferred when the traces' module paths differ; --map rules first).")
@click.option("--only", "only", multiple=True, metavar="PATTERN",
              help="Only modules matching this glob (and what lies below them), on either side (repeatable).")
@click.option("--ignore", "ignore", multiple=True, metavar="PATTERN",
              help="Leave out modules matching this glob (and what lies below them) (repeatable).")
def diff(trace_a: Path, trace_b: Path, maps: tuple[str, ...], rtol: float | None, atol: float | None,
         fmt: str, as_json: bool, limit: int, show_map: bool, only: tuple[str, ...], ignore: tuple[str, ...]) -> None:
    """Compare two traces: semantic divergences first, then the culprit (the first module whose
    inputs agree and whose outputs do not), then the first divergence detected.

    Two implementations with different module names are aligned by an inferred module map
    (--show-map prints it; --map rules override it).

    Exit status: 0 same within tolerance, 1 different, 2 usage, 3 unreadable trace.
    """
    from vlmscope.analyze.align import parse_maps
    from vlmscope.analyze.diff import diff as run_diff
    from vlmscope.trace import TraceError, preflight

    mode = resolve_format(fmt, as_json)
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
        report = run_diff(trace_a, trace_b, rules, rtol=rtol, atol=atol, limit=limit, only=only, ignore=ignore)
    except TraceError as e:
        _fail_trace(e)
        return
    if mode == "json":
        d = report.to_dict()
        if show_map and report.module_map is not None:
            d["module_map"] = report.module_map.to_dict()
        emit_json(d)
    else:
        out = Out(mode)
        if show_map and report.module_map is not None:
            _print_map(report.module_map, out)
        _print_diff(report, out)
    sys.exit(EXIT_OK if report.same else EXIT_FOUND)


def _print_map(mm, out) -> None:
    from rich.text import Text

    if mm.identity:
        out.print(Text("module map: ", "bold"), _t("identity (the traces share their module paths)"))
        return
    out.print(Text("module map (A -> B):", "bold"))
    for line in mm.lines():
        out.print(_t("  " + line))


def _print_diff(rep, out) -> None:
    from rich.text import Text

    from vlmscope.analyze.diff import show_value

    out.print(Text("diff ", "bold"), _t(rep.trace_a, "cyan"), " vs ", _t(rep.trace_b, "cyan"),
              f"  ({rep.n_steps[0]} / {rep.n_steps[1]} steps)")
    c = rep.counts
    summary = ", ".join(f"{k}: {v['same']} same" + "".join(f", {v[s]} {s.replace('_', ' ')}" for s in
                                                            ("shape", "drift", "missing_in_a", "missing_in_b") if v[s])
                        for k, v in c.items())
    mm = rep.module_map
    if mm is not None and not mm.identity:
        ua, ub = mm.unmatched()
        out.print(_t(f"module map inferred: {len(mm.pairs)} pairs, {len(ua)} only in A, {len(ub)} only in B"
                     + (f"; {len(mm.notes)} note(s)" if mm.notes else "") + " (--show-map prints it)", "dim"))
    if rep.same:
        out.print(Text("same", style="bold green"), Text(f" within tolerance ({summary})"))
        if rep.culprit is not None and rep.culprit.caveat:
            out.print(_t(f"note: {rep.culprit.caveat}", "dim"))
        return
    sem = rep.first_semantic
    if sem is not None:     # what the steps were fed differs: said before any tensor drift
        out.print(Text("first semantic divergence: ", "bold yellow"), _t(sem.headline()))
        n_pairs = min(rep.n_steps)
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rep.semantic_counts.items() if v)
        out.print(_t(f"semantic differences, aligned steps where each differs (of {n_pairs}): {counts}", "dim"))
    c = rep.culprit
    if c is not None and c.status != "same":
        if c.status in ("found", "upstream"):
            lead, _, rest = c.headline().partition(": ")
            out.print(Text(f"{lead}: ", "bold red" if c.caveat is None else "bold yellow"), _t(rest))
        else:
            out.print(Text("localization: ", "bold"), _t(c.headline()))
        if c.walked:
            out.print(_t("walked upstream from: " + " <- ".join(reversed(c.walked)), "dim"))
        if c.detected_a is not None and c.detected_a != c.module_a:
            out.print(_t(f"first call whose outputs differ (data-flow order): {c.detected_a or '<root>'}", "dim"))
        if c.caveat:
            out.print(_t(f"note: {c.caveat}", "dim"))
    divergences, groups = rep.divergences, rep.groups
    f = rep.first
    if rep.cross:   # two implementations: what exists on one side only is how they differ
        from vlmscope.analyze.diff import cross_view

        divergences, groups = cross_view(rep)
        f = divergences[0] if divergences else None
    if f is not None and (rep.n_divergent or sem is None):    # the first tensor (or node) divergence detected
        out.print(Text("first divergence detected: ", "bold yellow"), _t(f.headline()))
        if rep.first_caveat:
            out.print(_t(f"note: {rep.first_caveat}", "dim"))
    if rep.cross:
        out.print(_t(f"{sum(g['count'] for g in groups)} divergent node(s) among the paired ones (the nodes on one "
                     f"side only are how the implementations differ; --json lists them); {summary}", "dim"))
    else:
        out.print(_t(f"{rep.n_divergent} divergent node(s); {summary}", "dim"))
    if rep.semantic_steps:
        _print_semantic_steps(rep, out)
    if divergences:
        tbl = Grid((("#", {"justify": "right"}), ("step", {"justify": "right"}), ("kind", {"no_wrap": True}),
                    ("module", {"no_wrap": True}), ("what", {}), ("status", {}), ("A", {}), ("B", {}),
                    ("tokens / detail", {"ratio": 1})))
        st_style = {"shape": "red", "drift": "yellow", "missing_in_a": "magenta", "missing_in_b": "magenta"}
        for i, d in enumerate(divergences):
            tok = ""
            if d.tokens:
                from vlmscope.analyze.diff import _fmt_tokens

                tok = f"tokens {_fmt_tokens(d.tokens)}; "
            tbl.add_row(str(i + 1), str(d.step), _t(f"{d.category} {d.node}"), _t(d.module or "<root>"), _t(d.what),
                        _t(d.status, st_style.get(d.status, "")), _t(d.a), _t(d.b), _t(tok + (d.short or d.detail)))
        out.grid(tbl)
        if not rep.cross and rep.n_divergent > len(divergences):
            out.print(Text(f"... {rep.n_divergent - len(divergences)} more (use --limit or --json)", "dim"))
    if groups:
        g = Grid([(col, {}) for col in ("table", "module", "status", "count", "steps")], title="by module")
        for r in groups[:20]:
            steps = str(r["first_step"]) if r["first_step"] == r["last_step"] else f"{r['first_step']}-{r['last_step']}"
            g.add_row(_t(r["table"]), _t(r["module"] or "<root>"), _t(r["status"]), str(r["count"]), steps)
        out.grid(g)
        if len(groups) > 20:
            out.print(Text(f"... {len(groups) - 20} more groups", "dim"))
    if rep.steps:
        s = Grid([(col, {}) for col in ("step", "field", "A", "B")], title="step table")
        for r in rep.steps[:20]:
            s.add_row(str(r["step"]), _t(r["field"]), _t(show_value(r["a"])), _t(show_value(r["b"])))
        out.grid(s)


def _print_semantic_steps(rep, out, limit: int = 12) -> None:
    """What each differing step was fed, A and B side by side; a differing cell is marked ``≠`` (and
    yellow: a difference, not a verdict; red is kept for what is wrong)."""
    from rich.text import Text

    firsts = {}
    for d in rep.semantic:
        firsts.setdefault((d.step, d.field), d.detail)
    g = Grid((("step", {"justify": "right", "no_wrap": True}), ("kind", {"no_wrap": True}),
              ("field", {"no_wrap": True}), ("A", {}), ("B", {}), ("first difference", {"ratio": 1})),
             title="semantic, A | B side by side (≠ differs)")
    for st in rep.semantic_steps[:limit]:
        step = str(st["step"]) + (f" (B {st['step_b']})" if st["step_b"] != st["step"] else "")
        for k, c in enumerate(st["cells"]):
            mark = "≠ " if c["differs"] else "  "
            style = "yellow" if c["differs"] else ""
            g.add_row(step if k == 0 else "", st["kind"] if k == 0 else "", _t(c["field"]), _t(c["a"], style),
                      _t(mark + c["b"], style), _t(firsts.get((st["step"], c["field"]), "")))
    out.grid(g)
    more = sum(1 for v in rep.semantic_steps) - limit
    if more > 0:
        out.print(Text(f"... {more} more steps differ (use --json)", "dim"))


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


@click.command("snapshot", cls=Command)
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Write the snapshot to this file (default: stdout).")
@click.option("--reshapes", is_flag=True, help="Include the shape-changing ops.")
@click.option("--steps", type=click.IntRange(1, None), default=None, help="Only the first N steps.")
@click.option("--compare", "golden", type=click.Path(path_type=Path), default=None,
              help="Compare with a golden snapshot instead: print a unified diff, exit 1 when it differs.")
@click.option("--force", is_flag=True, help="Replace --out even when it is not a vlmscope snapshot.")
@click.option("--json", "as_json", is_flag=True,
              help="With --compare: print the result as JSON (same, summary, diff). The snapshot itself is JSON.")
def snapshot(trace: Path, out: Path | None, reshapes: bool, steps: int | None, golden: Path | None,
             force: bool, as_json: bool) -> None:
    """Write a reviewable golden shape snapshot (JSON, one entry per line, in execution order).

    With --compare: a one-line summary and the unified diff; exit 1 when the shapes differ.
    Exit status: 0 written / same, 1 different, 2 usage, 3 unreadable trace.
    """
    from vlmscope.analyze.snapshot import compare_golden, snapshot_text
    from vlmscope.trace import TraceError, open_trace, preflight
    from vlmscope.trace.text import json_printable, printable

    if golden is not None and not golden.is_file():
        raise click.BadParameter(f"golden snapshot not found: {golden}", param_hint="--compare")
    if out is not None and not force and _replaces_other_file(out):
        fail(f"{out} exists and is not a vlmscope snapshot; use --force to replace it", EXIT_USAGE)
    try:
        preflight(trace)
        with open_trace(trace) as t:
            if golden is not None:
                try:
                    summary, d = compare_golden(t, golden)
                except ValueError as e:
                    raise click.BadParameter(str(e), param_hint="--compare") from None
                if as_json:
                    emit_json({"trace": str(trace), "golden": str(golden), "same": not d,
                               "summary": summary or None, "diff": d if d.startswith("---") else None})
                elif d:
                    con = Out(resolve_format("auto"))
                    con.print(_t(summary, "bold red"))
                    if d.startswith("---"):
                        _print_udiff(con, d, limit=10_000)
                else:
                    click.echo(f"same shapes as {printable(golden)}")
                sys.exit(EXIT_FOUND if d else EXIT_OK)
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
            fail(f"cannot write {out}: {e.strerror or e}", EXIT_USAGE)
        click.echo(f"wrote {printable(out)} ({text.count(chr(10))} lines)", err=True)
