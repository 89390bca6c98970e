"""Probes: the semantic values a module receives (position ids, masks, caches, input ids),
plus what the root call, rotary modules and the vision merger tell about a step.

A probe row is written on the hot path with its values queued on the device
(:mod:`vlmscope.recorder.stats`); the info derived from the values (ranges, spans, the
mask's fill value) is completed by :mod:`vlmscope.recorder.assemble` once they are on the host.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from vlmscope import trace as T
from vlmscope.recorder.buffer import ProbeRow, QueuedValues, StepBuffer
from vlmscope.recorder.stats import dtype_name, queue_bytes, queue_stats, version_of

CACHE_ARG_NAMES = ("past_key_values", "past_key_value", "layer_past", "cache", "layer_pasts")
INT_PROBE_NAMES = ("position_ids", "cache_position", "rope_deltas", "image_grid_thw", "video_grid_thw",
                   "grid_thw", "mm_token_type_ids", "token_type_ids", "input_ids")
# argument names that are recorded under another probe kind (the vision tower's ``grid_thw`` is a
# ``video_grid_thw`` when it is the very tensor the model received under that name, see ``_int``)
PROBE_KIND = {"grid_thw": "image_grid_thw"}
# float arguments stored as float64 values (enc 3)
FLOAT_PROBE_NAMES = ("second_per_grid_ts",)
MASK_NAMES = ("attention_mask", "causal_mask", "encoder_attention_mask")
# where the root's output keeps the cache: "cache" first, since transformers 5 warns on every
# look-up of the old name
_OUTPUT_CACHE_NAMES = ("cache", "past_key_values")


def is_cache_object(obj: Any) -> bool:
    """A transformers ``Cache`` (or anything shaped like one)."""
    return hasattr(obj, "get_seq_length") or (hasattr(obj, "layers") and hasattr(obj, "update"))


def is_quantized_triple(x: Any) -> bool:
    """Qwen-1's quantized cache tensor: ``(uint8 data, scale, zero)``."""
    return (isinstance(x, (tuple, list)) and len(x) == 3 and all(isinstance(t, Tensor) for t in x)
            and not x[0].is_floating_point())


