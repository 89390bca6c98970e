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


def grids_by_step(ix: TraceIndex) -> dict[int, np.ndarray]:
    """Per step: the first ``image_grid_thw`` value, as ``[n_images, 3]``."""
    rows = ix.probe_rows("image_grid_thw", text_only=False)
    out: dict[int, np.ndarray] = {}
    p = ix.probes
    for r in rows:
        s = int(p["step"][r])
        if s not in out:
            v = ix.value(int(r))
            if v is not None:
                out[s] = np.atleast_2d(v)
    return out
