"""Device-side values: tensor stats, probe values and payloads queued on the tensor's device,
and the one device->host copy per step that brings them back.

Nothing here synchronises with the device while the forward runs: every value is a small
tensor appended to the step's ``device_chunks`` as raw bytes, and ``copy_to_host`` turns them
into one host byte array at the end of the step (one ``torch.cat``, one ``.cpu()``).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import Tensor

from vlmscope.recorder.buffer import NO_STATS, PayloadRequest, StatSlot, StepBuffer

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


def stats_from_blob(blob: np.ndarray, slots: list[StatSlot] | tuple[StatSlot, ...]) -> np.ndarray:
    """Rows of [min, max, sum, norm, nan, inf] (nan/inf 0 where they were not counted)."""
    off, width = np.asarray(list(slots), dtype=np.int64).reshape(-1, 2).T  # StatSlot pairs
    out = np.full((len(off), 6), np.nan)
    out[:, 4:] = 0.0
    f64 = blob[: len(blob) - len(blob) % 8].view(np.float64) if len(blob) >= 8 else np.zeros(0)
    for w in (4, 6):
        ok = (off >= 0) & (width == w)
        if ok.any():
            idx = (off[ok] // 8)[:, None] + np.arange(w)[None, :]
            out[np.flatnonzero(ok)[:, None], np.arange(w)[None, :]] = f64[idx]
    return out


def float_at(blob: np.ndarray, off: int) -> float:
    """The float64 at byte ``off`` of the step's host blob (a stat slot's first value: min)."""
    return float(blob[off:off + 8].view(np.float64)[0])
