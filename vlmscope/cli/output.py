"""What every command shares: the one error line, the output formats, plain tables.

Only click is imported at module level (``vlmscope --help`` stays fast); rich is imported when
something is printed.

- **Errors.** Bad input is one line on stderr, ``vlmscope: error: ...``, with the command's
  exit code and no traceback: :func:`fail` for the commands' own errors, and
  :class:`OneLineErrors` (mixed into the group and every command) for click's usage errors,
  which click would print as a usage block.
- **Formats.** ``--format auto|plain|rich|json`` (and ``--json``, the same as ``--format json``):
  ``auto`` is ``rich`` on a terminal and ``plain`` anywhere else (a pipe, a file, a CI log),
  where every row is printed in full on one line: no truncation, no wrapping, no box drawing,
  no colour.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

import click

ERROR_PREFIX = "vlmscope: error: "
FORMATS = ("auto", "plain", "rich", "json")


def error_line(message: Any) -> str:
    """The one line shown for an error: the prefix and the message (control characters escaped)."""
    from vlmscope.trace.text import printable

    return ERROR_PREFIX + printable(message)


def echo_error(message: Any) -> None:
    click.echo(error_line(message), err=True)


def fail(message: Any, code: int) -> None:
    """Print ``vlmscope: error: MESSAGE`` on stderr and exit with ``code``."""
    echo_error(message)
    sys.exit(code)


# ============================================================================ click's errors


class _OneLine(click.ClickException):
    """A click error (a usage error, a bad parameter) shown as one ``vlmscope: error:`` line."""

    def __init__(self, e: click.ClickException):
        super().__init__(e.format_message())
        self.exit_code = e.exit_code
        hint = ""
        ctx = getattr(e, "ctx", None)
        if isinstance(e, click.UsageError) and ctx is not None:
            hint = f" (see '{ctx.command_path} -h')"
        self.line = " ".join(e.format_message().split()) + hint

    def show(self, file: Any = None) -> None:
        echo_error(self.line)


def _one_line(e: click.ClickException) -> click.ClickException:
    if isinstance(e, _OneLine) or type(e).__name__ == "NoArgsIsHelpError":   # that one shows the help
        return e
    return _OneLine(e)


class OneLineErrors:
    """Mixin for click commands and groups: click's own errors become one line on stderr."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)   # type: ignore[misc]
        except click.ClickException as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)   # type: ignore[misc]
        except click.ClickException as e:
            raise _one_line(e) from None


class Command(OneLineErrors, click.Command):
    """Every vlmscope command: ``@click.command(cls=Command)``."""


# ============================================================================ formats


def writable_dir(d: Any, what: str = "output directory") -> None:
    """Create folder ``d`` (and its parents) if needed and make sure it can be written, or raise
    an ``OutputError`` naming it: "cannot create {what} D: ..." / "{what} is not writable: D"."""
    import os
    from pathlib import Path

    from vlmscope.errors import OutputError

    d = Path(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {what} {d}: {e.strerror or e}") from None
    if not os.access(d, os.W_OK):
        raise OutputError(f"{what} is not writable: {d}")


def format_options(fn):
    """``--format auto|plain|rich|json`` and ``--json`` (the same as ``--format json``)."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON (the same as --format json).")(fn)
    fn = click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
                      help="rich: tables for a terminal; plain: full rows, one per line, for pipes and logs "
                           "(auto picks rich on a terminal, plain otherwise); json: one JSON document.")(fn)
    return fn


def resolve_format(fmt: str, as_json: bool = False) -> str:
    """``plain``, ``rich`` or ``json`` for the ``--format`` and ``--json`` given."""
    if as_json:
        if fmt not in ("auto", "json"):
            raise click.UsageError(f"--json contradicts --format {fmt}")
        return "json"
    if fmt != "auto":
        return fmt
    from rich.console import Console

    return "rich" if Console().is_terminal else "plain"   # Rich's own test: FORCE_COLOR, TTY_COMPATIBLE


def emit_json(obj: Any) -> None:
    """One JSON document on stdout; control characters that ``json.dumps`` leaves raw (DEL, C1)
    are written as ``\\uXXXX`` escapes: the same values, safe to print."""
    from vlmscope.trace.text import json_printable

    click.echo(json_printable(json.dumps(obj, indent=2, default=_json_default)))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


class Grid:
    """A table, rendered as a Rich table (``rich``) or as aligned plain rows (``plain``).

    Cells are ``str`` or ``rich.text.Text`` (strings from a trace must come as ``Text`` made by
    :func:`vlmscope.trace.text.printable`, as everywhere)."""

    def __init__(self, columns: Iterable[tuple[str, dict]], *, title: str | None = None, **table_kw: Any):
        self.columns = list(columns)
        self.rows: list[list[Any]] = []
        self.title = title
        self.table_kw = table_kw

    def add_row(self, *cells: Any) -> None:
        self.rows.append(list(cells))

    def rich(self) -> Any:
        from rich.table import Table

        tbl = Table(title=self.title, **{"header_style": "bold", **self.table_kw})
        for name, kw in self.columns:
            tbl.add_column(name, **{k: v for k, v in kw.items() if k in ("justify", "no_wrap", "ratio", "style")})
        for r in self.rows:
            tbl.add_row(*r)
        return tbl

    def plain_lines(self) -> list[str]:
        from rich.cells import cell_len

        head = [name for name, _ in self.columns]
        body = [[_plain(c) for c in r] for r in self.rows]
        widths = [max([cell_len(head[i])] + [cell_len(r[i]) for r in body if i < len(r)]) for i in range(len(head))]
        right = [kw.get("justify") == "right" for _, kw in self.columns]
        lines = [f"{self.title}:"] if self.title else []
        for r in [head] + body:
            cells = []
            for i, c in enumerate(r):
                pad = " " * (widths[i] - cell_len(c)) if i < len(widths) else ""
                cells.append(pad + c if i < len(right) and right[i] else c + pad)
            lines.append("  ".join(cells).rstrip())
        return lines


def _plain(cell: Any) -> str:
    plain = getattr(cell, "plain", None)
    return plain if isinstance(plain, str) else str(cell)


class Out:
    """Prints lines (``Text``) and :class:`Grid` tables to stdout in the ``rich`` or ``plain`` format."""

    def __init__(self, mode: str):
        self.mode = mode
        self._console = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            kw: dict[str, Any] = {}
            if not sys.stdout.isatty():   # rich into a pipe (--format rich, FORCE_COLOR): wider than 80 columns
                kw["width"] = 160
            self._console = Console(highlight=False, soft_wrap=False, **kw)
        return self._console

    def print(self, *parts: Any) -> None:
        """A line: ``Text`` objects (or plain strings written by vlmscope itself, never a trace's)."""
        if self.mode == "plain":
            click.echo("".join(_plain(p) for p in parts))
            return
        from rich.text import Text

        self.console.print(Text.assemble(*[p if isinstance(p, Text) else Text(str(p)) for p in parts]))

    def grid(self, g: Grid) -> None:
        if self.mode == "plain":
            for ln in g.plain_lines():
                click.echo(ln)
        else:
            self.console.print(g.rich())
