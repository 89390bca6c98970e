"""Value sketches: a cheap per-token summary of a tensor that sees reorderings and small shifts.

A tensor of shape ``[..., D]`` is read as ``N = numel / D`` tokens (rows of its last dimension;
trailing dimensions of size 1 are skipped, see :func:`sketch_dim`). The recorder reads a
convolution's channel-first ``[N, C, *spatial]`` input and output as their N samples instead.
Its sketch holds, per token, ``1 + SKETCH_DIRS`` float16 values:

- column 0: the token's L2 norm divided by the tensor's largest token norm (``scale``, kept in
  the ``/sketches`` row), so every stored value lies in ``[0, 1]`` and float16 cannot overflow;
- columns 1..K: the cosine between the token and K fixed random unit directions (random signs
  over sqrt(D), from an integer hash of the hidden size ``D`` alone: :func:`projection`), so two
  implementations with the same hidden size project onto the same directions and their
  sketches compare token by token. A wide token (more than ``MAX_SKETCH_COLS`` values) is
  projected on the values :func:`sampled_columns` reads, and its cosines are taken against
  those values (against the whole token they would be ~1/sqrt(D), below float16's resolution
  of a difference).

Summary statistics (min, max, mean, std) do not change when rows are permuted or shifted; these
do. float16 keeps ~3 significant digits: differences below ~1e-3 of a token's norm are below the
sketch's resolution (the stats, kept in float64, still see them).

Shared by the recorder (which computes norms and projections on the device, divides and rounds
the cosines there and fills column 0 on the host with :func:`encode_column0`: the bits of
:func:`encode`), the importer and the synthetic traces (:func:`sketch_of`, numpy).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: random directions per token (the issue asks for 8-16; 8 keeps the recording cost down)
SKETCH_DIRS = 8
SKETCH_WIDTH = 1 + SKETCH_DIRS
#: tensors with more tokens than this are not sketched (their stats still are)
MAX_SKETCH_ROWS = 1 << 16
#: a token wider than this (vocabulary logits) is projected on ``WIDE_BLOCKS`` blocks of
#: contiguous values spread over it, this many values in all (:func:`sampled_columns`; its norm
#: still covers every value): the projection reads at most 4096 values per token, and reads them
#: without a gather (a strided sample of a [T, 151936] logits tensor touched all of its memory)
MAX_SKETCH_COLS = 4096
WIDE_BLOCKS = 8
#: the sketch definition, kept in ``/meta`` ``run_json`` as ``sketch_version`` by the writer of
#: any trace with sketches. 2: wide tokens projected on blocks (:func:`sampled_columns`); 1 (no
#: ``sketch_version``: traces written before): on every ``ceil(D / 4096)``-th value. Sketches of
#: wide tokens are compared only between traces of the same version
SKETCH_VERSION = 2


def sampled_columns(d: int) -> np.ndarray:
    """The values of a token of ``d`` values that its projection reads: all of them up to
    ``MAX_SKETCH_COLS``; past that, ``WIDE_BLOCKS`` blocks of ``MAX_SKETCH_COLS // WIDE_BLOCKS``
    contiguous values, block ``b`` starting at value ``b * (d // WIDE_BLOCKS)``."""
    d = int(d)
    if d <= MAX_SKETCH_COLS:
        return np.arange(d)
    per = MAX_SKETCH_COLS // WIDE_BLOCKS
    return (np.arange(WIDE_BLOCKS)[:, None] * (d // WIDE_BLOCKS) + np.arange(per)[None, :]).ravel()


SKETCH_DTYPE = np.dtype([
    ("tensor", np.int64),   # row in /tensors
    ("rows", np.int64),     # N tokens (rows of the last dimension)
    ("width", np.int16),    # values per token: 1 + K
    ("scale", np.float32),  # the largest token norm (column 0 is norm / scale)
    ("dtype", np.int32),    # string id: the tensor's dtype (the tolerance a comparison allows)
    ("digest", np.uint64),  # digests(): equal digests and scales mean equal sketches
    ("off", np.int64),      # element offset of the [N, width] float16 block in /sketch_data
])


def sketch_dim(shape) -> int:
    """The size of a token: the last dimension larger than 1 (a conv's ``[N, C, 1, 1, 1]`` output
    has tokens of ``C`` values), or 1 when there is none."""
    for d in reversed(tuple(shape)):
        if d != 1:
            return int(d)
    return 1


_M31 = (1 << 31) - 1


def projection_signs(d: int, k: int = SKETCH_DIRS, xp=np):
    """The signs (+1/-1, int64 ``[d, k]``) of the sketch directions for hidden size ``d``: a
    fixed integer hash of (row, column, d), every intermediate below 2^62, so numpy and torch
    (``xp=torch``: computed on the device, no copy from the host) give the same bits."""
    e = xp.arange(int(d) * k, dtype=xp.int64).reshape(int(d), k)
    h = (e * 2654435761 + (int(d) * 40503 + 1)) & _M31
    h = ((h ^ (h >> 15)) * 1103515245 + 12345) & _M31
    h = ((h ^ (h >> 13)) * 1103515245 + 12345) & _M31
    return ((h >> 16) & 1) * 2 - 1


@lru_cache(maxsize=64)
def projection(dim: int, k: int = SKETCH_DIRS) -> np.ndarray:
    """``[dim, k]`` float32 unit columns, the same for every trace with this hidden size: random
    signs over sqrt(m) on the m rows read (:func:`sampled_columns`, in their order), zero
    elsewhere."""
    cols = sampled_columns(dim)
    m = len(cols)
    p = np.zeros((int(dim), k), np.float32)
    p[cols] = projection_signs(m, k).astype(np.float32) * np.float32(1.0 / np.sqrt(m))
    p.setflags(write=False)
    return p


def encode(norms: np.ndarray, proj: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode several sketches at once.

    ``norms``: ``[T]`` float32 token norms of all sketches back to back; ``proj``: ``[T, K]``
    their projections; ``counts``: tokens per sketch (each > 0). Returns ``(scales [S] float32,
    data [T, 1 + K] float16)``: column 0 ``norm / scale`` (:func:`encode_column0`), the rest
    ``proj / norm`` in float32 rounded to float16, 0 for a zero token. A NaN token reads as NaN.
    The recorder divides and rounds on the device (``torch``: the same IEEE operations, the same
    bits) and calls :func:`encode_column0`."""
    counts = np.asarray(counts, dtype=np.int64)
    norms = np.asarray(norms, dtype=np.float32)
    proj = np.asarray(proj, dtype=np.float32).reshape(len(norms), -1)
    out = np.empty((len(norms), 1 + proj.shape[1]), np.float16)
    if not len(counts):
        return np.zeros(0, np.float32), out
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        np.divide(proj, norms[:, None], out=out[:, 1:], casting="unsafe")
    return encode_column0(norms, counts, out), out


def encode_column0(norms: np.ndarray, counts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Fill column 0 of ``out`` (``[T, 1 + K]`` float16, columns 1..K already ``proj / norm``)
    with ``norm / scale`` and give zero tokens cosines 0; returns the scales (``[S]`` float32,
    the largest token norm of each sketch; a sketch whose scale is 0 or NaN has column 0 at 0,
    NaN for its non-finite tokens)."""
    starts = np.cumsum(counts) - counts
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scales = np.maximum.reduceat(norms, starts)
        out[:, 0] = norms / np.repeat(scales, counts)
        dead = ~(scales > 0)
        if dead.any():
            rows = np.repeat(dead, counts)
            out[rows, 0] = np.where(np.isfinite(norms[rows]), 0, np.nan)
    zero = norms == 0
    if zero.any():
        out[zero, 1:] = 0
    return scales.astype(np.float32)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ARANGE = np.zeros(0, np.uint64)
#: positions kept cached (8 MiB); longer arrays are made on demand and not kept
_ARANGE_MAX = 1 << 20


def _positions(n: int) -> np.ndarray:
    """``arange(n)`` as uint64: a cached, read-only array up to ``_ARANGE_MAX`` (a recording
    digests every step's sketches), made afresh beyond. Safe from several threads (the cache is
    read once, replaced whole)."""
    global _ARANGE
    cached = _ARANGE
    if len(cached) >= n:
        return cached[:n]
    if n > _ARANGE_MAX:
        return np.arange(n, dtype=np.uint64)
    cached = np.arange(min(max(n, 2 * len(cached)), _ARANGE_MAX), dtype=np.uint64)
    cached.setflags(write=False)
    _ARANGE = cached
    return cached[:n]


def digests(data: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One uint64 per sketch of ``data`` (``[T, width]`` float16, the sketches' tokens back to
    back, ``counts`` tokens each): the sum of the values' bit patterns ``u_i``, each weighted by
    ``i * G + 1`` for its place ``i`` in the sketch (G odd), modulo 2^64. Two sketches with the
    same bits have the same digest; a reordering changes it. ``diff`` compares the digests (and
    scales) first and reads the values only of the pairs whose digests differ.

    Computed with the place in the whole array, ``j = start + i``: the sum is
    ``G (sum u_j j) - G start (sum u_j) + sum u_j``, exact modulo 2^64."""
    counts = np.asarray(counts, dtype=np.int64)
    if not len(counts):
        return np.zeros(0, np.uint64)
    width = data.shape[1] if data.ndim == 2 else 1
    u = np.ascontiguousarray(data, dtype=np.float16).reshape(-1).view(np.uint16)
    if not len(u):
        return np.zeros(len(counts), np.uint64)
    n = counts * width
    starts = np.cumsum(n) - n
    with np.errstate(over="ignore"):
        # uint16 x uint64 (no uint64 copy of the values), sums accumulated in uint64
        suj = np.add.reduceat(np.multiply(u, _positions(len(u))), starts)
        su = np.add.reduceat(u, starts, dtype=np.uint64)
        return _GOLDEN * suj - _GOLDEN * starts.astype(np.uint64) * su + su


def sketch_of(x: np.ndarray, max_rows: int = MAX_SKETCH_ROWS) -> tuple[float, np.ndarray] | None:
    """The sketch of one floating array ``[..., D]`` (numpy: the importer, synthetic traces):
    ``(scale, data [N, 1 + K] float16)``, or None when it has no tokens or too many."""
    x = np.asarray(x)
    if x.ndim == 0 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        return None
    d = sketch_dim(x.shape)
    x2 = x.reshape(-1, d).astype(np.float32, copy=False)
    if len(x2) > max_rows:
        return None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        norms = _row_norms(x2)
        cols = sampled_columns(d)      # the rows of projection(d) that are not zero
        if len(cols) < d:
            # a wide token: cosines against the values read (encode divides by the token's norm)
            xr = x2[:, cols]
            read = _row_norms(xr)
            factor = np.where(read > 0, norms / read, np.float32(0))
            proj = (xr @ projection(d)[cols]) * factor[:, None]
        else:
            proj = x2 @ projection(d)
    scales, data = encode(norms, proj, np.array([len(x2)]))
    return float(scales[0]), data


def _row_norms(x: np.ndarray) -> np.ndarray:
    """float32 L2 norm of each row of ``x``, summed in float64."""
    x64 = x.astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", x64, x64)).astype(np.float32)


def decode(scale: float, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(norms [N] float64, cosines [N, K] float64)`` of a stored sketch."""
    d = np.asarray(data, dtype=np.float64)
    return d[:, 0] * float(scale), d[:, 1:]
