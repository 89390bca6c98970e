"""Device-side values: tensor stats, probe values and payloads queued on the tensor's device,
and the one device->host copy per step that brings them back.

Nothing here synchronises with the device while the forward runs: every value is a small
tensor appended to the step's ``device_chunks`` as raw bytes, and ``copy_to_host`` turns them
into one host byte array at the end of the step (one ``torch.cat``, one ``.cpu()``).
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from vlmscope.recorder.buffer import NO_STATS, PayloadRequest, StatSlot, StepBuffer
from vlmscope.trace.sketch import MAX_SKETCH_ROWS, sketch_dim
from vlmscope.trace.sketch import encode as encode_sketches
from vlmscope.trace.sketch import projection_signs

_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dt: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (cached: called for every tensor)."""
    n = _DTYPE_NAMES.get(dt)
    if n is None:
        n = str(dt).replace("torch.", "")
        _DTYPE_NAMES[dt] = n
    return n


def version_of(t: Tensor) -> int:
    """In-place version counter (inference tensors have none: they cannot be modified in place
    outside inference mode, and inside it vlmscope keys on identity alone)."""
    if t.is_inference():
        return -1
    try:
        return t._version
    except RuntimeError:
        return -1


def queue_stats(st: StepBuffer, t: Tensor) -> StatSlot:
    """Queue min, max, sum, L2 norm (and NaN/Inf counts) of ``t`` on its device.

    Returns the stat slot in the step's device blob, or ``NO_STATS``. Mean and std are derived
    on the host at the end of the step (std from the sum of squares, one fast pass; approximate
    only when std << |mean|). NaN/Inf counts cost several passes, so they are computed only when
    they can be non-zero: on CUDA always (cheap there, and we must not sync to decide), on CPU
    only when min or max is not finite (a CPU tensor's value is already on the host).
    A tensor passed from one module to the next gets its stats computed once per step.
    """
    key = (id(t), version_of(t))
    hit = st.stat_dedupe.get(key)
    if hit is not None:
        ref, slot = hit
        if ref() is t:
            return slot
    if t.numel() == 0 or t.is_complex() or t.layout != torch.strided or t.is_meta:
        return NO_STATS
    x = t.detach()
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    mn, mx = torch.aminmax(x)
    counts = False
    if x.is_floating_point():
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
        total = x.sum(dtype=acc)
        norm = torch.linalg.vector_norm(x, dtype=acc)
        # math.isfinite on a CPU scalar tensor reads a value that is already on the host
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
    width = 6 if counts else 4
    slot = (st.device_bytes, width)
    st.device_chunks.append(vec.view(torch.uint8))
    st.device_bytes += 8 * width
    try:
        st.stat_dedupe[key] = (weakref.ref(t), slot)
    except TypeError:  # not weak-referenceable: no identity cache for it
        pass
    return slot


_PROJ: dict[tuple[int, torch.device], Tensor] = {}


def _projection(d: int, device: torch.device) -> Tensor:
    """The sketch directions for hidden size ``d`` (:func:`vlmscope.trace.sketch.projection`) on
    ``device``, plus a column of ones (each token's sum, for the tensor's sum: the statistics of a
    sketched tensor need no pass of their own); copied there once per (size, device)."""
    p = _PROJ.get((d, device))
    if p is None:
        # built on the device (integer ops, no host-to-device copy: nothing to synchronise);
        # stored [K + 1, D] and used transposed: a matmul against a narrow [D, K] operand runs at
        # half the speed on CPU BLAS (each output is then a dot product over contiguous memory)
        with torch.device(device):
            signs = projection_signs(d, xp=torch).to(torch.float32) * (1.0 / math.sqrt(d))
            p = torch.cat((signs.t(), torch.ones((1, d), dtype=torch.float32))).contiguous()
        _PROJ[(d, device)] = p
    return p.t()


#: dtypes whose statistics can come from the sketch's matmul (float32 accumulation, as before)
_FUSED = (torch.float32, torch.float16, torch.bfloat16)


