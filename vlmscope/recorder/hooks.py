"""The ``Recorder``: forward hooks on every module, the step lifecycle, and ``record()``.

A step opens with the first hooked call and closes when the root call returns; the hooks
fill a :class:`~vlmscope.recorder.buffer.StepBuffer` and :func:`~vlmscope.recorder.assemble.write_step`
writes it. Anything that goes wrong inside vlmscope's own hook code stops the recording,
never the model.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
import traceback as _tb
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from vlmscope import trace as T
from vlmscope.recorder.assemble import write_step
from vlmscope.recorder.buffer import NO_STATS, EventRow, StepBuffer, TensorRow
from vlmscope.recorder.probes import CACHE_ARG_NAMES, FLOAT_PROBE_NAMES, MASK_NAMES, Probes, is_cache_object
from vlmscope.recorder.reshapes import ReshapeCapture
from vlmscope.recorder.stats import PayloadBudget, dtype_name, queue_stats, queue_stats_sketch
from vlmscope.recorder.structure import analyse, config_json, module_rows, run_meta

DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024

# Our own torch calls inside hooks must not go through the reshape mode (cost, and noise).
_NO_TORCH_FUNCTION = torch._C.DisableTorchFunction


class Recorder:
    """Record every forward call of ``model`` into the trace ``out``.

    Use as a context manager around ``model.generate(...)`` or plain forward calls::

        with vlmscope.Recorder(model, out="traces/run.h5") as rec:
            model.generate(**inputs, max_new_tokens=8)
        rec.path  # the finished trace

    Several ``generate`` calls may share one recorder: each call's first step is a prefill
    (``kind`` 0). :meth:`begin_call` announces a call and what its batch rows are; without it
    the recorder detects a new call from the cache (see :meth:`begin_call`).

    Hooks are removed on exit, even after an exception, leaving the model as it was.
    The exception (if any) propagates after the trace is closed with status
    ``failed`` (a forward raised) or ``incomplete`` (KeyboardInterrupt).

    Until it is closed, the trace is a journal, ``out + ".partial"``: a process killed at any
    point leaves it with every finished step, and ``open_trace`` reads it. ``overwrite=False``
    refuses an existing ``out`` or ``.partial`` (``FileExistsError``); ``fsync=True`` forces
    each step to the disk. A write error (a full disk) stops the recording, the model runs on,
    and :class:`vlmscope.TraceWriteError` is raised on exit, naming the journal.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        out: str | os.PathLike,
        *,
        meta: dict | None = None,
        save_tensors: str | list[str] | None = None,
        max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
        reshapes: bool = True,
        stats: bool = True,
        sketches: bool = True,
        on_step: Callable[[int, "Recorder"], None] | None = None,
        image_token_id: int | None = None,
        overwrite: bool = True,
        fsync: bool = False,
    ):
        self.model = model
        self.out = Path(out)
        self.meta = dict(meta or {})
        if isinstance(save_tensors, str):
            save_tensors = [save_tensors]
        self.save_globs = list(save_tensors or [])
        self.max_tensor_bytes = int(max_tensor_bytes)
        self.record_reshapes = reshapes
        self.record_stats = stats
        self.record_sketches = sketches
        self.on_step = on_step
        self.overwrite = overwrite
        self.fsync = fsync
        self.path: Path | None = None
        self.status: str | None = None
        self.warnings: list[str] = []
        self.n_steps = 0
        self.n_events = 0
        self.error: dict | None = None
        self._paused = False
        self.broken: str | None = None  # set when a recorder bug stopped the recording
        self._step: StepBuffer | None = None
        self._stack: list[int] = []      # event indices (step-local) of running modules
        self._stack_mod: list[int] = []  # module ids of running modules
        self._handles: list[Any] = []
        self._mode: ReshapeCapture | None = None
        self._writer: T.TraceWriter | None = None
        self._probes: Probes | None = None
        self._error_stack: list[str] | None = None
        self._last_reshape: dict | None = None
        self._payloads = PayloadBudget(self.max_tensor_bytes, self.warnings)
        self._argnames: dict[Any, tuple[str, ...]] = {}
        self._dtype_ids: dict[torch.dtype, int] = {}
        self._device_ids: dict[torch.device, int] = {}
        self.model_info = analyse(model, image_token_id, self.save_globs)
        self._paths = self.model_info.paths
        s = self.model_info.structure
        self.decoder_layers, self.text_model = s.decoder_layers, s.text_model
        self.vision_model, self.merger = s.vision_model, s.merger
        self.image_token_id = self.model_info.image_token_id
        self.kv_heads, self.n_heads = self.model_info.kv_heads, self.model_info.n_heads
        self.calls: list[dict] = []     # one entry per generate call (run_json ``calls``)
        self._call_pending = False      # begin_call() was called: the next step is a prefill
        self._prev_cache = False        # the last written step had a cache

    def structure(self) -> dict:
        """The recognised structure, as stored in ``/meta``."""
        return self.model_info.meta()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Recorder":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stop(exc)
        return False

    def start(self) -> None:
        """Open the trace, attach the hooks and enter the reshape mode."""
        info = self.model_info
        w = self._writer = T.TraceWriter(self.out, meta=run_meta(self.model, self.meta, info),
                                         config_json=config_json(self.model), overwrite=self.overwrite,
                                         fsync=self.fsync)
        w.set_modules(module_rows(w, info))
        w.end_step()
        self._probes = Probes(w, info.paths, info.decoder_prefix, info.kv_heads)
        for i, (_, m) in enumerate(info.modules):
            self._handles.append(m.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._make_post(i), with_kwargs=True,
                                                         always_call=True))
        if self.record_reshapes:
            self._mode = ReshapeCapture(self)
            self._mode.__enter__()

    def stop(self, exc: BaseException | None = None) -> Path | None:
        """Remove the hooks and close the trace. Safe to call more than once."""
        try:
            if self._mode is not None:
                try:
                    self._mode.__exit__(None, None, None)
                finally:
                    self._mode = None
            for h in self._handles:
                h.remove()
            self._handles = []
        finally:
            if self._writer is not None and not self._writer.closed:
                self._finish(exc)
        return self.path

    def _finish(self, exc: BaseException | None) -> None:
        w = self._writer
        assert w is not None
        failed_step = self._step.index if self._step is not None else (
            self.n_steps - 1 if self._error_stack is not None else self.n_steps)
        if self._step is not None:
            if exc is None and not self._stack:
                # submodule calls made outside any root forward (e.g. only a vision tower was run)
                self._end_step(None)
            elif isinstance(exc, Exception):
                # the forward raised and the hooks could not close the step
                self._step.failed = True
                self._end_step(None)
            else:
                # interrupted (Ctrl-C) mid-step: keep only the finished steps
                self._step = None
        self._stack.clear()
        self._stack_mod.clear()
        if exc is None:
            status = T.STATUS_COMPLETE if self.broken is None else T.STATUS_INCOMPLETE
        elif isinstance(exc, Exception):
            status = T.STATUS_FAILED
            self.error = {"type": type(exc).__name__, "message": str(exc), "step": failed_step,
                          "module_stack": self._error_stack or [], "last_reshape": self._last_reshape}
            w.set_error(traceback="".join(_tb.format_exception(type(exc), exc, exc.__traceback__)),
                        **self.error)
        else:
            status = T.STATUS_INCOMPLETE
        if self.warnings:
            w.update_meta(warnings=self.warnings)
        self.status = status
        try:
            self.path = w.close(status)
        except T.TraceWriteError:
            # the disk is full (or the like): the journal keeps every committed step
            self.status, self.path = T.STATUS_INCOMPLETE, w.partial_path
            raise

    def begin_call(self, **info: Any) -> None:
        """Say that a new ``generate`` call starts: the next step is its prefill.

        ``info`` describes the call (the shared schema: ``batch_size``, ``padding_side``, and
        ``rows``, one ``{"prompt", "images", "video", "messages"}`` dict per batch row); it is
        stored as ``{"call": i, "first_step": s, **info}`` in run_json ``calls`` (and, for the
        first call, as run_json ``batch``). Without ``begin_call`` the recorder still detects
        each call's prefill (step 0, an empty cache, or no cache after a step that had one) and
        lists the calls it found, their rows unknown.
        """
        self._call_pending = True
        first = self._step.index if self._step is not None else self.n_steps
        if self.calls and self.calls[-1]["first_step"] == first:
            # a second begin_call before any step of the first one: the later description wins
            self.calls.pop()
        entry = {"call": len(self.calls), "first_step": first, **info}
        self.calls.append(entry)
        self._write_calls()

    def _write_calls(self) -> None:
        fields: dict[str, Any] = {"calls": self.calls}
        first = self.calls[0] if self.calls else None
        if first is not None and first.get("rows") is not None:
            fields["batch"] = {"rows": first["rows"], "padding_side": first.get("padding_side")}
        self.add_meta(**fields)

    def _step_kind(self, st: StepBuffer) -> int:
        """Prefill (the first step of a generate call) or decode, and the call list kept up to date."""
        has_cache = st.cache_before >= 0 or st.cache_after >= 0
        prefill = (st.index == 0 or self._call_pending or st.cache_before == 0
                   or (not has_cache and self._prev_cache))
        self._prev_cache = has_cache
        if not prefill:
            return T.KIND_DECODE
        announced = self._call_pending and bool(self.calls) and self.calls[-1]["first_step"] >= st.index
        self._call_pending = False
        if announced:
            entry = self.calls[-1]
            entry["first_step"] = st.index
        else:  # detected: the rows are unknown
            entry = {"call": len(self.calls), "first_step": st.index, "batch_size": None, "padding_side": None,
                     "rows": None, "detected": True}
            self.calls.append(entry)
        if entry.get("batch_size") is None and st.batch_size >= 0:
            entry["batch_size"] = st.batch_size
        if entry.get("detected") and entry.get("padding_side") is None:
            entry["padding_side"] = st.padding_side
        self._write_calls()
        return T.KIND_PREFILL

    def add_meta(self, **fields: Any) -> None:
        """Add run metadata (e.g. the generated text) before the trace is closed."""
        if self._writer is not None and not self._writer.closed:
            self._writer.update_meta(**fields)
        else:
            self.meta.update(fields)

    # ------------------------------------------------------------------ hooks
    def _argnames_of(self, module: torch.nn.Module) -> tuple[str, ...]:
        fwd = type(module).forward
        names = self._argnames.get(fwd)
        if names is None:
            try:
                params = list(inspect.signature(fwd).parameters.values())[1:]
                names = tuple(p.name for p in params
                              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
            except (TypeError, ValueError):
                names = ()
            self._argnames[fwd] = names
        return names

    def _make_pre(self, mod_id: int):
        def pre(module, args, kwargs):
            if self._paused:
                return None
            self._paused = True
            try:
                with _NO_TORCH_FUNCTION():
                    self._pre(mod_id, module, args, kwargs)
            except Exception as e:  # noqa: BLE001 - a recorder bug must never break the model
                self._internal_error(e)
            finally:
                self._paused = self.broken is not None
            return None
        return pre

    def _make_post(self, mod_id: int):
        def post(module, args, kwargs, output):
            if self._paused or not self._stack_mod or self._stack_mod[-1] != mod_id:
                return None
            self._paused = True
            try:
                with _NO_TORCH_FUNCTION():
                    self._post(mod_id, module, args, kwargs, output)
            except Exception as e:  # noqa: BLE001 - a recorder bug must never break the model
                self._internal_error(e)
            finally:
                self._paused = self.broken is not None
            return None
        return post

    def _internal_error(self, e: Exception) -> None:
        """Stop recording (the model runs on untouched); the trace keeps its finished steps."""
        step = self._step.index if self._step is not None else self.n_steps
        self.broken = (f"vlmscope stopped recording at step {step} after an internal error "
                       f"({type(e).__name__}: {e}); please report it. The model ran on unaffected.")
        self.warnings.append(self.broken)
        self.warnings.append("".join(_tb.format_exception(type(e), e, e.__traceback__))[-4000:])
        self._step = None
        self._stack.clear()
        self._stack_mod.clear()
        self._paused = True   # for good: hooks and reshape capture pass everything through from now on

    def _pre(self, mod_id: int, module, args, kwargs) -> None:
        if self._step is None:
            # A step opens with the first hooked call. Submodules called outside the root
            # (generate() runs the vision tower before the prefill forward) join the next step.
            if self._stack:
                return
            self._begin_step()
        st = self._step
        ev = len(st.events)
        nth = st.nth.get(mod_id, 0)
        st.nth[mod_id] = nth + 1
        if mod_id == 0 and not self._stack:
            st.root_ev = ev
        # EventRow(seq, module, nth, depth, parent, t0, pending)
        st.events.append(EventRow(st.seq, mod_id, nth, len(self._stack), self._stack[-1] if self._stack else -1,
                                  time.perf_counter(), []))
        st.seq += 1
        self._stack.append(ev)
        self._stack_mod.append(mod_id)
        names = self._argnames_of(module)
        for i, a in enumerate(args):
            self._value(st, ev, T.ROLE_INPUT, names[i] if i < len(names) else f"args[{i}]", a, mod_id)
        for name, a in kwargs.items():
            self._value(st, ev, T.ROLE_KWARG, name, a, mod_id)
        info = self.model_info
        if mod_id == info.text_model_id and st.text_ev < 0:
            st.text_ev = ev
            emb = kwargs.get("inputs_embeds")
            if emb is None and "inputs_embeds" in names[:len(args)]:
                emb = args[names.index("inputs_embeds")]
            if isinstance(emb, Tensor):
                st.embeds_seen = True
                self._probes.token_norms(st, ev, mod_id, "inputs_embeds", emb)
        if mod_id == info.layer0_id and (st.first_layer_q < 0 or not st.embeds_seen):
            hs = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hs, Tensor) and hs.dim() >= 2:
                if st.first_layer_q < 0:
                    st.first_layer_q = int(hs.shape[-2])
                if not st.embeds_seen:
                    # the text model embedded input_ids itself: its first layer's input is the embeddings
                    st.embeds_seen = True
                    if st.text_ev >= 0:
                        self._probes.token_norms(st, st.text_ev, info.text_model_id, "inputs_embeds", hs)
                    else:
                        self._probes.token_norms(st, ev, mod_id, "inputs_embeds", hs)
        if mod_id == info.rope_owner_id:
            st.owner_ev = ev
        if mod_id == 0 and len(self._stack) == 1:
            self._probes.root_inputs(st, args, kwargs, names)
        if mod_id in info.rotary_ids:
            self._probes.rotary(st, ev, mod_id, args, kwargs, names)

    def _post(self, mod_id: int, module, args, kwargs, output) -> None:
        st = self._step
        if st is None:
            return
        exc = sys.exc_info()[1]
        ev = self._stack[-1]
        row = st.events[ev]
        if exc is not None:
            row.status = 1
            if self._error_stack is None:
                self._error_stack = [self._paths[m] for m in self._stack_mod]
        else:
            self._value(st, ev, T.ROLE_OUTPUT, "out", output, mod_id)
            if mod_id == self.model_info.merger_id:
                self._probes.merger(st, ev, mod_id, output)
            elif mod_id == self.model_info.vision_model_id:
                self._probes.vision_output(st, ev, mod_id, output)
        st.flush_tensors(row)
        row.end_seq = st.seq
        row.dur_us = (time.perf_counter() - row.t0) * 1e6
        self._stack.pop()
        self._stack_mod.pop()
        if not self._stack:
            if exc is not None:
                st.failed = True
            if mod_id == 0 or exc is not None:
                self._probes.root_outputs(st, output if exc is None else None)
                owner = self.model_info.rope_owner_id
                if owner >= 0:
                    self._probes.rope_state(st, owner, self.model_info.modules[owner][1])
                self._end_step(output)

    # ------------------------------------------------------------------ values
    def _value(self, st: StepBuffer, ev: int, role: int, name: str, v: Any, mod_id: int) -> None:
        """Record tensors inside ``v`` (recursively) and the probes its name calls for."""
        if v is None:
            return
        if isinstance(v, Tensor):
            if role != T.ROLE_OUTPUT:
                self._probes.tensor(st, ev, mod_id, name, v)
            self._tensor(st, ev, role, name, v, mod_id)
            return
        if (role != T.ROLE_OUTPUT and name in CACHE_ARG_NAMES) or is_cache_object(v):
            self._probes.cache(st, ev, mod_id, name, v)
            return
        if isinstance(v, dict):  # includes ModelOutput
            for k, x in v.items():
                if x is None:
                    continue
                if k in CACHE_ARG_NAMES or is_cache_object(x):
                    self._probes.cache(st, ev, mod_id, f"{name}.{k}", x)
                elif role != T.ROLE_OUTPUT and name in MASK_NAMES and isinstance(x, Tensor):
                    self._probes.tensor(st, ev, mod_id, name, x, label=f"{name}[{k}]")
                    self._tensor(st, ev, role, f"{name}[{k}]", x, mod_id)
                else:
                    self._value(st, ev, role, f"{name}.{k}" if role == T.ROLE_OUTPUT else f"{name}[{k}]", x, mod_id)
            return
        if isinstance(v, (tuple, list)):
            if role != T.ROLE_OUTPUT and name in FLOAT_PROBE_NAMES and self._probes.float_list(st, ev, mod_id, name, v):
                return
            for i, x in enumerate(v):
                if x is not None:
                    self._value(st, ev, role, f"{name}[{i}]", x, mod_id)

    def _tensor(self, st: StepBuffer, ev: int, role: int, name: str, t: Tensor, mod_id: int) -> None:
        w = self._writer
        # value sketches of floating tensors, masks excepted (rows of -inf say nothing per token);
        # with them, the stats of a float tensor come mostly from the sketch's own matmul
        if self.record_sketches and t.is_floating_point() and name.partition("[")[0] not in MASK_NAMES:
            per_sample = mod_id in self.model_info.channel_first_ids and t.dim() > 2 and t.shape[0] > 0
            slot, sketch = queue_stats_sketch(st, t, self.record_stats, t.numel() // t.shape[0] if per_sample else 0)
        else:
            slot, sketch = (queue_stats(st, t) if self.record_stats else NO_STATS), -1
        payload = -1
        if role == T.ROLE_OUTPUT and mod_id in self.model_info.save_ids:
            payload = self._payloads.request(st, t, self._paths[mod_id], name)
        name_id = w.intern(name)
        # string ids of dtypes and devices by object: str(t.device) alone costs more than the row
        dtype_id = self._dtype_ids.get(t.dtype)
        if dtype_id is None:
            dtype_id = self._dtype_ids[t.dtype] = w.intern(dtype_name(t.dtype))
        device_id = self._device_ids.get(t.device)
        if device_id is None:
            device_id = self._device_ids[t.device] = w.intern(str(t.device))
        # TensorRow(event, role, name, ndim, shape, dtype, device, numel, stats, payload)
        st.events[ev].pending.append(TensorRow(ev, role, name_id, t.dim(), tuple(t.shape), dtype_id, device_id,
                                               t.numel(), slot, payload, sketch))

    # ------------------------------------------------------------------ steps
    def _begin_step(self) -> None:
        self._step = StepBuffer(self.n_steps)
        self._error_stack = None if self.error is None else self._error_stack

    def _end_step(self, output: Any) -> None:
        """Write the finished step (``output``: the root's, unused; kept for callers that wrap this)."""
        st = self._step
        w = self._writer
        self._step = None
        if st is None or w is None:
            return
        self.n_events += write_step(w, st, self.model_info, self._step_kind)
        self.n_steps += 1
        if self.on_step is not None:
            self.on_step(st.index, self)


def record(model: torch.nn.Module, processor: Any = None, *, image: Any = None, prompt: str = "",
           rows: list | None = None, calls: list | None = None, padding_side: str = "left",
           fps: float | None = None, out: str | os.PathLike = "traces/trace.h5", max_new_tokens: int = 8,
           **recorder_kwargs: Any) -> Path:
    """Prepare inputs with ``processor``, run ``model.generate`` under a :class:`Recorder`.

    The inputs are one of:

    - ``prompt`` and ``image`` (a path or a PIL image, or None for text-only): one row;
    - ``rows=[...]``: one batched ``generate`` call, one row dict each:
      ``{"prompt": str, "images": [path or PIL image, ...], "video": path}`` or
      ``{"messages": [...]}`` (a chat in the processor's format, image and video items naming
      their files: ``{"type": "image", "path": ...}``), padded on ``padding_side``;
    - ``calls=[rows1, rows2, ...]``: several ``generate`` calls in order, in one trace (each
      begins with its own prefill step).

    ``fps`` is the frame rate the video processor samples videos at (every frame when None).
    Returns the trace path.
    """
    from vlmscope.errors import UserError
    from vlmscope.recorder.inputs import as_rows, build_batch_inputs, build_inputs, generate_calls

    if rows is not None and calls is not None:
        raise UserError("give rows= (one call) or calls= (several), not both")
    if (rows is not None or calls is not None) and (prompt or image is not None):
        raise UserError("give prompt=/image= or rows=/calls=, not both")
    if calls is not None:
        if not isinstance(calls, (list, tuple)) or not calls:
            raise UserError("calls must be a non-empty list of row lists")
        prepared = [build_batch_inputs(model, processor, as_rows(c, f"calls[{i}]"), padding_side=padding_side,
                                       fps=fps) for i, c in enumerate(calls)]
    elif rows is not None:
        prepared = [build_batch_inputs(model, processor, rows, padding_side=padding_side, fps=fps)]
    else:
        inputs, info = build_inputs(model, processor, prompt=prompt, image=image)
        row = {"prompt": prompt, "images": [info["image"].get("path")] if "image" in info else [], "video": None,
               "messages": False, "media": [{"kind": "image", **info["image"]}] if "image" in info else []}
        prepared = [(inputs, {**info, "rows": [row], "padding_side": padding_side, "batch_size": 1})]
    first = prepared[0][1]
    meta = dict(recorder_kwargs.pop("meta", {}) or {})
    meta.update({k: first[k] for k in ("prompt", "image") if k in first})
    meta.setdefault("prompt", prompt)
    meta.setdefault("generation", {"max_new_tokens": max_new_tokens, "do_sample": False})
    with Recorder(model, out, meta=meta, **recorder_kwargs) as rec:
        generate_calls(rec, model, processor, prepared, max_new_tokens=max_new_tokens)
    return rec.path
