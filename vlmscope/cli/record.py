"""``vlmscope record`` and ``vlmscope summary``."""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from vlmscope.cli.output import Command, fail, format_options, resolve_format, writable_dir
from vlmscope.errors import OutputError, UserError


def _parse_option(values: tuple[str, ...]) -> dict:
    out: dict = {}
    for item in values:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        k = k.strip()
        if not k.isidentifier():
            raise click.BadParameter(f"{k!r} is not an option name", param_hint="--option")
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def _check_text(value: str, what: str) -> None:
    """A command-line string that is not valid UTF-8 (bytes in argv decode to lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} is not valid UTF-8") from None


def default_out(model: str, image: str | None, root: Path = Path("traces")) -> Path:
    """A readable, unique trace name: traces/<model>-<image>-<YYYYmmdd-HHMMSS>.h5."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name.split(":")[-1]).strip("-") or "model"
    parts = [name]
    if image:
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "-", Path(image).stem))
    parts.append(time.strftime("%Y%m%d-%H%M%S"))
    base = root / ("-".join(parts) + ".h5")
    path, i = base, 2
    while path.exists() or path.with_name(path.name + ".partial").exists():
        path = base.with_name(f"{base.stem}-{i}.h5")
        i += 1
    return path


def _check_free(path: Path, force: bool) -> None:
    """Refuse to replace an existing file (a trace, a killed run's journal, anything) without --force."""
    if path.is_dir():
        raise OutputError(f"output path is a directory: {path}")
    if force:
        return
    partial = path.with_name(path.name + ".partial")
    if partial.exists() or partial.is_symlink():
        raise OutputError(f"{partial} exists: the only copy of a recording that did not finish "
                          f"(read it with 'vlmscope summary {partial}'); use --force to replace it")
    if path.exists() or path.is_symlink():
        raise OutputError(f"{path} exists; use --force to replace it, or choose another -o")


def _check_writable(path: Path) -> None:
    writable_dir(path.parent if str(path.parent) else Path("."))
    if path.is_dir():
        raise OutputError(f"output path is a directory: {path}")


def _check_max_new_tokens(ctx, param, value: int) -> int:
    if value < 1:
        raise click.BadParameter(f"{value}: must be at least 1 (-n 1 records only the prefill)", ctx, param)
    if value > 100_000:
        raise click.BadParameter(f"{value} is more than 100000", ctx, param)
    return value


#: The prompt of a run given no --prompt (and no --batch).
DEFAULT_PROMPT = "Describe this image."


def _check_fps(ctx, param, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value}: must be a positive number of frames per second", ctx, param)
    return value


@dataclass
class InputSpec:
    """What the command line asks to run: rows from --prompt/--image/--video or --batch files."""

    prompts: list[str]
    images: list[str]
    videos: list[str]
    batches: list[str]
    repeat: int = 1
    padding_side: str = "left"
    fps: float | None = None

    def calls(self) -> list:
        """Check the rows of every generate call (before any model loads): a list of row lists."""
        from vlmscope.recorder.inputs import read_rows, rows_from_args

        if self.batches:
            given = [f for f, v in (("--prompt", self.prompts), ("--image", self.images),
                                    ("--video", self.videos)) if v]
            if given:
                raise UserError(f"--batch and {given[0]} cannot be combined: put the rows in the batch file")
            calls = [read_rows(f) for f in self.batches]
        else:
            calls = [rows_from_args(self.prompts or [DEFAULT_PROMPT], self.images, self.videos)]
        if self.fps is not None and not any(r.videos for rows in calls for r in rows):
            raise UserError("--fps sets the video sampling rate, but no row has a video")
        return calls

    def name_hint(self) -> str | None:
        """What the default trace name is made from: the first image, video or batch file."""
        return next(iter(self.images or self.videos or self.batches), None)


@click.command(cls=Command)
@click.option("--model", "-m", "model_spec", default=None, metavar="NAME|DIR|MODULE:FACTORY",
              help="Embedded model name (default tiny-qwen2.5-vl), a local checkpoint directory, "
                   "or package.module:factory returning (model, processor).")
@click.option("--image", "-i", "images", type=click.Path(dir_okay=True, path_type=str), multiple=True,
              help="Image file (repeatable; omit for a text-only run). N prompts with N images: one image "
                   "per row; one prompt with k images: one row with k images.")
@click.option("--prompt", "-p", "prompts", multiple=True,
              help=f"Prompt (repeatable: one batch row each)  [default: {DEFAULT_PROMPT}]")
