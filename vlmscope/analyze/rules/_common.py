"""Helpers shared by the rule families: vectorised grouping of table rows, decoded probe
values, and the per-step facts several families read (image spans, image grids, the masks
that reached the decoder layers).

Several rules derive the same facts from one :class:`TraceIndex`; :func:`memo` keeps them on
the index (one per open trace, see ``index_of``), so a trace computes each of them once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from vlmscope.semantics import image_spans

from .._index import TraceIndex
from .report import Violation


def memo(ix: TraceIndex, key: str, compute: Callable[[TraceIndex], Any]) -> Any:
    """``compute(ix)``, once per index: the result is kept in the index's ``__dict__`` under ``key``."""
    d = ix.__dict__
    if key not in d:
        d[key] = compute(ix)
    return d[key]


def step_arrays(ix: TraceIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``q_len``, ``cache_before`` and ``input_len`` per step, as int64."""
    st = ix.steps
    return (st["q_len"].astype(np.int64), st["cache_before"].astype(np.int64),
            st["input_len"].astype(np.int64))


def first_per_group(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indices (into ``keys``) of the first element of each distinct key, by ``order``."""
    if not len(keys):
        return np.zeros(0, np.int64)
    o = np.lexsort((order, keys))
    k = keys[o]
    first = np.ones(len(k), bool)
    first[1:] = k[1:] != k[:-1]
    return o[first]


def group_report(ix: TraceIndex, rows: np.ndarray, group_key: np.ndarray, make: Callable[[int, int], Violation]
                 ) -> list[Violation]:
    """One violation per distinct ``group_key`` over probe ``rows``: at the earliest row, with
    the other modules of the group listed in ``also``."""
    out: list[Violation] = []
    if not len(rows):
        return out
    p = ix.probes
    t = p["step"][rows].astype(np.int64) * (1 << 32) + p["seq"][rows].astype(np.int64)
    o = np.lexsort((t, group_key))
    k = group_key[o]
    start = np.nonzero(np.r_[True, k[1:] != k[:-1]])[0]
    end = np.r_[start[1:], len(k)]
    for a, b in zip(start, end):
        members = rows[o[a:b]]
        v = make(int(members[0]), int(b - a))
        mods = np.unique(p["module"][members])
        v.also = [m for m in (ix.module_path(int(x)) for x in mods[:9]) if m != v.module][:8]
        v.count = int(b - a)
        out.append(v)
    return out


def blob_values(ix: TraceIndex, rows: np.ndarray) -> dict[int, np.ndarray | None]:
    """Decoded values of probe rows, decoding each distinct stored blob once."""
    p = ix.probes
    if not len(rows):
        return {}
    off = p["data_off"][rows].astype(np.int64)
    ln = p["data_len"][rows].astype(np.int64)
    nd = p["ndim"][rows].astype(np.int64)
    lead = np.clip(p["shape"][rows][:, 0], 0, None).astype(np.int64)
    key = ((off * (int(ln.max()) + 1) + ln) * 9 + nd) * (int(lead.max()) + 1) + lead
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    vals = [ix.value(int(rows[i])) for i in first]
    return {r: vals[j] for r, j in zip(rows.tolist(), inv.ravel().tolist())}


def fmt_tokens(tok: Iterable[int], limit: int = 8) -> str:
    """``0, 1, 2, ... (12 in all)``: at most ``limit`` values."""
    tok = list(tok)
    s = ", ".join(str(t) for t in tok[:limit])
    return s + (f", ... ({len(tok)} in all)" if len(tok) > limit else "")


def mask_rows(ix: TraceIndex) -> np.ndarray:
    """attention_mask probes that reached the decoder layers (or attention modules)."""
    return memo(ix, "_mask_rows", _mask_rows)


def _mask_rows(ix: TraceIndex) -> np.ndarray:
    rows = ix.probe_rows("attention_mask")
    if not len(rows):
        return rows
    mods = ix.probes["module"][rows]
    at_layer = ix.layer_of_module[mods] >= 0
    if at_layer.any():
        return rows[at_layer]
    inside = ix.layer_under_module[mods] >= 0
    if inside.any():
        return rows[inside]
    return rows[ix.probes["ndim"][rows] >= 3]


def image_spans_by_step(ix: TraceIndex) -> dict[int, tuple[int, list[tuple[int, int, int]]]]:
    """Per step with image placeholders: (probe row, [(batch_row, start, end), ...]), from the
    step's first ``input_ids`` probe (its ``spans`` info, else its stored ids)."""
    rows = ix.probe_rows("input_ids", text_only=False)
    if not len(rows):
        return {}
    p = ix.probes
    firsts = first_per_group(p["step"][rows].astype(np.int64), p["seq"][rows].astype(np.int64))
    out = {}
    img_id = ix.meta.get("image_token_id")
    for r in rows[firsts]:
        info = ix.info(int(r))
        spans = info.get("spans")
        if spans is None:
            tok = info.get("image_token_id", img_id)
            v = ix.value(int(r))
            if v is None or tok is None:
                continue
            spans = image_spans(np.asarray(v), int(tok))
        spans = [tuple(int(x) for x in s) for s in spans]
        if spans:
            out[int(p["step"][r])] = (int(r), spans)
    return out


def _first_value_by_step(ix: TraceIndex, kind: str) -> dict[int, np.ndarray]:
    """Per step: the first ``kind`` probe's value, as a 2-D array."""
    out: dict[int, np.ndarray] = {}
    p = ix.probes
    for r in ix.probe_rows(kind, text_only=False):
        s = int(p["step"][r])
        if s not in out:
            v = ix.value(int(r))
            if v is not None:
                out[s] = np.atleast_2d(v)
    return out


def grids_by_step(ix: TraceIndex) -> dict[int, np.ndarray]:
    """Per step: the first ``image_grid_thw`` value, as ``[n_images, 3]``."""
    return _first_value_by_step(ix, "image_grid_thw")


# ---------------------------------------------------------------------------- batch rows


def root_module(ix: TraceIndex) -> int:
    """Module row of the recorded model itself (path ``""``), -1 when the trace has none."""
    hits = np.nonzero(ix.module_paths == "")[0] if len(ix.module_paths) else []
    return int(hits[0]) if len(hits) else -1


def call_starts(ix: TraceIndex) -> np.ndarray:
    """First (prefill) step of the call of each step (-1 for steps before the first prefill)."""
    def compute(ix: TraceIndex) -> np.ndarray:
        call = np.asarray(ix.call_of_step, np.int64)
        firsts = np.asarray(ix.call_first_steps, np.int64)
        return np.where(call >= 0, firsts[np.clip(call, 0, max(len(firsts) - 1, 0))] if len(firsts) else -1, -1)
    return memo(ix, "_call_starts", compute)


def root_mask_rows(ix: TraceIndex) -> np.ndarray:
    """Per step: the probe row of the 2-D attention mask the recorded model received (-1: none),
    the root's first 2-D ``attention_mask`` probe, else the step's first 2-D mask outside the
    decoder layers."""
    def compute(ix: TraceIndex) -> np.ndarray:
        out = np.full(max(ix.n_steps, 1), -1, np.int64)
        rows = ix.probe_rows("attention_mask", text_only=False)
        p = ix.probes
        rows = rows[p["ndim"][rows] == 2] if len(rows) else rows
        if not len(rows):
            return out
        mods = p["module"][rows].astype(np.int64)
        outside = ix.layer_under_module[np.clip(mods, 0, None)] < 0
        rows, mods = rows[outside], mods[outside]
        pri = np.where(mods == root_module(ix), 0, 1).astype(np.int64)
        order = pri * (1 << 40) + p["seq"][rows].astype(np.int64)
        firsts = rows[first_per_group(p["step"][rows].astype(np.int64), order)]
        out[p["step"][firsts].astype(np.int64)] = firsts
        return out
    return memo(ix, "_root_mask_rows", compute)


def root_mask_2d(ix: TraceIndex, s: int) -> np.ndarray | None:
    """The 2-D attention mask the recorded model received in step ``s``: bool ``[B, K]``, True
    where a key is a real token (None when there is none)."""
    cache = ix.__dict__.setdefault("_root_mask_2d", {})
    if s not in cache:
        rows = root_mask_rows(ix)
        r = int(rows[s]) if 0 <= s < len(rows) else -1
        v = ix.value(r) if r >= 0 else None
        cache[s] = np.asarray(v, bool) if v is not None and v.ndim == 2 else None
    return cache[s]


def prompt_padding(ix: TraceIndex, s: int) -> np.ndarray | None:
    """The padding of the prompt of step ``s``'s call, bool ``[B, L]`` (True = a padding
    position the processor added), from the 2-D mask of the call's prefill when that mask
    covers the prefill's tokens (``L == q_len``, empty cache). Keys from ``L`` on are the tokens
    the call generated, never padding. A step whose call's prefill is unknown uses its own 2-D
    mask (when it covers the step's keys)."""
    cache = ix.__dict__.setdefault("_prompt_padding", {})
    if s in cache:
        return cache[s]
    q_len, cb, _ = step_arrays(ix)
    p0 = int(call_starts(ix)[s]) if 0 <= s < ix.n_steps else -1
    pad = None
    if p0 >= 0:
        if ("call", p0) not in cache:
            m = root_mask_2d(ix, p0)
            ok = m is not None and m.shape[1] == q_len[p0] and cb[p0] <= 0
            cache[("call", p0)] = ~m if ok else None
        pad = cache[("call", p0)]
    if pad is None and 0 <= s < ix.n_steps:
        m = root_mask_2d(ix, s)
        if m is not None and q_len[s] >= 0 and m.shape[1] == max(int(cb[s]), 0) + q_len[s]:
            pad = ~m
    cache[s] = pad
    return pad


def padded_steps(ix: TraceIndex) -> np.ndarray:
    """Bool per step: its call's prompt has padding (see :func:`prompt_padding`)."""
    def compute(ix: TraceIndex) -> np.ndarray:
        n = ix.n_steps
        out = np.zeros(max(n, 1), bool)
        if not n:
            return out
        starts = call_starts(ix)
        has_mask = root_mask_rows(ix)[:n] >= 0
        fallback = starts < 0
        for p0 in np.unique(starts[starts >= 0]).tolist():
            pk = prompt_padding(ix, p0) if has_mask[p0] else None
            mine = starts == p0
            if pk is not None and ix.__dict__["_prompt_padding"].get(("call", p0)) is not None:
                out[:n][mine] = bool(pk.any())
            else:
                fallback |= mine
        for s in np.nonzero(fallback & has_mask)[0].tolist():   # their own 2-D mask
            pk = prompt_padding(ix, s)
            out[s] = pk is not None and bool(pk.any())
        return out
    return memo(ix, "_padded_steps", compute)


def sliding_window_layers(ix: TraceIndex) -> bool:
    """The text model attends through a sliding window on some layer (the config's
    ``layer_types``, or ``use_sliding_window``)."""
    cfg = ix.config if isinstance(ix.config, dict) else {}
    for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        lt = c.get("layer_types")
        if isinstance(lt, list) and any(str(x) == "sliding_attention" for x in lt):
            return True
        if c.get("use_sliding_window") is True and c.get("sliding_window"):
            return True
    return False


def video_grids_by_step(ix: TraceIndex) -> dict[int, np.ndarray]:
    """Per step: the first ``video_grid_thw`` value, as ``[n_videos, 3]``."""
    return memo(ix, "_video_grids", lambda ix: _first_value_by_step(ix, "video_grid_thw"))