def queue_stats_sketch(st: StepBuffer, t: Tensor) -> tuple[StatSlot, int]:
    """The statistics and the value sketch of ``t`` together: ``(stat slot, sketch slot)``.

    For a float32/16/bfloat16 tensor the sketch's matmul also yields each token's sum, and its
    per-token norms the tensor's norm, so the statistics need only ``aminmax`` on the device
    (their sum and norm are added up on the host, in float64, from the sketch's columns): the
    stat slot then has a negative width (-2: min, max; -4: and the NaN/Inf counts). Anything else
    gets the two separately."""
    key = (id(t), version_of(t))
    hit = st.stat_dedupe.get(key)
    if hit is not None:
        ref, slot = hit
        if ref() is t:
            return slot, queue_sketch(st, t)
    if t.dtype not in _FUSED or t.dim() == 0 or t.layout != torch.strided or t.is_meta or t.numel() == 0:
        return queue_stats(st, t), queue_sketch(st, t)
    d = sketch_dim(t.shape)
    if t.numel() // d > MAX_SKETCH_ROWS:
        return queue_stats(st, t), -1
    x = t.detach()
    mn, mx = torch.aminmax(x)
    counts = x.device.type != "cpu" or not (math.isfinite(mn) and math.isfinite(mx))
    if counts:
        vec = torch.stack([p.to(torch.float64) for p in (mn, mx, torch.isnan(x).sum(), torch.isinf(x).sum())])
    else:
        vec = torch.stack([mn, mx]).to(torch.float64)
    slot = (st.device_bytes, -vec.shape[0])
    st.device_chunks.append(vec.view(torch.uint8))
    st.device_bytes += 8 * vec.shape[0]
    try:
        st.stat_dedupe[key] = (weakref.ref(t), slot)
    except TypeError:
        pass
    return slot, queue_sketch(st, t)


def queue_sketch(st: StepBuffer, t: Tensor) -> int:
    """Queue the value sketch of a floating tensor ``[..., D]`` on its device: per token (row of
    the last dimension) its L2 norm and its projection on the fixed directions for ``D``
    (float32, ``[N, 2 + K]``: the norm, the K projections and the token's sum; encoded to float16
    on the host when the step is written, see :mod:`vlmscope.trace.sketch`). Returns the index of its slot, or -1 (not floating, no tokens,
    more than ``MAX_SKETCH_ROWS`` tokens). Two ops (a norm and a matmul) and a concatenation; a
    tensor passed on from module to module is sketched once per step."""
    key = (id(t), version_of(t))
    hit = st.sketch_dedupe.get(key)
    if hit is not None:
        ref, slot = hit
        if ref() is t:
            return slot
    if not t.is_floating_point() or t.dim() == 0 or t.layout != torch.strided or t.is_meta:
        return -1
    d = sketch_dim(t.shape)
    numel = t.numel()
    if d == 0 or numel == 0 or numel // d > MAX_SKETCH_ROWS:
        return -1
    n = numel // d
    x = t.detach().reshape(n, d)
    if x.dtype != torch.float32:
        x = x.float()
    vals = torch.cat((torch.linalg.vector_norm(x, dim=1).unsqueeze(1), torch.mm(x, _projection(d, x.device))), 1)
    width = vals.shape[1]
    off = st.device_bytes
    st.device_chunks.append(vals.view(-1).view(torch.uint8))
    nbytes = 4 * n * width
    if nbytes % 8:
        st.device_chunks.append(torch.zeros(4, dtype=torch.uint8, device=x.device))
        nbytes += 4
    st.device_bytes += nbytes
    slot = len(st.sketch_slots)
    st.sketch_slots.append((off, n, width))
    try:
        st.sketch_dedupe[key] = (weakref.ref(t), slot)
    except TypeError:
        pass
    return slot


class StepSketches(NamedTuple):
    scales: np.ndarray    # [S] float32, per slot
    data: np.ndarray      # [T, 1 + K] float16, the slots' tokens back to back
    counts: np.ndarray    # [S] tokens per slot
    sums: np.ndarray      # [S] float64: the tensor's sum (from its tokens' sums)
    norms: np.ndarray     # [S] float64: the tensor's L2 norm (from its tokens' norms)


