"""``vlmscope view``: open the terminal UI on a trace, or two traces to diff.

Textual is imported inside the command, so ``vlmscope --help`` stays fast. A trace that
cannot be read (missing, truncated, foreign, newer format) is reported in one line on
stderr with exit status 3, before the UI starts.
"""

from __future__ import annotations

import sys

import click

EXIT_BAD_TRACE = 3


@click.command("view", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("traces", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--map", "maps", multiple=True, metavar="'A_REGEX=B_REPL'",
              help="Diff mode: rewrite trace A's module paths before aligning them with B's, as "
                   "`vlmscope diff --map` does (different implementations). Repeatable.")
def view(traces: tuple[str, ...], maps: tuple[str, ...]) -> None:
    """Step through TRACE in a terminal UI; with two traces, diff them (A B).

    \b
    Keys: j/k move, enter expand, n/N next/previous layer, ]/[ next/previous step,
    / search, f filter, c step context, g first divergence, e next check violation,
    p saved payload, ? help, q quit.
    """
    if len(traces) > 2:
        raise click.UsageError("view takes one trace, or two to diff (A B)")
    from vlmscope.trace import TraceError, open_trace, preflight
    from vlmscope.trace.text import printable
    from vlmscope.analyze.maps import parse_maps

    try:
        parse_maps(list(maps))
    except ValueError as e:
        click.echo(f"vlmscope view: {printable(e)}", err=True)
        sys.exit(2)
    if maps and len(traces) < 2:
        click.echo("vlmscope view: --map only applies when diffing two traces", err=True)
    for path in traces:
        try:
            preflight(path)       # a file that hangs HDF5 is refused, not read (docs/trace-format.md)
            t = open_trace(path)
            t.close()
        except TraceError as e:
            click.echo(f"vlmscope view: {printable(e)}", err=True)
            sys.exit(EXIT_BAD_TRACE)
        except OSError as e:  # permissions and the like
            click.echo(f"vlmscope view: cannot read {printable(path)}: {printable(e.strerror or e)}", err=True)
            sys.exit(EXIT_BAD_TRACE)

    from vlmscope.tui.app import ViewerApp

    ViewerApp(list(traces), list(maps), freeze_gc=True).run()
