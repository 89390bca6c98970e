"""``vlmscope import DUMP_DIR -o trace.h5``: a folder of named tensors (an MLX, JAX or
llama.cpp port's dump) as a trace (``docs/import-format.md``)."""

from __future__ import annotations

from pathlib import Path

import click

from vlmscope.cli.output import Command, fail


@click.command(name="import", cls=Command)
@click.argument("dump_dir", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="The trace to write.")
@click.option("--max-tensor-bytes", type=click.IntRange(0, None), default=256 * 1024 * 1024, show_default=True,
              help="Store full tensors (payloads) up to this many bytes in all; later ones keep stats only.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def import_(dump_dir: Path, out: Path, max_tensor_bytes: int, force: bool, debug: bool):
    """Turn DUMP_DIR (.safetensors, .npy, .npz files of tensors named like
    step0/blocks.3.attn.out, and an optional manifest.json) into a trace.

    Exit status: 0 written, 2 usage or a bad dump (nothing is written).
    """
    from vlmscope.analyze.importer import import_dump
    from vlmscope.errors import UserError

    try:
        got = import_dump(dump_dir, out, max_tensor_bytes=max_tensor_bytes, overwrite=force)
    except UserError as e:
        if debug:
            raise
        fail(e, e.exit_code)
    except OSError as e:
        if debug:
            raise
        fail(f"cannot import {dump_dir}: {e}", 2)
    def n(k: int, word: str) -> str:
        return f"{k} {word}{'' if k == 1 else 's'}"
    click.echo(f"{out}: {n(got['steps'], 'step')}, {n(got['events'], 'event')}, {n(got['tensors'], 'tensor')} "
               f"({got['payload_bytes']} payload bytes) from {n(got['files'], 'file')}")
    for w in got["warnings"]:
        click.echo(f"warning: {w}", err=True)
