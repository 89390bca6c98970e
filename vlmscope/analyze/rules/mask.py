"""Rule family ``mask``: the attention mask that reaches the decoder layers fits the keys and
the attention scores it is added to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmscope.semantics import fmt_shape

from .._index import TraceIndex
from ._common import first_per_group, group_report, mask_rows, step_arrays
from .registry import rule
from .report import Violation


@dataclass
class _MaskGeometry:
    """Per mask probe row (aligned arrays): what the mask is and what the step needs."""

    rows: np.ndarray
    step: np.ndarray
    nd: np.ndarray
    shp: np.ndarray
    q: np.ndarray        # q_len of the step
    c: np.ndarray        # cache length before the step (0 when unknown)
    last: np.ndarray     # the mask's key length (last dim)
    qdim: np.ndarray     # its query length (q_len for a mask of fewer than 3 dims)
    b: np.ndarray        # the step's batch size (0 unknown)
    heads: int           # num_attention_heads (0 unknown)
    bad_k: np.ndarray
    bad_q: np.ndarray
    bad_b: np.ndarray
    bad_h: np.ndarray


def _mask_geometry(ix: TraceIndex, rows: np.ndarray) -> _MaskGeometry:
    p = ix.probes
    q_len, cb, _ = step_arrays(ix)
    step = p["step"][rows].astype(np.int64)
    nd = p["ndim"][rows].astype(np.int64)
    shp = p["shape"][rows]
    q = q_len[step]
    c = np.where(cb[step] < 0, 0, cb[step])
    last = shp[np.arange(len(rows)), np.clip(nd - 1, 0, 7)]
    qdim = np.where(nd >= 3, shp[np.arange(len(rows)), np.clip(nd - 2, 0, 7)], q)
    heads = int(ix.meta.get("num_attention_heads") or 0)
    b = _batch_per_step(ix)[step]
    return _MaskGeometry(
        rows, step, nd, shp, q, c, last, qdim, b, heads,
        bad_k=(q >= 0) & (last != c + q),
        bad_q=(q >= 0) & (nd >= 3) & (qdim != q) & (qdim != 1),
        bad_b=(nd >= 2) & (b > 0) & (shp[:, 0] != b) & (shp[:, 0] != 1),
        bad_h=(nd == 4) & (shp[:, 1] != 1) & ((shp[:, 1] != heads) if heads else False))


def _batch_per_step(ix: TraceIndex) -> np.ndarray:
    """Batch size per step: dim 0 of its first input_ids probe when that is 2-D (0 unknown)."""
    out = np.zeros(max(ix.n_steps, 1), np.int64)
    rows = ix.probe_rows("input_ids", text_only=False)
    if len(rows):
        p = ix.probes
        firsts = rows[first_per_group(p["step"][rows].astype(np.int64), p["seq"][rows].astype(np.int64))]
        ok = p["ndim"][firsts] == 2
        out[p["step"][firsts][ok]] = p["shape"][firsts][ok, 0]
    return out


@rule("mask.length", "the attention mask's key length equals cache length before the step + q_len; "
      "a 4-D mask's query length equals q_len and it broadcasts to [B, heads, q, k]")
def rule_mask_length(ix: TraceIndex) -> list[Violation]:
    rows = mask_rows(ix)
    if not len(rows):
        return []   # no mask reached the layers: SDPA is_causal, a valid case
    g = _mask_geometry(ix, rows)
    sel = np.nonzero(g.bad_k | g.bad_q | g.bad_b | g.bad_h)[0]
    if not len(sel):
        return []
    key = g.step[sel] * (1 << 20) + g.last[sel] * 8 + g.nd[sel]

    def make(r: int, n: int) -> Violation:
        return _mask_violation(ix, g, int(np.nonzero(rows == r)[0][0]), r)

    return group_report(ix, rows[sel], key, make)


def _mask_violation(ix: TraceIndex, g: _MaskGeometry, i: int, r: int) -> Violation:
    """The violation of mask probe ``r`` (index ``i`` in ``g``): key length first, then query
    length, then batch/head broadcasting."""
    p = ix.probes
    s = int(g.step[i])
    shape = fmt_shape(g.shp[i][: g.nd[i]])
    k, qq, cc = int(g.last[i]), int(g.q[i]), int(g.c[i])
    if g.bad_k[i]:
        expected = f"key length {cc + qq} (cache {cc} + q_len {qq})"
        actual = f"mask {shape}: key length {k}"
        _, _, in_len = step_arrays(ix)
        hint = _key_length_hint(k, cc, qq, int(in_len[s]))
    elif g.bad_q[i]:
        expected = f"query length {qq} (q_len) or 1"
        actual = f"mask {shape}: query length {int(g.qdim[i])}"
        hint = "mask query length does not match the hidden states entering the layer"
    else:
        expected = f"broadcastable to [B={int(g.b[i])}, heads={g.heads or '?'}, q={qq}, k={cc + qq}]"
        actual = f"mask {shape}"
        hint = "mask batch/head dims do not broadcast to the attention scores"
    return Violation("mask.length", s, ix.module_path(int(p["module"][r])), expected, actual, hint,
                     seq=int(p["seq"][r]))


def _key_length_hint(k: int, cc: int, qq: int, il: int) -> str:
    """Why a mask of key length ``k`` was built, given cache ``cc``, q_len ``qq`` and input_len ``il``."""
    if il >= 0 and il != qq and k in (cc + il, il):
        return "mask was built for the token sequence, not the embedding sequence after the image splice"
    if k == cc:
        return "mask covers only the cached keys, not this step's new tokens"
    if k == qq and cc > 0:
        return "mask covers only this step's tokens and ignores the cache"
    return "mask was built for a different sequence than the keys it is applied to"
