"""Device-side values: tensor stats, probe values and payloads queued on the tensor's device,
and the one device->host copy per step that brings them back.

Nothing here synchronises with the device while the forward runs: every value is a small
tensor appended to the step's ``device_chunks`` as raw bytes (the value sketches to their own
lists), and ``copy_to_host`` writes them all into one device byte array at the end of the step,
brought back with one ``.cpu()``.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from vlmscope.recorder.buffer import NO_STATS, PayloadRequest, StatSlot, StepBuffer
from vlmscope.trace.sketch import MAX_SKETCH_COLS, MAX_SKETCH_ROWS, WIDE_BLOCKS, sketch_dim
from vlmscope.trace.sketch import encode_column0
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
    ``device``: ``[K + 1, D]``, transposed, plus a row of ones (each token's sum, for the tensor's
    sum: the statistics of a sketched tensor need no pass of their own), for
    ``torch.nn.functional.linear``; for a wide token (``D > MAX_SKETCH_COLS``) ``[B, K, L]``, the
    directions on each of its B blocks of L values, for one ``bmm``. Made there once per (size,
    device)."""
    p = _PROJ.get((d, device))
    if p is None:
        # built on the device (integer ops, no host-to-device copy: nothing to synchronise);
        # K outputs a row for linear(): a matmul against a narrow [D, K] operand runs at half the
        # speed on CPU BLAS (here each output is a dot product over contiguous memory)
        m = min(d, MAX_SKETCH_COLS)
        with torch.device(device):
            signs = projection_signs(m, xp=torch).to(torch.float32) * (1.0 / math.sqrt(m))
            if d > MAX_SKETCH_COLS:   # rows b*L..(b+1)*L-1 of the signs belong to block b
                p = signs.reshape(WIDE_BLOCKS, m // WIDE_BLOCKS, -1).transpose(1, 2).contiguous()
            else:
                p = torch.cat((signs.t(), torch.ones((1, d), dtype=torch.float32))).contiguous()
        _PROJ[(d, device)] = p
    return p


#: dtypes whose statistics can come from the sketch's own ops (float32 accumulation, as before)
_FUSED = (torch.float32, torch.float16, torch.bfloat16)


def queue_stats_sketch(st: StepBuffer, t: Tensor, stats: bool = True, per_token: int = 0) -> tuple[StatSlot, int]:
    """The value sketch of a floating tensor ``[..., D]`` and (``stats``) its statistics, queued
    on its device: ``(stat slot, sketch slot)`` (``NO_STATS`` / -1 when there are none).
    ``per_token``: the values per token when they are not
    :func:`~vlmscope.trace.sketch.sketch_dim`'s (a convolution's channel-first tensor: one token
    per sample), 0 for that default.

    The sketch: per token (row of the last dimension larger than 1) its projection on the K fixed
    directions for ``D`` and its sum (a row of ones in the same ``linear``), its L2 norm, and the
    tensor's min and max: one ``aminmax``, one norm and one ``linear`` per tensor, kept in the
    step's lists and joined once per step by :func:`copy_to_host`, which also divides and rounds
    the cosines (see :mod:`vlmscope.trace.sketch`). For float32/16/bfloat16 tensors the
    statistics come from the sketch (the sum from the tokens' sums, the norm from their norms, min
    and max), so they cost no pass of their own: the stat slot then has a negative width (-2; -4
    with the NaN/Inf counts, queued separately as int64 at its offset). Other tensors (float64,
    too many tokens) get :func:`queue_stats` and, when it fits, a sketch. A tensor passed on from
    module to module is done once per step."""
    key = (id(t), version_of(t))
    hit = st.sketch_dedupe.get(key)
    if hit is not None:
        ref, slot, hit_per_token = hit
        if ref() is t and hit_per_token == per_token:    # the same tensor read as the same tokens
            s_hit = st.stat_dedupe.get(key) if stats else None
            return (s_hit[1] if s_hit is not None and s_hit[0]() is t else
                    (queue_stats(st, t) if stats else NO_STATS)), slot
    if not t.is_floating_point() or t.dim() == 0 or t.layout != torch.strided or t.is_meta:
        return (queue_stats(st, t) if stats else NO_STATS), -1
    d = per_token or sketch_dim(t.shape)
    numel = t.numel()
    if numel == 0 or numel // d > MAX_SKETCH_ROWS:
        return (queue_stats(st, t) if stats else NO_STATS), -1
    n = numel // d
    fused = stats and t.dtype in _FUSED
    stat_slot = queue_stats(st, t) if stats and not fused else NO_STATS
    x = t.detach().reshape(n, d)
    if x.dtype != torch.float32:
        x = x.float()
    mn, mx = torch.aminmax(x)
    on_cpu = x.device.type == "cpu"
    if on_cpu:   # the values are on the host already: read now, no join of 0-d tensors at the step's end
        mn, mx = float(mn), float(mx)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if d <= MAX_SKETCH_COLS:
        proj = torch.nn.functional.linear(x, _projection(d, x.device))
    else:   # a wide token: its blocks projected (a strided view, no copy), its sum from all values
        if x.stride(1) != 1:
            x = x.contiguous()
        per = MAX_SKETCH_COLS // WIDE_BLOCKS
        blocks = x.as_strided((WIDE_BLOCKS, n, per), (d // WIDE_BLOCKS, x.stride(0), 1))
        # cosines against the values read (the step divides by the token's norm: scaled here by
        # norm / norm of the values read, 0 when those are all 0), as sketch.sketch_of does
        read = torch.linalg.vector_norm(blocks, dim=(0, 2)).unsqueeze(1)
        factor = torch.where(read > 0, norms / read, 0.0)
        proj = torch.cat((torch.bmm(blocks, _projection(d, x.device).transpose(1, 2)).sum(0) * factor,
                          x.sum(1, keepdim=True)), 1)
    slot = len(st.sketch_rows)
    st.sketch_proj.append(proj)
    st.sketch_norms.append(norms)
    st.sketch_min.append(mn)
    st.sketch_max.append(mx)
    st.sketch_rows.append(n)
    if fused:
        # NaN/Inf counts only when they can be non-zero (as queue_stats decides)
        if not on_cpu or not (math.isfinite(mn) and math.isfinite(mx)):
            cnt = torch.stack((torch.isnan(x).sum(), torch.isinf(x).sum()))
            stat_slot = (st.device_bytes, -4)
            st.device_chunks.append(cnt.view(torch.uint8))
            st.device_bytes += 16
        else:
            stat_slot = (-2, -2)      # no bytes of its own: everything is in the sketch
    try:
        ref = weakref.ref(t)
        st.sketch_dedupe[key] = (ref, slot, per_token)
        if stats:
            st.stat_dedupe[key] = (ref, stat_slot)
    except TypeError:
        pass
    return stat_slot, slot


def queue_sketch(st: StepBuffer, t: Tensor) -> int:
    """The value sketch alone (statistics off): see :func:`queue_stats_sketch`."""
    return queue_stats_sketch(st, t, stats=False)[1]


class StepSketches(NamedTuple):
    scales: np.ndarray    # [S] float32, per slot
    data: np.ndarray      # [T, 1 + K] float16, the slots' tokens back to back
    counts: np.ndarray    # [S] tokens per slot
    sums: np.ndarray      # [S] float64: the tensor's sum (from its tokens' sums)
    norms: np.ndarray     # [S] float64: the tensor's L2 norm (from its tokens' norms)
    mins: np.ndarray      # [S] float64
    maxs: np.ndarray      # [S] float64


def sketches_from_blob(blob: np.ndarray, st: StepBuffer) -> StepSketches:
    """The step's sketches from the bytes :func:`copy_to_host` put after its other
    ``device_bytes``: the ``[T, 2]`` float32 sums and norms of the tokens, the ``[2S]`` float32
    mins and maxes, and the ``[T, 1 + K]`` float16 block whose cosines the device wrote. Column 0
    (norm / scale) is filled here, in place, and zero tokens get cosines 0: the result is
    :func:`vlmscope.trace.sketch.encode`'s, bit for bit."""
    n = np.asarray(st.sketch_rows, dtype=np.int64)
    lay = _sketch_layout(st)
    total, k = lay.total, lay.k
    tail = blob[st.device_bytes:lay.mm].view(np.float32).reshape(total, 2)
    mm = blob[lay.mm:lay.data].view(np.float32)
    data = blob[lay.data:lay.end].view(np.float16).reshape(total, 1 + k)
    first = np.cumsum(n) - n
    norms_t = tail[:, 1]
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.add.reduceat(tail[:, 0].astype(np.float64), first)
        n64 = norms_t.astype(np.float64)
        norms = np.sqrt(np.add.reduceat(n64 * n64, first))
    scales = encode_column0(norms_t, n, data)
    return StepSketches(scales, data, n, sums, norms, mm[:len(n)].astype(np.float64),
                        mm[len(n):].astype(np.float64))


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


class _SketchLayout(NamedTuple):
    """Where the step's sketches lie in its blob, from byte ``st.device_bytes`` on: the tokens'
    sums and norms ``[T, 2]`` float32 up to ``mm``, the mins then the maxes ``[2S]`` float32 up
    to ``data``, the ``[T, 1 + K]`` float16 block up to ``end``."""
    total: int     # tokens T
    k: int         # directions K
    mm: int
    data: int
    end: int


def _sketch_layout(st: StepBuffer) -> _SketchLayout | None:
    """The one definition of the sketches' place in the blob (written by :func:`copy_to_host`,
    read by :func:`sketches_from_blob`); None when the step has none."""
    if not st.sketch_proj:
        return None
    total = sum(st.sketch_rows)
    k = int(st.sketch_proj[0].shape[1]) - 1
    mm = st.device_bytes + 8 * total
    data = mm + 8 * len(st.sketch_rows)
    return _SketchLayout(total, k, mm, data, data + 2 * total * (1 + k))


def copy_to_host(st: StepBuffer) -> np.ndarray:
    """The one device->host copy of a step: every queued chunk as one uint8 array, the value
    sketches last, from byte ``st.device_bytes`` (see :func:`sketches_from_blob`). The blob is
    allocated once on the device and every part is written into its place (``out=``)."""
    chunks = st.device_chunks
    lay = _sketch_layout(st)
    if lay is None:
        if not chunks:
            return np.zeros(0, np.uint8)
        return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).cpu().numpy()
    nb, total, k = st.device_bytes, lay.total, lay.k
    proj, norms = torch.cat(st.sketch_proj), torch.cat(st.sketch_norms)   # [T, K + 1], [T, 1]
    buf = torch.empty(lay.end, dtype=torch.uint8, device=proj.device)
    if chunks:
        torch.cat(chunks, out=buf[:nb])
    # the tokens' sums and norms (float32: the tensors' statistics come from them), the mins
    # and maxes, then the [T, 1 + K] float16 block as stored, its cosines divided and rounded on
    # the device for the whole step at once (the same IEEE division and rounding as numpy's, see
    # sketch.encode); column 0 (norm / scale) is filled on the host
    torch.cat((proj[:, k:], norms), 1, out=buf[nb:lay.mm].view(torch.float32).view(total, 2))
    on_host = isinstance(st.sketch_min[0], float)     # a CPU step's (queue_stats_sketch)
    if not on_host:
        torch.stack(st.sketch_min + st.sketch_max, out=buf[lay.mm:lay.data].view(torch.float32))
    torch.div(proj[:, :k], norms, out=buf[lay.data:].view(torch.float16).view(total, 1 + k)[:, 1:])
    blob = buf.cpu().numpy()
    if on_host:
        blob[lay.mm:lay.data].view(np.float32)[:] = st.sketch_min + st.sketch_max
    return blob


def stats_from_blob(blob: np.ndarray, slots: list[StatSlot] | tuple[StatSlot, ...],
                    sketch_of_row: np.ndarray | None = None, sk: "StepSketches | None" = None) -> np.ndarray:
    """Rows of [min, max, sum, norm, nan, inf] (nan/inf 0 where they were not counted). Slots of
    negative width (:func:`queue_stats_sketch`) take their sum and norm from the row's sketch
    (``sketch_of_row``: each row's sketch slot, ``sk``: the step's decoded sketches)."""
    off, width = np.asarray(list(slots), dtype=np.int64).reshape(-1, 2).T  # StatSlot pairs
    out = np.full((len(off), 6), np.nan)
    out[:, 4:] = 0.0
    f64 = blob[: len(blob) - len(blob) % 8].view(np.float64) if len(blob) >= 8 else np.zeros(0)
    for w in (4, 6):
        ok = (off >= 0) & (width == w)
        if ok.any():
            idx = (off[ok] // 8)[:, None] + np.arange(w)[None, :]
            out[np.flatnonzero(ok)[:, None], np.arange(w)[None, :]] = f64[idx]
    fused = width < 0
    if fused.any() and sk is not None and sketch_of_row is not None:
        rows = np.flatnonzero(fused)
        slot = sketch_of_row[rows]
        out[rows, 0], out[rows, 1] = sk.mins[slot], sk.maxs[slot]
        out[rows, 2], out[rows, 3] = sk.sums[slot], sk.norms[slot]
        cnt = rows[width[rows] == -4]
        if len(cnt):
            i64 = blob[: len(blob) - len(blob) % 8].view(np.int64)
            out[cnt, 4] = i64[off[cnt] // 8]
            out[cnt, 5] = i64[off[cnt] // 8 + 1]
    return out


def float_at(blob: np.ndarray, off: int) -> float:
    """The float64 at byte ``off`` of the step's host blob (a stat slot's first value: min)."""
    return float(blob[off:off + 8].view(np.float64)[0])