@click.option("--video", "videos", type=click.Path(dir_okay=True, path_type=str), multiple=True,
              help="Video file (repeatable: one per prompt), decoded with PyAV by the model's video processor.")
@click.option("--fps", type=float, default=None, callback=_check_fps,
              help="Frames per second the video processor samples (default: every frame).")
@click.option("--batch", "batches", type=click.Path(dir_okay=True, path_type=str), multiple=True,
              metavar="FILE.jsonl",
              help="Batch rows, one JSON object per line: {\"prompt\", \"images\", \"video\"} or "
                   "{\"messages\"}; relative paths are from the file's folder. Repeatable: each file is "
                   "one generate call, in order, in one trace.")
@click.option("--repeat", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Repeat the whole sequence of generate calls N times (stale state between calls).")
@click.option("--padding-side", type=click.Choice(["left", "right"]), default="left", show_default=True,
              help="Which side the processor pads a batch's shorter rows on.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Trace path (default: a unique name under traces/).")
@click.option("--max-new-tokens", "-n", type=int, default=8, show_default=True, callback=_check_max_new_tokens,
              help="New tokens to generate: one step each (the first is the prefill; -n 1 records only the prefill).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64", "auto"]), default=None,
              help="Model dtype (default: the model's own).")
@click.option("--attn-implementation", type=str, default=None, help="eager, sdpa, flash_attention_2, ...")
@click.option("--seed", type=click.IntRange(-(2**63), 2**64 - 1), default=0, show_default=True,
              help="Seed for weights of embedded models and torch (torch's range: -2^63 to 2^64-1).")
@click.option("--save-tensors", multiple=True, metavar="GLOB",
              help="Save full outputs of modules whose path matches GLOB (repeatable).")
@click.option("--max-tensor-bytes", type=click.IntRange(0, None), default=256 * 1024 * 1024, show_default=True,
              help="Cap on saved tensor payload bytes; past it only stats are kept.")
@click.option("--no-reshapes", is_flag=True, help="Do not record reshape events.")
@click.option("--no-stats", is_flag=True, help="Do not compute tensor stats.")
@click.option("--no-sketches", is_flag=True,
              help="Do not record value sketches (per-token norms and projections that let diff see reordered "
                   "or shifted values and name a culprit).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Extra keyword option for the model factory (e.g. use_cache_quantization=true).")
@click.option("--verbose", "-v", is_flag=True, help="Print one line per recorded step (useful in logs).")
@click.option("--force", is_flag=True, help="Replace an existing output file (and a killed run's .partial).")
@click.option("--fsync", is_flag=True, help="Force every finished step to the disk (survives power loss; slower).")
@format_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def record(model_spec, images, prompts, videos, fps, batches, repeat, padding_side, out, max_new_tokens, device,
           dtype, attn_implementation, seed, save_tensors, max_tensor_bytes, no_reshapes, no_stats, no_sketches, options,
           verbose, force, fsync, fmt, as_json, debug):
    """Run generation on a model and record every step into an HDF5 trace.

    Batches: repeated --prompt/--image/--video make one batched generate call; each --batch
    FILE.jsonl is one call (all in one trace, in order), and --repeat N runs the sequence N times.

    Exit status: 0 recorded, 1 the forward raised (the trace is kept), 2 bad input,
    4 the trace could not be written, 130 interrupted, 143 terminated.
    """
    from rich.console import Console

    from vlmscope.trace import TraceWriteError

    err = Console(stderr=True)
    mode = resolve_format(fmt, as_json)
    opts = _parse_option(options)
    _install_signal_handlers()
    try:
        for what, values in (("--prompt", prompts), ("--image", images), ("--video", videos), ("--batch", batches)):
            for v in values:
                _check_text(v, what)
        spec = InputSpec(prompts=list(prompts), images=list(images), videos=list(videos), batches=list(batches),
                         repeat=repeat, padding_side=padding_side, fps=fps)
        code = _record(model_spec, spec, out, max_new_tokens, device, dtype, attn_implementation, seed,
                       save_tensors, max_tensor_bytes, no_reshapes, no_stats, opts, verbose,
                       force=force, fsync=fsync, mode=mode, sketches=not no_sketches)
    except UserError as e:
        if debug:
            raise
        fail(e, e.exit_code)
    except TraceWriteError as e:
        if debug:
            raise
        fail(e, EXIT_WRITE_ERROR)
    except KeyboardInterrupt as e:
        err.print("[yellow]terminated[/]" if isinstance(e, Terminated) else "[yellow]interrupted[/]")
        sys.exit(_interrupt_code(e))
    sys.exit(code)


