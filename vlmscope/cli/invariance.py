"""``vlmscope invariance``: is each row of a batch computed as it is alone?

Records, into one folder, the batch left-padded, the batch right-padded and every row alone
(B=1), each a normal trace with the output of every module saved; then compares each row's
slice of every module output with the row-alone run (:mod:`vlmscope.analyze.invariance`) and
prints, per row and padding side, "invariant" or the first module where the row differs.

``record_invariance`` is the recording half as a Python function (a model object in, the
folder's manifest out); ``--from DIR`` compares the traces of an earlier run again.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import click

from vlmscope.cli.output import Command, Grid, Out, emit_json, fail, format_options, resolve_format, writable_dir
from vlmscope.errors import OutputError, UserError

MANIFEST = "invariance.json"
SIDES = ("left", "right")
DEFAULT_MAX_NEW_TOKENS = 4
DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024


# ============================================================================ recording


def trace_names(n_rows: int, sides: Sequence[str] = SIDES) -> dict:
    """The file names of one invariance run: ``batch-left.h5``, ``batch-right.h5``, ``row-0.h5``..."""
    return {"batch": {s: f"batch-{s}.h5" for s in sides}, "rows": [f"row-{i}.h5" for i in range(n_rows)]}


def _free(path: Path, force: bool) -> None:
    partial = path.with_name(path.name + ".partial")
    if path.is_dir():
        raise OutputError(f"output path is a directory: {path}")
    if not force:
        for p in (path, partial):
            if p.exists() or p.is_symlink():
                raise OutputError(f"{p} exists; use --force to replace it, or choose another -o")
    elif partial.exists():
        partial.unlink()


def check_outputs(out: Path, n_rows: int, sides: Sequence[str], force: bool) -> None:
    """Refuse to replace the traces (or the manifest) of an earlier run without ``force``."""
    names = trace_names(n_rows, sides)
    for p in [*names["batch"].values(), *names["rows"]]:
        _free(out / p, force)
    if (out / MANIFEST).exists() and not force:
        raise OutputError(f"{out / MANIFEST} exists; use --force to replace it, or choose another -o")


def record_invariance(model: Any, processor: Any, rows: Any, out_dir: str | os.PathLike, *,
                      max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = 0, fps: float | None = None,
                      sides: Sequence[str] = SIDES, save_tensors: Sequence[str] = ("*",),
                      max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES, meta: dict | None = None,
                      force: bool = False, on_run: Any = None) -> dict:
    """Record ``rows`` batched (once per padding side in ``sides``) and each row alone into
    ``out_dir``: greedy generation, the same seed before every run, every module's output saved
    (``save_tensors`` globs, up to ``max_tensor_bytes`` per trace). Writes and returns the
    manifest (``invariance.json``: trace names, rows, settings, each run's generated texts and
    the warnings of capped payloads). ``rows`` are row dicts or parsed rows
    (:func:`vlmscope.recorder.inputs.as_rows`); at least two."""
    import torch

    from vlmscope.recorder import Recorder
    from vlmscope.recorder.inputs import as_rows, build_batch_inputs, generate_texts

    rows = as_rows(rows)
    if len(rows) < 2:
        raise UserError(f"a batch needs at least 2 rows to compare with each row alone, got {len(rows)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"-o must be a folder: {out} is a file")
    writable_dir(out, "output folder")
    check_outputs(out, len(rows), sides, force)
    names = trace_names(len(rows), sides)
    # every input is built before anything runs: a bad row fails fast, nothing half-recorded
    runs: list[tuple[str, Any, dict, dict]] = []
    for side in sides:
        inputs, info = build_batch_inputs(model, processor, rows, padding_side=side, fps=fps)
        runs.append((names["batch"][side], inputs, info, {"role": "batch", "padding_side": side}))
    for i, row in enumerate(rows):
        inputs, info = build_batch_inputs(model, processor, [row], fps=fps)
        runs.append((names["rows"][i], inputs, info, {"role": "alone", "row": i}))
    manifest: dict[str, Any] = {"vlmscope_invariance": 1, **names, "n_rows": len(rows),
                                "rows": [r.meta() for r in rows], "max_new_tokens": max_new_tokens,
                                "seed": seed, "save_tensors": list(save_tensors),
                                "max_tensor_bytes": max_tensor_bytes, "generated": {}, "warnings": {}}
    base_meta = dict(meta or {})
    for name, inputs, info, role in runs:
        torch.manual_seed(seed)
        run_meta = {**base_meta, **info, "seed": seed, "invariance": role,
                    "generation": {"max_new_tokens": max_new_tokens, "do_sample": False}}
        rec = Recorder(model, out / name, meta=run_meta, save_tensors=list(save_tensors),
                       max_tensor_bytes=max_tensor_bytes, overwrite=force)
        rec.start()
        begin = getattr(rec, "begin_call", None)
        if begin is not None:
            begin(batch_size=info.get("batch_size"), padding_side=info.get("padding_side"),
                  rows=info.get("rows"))
        try:
            texts = generate_texts(model, processor, inputs, max_new_tokens=max_new_tokens)
            rec.add_meta(generated_text=texts[0] if texts else "", generated_texts=texts)
        except BaseException as e:
            rec.stop(e)
            if isinstance(e, Exception):
                raise RecordingFailed(name, e) from e
            raise
        rec.stop(None)
        manifest["generated"][name] = texts
        capped = [w for w in rec.warnings if "max-tensor-bytes" in w]
        if capped:
            manifest["warnings"][name] = capped
        if on_run is not None:
            on_run(name)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


class RecordingFailed(Exception):
    """The model raised while one of the runs was recorded (its trace is kept, status failed)."""

    def __init__(self, name: str, error: BaseException):
        msg = str(error).strip().splitlines()
        super().__init__(f"the model raised while recording {name}: {type(error).__name__}"
                         f"{': ' + msg[0] if msg else ''}")
        self.name = name


# ============================================================================ comparing


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of an invariance folder (a one-line error for a missing or damaged one)."""
    d = Path(folder)
    p = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"--from must be an invariance folder: {d} is not a folder")
    if not p.is_file():
        raise UserError(f"{d} has no {MANIFEST}: not a folder written by 'vlmscope invariance'")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p} is not readable JSON: {e}") from None
    ok = (isinstance(m, dict) and isinstance(m.get("batch"), dict) and isinstance(m.get("rows"), list)
          and set(m["batch"]) <= set(SIDES) and m["batch"]
          and isinstance(m.get("n_rows"), int) and not isinstance(m["n_rows"], bool)
          and 2 <= m["n_rows"] == len(m["rows"]))
    if ok:
        names = trace_names(m["n_rows"], list(m["batch"]))
        ok = m["batch"] == names["batch"]
    if not ok:
        raise UserError(f"{p} is not an invariance manifest")
    return m