def sketches_from_blob(blob: np.ndarray, slots: list[tuple[int, int, int]]) -> StepSketches:
    """Decode and encode the step's queued sketches, vectorised over the whole step."""
    off, n, width = np.asarray(slots, dtype=np.int64).reshape(-1, 3).T
    w = int(width[0])
    f32 = blob[: len(blob) - len(blob) % 4].view(np.float32)
    total = int(n.sum())
    starts = np.repeat(off // 4, n) + (np.arange(total) - np.repeat(np.cumsum(n) - n, n)) * w
    vals = f32[starts[:, None] + np.arange(w)[None, :]]
    first = np.cumsum(n) - n
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.add.reduceat(vals[:, -1].astype(np.float64), first)
        norms = np.sqrt(np.add.reduceat(np.square(vals[:, 0].astype(np.float64)), first))
    scales, data = encode_sketches(vals[:, 0], vals[:, 1:-1], n)
    return StepSketches(scales, data, n, sums, norms)


def queue_bytes(st: StepBuffer, t: Tensor) -> tuple[int, int]:
    """Queue a device tensor's bytes for the end-of-step copy; returns (byte offset, length)."""
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


class PayloadBudget:
    """Full output tensors for ``--save-tensors``, up to ``max_bytes`` over the whole run."""

    def __init__(self, max_bytes: int, warnings: list[str]):
        self.max_bytes = max_bytes
        self.used = 0
        self.capped = False
        self.warnings = warnings  # the recorder's list: the cap is reported once, in meta.warnings

    def request(self, st: StepBuffer, t: Tensor, module: str, name: str) -> int:
        """Queue ``t`` for /payloads; returns the step-local request index, or -1 over budget."""
        nbytes = t.numel() * (4 if t.dtype in (torch.bfloat16, torch.float16) else t.element_size())
        if self.used + nbytes > self.max_bytes:
            if not self.capped:
                self.capped = True
                self.warnings.append(
                    f"--max-tensor-bytes {self.max_bytes} reached at step {st.index} "
                    f"({module} {name}); later tensors keep stats only")
            return -1
        self.used += nbytes
        x = t.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        elif x.dtype == torch.bool:
            x = x.to(torch.uint8)
        else:
            x = x.clone()
        off, n = queue_bytes(st, x)
        st.payloads.append(PayloadRequest(off, n, dtype_name(x.dtype), tuple(x.shape), module, name,
                                          dtype_name(t.dtype)))
        return len(st.payloads) - 1  # step-local; remapped when the step is written


def copy_to_host(st: StepBuffer) -> np.ndarray:
    """The one device->host copy of a step: every queued chunk as one uint8 array."""
    if not st.device_chunks:
        return np.zeros(0, np.uint8)
    if len(st.device_chunks) == 1:
        return st.device_chunks[0].cpu().numpy()
    return torch.cat(st.device_chunks).cpu().numpy()


def stats_from_blob(blob: np.ndarray, slots: list[StatSlot] | tuple[StatSlot, ...],
                    sketch_of_row: np.ndarray | None = None, sk: "StepSketches | None" = None) -> np.ndarray:
    """Rows of [min, max, sum, norm, nan, inf] (nan/inf 0 where they were not counted). Slots of
    negative width (:func:`queue_stats_sketch`) take their sum and norm from the row's sketch
    (``sketch_of_row``: each row's sketch slot, ``sk``: the step's decoded sketches)."""
    off, width = np.asarray(list(slots), dtype=np.int64).reshape(-1, 2).T  # StatSlot pairs
    out = np.full((len(off), 6), np.nan)
    out[:, 4:] = 0.0
    f64 = blob[: len(blob) - len(blob) % 8].view(np.float64) if len(blob) >= 8 else np.zeros(0)
    for w, cols in ((4, (0, 1, 2, 3)), (6, (0, 1, 2, 3, 4, 5)), (-2, (0, 1)), (-4, (0, 1, 4, 5))):
        ok = (off >= 0) & (width == w)
        if ok.any():
            idx = (off[ok] // 8)[:, None] + np.arange(len(cols))[None, :]
            out[np.flatnonzero(ok)[:, None], np.asarray(cols)[None, :]] = f64[idx]
            if w < 0 and sk is not None and sketch_of_row is not None:
                rows = np.flatnonzero(ok)
                slot = sketch_of_row[rows]
                out[rows, 2] = sk.sums[slot]
                out[rows, 3] = sk.norms[slot]
    return out


def float_at(blob: np.ndarray, off: int) -> float:
    """The float64 at byte ``off`` of the step's host blob (a stat slot's first value: min)."""
    return float(blob[off:off + 8].view(np.float64)[0])
