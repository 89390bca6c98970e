"""The ``vlmscope`` command line: a thin click group.

Commands live in their own modules and are imported only when used; heavy packages
(torch, textual) are imported inside command bodies, so ``vlmscope --help`` and the
trace-only commands start fast.
"""

from __future__ import annotations

import importlib

import click

from vlmscope._version import __version__
from vlmscope.cli.output import OneLineErrors

COMMANDS = {
    "record": "vlmscope.cli.record:record",
    "summary": "vlmscope.cli.record:summary",
    "check": "vlmscope.cli.analyze:check",
    "diff": "vlmscope.cli.analyze:diff",
    "snapshot": "vlmscope.cli.analyze:snapshot",
    "view": "vlmscope.cli.view:view",
    "invariance": "vlmscope.cli.invariance:invariance",
    "import": "vlmscope.cli.importer:import_",
}


class LazyGroup(OneLineErrors, click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["vlmscope.argv"] = ["vlmscope", *args]  # recorded in trace metadata
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod, _, attr = target.partition(":")
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vlmscope")
def main() -> None:
    """vlmscope: record, check, diff and view the shapes of a multimodal Qwen forward."""