def _mask_style(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "additive" if t.is_floating_point() else "int"


def _allowed(x: Tensor, style: str) -> Tensor:
    """uint8: 1 where the mask lets a query attend."""
    if style == "bool":
        return x.to(torch.uint8, copy=True)
    if style == "additive":
        return (x > torch.finfo(x.dtype).min / 2).to(torch.uint8)
    return (x != 0).to(torch.uint8)


def _cache_keys(obj: Any) -> tuple[list[Any], str | None] | None:
    """Each layer's key tensor (or quantized triple, or None) and the layout the type implies."""
    if hasattr(obj, "layers") and isinstance(getattr(obj, "layers"), (list, tuple)):
        keys = []
        for layer in obj.layers:
            k = getattr(layer, "keys", None)
            keys.append(k if isinstance(k, Tensor) and k.dim() >= 3 else None)
        return keys, "BHSD"
    if hasattr(obj, "key_cache"):
        return [k if isinstance(k, Tensor) else None for k in obj.key_cache], "BHSD"
    if isinstance(obj, (tuple, list)):
        if obj and len(obj) == 2 and (isinstance(obj[0], Tensor) or is_quantized_triple(obj[0])):
            obj = (obj,)  # a single layer's (k, v), plain or quantized
        return [layer[0] if isinstance(layer, (tuple, list)) and layer else None for layer in obj], None
    return None


_FEATURE_FNS = {"get_video_features": True, "get_image_features": False}


def _encoding_video(max_depth: int = 40) -> bool:
    """Whether the running vision tower encodes a video: the innermost ``get_video_features`` /
    ``get_image_features`` on the Python stack (transformers' names for the two encoders; in
    ``generate`` they run before the prefill, so no root argument names the grid). Walked once
    per vision-tower call."""
    f = sys._getframe(1)
    for _ in range(max_depth):
        if f is None:
            return False
        hit = _FEATURE_FNS.get(f.f_code.co_name)
        if hit is not None:
            return hit
        f = f.f_back
    return False


class Probes:
    """Writes probe rows into the current step (state: the cache layout seen so far)."""

    def __init__(self, writer: T.TraceWriter, paths: Sequence[str], decoder_prefix: str | None,
                 kv_heads: int | None):
        self.w = writer
        self.paths = paths
        self.decoder_prefix = decoder_prefix
        self.kv_heads = kv_heads
        self.layout_hint: str | None = None  # the last layout the head count decided

    def row(self, st: StepBuffer, ev: int, mod_id: int, kind: str, name: str, shape: tuple, dtype: str,
            enc: int, off: int, n: int, info: dict | None, derive: str | None = None,
            host: np.ndarray | None = None, stat_off: int = -1, width: int = 8) -> None:
        w = self.w
        st.probes.append(ProbeRow(st.seq, ev, mod_id, w.intern(kind), w.intern(name), tuple(shape),
                                  w.intern(dtype), enc, off, n, info, derive, host, stat_off, width))
        st.seq += 1

    # ------------------------------------------------------------------ tensors by argument name
    def tensor(self, st: StepBuffer, ev: int, mod_id: int, name: str, t: Tensor, label: str | None = None) -> None:
        """The probe an argument's name calls for (int values, float values or a mask), if any."""
        if name in INT_PROBE_NAMES:
            self._int(st, ev, mod_id, name, t, label)
        elif name in MASK_NAMES:
            self._mask(st, ev, mod_id, name, t, label)
        elif name in FLOAT_PROBE_NAMES:
            self._float(st, ev, mod_id, name, t, label)

    def _int(self, st: StepBuffer, ev: int, mod_id: int, name: str, t: Tensor, label: str | None) -> None:
        if t.is_floating_point() or t.is_complex():
            return
        key = (id(t), version_of(t), "i")
        kind = PROBE_KIND.get(name, name)
        if name == "video_grid_thw":
            st.video_grids[key] = weakref.ref(t)
        elif name == "grid_thw":
            ref = st.video_grids.get(key)
            if (ref is not None and ref() is t) or _encoding_video():
                kind = "video_grid_thw"  # get_video_features: the vision tower runs on the video grids
        cached = st.probe_cache.get(key)
        if cached is None or cached.ref() is not t:
            off, n = queue_bytes(st, t.detach().to(torch.int64, copy=True))
            cached = st.probe_cache[key] = QueuedValues(off, n, weakref.ref(t), -1)
        self.row(st, ev, mod_id, kind, label or name, tuple(t.shape), dtype_name(t.dtype),
                 T.ENC_INT64, cached.off, cached.nbytes, None, derive=kind)

    def _float(self, st: StepBuffer, ev: int, mod_id: int, name: str, t: Tensor, label: str | None) -> None:
        """A value stored as float64 (enc 3), whatever its dtype (an int ``second_per_grid_ts`` is
        kept as the ints it holds: the dtype column says what the model got)."""
        if t.is_complex():
            return
        key = (id(t), version_of(t), "f")
        cached = st.probe_cache.get(key)
        x = t.detach()
        # exact: float32 holds every float16/bfloat16/float32 value; float64 the rest (not on MPS)
        wide = x.dtype == torch.float64 or (not x.is_floating_point() and x.device.type != "mps")
        width = 8 if wide else 4
        if cached is None or cached.ref() is not t:
            off, n = queue_bytes(st, x.to(torch.float64 if wide else torch.float32, copy=True))
            cached = st.probe_cache[key] = QueuedValues(off, n, weakref.ref(t), width)
        self.row(st, ev, mod_id, name, label or name, tuple(t.shape), dtype_name(t.dtype),
                 T.ENC_FLOAT64, cached.off, cached.nbytes, None, derive=name, width=cached.stat_off)

    def float_list(self, st: StepBuffer, ev: int, mod_id: int, name: str, values: Any) -> bool:
        """A float argument given as a Python list (``second_per_grid_ts=[1.0, 0.5]``): host values.
        Returns False when ``values`` is not a flat list of numbers."""
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return False
        host = np.asarray(values, dtype=np.float64)
        self.row(st, ev, mod_id, name, name, host.shape, "float64" if any(isinstance(v, float) for v in values)
                 else "int64", T.ENC_FLOAT64, -1, 0, None, derive=name, host=host)
        return True

    def token_norms(self, st: StepBuffer, ev: int, mod_id: int, name: str, t: Tensor) -> None:
        """The L2 norm of each last-dim row of ``t`` (each token's feature vector), computed on the
        device in float32 and queued: one reduction, no sync."""
        if not t.is_floating_point() or t.dim() < 1 or t.numel() == 0:
            return
        norms = torch.linalg.vector_norm(t.detach(), dim=-1, dtype=torch.float32)
        off, n = queue_bytes(st, norms)
        self.row(st, ev, mod_id, "token_norms", name, tuple(norms.shape), dtype_name(t.dtype),
                 T.ENC_FLOAT64, off, n, None, derive="token_norms", width=4)

    def rope_state(self, st: StepBuffer, mod_id: int, module: torch.nn.Module) -> None:
        """The model's ``rope_deltas`` attribute ([B, 1] in Qwen2-VL) at the end of the step: the
        per-row offsets the next decode step will add to its text positions."""
        t = getattr(module, "rope_deltas", None)
        if not isinstance(t, Tensor) or t.is_complex() or t.numel() == 0:
            return
        ev = st.owner_ev if st.owner_ev >= 0 else st.root_ev
        if ev < 0:
            return
        key = (id(t), version_of(t), "i")
        cached = st.probe_cache.get(key)
        if cached is None or cached.ref() is not t:
            off, n = queue_bytes(st, t.detach().to(torch.int64, copy=True))
            cached = st.probe_cache[key] = QueuedValues(off, n, weakref.ref(t), -1)
        self.row(st, ev, mod_id, "rope_deltas", "state", tuple(t.shape), dtype_name(t.dtype),
                 T.ENC_INT64, cached.off, cached.nbytes, None, derive="rope_deltas")

    def _mask(self, st: StepBuffer, ev: int, mod_id: int, name: str, t: Tensor, label: str | None) -> None:
        key = (id(t), version_of(t), "m")
        cached = st.probe_cache.get(key)
        style = _mask_style(t)
        if cached is None or cached.ref() is not t:
            off, n = queue_bytes(st, _allowed(t.detach(), style))
            stat_off, _ = queue_stats(st, t)
            cached = st.probe_cache[key] = QueuedValues(off, n, weakref.ref(t), stat_off)
        info = {"style": style, "dtype": dtype_name(t.dtype)}
        self.row(st, ev, mod_id, "attention_mask", label or name, tuple(t.shape), dtype_name(t.dtype),
                 T.ENC_BITS, cached.off, cached.nbytes, info, derive="attention_mask", stat_off=cached.stat_off)
        if st.mask_shape is None and self.decoder_prefix and self.paths[mod_id].startswith(self.decoder_prefix):
            st.mask_shape = tuple(t.shape)

    # ------------------------------------------------------------------ caches
    def cache_summary(self, obj: Any) -> dict | None:
        """Per-layer lengths and layout of a Cache object or a legacy tuple cache (host only)."""
        found = _cache_keys(obj)
        if found is None:
            return None
        keys, layout = found
        ctype = type(obj).__name__
        lengths: list[int] = []
        key_shape = None
        dtype = None
        for k in keys:
            quant = isinstance(k, (tuple, list))  # quantized: (uint8 data, scale, zero)
            if quant:
                k = k[0]
            if not isinstance(k, Tensor) or k.dim() < 3:
                lengths.append(0)
                continue
            if layout is None or layout.startswith("quantized") or ctype in ("tuple", "list"):
                inner = self.detect_layout(tuple(k.shape))
                layout = ("quantized-" + inner) if quant else inner
            shape = tuple(k.shape)
            lengths.append(shape[1] if layout.endswith("BSHD") else shape[-2])
            if key_shape is None:
                key_shape = list(shape)
                dtype = dtype_name(k.dtype)
        return {"type": ctype, "layout": layout or "unknown", "lengths": lengths, "key_shape": key_shape,
                "dtype": dtype, "n_layers": len(lengths)}

    def detect_layout(self, shape: tuple) -> str:
        """BHSD or BSHD of a 4-D key tensor, from where the KV head count sits (remembered
        across calls for shapes that cannot tell, e.g. when S equals the head count)."""
        if len(shape) != 4:
            return "unknown"
        h = self.kv_heads
        if h is not None:
            if shape[1] == h and shape[2] != h:
                self.layout_hint = "BHSD"
            elif shape[2] == h and shape[1] != h:
                self.layout_hint = "BSHD"
        return self.layout_hint or "BHSD"

    def cache(self, st: StepBuffer, ev: int, mod_id: int, name: str, obj: Any) -> None:
        info = self.cache_summary(obj)
        if info is None:
            return
        lengths = np.asarray(info["lengths"], dtype=np.int64)
        self.row(st, ev, mod_id, "cache", name, (len(lengths),), "int64", T.ENC_INT64, -1, 0, info, host=lengths)

    # ------------------------------------------------------------------ module-specific probes
    def rotary(self, st: StepBuffer, ev: int, mod_id: int, args: tuple, kwargs: dict,
               names: Sequence[str]) -> None:
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
        self.row(st, ev, mod_id, "rope_positions", name, (), "int64", T.ENC_INT64, -1, 0,
                 {"table_len": int(a)}, derive="rope")

    def merger(self, st: StepBuffer, ev: int, mod_id: int, output: Any) -> None:
        t = output
        if not isinstance(t, Tensor):
            t = getattr(output, "last_hidden_state", None) if not isinstance(output, (tuple, list)) else output[0]
        if isinstance(t, Tensor):
            rows = int(t.shape[0]) if t.dim() == 2 else int(np.prod(t.shape[:-1]))
            self.row(st, ev, mod_id, "merger_rows", "out", tuple(t.shape), dtype_name(t.dtype),
                     T.ENC_NONE, 0, 0, {"rows": rows})
            self.token_norms(st, ev, mod_id, "out", t)
            st.merger_out = weakref.ref(t)

    def vision_output(self, st: StepBuffer, ev: int, mod_id: int, output: Any) -> None:
        """The vision tower's features in the order the model scatters them: token norms of its
        ``pooler_output`` (transformers), or of its output when that is a plain tensor (or a
        tuple's first) as a port's may be, when that is not the merger's output itself
        (Qwen2.5-VL reorders the merger's window-ordered rows back into raster order after the
        merger). Stored under the name ``pooler_output`` either way."""
        if isinstance(output, Tensor):
            t = output
        elif isinstance(output, (tuple, list)):
            t = output[0] if output else None
        else:
            t = getattr(output, "pooler_output", None)
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 2:
            return
        ref = st.merger_out
        if ref is not None and ref() is t:
            return
        self.token_norms(st, ev, mod_id, "pooler_output", t)

    # ------------------------------------------------------------------ the root call
    def root_inputs(self, st: StepBuffer, args: tuple, kwargs: dict, names: Sequence[str]) -> None:
        """The step's input length and the cache length before it."""
        bound = dict(zip(names, args))
        bound.update(kwargs)
        ids = bound.get("input_ids")
        emb = bound.get("inputs_embeds")
        if isinstance(ids, Tensor):
            st.input_len = int(ids.shape[-1])
            st.batch_size = int(ids.shape[0]) if ids.dim() >= 2 else 1
        elif isinstance(emb, Tensor):
            st.input_len = int(emb.shape[-2])
            st.batch_size = int(emb.shape[0]) if emb.dim() >= 3 else 1
        cache = next((bound[n] for n in CACHE_ARG_NAMES if bound.get(n) is not None), None)
        st.root_cache = cache
        if cache is None:
            st.cache_before = 0
            return
        info = self.cache_summary(cache)
        if info and info["lengths"]:
            st.cache_before = int(info["lengths"][0])

    def root_outputs(self, st: StepBuffer, output: Any) -> None:
        """The cache length after the step (from the returned cache, else the one passed in)."""
        obj = None
        if output is not None:
            for n in _OUTPUT_CACHE_NAMES:
                if isinstance(output, dict):
                    if n in output.keys() and output[n] is not None:
                        obj = output[n]
                        break
                elif getattr(output, n, None) is not None:
                    obj = getattr(output, n)
                    break
        if obj is None:
            obj = st.root_cache
        info = self.cache_summary(obj) if obj is not None else None
        if info and info["lengths"]:
            st.cache_after = int(info["lengths"][0])
        elif st.cache_before == 0 and obj is None:
            st.cache_before = -1