#: ``record``'s exit code when the trace cannot be written (a full disk, a quota, a file-size limit).
EXIT_WRITE_ERROR = 4


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: finished steps are kept, the trace is marked incomplete."""


def _interrupt_code(e: BaseException) -> int:
    return 143 if isinstance(e, Terminated) else 130


def _install_signal_handlers() -> None:
    """SIGTERM stops the recording as Ctrl-C does (exit 143); SIGXFSZ (a file-size limit) becomes
    a write error the recorder reports, instead of killing the process."""
    import signal

    def on_term(signum, frame):
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, on_term)
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:   # not the main thread (an embedding application): keep its handlers
        pass


def _record(model_spec, spec: InputSpec, out, max_new_tokens, device, dtype, attn_implementation, seed,
            save_tensors, max_tensor_bytes, no_reshapes, no_stats, options, verbose=False, *,
            force: bool = False, fsync: bool = False, mode: str = "rich", sketches: bool = True) -> int:
    """Record the generate calls into one trace, print its summary; returns the exit code."""
    from rich.console import Console
    from rich.markup import escape as rich_escape
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from vlmscope.trace.text import printable

    console = Console(stderr=True)
    import vlmscope_models

    model_spec = model_spec or vlmscope_models.DEFAULT_MODEL
    _disable_hf_progress_bars()
    # Cheap checks first: nothing is loaded for a bad row, image, video or an unwritable output.
    calls = spec.calls()
    auto_named = out is None
    out = Path(out) if out else default_out(model_spec, spec.name_hint())
    _check_writable(out)
    _check_free(out, force)

    n_calls = len(calls) * spec.repeat
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _steps_column(),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task(f"loading {rich_escape(printable(model_spec))}", total=None)
        model, processor, minfo, prepared = _load_model_and_inputs(
            model_spec, device, dtype, attn_implementation, seed, options, calls, spec)
        progress.update(task, description="recording", total=max_new_tokens * n_calls, completed=0)
        on_step = _step_reporter(progress, task, max_new_tokens, verbose, console, n_calls)
        meta = _trace_meta(minfo, prepared[0][1], seed, max_new_tokens, attn_implementation)
        if n_calls > 1:
            meta["generation"]["calls"] = n_calls
        from vlmscope.recorder import Recorder

        rec = Recorder(model, out, meta=meta, save_tensors=list(save_tensors), max_tensor_bytes=max_tensor_bytes,
                       reshapes=not no_reshapes, stats=not no_stats, sketches=sketches, on_step=on_step, overwrite=force, fsync=fsync)
        _start(rec, model_spec, spec.name_hint(), auto_named)
        failure = _generate(rec, model, processor, prepared * spec.repeat, max_new_tokens)
    return _report(rec, failure, console, mode)


def _steps_column():
    """The progress bar's ``done/total`` column: empty while the total is unknown (loading the
    model), never ``0/None``."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class _StepsColumn(ProgressColumn):
        def render(self, task) -> Text:
            if task.total is None:
                return Text("")
            return Text(f"{int(task.completed)}/{int(task.total)}")

    return _StepsColumn()


def _start(rec, model_spec: str, image: str | None, auto_named: bool) -> None:
    """Open the trace. Its journal is created exclusively: when a run started in the same second
    took the default name, this one picks the next; an explicit ``-o`` that appeared meanwhile
    is refused."""
    for _ in range(1000):
        try:
            rec.start()
            return
        except FileExistsError as e:
            if not auto_named:
                raise OutputError(f"{e.filename} exists; use --force to replace it, or choose another -o") from None
            rec.out = default_out(model_spec, image, rec.out.parent)
        except OSError as e:
            raise OutputError(f"cannot create the trace {rec.out}: {e.strerror or e}") from None
    raise OutputError(f"no free trace name next to {rec.out}")


