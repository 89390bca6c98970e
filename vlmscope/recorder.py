"""Record a model's forward passes into a vlmscope trace.

``Recorder`` attaches forward pre/post hooks to every module and enters a
``TorchFunctionMode`` that logs shape-changing ops with their call sites. Each
top-level forward call of the model is a *step*. Tensor stats and probe values are
computed on the tensor's device, kept there, and copied to the host once per step
(one ``torch.cat`` of byte views, one ``.cpu()``), so recording adds no host
synchronisation inside the forward.

The hot path is written for speed: per-class caches for argument names, per-code
caches for call sites, a per-step identity cache so a tensor passed from one module
to the next gets its stats computed once.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import math
import os
import sys
import time
import traceback as _tb
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from vlmscope import trace as T

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_VLMSCOPE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

CACHE_ARG_NAMES = ("past_key_values", "past_key_value", "layer_past", "cache", "layer_pasts")
INT_PROBE_NAMES = ("position_ids", "cache_position", "rope_deltas", "image_grid_thw", "video_grid_thw",
                   "grid_thw", "mm_token_type_ids", "token_type_ids", "input_ids")
# argument names that are recorded under another probe kind
PROBE_KIND = {"video_grid_thw": "image_grid_thw", "grid_thw": "image_grid_thw"}
MASK_NAMES = ("attention_mask", "causal_mask", "encoder_attention_mask")

DEFAULT_MAX_TENSOR_BYTES = 256 * 1024 * 1024

# Our own torch calls inside hooks must not go through the reshape mode (cost, and noise).
_NO_TORCH_FUNCTION = torch._C.DisableTorchFunction


def _reshape_ops() -> dict[Any, str]:
    """The shape-changing torch callables we log, mapped to their op names."""
    ops: dict[Any, str] = {}
    tensor_methods = [
        "view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
        "permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "expand",
        "expand_as", "repeat", "repeat_interleave", "split", "split_with_sizes", "tensor_split",
        "chunk", "unbind", "narrow", "masked_scatter", "index_select", "unfold",
    ]
    for name in tensor_methods:
        m = getattr(Tensor, name, None)
        if m is not None:
            ops[m] = name
    torch_funcs = [
        "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "chunk", "tensor_split",
        "unbind", "narrow", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
        "transpose", "movedim", "swapaxes", "repeat_interleave", "masked_scatter", "index_select",
        "broadcast_to",
    ]
    for name in torch_funcs:
        f = getattr(torch, name, None)
        if f is not None:
            ops[f] = "cat" if name in ("concat", "concatenate") else name
    ops[torch.nn.functional.pad] = "pad"
    return ops


RESHAPE_OPS = _reshape_ops()

_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dt: torch.dtype) -> str:
    n = _DTYPE_NAMES.get(dt)
    if n is None:
        n = str(dt).replace("torch.", "")
        _DTYPE_NAMES[dt] = n
    return n


def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _fmt_arg(a: Any) -> str:
    if isinstance(a, torch.Size):
        return _fmt_shape(a)
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, Tensor):
        return "tensor" + _fmt_shape(a.shape)
    if isinstance(a, torch.dtype):
        return dtype_name(a)
    return repr(a) if not isinstance(a, str) else repr(a)


def _version_of(t: Tensor) -> int:
    """In-place version counter (inference tensors have none: they cannot be modified in place
    outside inference mode, and inside it vlmscope keys on identity alone)."""
    if t.is_inference():
        return -1
    try:
        return t._version
    except RuntimeError:
        return -1


def _is_quantized_triple(x: Any) -> bool:
    """Qwen-1's quantized cache tensor: ``(uint8 data, scale, zero)``."""
    return (isinstance(x, (tuple, list)) and len(x) == 3 and all(isinstance(t, Tensor) for t in x)
            and not x[0].is_floating_point())


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    return name.strip("_") if name.startswith("__") else name


def _has_tensor_index(idx: Any) -> bool:
    if isinstance(idx, Tensor):
        return True
    return isinstance(idx, tuple) and any(isinstance(i, Tensor) for i in idx)


_GETITEM = Tensor.__getitem__


def _is_cache_object(obj: Any) -> bool:
    return hasattr(obj, "get_seq_length") or (hasattr(obj, "layers") and hasattr(obj, "update"))


class _Step:
    """Per-step buffers (host lists plus device tensors awaiting the one copy)."""

    __slots__ = ("index", "events", "tensors", "reshapes", "probes", "device_chunks", "device_bytes",
                 "stat_slots", "probe_cache", "nth", "seq", "t0", "input_len", "cache_before",
                 "cache_after", "failed", "payload_reqs", "first_layer_q", "mask_probe", "pos_probe",
                 "image_tokens", "op_nth", "stat_dedupe", "root_ev")

    def __init__(self, index: int):
        self.index = index
        self.events: list[list] = []
        self.tensors: list[list] = []
        self.reshapes: list[list] = []
        self.probes: list[list] = []
        self.device_chunks: list[Tensor] = []
        self.device_bytes = 0
        self.stat_slots = 0
        self.probe_cache: dict[tuple, tuple[int, int, Any]] = {}
        self.stat_dedupe: dict[tuple, tuple[Any, int]] = {}
        self.nth: dict[int, int] = {}
        self.op_nth: dict[tuple[int, int], int] = {}
        self.seq = 0
        self.t0 = time.perf_counter()
        self.input_len = -1
        self.cache_before = -1
        self.cache_after = -1
        self.failed = False
        self.payload_reqs: list[tuple] = []
        self.first_layer_q = -1
        self.mask_probe: tuple | None = None
        self.pos_probe: tuple | None = None
        self.image_tokens = -1
        self.root_ev = -1