def compare_folder(folder: str | os.PathLike, *, rtol: float | None = None, atol: float | None = None,
                   sides: Sequence[str] | None = None):
    """Open the traces of an invariance folder and compare them (the batch runs of ``sides``,
    default all): the report (TraceError when a trace is unreadable)."""
    from contextlib import ExitStack

    from vlmscope.analyze.invariance import Tolerance, invariance
    from vlmscope.trace import open_trace, preflight

    d = Path(folder)
    m = read_manifest(d)
    recorded = list(m["batch"])
    if sides is not None:
        missing = [x for x in sides if x not in recorded]
        if missing and len(sides) < len(SIDES):
            raise UserError(f"{d} has no {missing[0]}-padded batch run (it has: {', '.join(recorded)})")
        recorded = [x for x in recorded if x in sides]
    names = trace_names(m["n_rows"], recorded)
    with ExitStack() as stack:
        def op(name: str):
            p = d / name
            preflight(p)
            return stack.enter_context(open_trace(p))

        batches = {side: op(n) for side, n in names["batch"].items()}
        alones = [op(n) for n in names["rows"]]
        traces = {"folder": str(d), **names}
        rep = invariance(batches, alones, tol=Tolerance(rtol=rtol, atol=atol), traces=traces)
    rep.traces["warnings"] = m.get("warnings") or {}
    rep.traces["generated"] = m.get("generated") or {}
    return rep


# ============================================================================ output


def _cell(x: float) -> str:
    return f"{x:.3g}"


