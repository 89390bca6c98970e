"""``vlmscope view``: open the terminal UI on a trace, or two traces to diff.

Textual is imported inside the command, so ``vlmscope --help`` stays fast. A trace that
cannot be read (missing, truncated, foreign, newer format) is reported in one line on
stderr with exit status 3, before the UI starts.
"""

from __future__ import annotations

import os
import sys

import click

from vlmscope.cli.output import Command, fail

EXIT_BAD_TRACE = 3


@click.command("view", cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("traces", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--map", "maps", multiple=True, metavar="'A_REGEX=B_REPL'",
              help="Diff mode: rewrite trace A's module paths before aligning them with B's, as "
                   "`vlmscope diff --map` does (different implementations). Repeatable.")
@click.option("--screenshot", metavar="OUT.svg", type=click.Path(dir_okay=False), default=None,
              help="Render the viewer headless (checks included), save it as an SVG and exit: for bug "
                   "reports. An existing file is refused unless --force.")
@click.option("--size", metavar="WxH", default=None, help="With --screenshot: the terminal size (default 120x40).")
@click.option("--step", type=int, default=None,
              help="With --screenshot: show step N (0 is the prefill, as `vlmscope check` numbers steps).")
@click.option("--select", metavar="PATH", default=None,
              help="With --screenshot: select the module's first call in the step (a path, glob or substring, as / "
                   "searches).")
@click.option("--context", is_flag=True, help="With --screenshot: open the step context panel.")
@click.option("--force", is_flag=True, help="With --screenshot: overwrite OUT.svg.")
def view(traces: tuple[str, ...], maps: tuple[str, ...], screenshot: str | None = None, size: str | None = None,
         step: int | None = None, select: str | None = None, context: bool = False, force: bool = False) -> None:
    """Step through TRACE in a terminal UI; with two traces, diff them (A B).

    \b
    Keys: j/k move, enter expand, n/N next/previous layer, ]/[ next/previous step,
    / search, f filter, c step context, g first divergence, e next check violation,
    p saved payload, S or ctrl+p screenshot, ? help, q quit.
    """
    if len(traces) > 2:
        raise click.UsageError("view takes one trace, or two to diff (A B)")
    from vlmscope.trace import TraceError, open_trace, preflight
    from vlmscope.trace.text import printable
    from vlmscope.analyze.maps import parse_maps

    shot_size = None
    if screenshot is None:
        given = [f"--{n}" for n, v in (("size", size), ("step", step), ("select", select), ("context", context),
                                       ("force", force)) if v not in (None, False)]
        if given:
            fail(f"{', '.join(given)} only apply with --screenshot", 2)
    else:
        from vlmscope.tui.export import DEFAULT_SIZE, ScreenshotError, parse_size

        try:
            shot_size = parse_size(size) if size is not None else DEFAULT_SIZE
        except ScreenshotError as e:
            fail(e, 2)
        if os.path.lexists(screenshot) and not force:
            fail(f"{screenshot} exists (--force overwrites it)", 2)

    try:
        parse_maps(list(maps))
    except ValueError as e:
        fail(f"--map: {e}", 2)
    if maps and len(traces) < 2:
        click.echo("vlmscope: warning: --map only applies when diffing two traces", err=True)
    for path in traces:
        try:
            preflight(path)       # a file that hangs HDF5 is refused, not read (docs/trace-format.md)
            t = open_trace(path)
            t.close()
        except TraceError as e:
            fail(e, EXIT_BAD_TRACE)
        except OSError as e:  # permissions and the like
            fail(f"cannot read {path}: {e.strerror or e}", EXIT_BAD_TRACE)

    if screenshot is not None:
        from vlmscope.tui.export import ScreenshotError, screenshot as save_screenshot

        try:
            out = save_screenshot(list(traces), screenshot, size=shot_size, step=step, select=select,
                                  context=context, force=force, maps=list(maps))
        except ScreenshotError as e:
            fail(e, 2)
        click.echo(f"saved {printable(str(out))}")
        return

    from vlmscope.tui.app import ViewerApp

    app = ViewerApp(list(traces), list(maps), freeze_gc=True)
    app.run()
    if app.return_code:      # a crash: the app printed one line naming its report (EXIT_CRASH)
        sys.exit(app.return_code)