def _disable_hf_progress_bars() -> None:
    """Our own progress bar replaces transformers' weight-loading bars."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _load_model_and_inputs(model_spec, device, dtype, attn_implementation, seed, options, calls, spec):
    """Seed torch, load the model and build the inputs of every call: (model, processor, model info,
    [(inputs, input info), ...] one per call)."""
    import torch

    import vlmscope_models
    from vlmscope.recorder.inputs import build_batch_inputs
    from vlmscope.recorder.loader import load_model

    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    torch.manual_seed(seed)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but CUDA is not available")
    if model_spec in vlmscope_models.EMBEDDED_MODELS:
        options = {"seed": seed, **options}
    model, processor, minfo = load_model(model_spec, device=device, dtype=dtype,
                                         attn_implementation=attn_implementation, options=options)
    prepared = [build_batch_inputs(model, processor, rows, padding_side=spec.padding_side, fps=spec.fps)
                for rows in calls]
    return model, processor, minfo, prepared


def _step_reporter(progress, task, max_new_tokens: int, verbose: bool, console, n_calls: int = 1):
    """The recorder's per-step callback: advance the progress bar (and print a line when verbose)."""

    def on_step(step: int, rec) -> None:
        calls = getattr(rec, "calls", None) or []
        call = len(calls) - 1 if calls else 0
        first = calls[-1].get("first_step", 0) if calls else 0
        local = step - first
        progress.update(task, completed=min(call * max_new_tokens + local + 1, max_new_tokens * (call + 1)),
                        description=("prefill" if local == 0 else f"decode {local}")
                        + (f" (call {call + 1})" if call else ""))
        if verbose:
            where = f"call {call}, " if n_calls > 1 else ""
            console.print(f"step {step} recorded ({where}{'prefill' if local == 0 else 'decode'}, "
                          f"{rec.n_events} module calls so far)", highlight=False)

    return on_step


def _trace_meta(minfo: dict, info: dict, seed: int, max_new_tokens: int, attn_implementation) -> dict:
    """The trace's metadata: model and input info, seed, command line and generation settings."""
    ctx = click.get_current_context(silent=True)
    argv = ctx.meta.get("vlmscope.argv") if ctx else None
    info = {k: info[k] for k in ("prompt", "image") if k in info}   # the rows go to run_json calls/batch
    meta = {**minfo, **info, "seed": seed, "argv": argv or ["vlmscope", *sys.argv[1:]],
            "generation": {"max_new_tokens": max_new_tokens, "do_sample": False}}
    if attn_implementation:
        meta["attn_implementation"] = attn_implementation
    return meta


def _generate(rec, model, processor, prepared, max_new_tokens: int) -> BaseException | None:
    """Run each call's ``generate`` under the recorder, in order; returns what interrupted or
    failed the run (None when every call finished)."""
    from vlmscope.recorder.inputs import generate_calls
    from vlmscope.trace import TraceWriteError

    failure: BaseException | None = None
    try:
        try:
            generate_calls(rec, model, processor, prepared, max_new_tokens=max_new_tokens)
        except BaseException as e:
            rec.stop(e)
            raise
        rec.stop(None)
    except TraceWriteError:
        raise
    except KeyboardInterrupt as e:
        failure = e
    except Exception as e:  # noqa: BLE001 - the model's own failure is what we report
        failure = e
    return failure


def _report(rec, failure: BaseException | None, console, mode: str = "rich") -> int:
    """Print the recorded trace's summary; the exit code: 130 interrupted, 1 failed or broken, else 0."""
    from rich.text import Text

    from vlmscope import open_trace
    from vlmscope.trace.text import printable

    with open_trace(rec.path) as t:
        _print_summary(t, mode)
    if isinstance(failure, KeyboardInterrupt):
        word = "terminated:" if isinstance(failure, Terminated) else "interrupted:"
        console.print(Text.assemble((word, "yellow"), f" kept {rec.n_steps} finished step(s) in "
                                    f"{printable(rec.path)} (incomplete)"))
        return _interrupt_code(failure)
    if failure is not None or rec.broken:
        return 1
    return 0


def _print_summary(t, mode: str) -> str | None:
    """The summary of an open trace in ``mode`` (plain, rich or json); why the rules could not run."""
    from vlmscope.cli.output import Out, emit_json
    from vlmscope.cli.summary import print_summary, summary_dict

    if mode == "json":
        data, failed = summary_dict(t)
        emit_json(data)
        return failed
    return print_summary(t, Out(mode))


@click.command(cls=Command)
@click.argument("trace", type=click.Path(path_type=Path))
@format_options
def summary(trace: Path, fmt: str, as_json: bool):
    """Print the summary of a trace: steps, events, size, generated text, broken invariants.

    Exit status: 0 summarised, 2 usage, 3 unreadable trace (or the checks could not run on it).
    """
    from vlmscope import TraceError, open_trace
    from vlmscope.trace import preflight

    mode = resolve_format(fmt, as_json)
    try:
        preflight(trace)          # a file that hangs HDF5 is refused, not read (docs/trace-format.md)
        with open_trace(trace) as t:
            failed = _print_summary(t, mode)
    except TraceError as e:
        fail(e, 3)
    if failed:   # what could be read is printed, but it is no verdict: never exit 0
        fail(f"check could not run: {failed}", 3)
