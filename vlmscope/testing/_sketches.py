"""Value sketches of the generate traces: made up, deterministic, one step at a time (numpy).

The synthetic tensors have stats but no values, so their sketches (:mod:`vlmscope.trace.sketch`)
are drawn from a seed that hashes what defines the tensor in the step: the step, its module,
role, shape and every stat of every row that shares it. Two traces of the same arguments get the
same sketch for the same tensor; a fault that changes a tensor's stats or shape (drift, NaN, a
shape change, a grown cache) changes its sketch. Rows that are one logical tensor (an output
passed on as the next module's input: the emitter's ``same`` names, :func:`sketch_sources`)
share one sketch (one ``off`` in ``/sketch_data``), as the recorder stores one tensor object once.

The values look like a recording's: column 0 is each token's norm over the largest (tokens of
``std * sqrt(D)`` give or take 20%), columns 1.. cosines of about ``1 / sqrt(D)``; a tensor with
NaN has NaN tokens. All of it is vectorised over the step's rows and tokens.
"""

from __future__ import annotations

import numpy as np

from vlmscope.trace.sketch import MAX_SKETCH_ROWS, SKETCH_DIRS, SKETCH_DTYPE, digests, encode

_U = np.uint64
_M1, _M2, _GOLD = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB), _U(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = _U(30), _U(27), _U(31), _U(11)
#: odd multipliers that fold a row's fields into one word before mixing
_FOLD = (np.random.default_rng(0x5EC7).integers(1, 1 << 62, size=32, dtype=np.int64) * 2 + 1).astype(np.uint64)
_COLS = (np.arange(1, 1 + 1 + SKETCH_DIRS, dtype=np.uint64) * _GOLD)[None, :]
_STATS = ("mean", "std", "min", "max", "absmax")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps)."""
    x = x + _GOLD
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


class _Layout:
    """What a step template's sketches look like whatever the step: the sketched rows, their
    logical tensors (``heads``: source rows; ``g``: each row's tensor; ``hr``: each head's
    place in ``rows``). Cached per template (its ``sketch_src`` array)."""

    def __init__(self, rows: np.ndarray, src: np.ndarray):
        self.rows = rows
        self.heads = np.unique(src[rows])
        self.g = np.searchsorted(self.heads, src[rows])
        self.hr = np.searchsorted(rows, self.heads)


_LAYOUTS: dict[int, tuple[np.ndarray, _Layout]] = {}


def _layout(src: np.ndarray, keep: np.ndarray | None, rows: np.ndarray) -> _Layout:
    if keep is not None:
        return _Layout(rows[keep], src)
    hit = _LAYOUTS.get(id(src))
    if hit is None or hit[0] is not src:
        if len(_LAYOUTS) > 16:
            _LAYOUTS.clear()
        hit = _LAYOUTS[id(src)] = (src, _Layout(rows, src))
    return hit[1]


def step_sketches(te: np.ndarray, src: np.ndarray, module: np.ndarray, step: int, seed: int, t0: int,
                  first_value: int, changed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A step's ``/sketches`` rows (global: tensors from ``t0``, values from ``first_value``) and
    their ``[T, 1 + SKETCH_DIRS]`` float16 values.

    ``te``: the step's tensor rows, stats filled; ``src``: each row's sketch source row (local,
    -1: none; :func:`vlmscope.testing._writer.sketch_sources`); ``module``: each row's module;
    ``changed``: rows whose values a fault changed although their stats did not (or None)."""
    width = 1 + SKETCH_DIRS
    rows = np.nonzero(src >= 0)[0]
    shape, ndim = te["shape"][rows], te["ndim"][rows]
    big = (np.arange(shape.shape[1])[None, :] < ndim[:, None]) & (shape != 1)
    last = shape.shape[1] - 1 - np.argmax(big[:, ::-1], axis=1)
    d = np.where(big.any(axis=1), shape[np.arange(len(rows)), last], 1)
    tokens = te["numel"][rows] // np.maximum(d, 1)
    keep = (tokens > 0) & (tokens <= MAX_SKETCH_ROWS)
    full = bool(keep.all())
    if not full:
        rows, d, tokens, shape, ndim = rows[keep], d[keep], tokens[keep], shape[keep], ndim[keep]
    if not len(rows):
        return np.zeros(0, SKETCH_DTYPE), np.zeros((0, width), np.float16)
    lay = _layout(src, None if full else keep, rows)
    g, heads, hr = lay.g, lay.heads, lay.hr
    # a word per row: the step, module, role, shape and stats (float bits), folded and mixed
    nf = 4 + shape.shape[1] + len(_STATS)
    words = np.empty((len(rows), nf), np.int64)
    words[:, 0] = step * 1_000_003 + seed
    words[:, 1] = module[rows]
    words[:, 2] = te["role"][rows] + 8 * ndim
    words[:, 3] = te["nan"][rows]
    if changed is not None:
        words[:, 2] += changed[rows].astype(np.int64) << 40
    words[:, 4:4 + shape.shape[1]] = shape
    for i, f in enumerate(_STATS):
        words[:, 4 + shape.shape[1] + i] = te[f][rows].view(np.int64)
    h = _mix(_mix(words.view(np.uint64) @ _FOLD[:nf]))
    gh = np.zeros(len(heads), np.uint64)
    np.add.at(gh, g, h)                        # every row of the tensor counts: a fault on one shows
    std = te["std"][heads]
    gnan = np.bincount(g, weights=words[:, 3] > 0, minlength=len(heads)) > 0
    gnan |= ~np.isfinite(std)
    n, dd = tokens[hr], d[hr].astype(np.float64)
    sigma = np.where(np.isfinite(std) & (std > 0), np.abs(std), 1.0)
    # the tokens: a value per column from a counter hashed with the tensor's word
    T = int(n.sum())
    starts = np.cumsum(n) - n
    if T == len(n):                            # one token each (decode steps, mostly)
        tok = np.zeros(T, np.uint64)
    else:
        tok = (np.arange(T, dtype=np.int64) - np.repeat(starts, n)).astype(np.uint64)
    x = _mix((np.repeat(gh, n) ^ _mix(tok))[:, None] + _COLS)
    u = (x >> _S11).astype(np.float64) * (1.0 / (1 << 53))
    norms = np.repeat(sigma * np.sqrt(dd), n) * (0.8 + 0.4 * u[:, 0])
    norms[np.repeat(gnan, n)] = np.nan
    cos = (2.0 * u[:, 1:] - 1.0) * np.repeat(np.minimum(1.0, 1.7 / np.sqrt(dd)), n)[:, None]
    scales, data = encode(norms.astype(np.float32), (cos * norms[:, None]).astype(np.float32), n)
    out = np.zeros(len(rows), SKETCH_DTYPE)
    out["tensor"] = t0 + rows
    out["rows"] = tokens
    out["width"] = width
    out["scale"] = scales[g]
    out["off"] = (first_value + starts * width)[g]
    out["dtype"] = te["dtype"][rows]
    out["digest"] = digests(data, n)[g]
    return out, data