class _ReshapeMode(TorchFunctionMode):
    def __init__(self, rec: "Recorder"):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        rec = self.rec
        op = RESHAPE_OPS.get(func)
        if rec._paused or rec._step is None:
            return func(*args, **kwargs)
        if op is None:
            if func is _GETITEM and len(args) > 1 and _has_tensor_index(args[1]):
                op = "index"  # advanced (tensor / boolean-mask) indexing changes shapes
            else:
                try:
                    return func(*args, **kwargs)
                except Exception:
                    # Any other torch op that raises (a broadcasting add, a matmul) gets a row
                    # with status 1, so the trace names the op that failed and its inputs.
                    rec._reshape_begin(_op_name(func), args, kwargs)
                    raise
        row = rec._reshape_begin(op, args, kwargs)
        out = func(*args, **kwargs)  # if this raises, the row stays marked as raised
        rec._reshape_end(row, out)
        return out


class Recorder:
    """Record every forward call of ``model`` into the trace ``out``.

    Use as a context manager around ``model.generate(...)`` or plain forward calls::

        with vlmscope.Recorder(model, out="traces/run.h5") as rec:
            model.generate(**inputs, max_new_tokens=8)
        rec.path  # the finished trace

    Hooks are removed on exit, even after an exception, leaving the model as it was.
    The exception (if any) propagates after the trace is closed with status
    ``failed`` (a forward raised) or ``incomplete`` (KeyboardInterrupt).
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
        on_step: Callable[[int, "Recorder"], None] | None = None,
        image_token_id: int | None = None,
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
        self.on_step = on_step
        self.path: Path | None = None
        self.status: str | None = None
        self.warnings: list[str] = []
        self.n_steps = 0
        self.n_events = 0
        self.error: dict | None = None
        self.image_token_id = image_token_id
        self._paused = False
        self.broken: str | None = None  # set when a recorder bug stopped the recording
        self._step: _Step | None = None
        self._stack: list[int] = []      # event indices (step-local) of running modules
        self._stack_mod: list[int] = []  # module ids of running modules
        self._handles: list[Any] = []
        self._mode: _ReshapeMode | None = None
        self._writer: T.TraceWriter | None = None
        self._error_stack: list[str] | None = None
        self._last_reshape: dict | None = None
        self._payload_bytes = 0
        self._payload_capped = False
        self._argnames: dict[Any, tuple[str, ...]] = {}
        self._internal_code: dict[Any, bool] = {}
        self._site_cache: dict[tuple, tuple[int, int, int, str]] = {}
        self._layout_hint: str | None = None
        self._zeros: dict[Any, Tensor] = {}
        self._analyse_structure()

    # ------------------------------------------------------------------ structure
    def _analyse_structure(self) -> None:
        model = self.model
        self._modules: list[tuple[str, torch.nn.Module]] = list(model.named_modules(remove_duplicate=True))
        self._mod_index = {id(m): i for i, (_, m) in enumerate(self._modules)}
        paths = [p for p, _ in self._modules]
        self._paths = paths
        cfg = getattr(model, "config", None)
        text_cfg = getattr(cfg, "text_config", None) or cfg
        get = lambda c, k: getattr(c, k, None) if c is not None else None  # noqa: E731
        self.kv_heads = get(text_cfg, "num_key_value_heads") or get(text_cfg, "num_attention_heads")
        self.n_heads = get(text_cfg, "num_attention_heads")
        if self.image_token_id is None:
            self.image_token_id = get(cfg, "image_token_id") or get(cfg, "image_token_index")

        def visionish(p: str) -> bool:
            return any(k in p for k in ("visual", "vision", "vit", "image_encoder", "clip"))

        best = None
        for p, m in self._modules:
            if isinstance(m, torch.nn.ModuleList) and not visionish(p) and len(m) > 0:
                if best is None or len(m) > best[1]:
                    best = (p, len(m))
        self.decoder_layers = best[0] if best else None
        self.text_model = self.decoder_layers.rpartition(".")[0] if self.decoder_layers else None
        vision = [p for p in paths if p and visionish(p.rsplit(".", 1)[-1]) or p.endswith("visual")]
        self.vision_model = min(vision, key=lambda p: p.count(".")) if vision else None
        merger = [p for p in paths if p.rsplit(".", 1)[-1] in
                  ("merger", "projector", "mm_projector", "multi_modal_projector", "visual_projection",
                   "vision_proj", "img_projection")]
        self.merger = min(merger, key=lambda p: p.count(".")) if merger else None
        self._layer0 = self.decoder_layers + ".0" if self.decoder_layers else None
        self._layer0_id = paths.index(self._layer0) if self._layer0 in paths else -1
        self._merger_id = paths.index(self.merger) if self.merger in paths else -1
        self._text_model_id = paths.index(self.text_model) if self.text_model in paths else -1
        self._decoder_prefix = (self.decoder_layers + ".") if self.decoder_layers else None
        self._rotary_ids = {i for i, (_, m) in enumerate(self._modules) if "rotary" in type(m).__name__.lower()}
        self._save_ids = {i for i, p in enumerate(paths)
                          if any(fnmatch.fnmatchcase(p, g) for g in self.save_globs)}

    def structure(self) -> dict:
        return {
            "decoder_layers": self.decoder_layers, "text_model": self.text_model,
            "vision_model": self.vision_model, "merger": self.merger,
            "image_token_id": self.image_token_id, "num_key_value_heads": self.kv_heads,
            "num_attention_heads": self.n_heads,
        }

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Recorder":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stop(exc)
        return False

    def start(self) -> None:
        meta = dict(self.meta)
        meta.update(self.structure())
        meta.setdefault("vlmscope", _version())
        meta.setdefault("torch", torch.__version__)
        try:
            import transformers
            meta.setdefault("transformers", transformers.__version__)
        except Exception:  # noqa: BLE001
            meta.setdefault("transformers", None)
        meta.setdefault("model_class", type(self.model).__name__)
        cfg0 = getattr(self.model, "config", None)
        if meta.get("family") is None:
            meta["family"] = getattr(cfg0, "model_type", None)
        if meta.get("model") is None:
            meta["model"] = getattr(cfg0, "_name_or_path", None) or getattr(self.model, "name_or_path", None) \
                or type(self.model).__name__
        p = next(iter(self.model.parameters()), None)
        if p is not None:
            meta.setdefault("device", str(p.device))
            meta.setdefault("dtype", dtype_name(p.dtype))
        cfg = getattr(self.model, "config", None)
        meta.setdefault("attn_implementation", getattr(cfg, "_attn_implementation", None))
        meta.setdefault("argv", list(sys.argv))
        config_json = "{}"
        if cfg is not None:
            try:
                config_json = cfg.to_json_string() if hasattr(cfg, "to_json_string") else json.dumps(
                    cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg), default=str)
            except Exception:  # noqa: BLE001
                config_json = json.dumps({"repr": repr(cfg)})
        self._writer = T.TraceWriter(self.out, meta=meta, config_json=config_json)
        w = self._writer
        rows = np.zeros(len(self._modules), T.MODULE_DTYPE)
        parent_of = {p: i for i, p in enumerate(self._paths)}
        for i, (p, m) in enumerate(self._modules):
            rows[i] = (w.intern(p), w.intern(type(m).__name__), 0 if not p else p.count(".") + 1,
                       parent_of.get(p.rpartition(".")[0], -1) if p else -1)
        w.set_modules(rows)
        w.end_step()
        for i, (_, m) in enumerate(self._modules):
            self._handles.append(m.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._make_post(i), with_kwargs=True,
                                                         always_call=True))
        if self.record_reshapes:
            self._mode = _ReshapeMode(self)
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
            self.error = {
                "type": type(exc).__name__,
                "message": str(exc),
                "step": failed_step,
                "module_stack": self._error_stack or [],
                "last_reshape": self._last_reshape,
            }
            w.set_error(traceback="".join(_tb.format_exception(type(exc), exc, exc.__traceback__)),
                        **self.error)
        else:
            status = T.STATUS_INCOMPLETE
        if self.warnings:
            w.update_meta(warnings=self.warnings)
        self.status = status
        self.path = w.close(status)

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

    def _pre(self, mod_id: int, module, args, kwargs) -> None:
        if self._step is None:
            # A step opens with the first hooked call. Submodules called outside the root
            # (generate() runs the vision tower before the prefill forward) join the next step.
            if self._stack:
                return
            self._begin_step()
        st = self._step
        assert st is not None
        ev = len(st.events)
        nth = st.nth.get(mod_id, 0)
        st.nth[mod_id] = nth + 1
        parent = self._stack[-1] if self._stack else -1
        seq = st.seq
        st.seq += 1
        # [seq, end_seq, module, nth, depth, parent, tensor_start, tensor_count, status, t0, pending tensors]
        row = [seq, -1, mod_id, nth, len(self._stack), parent, 0, 0, 0, time.perf_counter(), []]
        if mod_id == 0 and not self._stack:
            st.root_ev = ev
        st.events.append(row)
        self._stack.append(ev)
        self._stack_mod.append(mod_id)
        names = self._argnames_of(module)
        for i, a in enumerate(args):
            name = names[i] if i < len(names) else f"args[{i}]"
            self._value(ev, T.ROLE_INPUT, name, a, mod_id)
        for name, a in kwargs.items():
            self._value(ev, T.ROLE_KWARG, name, a, mod_id)
        if mod_id == self._layer0_id and st.first_layer_q < 0:
            hs = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hs, Tensor) and hs.dim() >= 2:
                st.first_layer_q = int(hs.shape[-2])
        if mod_id == 0 and len(self._stack) == 1:
            self._root_inputs(module, args, kwargs, names)
        if mod_id in self._rotary_ids:
            self._rotary_probe(ev, mod_id, args, kwargs, names)

    def _post(self, mod_id: int, module, args, kwargs, output) -> None:
        st = self._step
        if st is None:
            return
        exc = sys.exc_info()[1]
        ev = self._stack[-1]
        row = st.events[ev]
        if exc is not None:
            row[8] = 1
            if self._error_stack is None:
                self._error_stack = [self._paths[m] for m in self._stack_mod]
        else:
            self._value(ev, T.ROLE_OUTPUT, "out", output, mod_id)
            if mod_id == self._merger_id:
                self._merger_probe(ev, mod_id, output)
        self._flush_tensors(row)
        row[1] = st.seq
        row[9] = (time.perf_counter() - row[9]) * 1e6
        self._stack.pop()
        self._stack_mod.pop()
        if not self._stack:
            if exc is not None:
                st.failed = True
            if mod_id == 0 or exc is not None:
                self._root_outputs(module, kwargs, output if exc is None else None)
                self._end_step(output)

    def _flush_tensors(self, row: list) -> None:
        """Move a call's tensor rows (inputs, kwargs, outputs) into the step, contiguously."""
        st = self._step
        row[6] = len(st.tensors)
        row[7] = len(row[10])
        st.tensors.extend(row[10])
        row[10] = []

    # ------------------------------------------------------------------ values
    def _value(self, ev: int, role: int, name: str, v: Any, mod_id: int) -> None:
        """Record tensors inside ``v`` (recursively) and the probes its name calls for."""
        if v is None:
            return
        if isinstance(v, Tensor):
            if role != T.ROLE_OUTPUT:
                self._probe_for(ev, mod_id, name, v)
            self._tensor(ev, role, name, v, mod_id)
            return
        if role != T.ROLE_OUTPUT and name in CACHE_ARG_NAMES:
            self._cache_probe(ev, mod_id, name, v)
            return
        if _is_cache_object(v):
            self._cache_probe(ev, mod_id, name, v)
            return
        if isinstance(v, dict):  # includes ModelOutput
            for k, x in v.items():
                if x is None:
                    continue
                if k in CACHE_ARG_NAMES or _is_cache_object(x):
                    self._cache_probe(ev, mod_id, f"{name}.{k}", x)
                elif role != T.ROLE_OUTPUT and name in MASK_NAMES and isinstance(x, Tensor):
                    self._probe_for(ev, mod_id, name, x, label=f"{name}[{k}]")
                    self._tensor(ev, role, f"{name}[{k}]", x, mod_id)
                else:
                    self._value(ev, role, f"{name}.{k}" if role == T.ROLE_OUTPUT else f"{name}[{k}]", x, mod_id)
            return
        if isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                if x is not None:
                    self._value(ev, role, f"{name}[{i}]", x, mod_id)

    def _tensor(self, ev: int, role: int, name: str, t: Tensor, mod_id: int) -> None:
        st = self._step
        w = self._writer
        slot = self._stats(t) if self.record_stats else (-1, 0)
        payload = -1
        if role == T.ROLE_OUTPUT and mod_id in self._save_ids:
            payload = self._request_payload(t, mod_id, name)
        st.events[ev][10].append((ev, role, w.intern(name), t.dim(), tuple(t.shape), w.intern(dtype_name(t.dtype)),
                           w.intern(str(t.device)), t.numel(), slot, payload))

    def _stats(self, t: Tensor) -> tuple[int, int]:
        """Queue min, max, sum, L2 norm (and NaN/Inf counts) of ``t`` on its device.

        Returns (byte offset, number of float64 values) of the stat slot in the step's device
        blob, or (-1, 0). Mean and std are derived on the host at the end of the step (std
        from the sum of squares, one fast pass; approximate only when std << |mean|).
        NaN/Inf counts cost several passes, so they are computed only when they can be
        non-zero: on CUDA always (cheap there, and we must not sync to decide), on CPU only
        when min or max is not finite (a CPU tensor's value is already on the host).
        """
        st = self._step
        key = (id(t), _version_of(t))
        hit = st.stat_dedupe.get(key)
        if hit is not None and hit[0]() is t:
            return hit[1]
        if t.numel() == 0 or t.is_complex() or t.layout != torch.strided or t.is_meta:
            return (-1, 0)
        x = t.detach()
        if x.dtype == torch.bool:
            x = x.view(torch.uint8)
        mn, mx = torch.aminmax(x)
        counts = False
        if x.is_floating_point():
            acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
            total = x.sum(dtype=acc)
            norm = torch.linalg.vector_norm(x, dtype=acc)
            counts = x.device.type != "cpu" or not (math.isfinite(mn) and math.isfinite(mx))
        else:
            xd = x.to(torch.float64)
            total = xd.sum()
            norm = torch.linalg.vector_norm(xd)
            mn, mx = mn.to(torch.float64), mx.to(torch.float64)
        if counts:
            parts = [mn, mx, total, norm, torch.isnan(x).sum(), torch.isinf(x).sum()]
            vec = torch.stack([p.to(torch.float64) for p in parts])
        else:
            vec = torch.stack([mn, mx, total, norm])
            if vec.dtype != torch.float64:
                vec = vec.to(torch.float64)
        slot = (st.device_bytes, 6 if counts else 4)
        st.device_chunks.append(vec.view(torch.uint8))
        st.device_bytes += 8 * slot[1]
        try:
            st.stat_dedupe[key] = (weakref.ref(t), slot)
        except TypeError:
            pass
        return slot

    def _zero(self, device: torch.device) -> Tensor:
        z = self._zeros.get(device)
        if z is None:
            z = self._zeros[device] = torch.zeros((), dtype=torch.float64, device=device)
        return z

    def _queue_bytes(self, t: Tensor) -> tuple[int, int]:
        """Queue a device tensor for the end-of-step copy; returns (byte offset, length)."""
        st = self._step
        t = t.contiguous().reshape(-1)
        b = t.view(torch.uint8) if t.dtype != torch.uint8 else t
        off = st.device_bytes
        st.device_chunks.append(b)
        n = t.numel() * t.element_size()
        pad = -n % 8  # keep every slot 8-byte aligned: stats are read back as float64
        if pad:
            st.device_chunks.append(torch.zeros(pad, dtype=torch.uint8, device=b.device))
        st.device_bytes += n + pad
        return off, n

    def _request_payload(self, t: Tensor, mod_id: int, name: str) -> int:
        nbytes = t.numel() * (4 if t.dtype in (torch.bfloat16, torch.float16) else t.element_size())
        if self._payload_bytes + nbytes > self.max_tensor_bytes:
            if not self._payload_capped:
                self._payload_capped = True
                self.warnings.append(
                    f"--max-tensor-bytes {self.max_tensor_bytes} reached at step {self._step.index} "
                    f"({self._paths[mod_id]} {name}); later tensors keep stats only")
            return -1
        self._payload_bytes += nbytes
        x = t.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        elif x.dtype == torch.bool:
            x = x.to(torch.uint8)
        else:
            x = x.clone()
        off, n = self._queue_bytes(x)
        st = self._step
        st.payload_reqs.append((off, n, dtype_name(x.dtype), tuple(x.shape), mod_id, name, dtype_name(t.dtype)))
        return len(st.payload_reqs) - 1  # step-local; remapped in _end_step

    # ------------------------------------------------------------------ probes
    def _probe_row(self, ev: int, mod_id: int, kind: str, name: str, t_shape: tuple, dtype: str,
                   enc: int, off: int, n: int, info: dict | None, late: Any = None) -> None:
        st = self._step
        w = self._writer
        st.probes.append([st.seq, ev, mod_id, w.intern(kind), w.intern(name), tuple(t_shape),
                          w.intern(dtype), enc, off, n, info, late])
        st.seq += 1

    def _probe_for(self, ev: int, mod_id: int, name: str, t: Tensor, label: str | None = None) -> None:
        if name in INT_PROBE_NAMES:
            if t.is_floating_point() or t.is_complex():
                return
            kind = PROBE_KIND.get(name, name)
            key = (id(t), _version_of(t), "i")
            cached = self._step.probe_cache.get(key)
            if cached is None or cached[2]() is not t:
                off, n = self._queue_bytes(t.detach().to(torch.int64, copy=True))
                cached = (off, n, weakref.ref(t))
                self._step.probe_cache[key] = cached
            self._probe_row(ev, mod_id, kind, label or name, tuple(t.shape), dtype_name(t.dtype),
                            T.ENC_INT64, cached[0], cached[1], None, late=kind)
        elif name in MASK_NAMES:
            key = (id(t), _version_of(t), "m")
            cached = self._step.probe_cache.get(key)
            if t.dtype == torch.bool:
                style = "bool"
            elif t.is_floating_point():
                style = "additive"
            else:
                style = "int"
            if cached is None or cached[2]() is not t:
                x = t.detach()
                if style == "bool":
                    allowed = x.to(torch.uint8, copy=True)
                elif style == "additive":
                    allowed = (x > torch.finfo(x.dtype).min / 2).to(torch.uint8)
                else:
                    allowed = (x != 0).to(torch.uint8)
                off, n = self._queue_bytes(allowed)
                slot = self._stats(t)[0]
                cached = (off, n, weakref.ref(t), slot)
                self._step.probe_cache[key] = cached
            info = {"style": style, "dtype": dtype_name(t.dtype), "stat_slot": cached[3]}
            self._probe_row(ev, mod_id, "attention_mask", label or name, tuple(t.shape), dtype_name(t.dtype),
                            T.ENC_BITS, cached[0], cached[1], info, late="attention_mask")
            st = self._step
            if st.mask_probe is None and self._decoder_prefix and self._paths[mod_id].startswith(self._decoder_prefix):
                st.mask_probe = tuple(t.shape)

    def _cache_summary(self, obj: Any) -> dict | None:
        """Per-layer lengths and layout of a Cache object or a legacy tuple cache (host only)."""
        keys: list[Any] = []
        ctype = type(obj).__name__
        if hasattr(obj, "layers") and isinstance(getattr(obj, "layers"), (list, tuple)):
            for layer in obj.layers:
                k = getattr(layer, "keys", None)
                keys.append(k if isinstance(k, Tensor) and k.dim() >= 3 else None)
            layout = "BHSD"
        elif hasattr(obj, "key_cache"):
            keys = [k if isinstance(k, Tensor) else None for k in obj.key_cache]
            layout = "BHSD"
        elif isinstance(obj, (tuple, list)):
            layout = None
            if obj and len(obj) == 2 and (isinstance(obj[0], Tensor) or _is_quantized_triple(obj[0])):
                obj = (obj,)  # a single layer's (k, v), plain or quantized
            for layer in obj:
                if isinstance(layer, (tuple, list)) and layer:
                    keys.append(layer[0])
                else:
                    keys.append(None)
        else:
            return None
        lengths: list[int] = []
        key_shape = None
        dtype = None
        for k in keys:
            if k is None:
                lengths.append(0)
                continue
            quant = False
            if isinstance(k, (tuple, list)):  # quantized: (uint8 data, scale, zero)
                quant = True
                k = k[0]
            if not isinstance(k, Tensor) or k.dim() < 3:
                lengths.append(0)
                continue
            if layout is None or layout.startswith("quantized") or ctype in ("tuple", "list"):
                inner = self._detect_layout(tuple(k.shape))
                layout = ("quantized-" + inner) if quant else inner
            shape = tuple(k.shape)
            lengths.append(shape[1] if layout.endswith("BSHD") else shape[-2])
            if key_shape is None:
                key_shape = list(shape)
                dtype = dtype_name(k.dtype)
        return {"type": ctype, "layout": layout or "unknown", "lengths": lengths, "key_shape": key_shape,
                "dtype": dtype, "n_layers": len(lengths)}

    def _detect_layout(self, shape: tuple) -> str:
        if len(shape) != 4:
            return "unknown"
        h = self.kv_heads
        if h is not None:
            if shape[1] == h and shape[2] != h:
                self._layout_hint = "BHSD"
            elif shape[2] == h and shape[1] != h:
                self._layout_hint = "BSHD"
        return self._layout_hint or "BHSD"

    def _cache_probe(self, ev: int, mod_id: int, name: str, obj: Any) -> dict | None:
        info = self._cache_summary(obj)
        if info is None:
            return None
        lengths = np.asarray(info["lengths"], dtype=np.int64)
        self._probe_row(ev, mod_id, "cache", name, (len(lengths),), "int64", T.ENC_INT64, -1, 0, info,
                        late=lengths)
        return info

    def _rotary_probe(self, ev: int, mod_id: int, args, kwargs, names) -> None:
        """A rotary module called with a length (Qwen-1 style) builds its table for KV indices
        0..len-1 and the new tokens use the last q_len rows: those are the positions it applies.
        (Rotary modules called with ``position_ids`` get a ``position_ids`` probe instead.)"""
        for i, a in enumerate(args):
            if isinstance(a, int) and not isinstance(a, bool):
                name = names[i] if i < len(names) else f"args[{i}]"
                break
        else:
            for name, a in kwargs.items():
                if isinstance(a, int) and not isinstance(a, bool):
                    break
            else:
                return
        self._probe_row(ev, mod_id, "rope_positions", name, (), "int64", T.ENC_INT64, -1, 0,
                        {"table_len": int(a)}, late=("rope", int(a)))

    def _merger_probe(self, ev: int, mod_id: int, output: Any) -> None:
        t = output
        if not isinstance(t, Tensor):
            t = getattr(output, "last_hidden_state", None) if not isinstance(output, (tuple, list)) else output[0]
        if isinstance(t, Tensor):
            rows = int(t.shape[0]) if t.dim() == 2 else int(np.prod(t.shape[:-1]))
            self._probe_row(ev, mod_id, "merger_rows", "out", tuple(t.shape), dtype_name(t.dtype),
                            T.ENC_NONE, 0, 0, {"rows": rows})

    # ------------------------------------------------------------------ root / steps
    def _root_inputs(self, module, args, kwargs, names) -> None:
        st = self._step
        bound = dict(zip(names, args))
        bound.update(kwargs)
        ids = bound.get("input_ids")
        emb = bound.get("inputs_embeds")
        if isinstance(ids, Tensor):
            st.input_len = int(ids.shape[-1])
        elif isinstance(emb, Tensor):
            st.input_len = int(emb.shape[-2])
        cache = None
        for n in CACHE_ARG_NAMES:
            if bound.get(n) is not None:
                cache = bound[n]
                break
        if cache is not None:
            info = self._cache_summary(cache)
            if info and info["lengths"]:
                st.cache_before = int(info["lengths"][0])
            self._root_cache_obj = cache
        else:
            self._root_cache_obj = None
            st.cache_before = 0

    def _root_outputs(self, module, kwargs, output) -> None:
        st = self._step
        obj = None
        if output is not None:
            # "cache" first: transformers 5 warns on every look-up of the old name
            for n in ("cache", "past_key_values"):
                if isinstance(output, dict):
                    if n in output.keys() and output[n] is not None:
                        obj = output[n]
                        break
                elif getattr(output, n, None) is not None:
                    obj = getattr(output, n)
                    break
        if obj is None:
            obj = self._root_cache_obj
        info = self._cache_summary(obj) if obj is not None else None
        if info and info["lengths"]:
            st.cache_after = int(info["lengths"][0])
        elif st.cache_before == 0 and obj is None:
            st.cache_before = -1

    def _begin_step(self) -> None:
        self._step = _Step(self.n_steps)
        self._error_stack = None if self.error is None else self._error_stack

    # reshape hooks -------------------------------------------------------------------------
    def _site(self) -> tuple[int, int, int, str]:
        f = sys._getframe(3)
        internal = self._internal_code
        while f is not None:
            code = f.f_code
            flag = internal.get(code)
            if flag is None:
                fn = code.co_filename
                flag = fn.startswith(_TORCH_DIR) or fn.startswith(_VLMSCOPE_DIR)
                internal[code] = flag
            if not flag:
                break
            f = f.f_back
        if f is None:
            return (0, -1, 0, "?")
        key = (f.f_code, f.f_lineno)
        site = self._site_cache.get(key)
        if site is None:
            w = self._writer
            site = (w.intern(f.f_code.co_filename), f.f_lineno, w.intern(f.f_code.co_qualname
                    if hasattr(f.f_code, "co_qualname") else f.f_code.co_name),
                    f"{f.f_code.co_filename}:{f.f_lineno}")
            self._site_cache[key] = site
        return site

    def _reshape_begin(self, op: str, args: tuple, kwargs: dict) -> list:
        self._paused = True
        try:
            st = self._step
            w = self._writer
            tensors: list[Tensor] = []
            other: list[str] = []
            for a in args:
                if isinstance(a, Tensor):
                    tensors.append(a)
                elif isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
                    tensors.extend(x for x in a if isinstance(x, Tensor))
                else:
                    other.append(_fmt_arg(a))
            for k, a in kwargs.items():
                if isinstance(a, Tensor) and k in ("input", "other", "source", "mask"):
                    tensors.append(a)
                else:
                    other.append(f"{k}={_fmt_arg(a)}")
            in_shapes = " ".join(_fmt_shape(t.shape) for t in tensors)
            in_dtypes = " ".join(dtype_name(t.dtype) for t in tensors)
            ev = self._stack[-1] if self._stack else -1
            mod = self._stack_mod[-1] if self._stack_mod else -1
            k = (ev, w.intern(op))
            nth = st.op_nth.get(k, 0)
            st.op_nth[k] = nth + 1
            site = self._site()
            first = tuple(tensors[0].shape) if tensors else ()
            # [seq, event, module, op, nth, n_in, in_shape, in_shapes, in_dtypes, args,
            #  n_out, out_shape, out_dtype, site..., status]
            row = [st.seq, ev, mod, k[1], nth, len(tensors), first, w.intern(in_shapes), w.intern(in_dtypes),
                   w.intern("(" + ", ".join(other) + ")" if other else ""), 0, (), 0, site, 1]
            st.seq += 1
            st.reshapes.append(row)
            self._last_reshape = {"op": op, "in_shapes": in_shapes, "in_dtypes": in_dtypes,
                                  "args": "(" + ", ".join(other) + ")" if other else "",
                                  "module": self._paths[mod] if mod >= 0
                                  else None, "site": site[3],
                                  "step": st.index}
            return row
        finally:
            self._paused = False

    def _reshape_end(self, row: list, out: Any) -> None:
        if isinstance(out, Tensor):
            row[10], row[11], row[12] = 1, tuple(out.shape), self._writer.intern(dtype_name(out.dtype))
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            row[10], row[11], row[12] = len(out), tuple(out[0].shape), self._writer.intern(dtype_name(out[0].dtype))
        row[14] = 0

    # ------------------------------------------------------------------ end of step
    def _end_step(self, output: Any) -> None:
        st = self._step
        w = self._writer
        self._step = None
        if st is None or w is None:
            return
        for row in st.events:  # calls still open (the step raised): keep what they saw
            if row[10]:
                self._step = st
                self._flush_tensors(row)
                self._step = None
        # The one device->host copy of this step.
        if st.device_chunks:
            blob = torch.cat(st.device_chunks).cpu().numpy() if len(st.device_chunks) > 1 \
                else st.device_chunks[0].cpu().numpy()
        else:
            blob = np.zeros(0, np.uint8)
        step = st.index
        base_ev = w.counts["events"]
        base_t = w.counts["tensors"]
        base_r = w.counts["reshapes"]
        base_p = w.counts["probes"]

        # payloads
        payload_ids: list[int] = []
        for off, n, dt, shape, mod_id, name, orig_dt in st.payload_reqs:
            arr = blob[off:off + n].view(np.dtype(dt) if dt != "bool" else np.uint8).reshape(shape)
            payload_ids.append(w.add_payload(arr.copy(), module=self._paths[mod_id], step=step, name=name,
                                             dtype=orig_dt))

        # events
        ne = len(st.events)
        ev = np.zeros(ne, T.EVENT_DTYPE)
        if ne:
            cols = list(zip(*st.events))
            ev["step"] = step
            ev["seq"] = cols[0]
            end = np.asarray(cols[1])
            ev["end_seq"] = np.where(end < 0, st.seq, end)
            ev["module"] = cols[2]
            ev["nth"] = cols[3]
            ev["depth"] = cols[4]
            par = np.asarray(cols[5], dtype=np.int64)
            ev["parent"] = np.where(par >= 0, par + base_ev, -1)
            ev["tensor_start"] = np.asarray(cols[6], dtype=np.int64) + base_t
            cnt = np.asarray(cols[7])
            ev["status"] = cols[8]
            ev["tensor_count"] = cnt
            ev["dur_us"] = [c if e >= 0 else 0.0 for c, e in zip(cols[9], cols[1])]

        # tensors
        nt = len(st.tensors)
        tt = np.zeros(nt, T.TENSOR_DTYPE)
        if nt:
            cols = list(zip(*st.tensors))
            tt["step"] = step
            tt["event"] = np.asarray(cols[0], dtype=np.int64) + base_ev
            tt["role"] = cols[1]
            tt["name"] = cols[2]
            tt["ndim"] = cols[3]
            tt["shape"] = [T.pad_shape(s) for s in cols[4]]
            tt["dtype"] = cols[5]
            tt["device"] = cols[6]
            tt["numel"] = cols[7]
            stats = self._stats_from_blob(blob, cols[8])
            numel = np.maximum(np.asarray(cols[7], dtype=np.float64), 1)
            mean = stats[:, 2] / numel
            with np.errstate(invalid="ignore", over="ignore"):
                var = np.maximum(stats[:, 3] ** 2 / numel - mean ** 2, 0.0)
            tt["min"], tt["max"], tt["mean"], tt["std"] = stats[:, 0], stats[:, 1], mean, np.sqrt(var)
            tt["absmax"] = np.maximum(np.abs(stats[:, 0]), np.abs(stats[:, 1]))
            tt["nan"] = np.nan_to_num(stats[:, 4], nan=0).astype(np.int64)
            tt["inf"] = np.nan_to_num(stats[:, 5], nan=0).astype(np.int64)
            pl = np.asarray(cols[9], dtype=np.int64)
            tt["payload"] = [payload_ids[p] if p >= 0 else -1 for p in pl]

        # reshapes
        nr = len(st.reshapes)
        rr = np.zeros(nr, T.RESHAPE_DTYPE)
        if nr:
            cols = list(zip(*st.reshapes))
            rr["step"] = step
            rr["seq"] = cols[0]
            e = np.asarray(cols[1], dtype=np.int64)
            rr["event"] = np.where(e >= 0, e + base_ev, -1)
            rr["module"] = cols[2]
            rr["op"] = cols[3]
            rr["nth"] = cols[4]
            rr["n_in"] = cols[5]
            rr["in_ndim"] = [len(s) for s in cols[6]]
            rr["in_shape"] = [T.pad_shape(s) for s in cols[6]]
            rr["in_shapes"] = cols[7]
            rr["in_dtypes"] = cols[8]
            rr["args"] = cols[9]
            rr["n_out"] = cols[10]
            rr["out_ndim"] = [len(s) for s in cols[11]]
            rr["out_shape"] = [T.pad_shape(s) for s in cols[11]]
            rr["out_dtype"] = cols[12]
            rr["site_file"] = [s[0] for s in cols[13]]
            rr["site_line"] = [s[1] for s in cols[13]]
            rr["site_func"] = [s[2] for s in cols[13]]
            rr["status"] = cols[14]

        # probes: decode the values we need for derived info (host side, after the copy)
        np_ = len(st.probes)
        pr = np.zeros(np_, T.PROBE_DTYPE)
        extra_blobs: list[np.ndarray] = []
        blob_base = w.probe_bytes
        # Probe bytes are stored compactly: the step's probe data is re-packed, not the whole blob.
        store_map: dict[tuple[int, int, int], tuple[int, int]] = {}
        cursor = blob_base
        pos_rows = 0
        pos_min = [0, 0, 0]
        pos_max = [0, 0, 0]
        pos_candidate = None
        segments = self._segments(st, blob)
        for i, p in enumerate(st.probes):
            seq, e, mod_id, kind, name, shape, dt, enc, off, n, info, late = p
            data = None
            stored = None
            if enc == T.ENC_INT64 and off >= 0:
                data = blob[off:off + n].view(np.int64).reshape(shape)
            elif enc == T.ENC_INT64 and isinstance(late, np.ndarray):
                data = late
            elif isinstance(late, tuple) and late[0] == "rope":
                q = st.first_layer_q if st.first_layer_q > 0 else max(st.input_len, 0)
                data = np.arange(max(late[1] - q, 0), late[1], dtype=np.int64)
                shape = data.shape
                late = data
                if data.size:
                    info = {**(info or {}), "min": int(data[0]), "max": int(data[-1])}
            elif enc == T.ENC_BITS:
                data = blob[off:off + n].astype(bool).reshape(shape)
            info = dict(info or {})
            lk = late if isinstance(late, str) else None
            if lk == "position_ids" and data is not None:
                rows = data.reshape(-1, data.shape[-1]) if data.ndim <= 2 else data.reshape(data.shape[0], -1)
                if data.ndim <= 2:
                    rows = data.reshape(1, -1)
                info["rows"] = [[int(r.min()), int(r.max())] if r.size else [0, -1] for r in rows]
                if segments and data.shape[-1] == segments[0]:
                    # per text/image span of batch row 0: [kind, start, end, [[min, max] per row]]
                    v = data.reshape(-1, *data.shape[-2:]) if data.ndim >= 2 else data.reshape(1, 1, -1)
                    info["spans"] = [[kind_, a, b, [[int(r[0, a:b].min()), int(r[0, a:b].max())] for r in v]]
                                     for kind_, a, b in segments[1]]
                path = self._paths[mod_id]
                in_vision = bool(self.vision_model) and (path == self.vision_model or
                                                         path.startswith(self.vision_model + "."))
                if in_vision:
                    pass
                elif pos_candidate is None or (
                        (mod_id == self._text_model_id or (self._decoder_prefix and path.startswith(self._decoder_prefix)))
                        and not pos_candidate[0]):
                    pos_candidate = ((mod_id == self._text_model_id or bool(self._decoder_prefix and
                                      path.startswith(self._decoder_prefix))), info["rows"])
            elif lk == "input_ids" and data is not None:
                info.update(self._image_spans(data))
                if e == st.root_ev and st.image_tokens < 0:
                    st.image_tokens = info.get("image_tokens", -1)
            elif lk == "attention_mask":
                slot = info.pop("stat_slot", -1)
                if slot >= 0:
                    mn = float(blob[slot:slot + 8].view(np.float64)[0])
                    if info["style"] == "additive":
                        # the blocked value; None when nothing is blocked (e.g. a decode step)
                        info["min"] = mn
                        info["fill"] = mn if data is not None and not data.all() else None
            elif lk is not None and data is not None and data.size:
                info["min"], info["max"] = int(data.min()), int(data.max())
            if data is not None:
                k = (off, n, enc) if off >= 0 else (id(late), -1, enc)
                stored = store_map.get(k)
                if stored is None:
                    raw = np.packbits(data.ravel()) if enc == T.ENC_BITS else np.ascontiguousarray(
                        data, dtype=np.int64).view(np.uint8).ravel()
                    stored = (cursor, raw.size)
                    cursor += raw.size
                    extra_blobs.append(raw)
                    store_map[k] = stored
            pr[i] = (step, seq, e + base_ev, mod_id, kind, name, len(shape), T.pad_shape(shape),
                     dt, enc if data is not None else T.ENC_NONE,
                     stored[0] if stored else 0, stored[1] if stored else 0,
                     w.intern(json.dumps(info, separators=(",", ":"))) if info else 0)
        if extra_blobs:
            w.append_probe_data(np.concatenate(extra_blobs))
        if pos_candidate is not None:
            rows = pos_candidate[1]
            if len(rows) == 4:  # [text, t, h, w]: the three M-RoPE rows
                rows = rows[1:]
            pos_rows = len(rows)
            for j, (a, b) in enumerate(rows[:3]):
                pos_min[j], pos_max[j] = a, b

        w.append("events", ev)
        w.append("tensors", tt)
        w.append("reshapes", rr)
        w.append("probes", pr)
        mask_shape = st.mask_probe or ()
        srow = np.zeros(1, T.STEP_DTYPE)
        srow[0] = (step, T.KIND_PREFILL if step == 0 else T.KIND_DECODE, 1 if st.failed else 0,
                   st.input_len, st.first_layer_q, st.cache_before, st.cache_after, pos_rows,
                   pos_min, pos_max, len(mask_shape), (tuple(mask_shape) + (-1,) * 4)[:4], st.image_tokens,
                   base_ev, ne, base_t, nt, base_r, nr, base_p, np_,
                   (time.perf_counter() - st.t0) * 1e3)
        w.append("steps", srow)
        w.end_step()
        self.n_steps += 1
        self.n_events += ne
        if self.on_step is not None:
            self.on_step(step, self)

    def _segments(self, st: _Step, blob: np.ndarray) -> tuple[int, list] | None:
        """(L, [[kind, start, end], ...]): the text/image spans of row 0 of the root's input_ids."""
        for p in st.probes:
            if isinstance(p[11], str) and p[11] == "input_ids" and p[1] == st.root_ev and p[8] >= 0 and self.image_token_id is not None:
                ids = blob[p[8]:p[8] + p[9]].view(np.int64).reshape(p[5])
                row = ids.reshape(-1, ids.shape[-1])[0] if ids.ndim else ids.reshape(1)
                img = row == self.image_token_id
                cuts = np.flatnonzero(np.diff(img.astype(np.int8))) + 1
                bounds = [0, *cuts.tolist(), len(row)]
                return len(row), [["image" if img[a] else "text", a, b] for a, b in zip(bounds, bounds[1:]) if b > a]
        return None

    @staticmethod
    def _stats_from_blob(blob: np.ndarray, slots: Iterable[tuple[int, int]]) -> np.ndarray:
        """Rows of [min, max, sum, norm, nan, inf] (nan/inf 0 where they were not counted)."""
        sl = np.asarray(list(slots), dtype=np.int64).reshape(-1, 2)
        out = np.full((len(sl), 6), np.nan)
        out[:, 4:] = 0.0
        f64 = blob[: len(blob) - len(blob) % 8].view(np.float64) if len(blob) >= 8 else np.zeros(0)
        for width in (4, 6):
            ok = (sl[:, 0] >= 0) & (sl[:, 1] == width)
            if ok.any():
                idx = (sl[ok, 0] // 8)[:, None] + np.arange(width)[None, :]
                out[np.flatnonzero(ok)[:, None], np.arange(width)[None, :]] = f64[idx]
        return out

    def _image_spans(self, ids: np.ndarray) -> dict:
        tok = self.image_token_id
        if tok is None:
            return {}
        ids2 = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
        spans = []
        for b, row in enumerate(ids2):
            m = (row == tok).astype(np.int8)
            d = np.diff(np.concatenate([[0], m, [0]]))
            for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
                spans.append([b, int(s), int(e)])
        return {"image_token_id": int(tok), "spans": spans, "image_tokens": int((ids2 == tok).sum())}


def _version() -> str:
    from vlmscope import __version__
    return __version__


def record(model: torch.nn.Module, processor: Any = None, *, image: Any = None, prompt: str = "",
           out: str | os.PathLike = "traces/trace.h5", max_new_tokens: int = 8, **recorder_kwargs: Any) -> Path:
    """Prepare inputs with ``processor``, run ``model.generate`` under a :class:`Recorder`.

    ``image`` is a path or a PIL image (or None for text-only). Returns the trace path.
    """
    from vlmscope.inputs import build_inputs, generate_text

    inputs, info = build_inputs(model, processor, prompt=prompt, image=image)
    meta = dict(recorder_kwargs.pop("meta", {}) or {})
    meta.update(info)
    meta.setdefault("prompt", prompt)
    meta.setdefault("generation", {"max_new_tokens": max_new_tokens, "do_sample": False})
    with Recorder(model, out, meta=meta, **recorder_kwargs) as rec:
        text = generate_text(model, processor, inputs, max_new_tokens=max_new_tokens)
        rec.add_meta(generated_text=text)
    return rec.path
