"""Which position ids a step used, for the ``positions`` rules: normalised ``[R, B, S]``
values, the probe RoPE actually read, and the probe where positions first reach the
language model."""

from __future__ import annotations

import numpy as np

from vlmscope.semantics import is_rotary_class

from .._index import TraceIndex
from ._common import blob_values, first_per_group, memo


def positions_norm(v: np.ndarray | None) -> np.ndarray | None:
    """Position ids as ``[R, B, S]``: R = 3 for M-RoPE (a leading text row of a 4-row tensor is
    dropped), 1 for 1-D."""
    if v is None:
        return None
    if v.ndim == 3:
        return v[1:] if v.shape[0] == 4 else v
    if v.ndim == 2:
        return v[None]
    if v.ndim == 1:
        return v[None, None]
    return None


def kv_text(v: np.ndarray | None) -> np.ndarray | None:
    """The 1-D (KV-index style) positions inside a position_ids value, ``[B, S]``, or None."""
    if v is None:
        return None
    if v.ndim == 2:
        return v
    if v.ndim == 3 and v.shape[0] == 4:
        return v[0]
    if v.ndim == 1:
        return v[None]
    return None


def is_mrope_model(ix: TraceIndex) -> bool:
    """The config names an ``mrope_section``, or the family is a Qwen-VL one."""
    cfg = ix.config or {}
    tc = cfg.get("text_config") or cfg
    rp = (tc.get("rope_parameters") or tc.get("rope_scaling") or {}) if isinstance(tc, dict) else {}
    return bool(rp.get("mrope_section")) or ix.family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _position_priorities(ix: TraceIndex, rope_rows: np.ndarray, pos_rows: np.ndarray) -> np.ndarray:
    """Priority of each row of ``rope_rows`` then ``pos_rows`` (lower wins): 0 a ``rope_positions``
    probe, 1 position_ids at a rotary module, 2 at the text model, 3 any 3-D one, 4 the others."""
    prio = np.concatenate([np.zeros(len(rope_rows), np.int64), np.full(len(pos_rows), 3, np.int64)])
    if len(pos_rows):
        p = ix.probes
        mods = p["module"][pos_rows]
        rotary = np.array([is_rotary_class(str(c)) or "rotary" in str(pth).lower()
                           for c, pth in zip(ix.module_classes, ix.module_paths)], bool)
        is_rot = rotary[mods]
        is_tm = mods == ix.text_model_module
        is3 = p["ndim"][pos_rows] == 3
        prio[len(rope_rows):] = np.where(is_rot, 1, np.where(is_tm, 2, np.where(is3, 3, 4)))
    return prio


def used_positions(ix: TraceIndex) -> dict[int, tuple[int, np.ndarray, bool]]:
    """Per step: (probe row, positions [R,B,S], from_rope_probe) of the positions RoPE used.

    Preference: a ``rope_positions`` probe; else ``position_ids`` received by a rotary module;
    else by the text model; else the first ``position_ids`` probe on the text side. Computed
    once per index (several rules read it).
    """
    return memo(ix, "_used_positions", _used_positions)


def _used_positions(ix: TraceIndex) -> dict[int, tuple[int, np.ndarray, bool]]:
    p = ix.probes
    rope_rows = ix.probe_rows("rope_positions")
    pos_rows = ix.probe_rows("position_ids")
    if not len(rope_rows) and not len(pos_rows):
        return {}
    rows = np.concatenate([rope_rows, pos_rows])
    prio = _position_priorities(ix, rope_rows, pos_rows)
    order_key = prio * (1 << 40) + p["seq"][rows].astype(np.int64)
    steps = p["step"][rows].astype(np.int64)
    firsts = first_per_group(steps, order_key)
    chosen = rows[firsts]
    vals = blob_values(ix, chosen)
    q_len = ix.steps["q_len"]
    out = {}
    for r, pr in zip(chosen, prio[firsts]):
        v = positions_norm(vals.get(int(r)))
        if v is None:
            continue
        s = int(p["step"][r])
        q = int(q_len[s]) if s < len(q_len) else -1
        if pr == 0 and q > 0 and v.shape[-1] > q:   # rotary produced cos/sin for [0, kv_len)
            v = v[..., -q:]
        out[s] = (int(r), v, bool(pr == 0))
    return out


def _first_position_rows(ix: TraceIndex) -> dict[int, int]:
    rows = ix.probe_rows("position_ids")
    if not len(rows):
        return {}
    p = ix.probes
    f = rows[first_per_group(p["step"][rows].astype(np.int64), p["seq"][rows].astype(np.int64))]
    return dict(zip(p["step"][f].tolist(), f.tolist()))


def first_text_position_probe(ix: TraceIndex, step: int, fallback_row: int) -> int:
    """The earliest position_ids probe on the text side in ``step`` (where the positions
    first reach the language model); ``fallback_row`` when there is none."""
    r = memo(ix, "_first_pos", _first_position_rows).get(step)
    if r is None:
        return fallback_row
    return r if int(ix.probes["seq"][r]) <= int(ix.probes["seq"][fallback_row]) else fallback_row