def print_report(rep, mode: str) -> None:
    from rich.text import Text

    from vlmscope.trace.text import printable

    if mode == "json":
        emit_json(rep.to_dict())
        return
    out = Out(mode)
    g = Grid([("row", {"justify": "right"}), ("padding", {}), ("verdict", {}), ("step", {"justify": "right"}),
              ("first divergent module", {}), ("where", {}), ("max |diff|", {"justify": "right"}),
              ("scale", {"justify": "right"}), ("divergent", {"justify": "right"})],
             title="batch invariance: each row in the batch against the row alone")
    for row in range(rep.rows):
        for side, rs in rep.sides.items():
            r = next(x for x in rs if x.row == row)
            style = {"invariant": "green", "differs": "red"}.get(r.verdict, "yellow")
            if r.first is not None:
                f = r.first
                mod = Text(printable(f"{f.module or '(root)'} {f.name}" + (f" [{f.nth}]" if f.nth else "")))
                g.add_row(str(row), side, Text(r.verdict, style), str(f.step), mod, Text(printable(f.where)),
                          _cell(f.max_abs), _cell(f.scale), str(r.n_divergent))
            else:
                note = r.note or (f"{'within tolerance' if r.max_rel else 'bit-exact'} ({r.n_compared} "
                                  f"outputs, {r.steps_compared} steps"
                                  + (f"; max rel diff {r.max_rel:.2g})" if r.max_rel else ")"))
                g.add_row(str(row), side, Text(r.verdict, style), "", Text(printable(note)), "", "", "", "")
    out.grid(g)
    tol = rep.tolerance
    rt = tol["rtol"]
    rtxt = ", ".join(f"{k} {v:g}" for k, v in rt.items()) if isinstance(rt, dict) else f"{rt:g}"
    out.print(f"tolerance: max |batch - alone| <= atol {tol['atol']:g} + rtol x scale (max |alone|); rtol {rtxt}")
    for side, rs in rep.sides.items():
        for r in rs:
            if r.not_compared:
                shown = ", ".join(r.not_compared[:4]) + (f" and {len(r.not_compared) - 4} more"
                                                          if len(r.not_compared) > 4 else "")
                out.print(Text(printable(f"row {r.row} {side}: {len(r.not_compared)} module(s) not compared "
                                         f"(no saved tensor: --max-tensor-bytes reached): {shown}")))
            if r.unmatched:
                shown = "; ".join(r.unmatched[:3]) + (f" and {len(r.unmatched) - 3} more"
                                                      if len(r.unmatched) > 3 else "")
                out.print(Text(printable(f"row {r.row} {side}: {len(r.unmatched)} output(s) not compared: {shown}")))
    if any(r.first is not None and "padding in the batch" in r.first.where for rs in rep.sides.values() for r in rs):
        out.print("padding in the batch: generate reads a row's next token at the batch's last position, which "
                  "right padding fills with padding for the shorter rows")
    folder = rep.traces.get("folder")
    if folder:
        out.print(Text(printable(f"traces: {folder}/ ({', '.join(rep.traces['batch'].values())}, "
                                 f"row-0.h5 .. row-{rep.rows - 1}.h5)")))
    n_diff = sum(r.verdict == "differs" for rs in rep.sides.values() for r in rs)
    n_nc = sum(r.verdict == "not compared" for rs in rep.sides.values() for r in rs)
    if n_diff:
        out.print(Text(f"{n_diff} row run(s) differ from the row alone", "red"))
    elif n_nc:
        out.print(Text(f"{n_nc} row run(s) could not be compared", "yellow"))
    else:
        out.print(Text(f"every row is batch invariant ({' and '.join(rep.sides)} padding)", "green"))


def exit_code(rep) -> int:
    """0 every row invariant; 1 some row differs (or could not be compared)."""
    return 0 if rep.invariant else 1


# ============================================================================ the command


def _default_dir(model: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name.split(":")[-1]).strip("-") or "model"
    base = Path("traces") / f"invariance-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 2
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _options(values: tuple[str, ...]) -> dict:
    out: dict = {}
    for item in values:
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or not k.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    return out


def _positive_tol(ctx, param, value):
    if value is not None and not (value >= 0 and value == value and value != float("inf")):
        raise click.BadParameter(f"{value}: must be a finite number >= 0", ctx, param)
    return value


def _check_n(ctx, param, value: int) -> int:
    if not 1 <= value <= 10_000:
        raise click.BadParameter(f"{value}: must be between 1 and 10000", ctx, param)
    return value


@click.command(cls=Command)
@click.option("--batch", "-b", "batch", type=click.Path(path_type=Path), default=None, metavar="ROWS.jsonl",
              help="The batch: one row per line, {\"prompt\", \"images\", \"video\"} or {\"messages\"}.")
@click.option("--from", "from_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Compare the traces of an earlier 'vlmscope invariance' folder again (records nothing).")
@click.option("--model", "-m", "model_spec", default=None, metavar="NAME|DIR|MODULE:FACTORY",
              help="Embedded model name (default tiny-qwen2.5-vl), a local checkpoint directory, "
                   "or package.module:factory returning (model, processor).")
@click.option("--max-new-tokens", "-n", type=int, default=DEFAULT_MAX_NEW_TOKENS, show_default=True,
              callback=_check_n, help="New tokens per run (steps compared).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Folder for the traces (default: a new folder under traces/).")
@click.option("--padding-side", type=click.Choice(["both", "left", "right"]), default="both", show_default=True,
              help="Which padded batch runs to record and compare (right padding puts a shorter row's "
                   "last position on padding, where generate reads its next token).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64", "auto"]), default=None,
              help="Model dtype (default: the model's own).")
@click.option("--attn-implementation", type=str, default=None, help="eager, sdpa, flash_attention_2, ...")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed set before every run (and for an embedded model's weights).")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Frames per second sampled from videos (default: every frame).")
@click.option("--save-tensors", multiple=True, metavar="GLOB", default=("*",), show_default=True,
              help="Modules whose outputs are saved and compared (repeatable).")
@click.option("--max-tensor-bytes", type=click.IntRange(0, None), default=DEFAULT_MAX_TENSOR_BYTES,
              show_default=True, help="Cap on saved tensor bytes per trace; modules past it are not compared.")
@click.option("--rtol", type=float, default=None, callback=_positive_tol,
              help="Relative tolerance for every dtype (default by dtype: float32 1e-5, bfloat16 3e-2, ...).")
@click.option("--atol", type=float, default=None, callback=_positive_tol, help="Absolute tolerance (default 0).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Extra keyword option for the model factory (e.g. max_pixels=12544).")
@click.option("--force", is_flag=True, help="Replace the traces of an earlier run in the same folder.")
@format_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def invariance(batch, from_dir, model_spec, max_new_tokens, out, padding_side, device, dtype, attn_implementation, seed, fps,
               save_tensors, max_tensor_bytes, rtol, atol, options, force, fmt, as_json, debug):
    """Record a batch (left- and right-padded) and each of its rows alone, and name, per row,
    the first module whose output for that row differs from the row alone beyond its dtype's
    tolerance.

    Exit status: 0 every row is invariant, 1 some row differs (or could not be compared, or the
    model raised), 2 bad input, 3 unreadable trace.
    """
    from vlmscope.trace import TraceError

    mode = resolve_format(fmt, as_json)
    opts = _options(options)
    sides = SIDES if padding_side == "both" else (padding_side,)
    try:
        if (batch is None) == (from_dir is None):
            raise UserError("give --batch ROWS.jsonl (record and compare) or --from DIR (compare again)")
        if from_dir is not None:
            folder = from_dir
        else:
            folder = _record(batch, model_spec, max_new_tokens, out, device=device, dtype=dtype,
                             attn_implementation=attn_implementation, seed=seed, fps=fps,
                             save_tensors=save_tensors, max_tensor_bytes=max_tensor_bytes, options=opts,
                             force=force, sides=sides)
        rep = compare_folder(folder, rtol=rtol, atol=atol, sides=sides)
    except UserError as e:
        if debug:
            raise
        fail(e, e.exit_code)
    except TraceError as e:
        if debug:
            raise
        fail(e, 3)
    except RecordingFailed as e:
        if debug:
            raise
        fail(e, 1)
    print_report(rep, mode)
    sys.exit(exit_code(rep))


def _record(batch: Path, model_spec: str | None, max_new_tokens: int, out: Path | None, *, device: str,
            dtype: str | None, attn_implementation: str | None, seed: int, fps: float | None,
            save_tensors: Sequence[str], max_tensor_bytes: int, options: dict, force: bool,
            sides: Sequence[str] = SIDES) -> Path:
    """Load the model, record the N+2 runs into the folder; returns the folder."""
    import vlmscope_models
    from rich.console import Console

    from vlmscope.recorder.inputs import read_rows

    rows = read_rows(batch)          # a bad file fails before the model is loaded
    if len(rows) < 2:
        raise UserError(f"{batch}: {len(rows)} row; a batch needs at least 2 rows to compare with each row alone")
    model_spec = model_spec or vlmscope_models.DEFAULT_MODEL
    folder = Path(out) if out is not None else _default_dir(model_spec)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"-o must be a folder: {folder} is a file")
    if folder.is_dir():
        check_outputs(folder, len(rows), sides, force)   # before the model is loaded
    import torch

    from vlmscope.recorder.loader import load_model

    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but CUDA is not available")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:   # pragma: no cover
        pass
    torch.manual_seed(seed)
    if model_spec in vlmscope_models.EMBEDDED_MODELS:
        options = {"seed": seed, **options}
    model, processor, minfo = load_model(model_spec, device=device, dtype=dtype,
                                         attn_implementation=attn_implementation, options=options)
    ctx = click.get_current_context(silent=True)
    argv = ctx.meta.get("vlmscope.argv") if ctx else None
    meta = {**minfo, "argv": argv or ["vlmscope", *sys.argv[1:]]}
    if attn_implementation:
        meta["attn_implementation"] = attn_implementation
    err = Console(stderr=True)
    total = len(rows) + len(sides)
    done = [0]

    def on_run(name: str) -> None:
        done[0] += 1
        if err.is_terminal:
            err.print(f"recorded {name} ({done[0]}/{total})", highlight=False)

    record_invariance(model, processor, rows, folder, max_new_tokens=max_new_tokens, seed=seed, fps=fps,
                      save_tensors=save_tensors, max_tensor_bytes=max_tensor_bytes, meta=meta, force=force,
                      on_run=on_run, sides=sides)
    return folder
