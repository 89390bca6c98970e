"""Rule family ``positions``: position ids have the step's length, continue across decode
steps, follow the M-RoPE layout over images (text after an image, the image grid, no silent
1-D fallback), keep ``rope_deltas`` constant, and agree with the KV index attention uses."""

from __future__ import annotations

import numpy as np

from vlmscope.semantics import fmt_shape

from .._index import TraceIndex
from ._common import blob_values, first_per_group, fmt_tokens, group_report, image_spans_by_step
from ._mrope import mrope_violations
from ._positions import first_text_position_probe, kv_text, used_positions
from .registry import rule
from .report import Violation


@rule("positions.length", "the position ids' last dim equals q_len")
def rule_positions_length(ix: TraceIndex) -> list[Violation]:
    rows = ix.probe_rows("position_ids")
    if not len(rows):
        return []
    p = ix.probes
    q_len = ix.steps["q_len"].astype(np.int64)
    step = p["step"][rows].astype(np.int64)
    nd = p["ndim"][rows].astype(np.int64)
    last = p["shape"][rows][np.arange(len(rows)), np.clip(nd - 1, 0, 7)]
    q = q_len[step]
    bad = (q >= 0) & (nd >= 1) & (last != q)
    sel = rows[bad]
    key = step[bad] * (1 << 20) + last[bad]

    def make(r: int, n: int) -> Violation:
        s = int(p["step"][r])
        return Violation("positions.length", s, ix.module_path(int(p["module"][r])),
                         f"last dim {int(q_len[s])} (q_len)",
                         f"position_ids {fmt_shape(p['shape'][r][: p['ndim'][r]])}",
                         "position ids were built for a different sequence length than the hidden states",
                         seq=int(p["seq"][r]))

    return group_report(ix, sel, key, make)


def _oracle_reported(ix: TraceIndex) -> set[int]:
    """Steps of the calls ``positions.oracle`` reported on: the rules that restate the same wrong
    positions (continuity, rope deltas) leave them to it."""
    from .oracle import oracle_result   # (imported here: positions.oracle registers after these rules)

    return oracle_result(ix).reported


def _first_diff_row(a: np.ndarray, b: np.ndarray) -> int:
    """The first batch row where two per-row values ([B] or [B, 1]) differ, -1 when unknown."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        return -1 if a.shape != b.shape else 0
    d = np.nonzero(a != b)[0]
    return int(d[0]) if len(d) else -1


# ---------------------------------------------------------------------------- continuity


@rule("positions.continuity", "decode positions continue exactly from the previous step of their call, per "
      "batch row (calls positions.oracle reports on are left to it)")
def rule_positions_continuity(ix: TraceIndex) -> list[Violation]:
    used = used_positions(ix)
    st = ix.steps
    out = []
    spans = image_spans_by_step(ix)
    call = ix.call_of_step
    done = _oracle_reported(ix)
    for s in range(1, ix.n_steps):
        if (s not in used or (s - 1) not in used or st["kind"][s] == 0 or s in spans or s in done
                or call[s] != call[s - 1]):
            continue
        r, cur, _ = used[s]
        _, prev, _ = used[s - 1]
        if cur.shape[1] != prev.shape[1] or cur.shape[0] != prev.shape[0]:
            continue
        v = _continuity_violation(ix, s, r, cur, prev)
        if v is not None:
            out.append(v)
    return out


def _continuity_violation(ix: TraceIndex, s: int, r: int, cur: np.ndarray, prev: np.ndarray) -> Violation | None:
    """Step ``s``'s positions ``cur`` (``[R, B, S]``, from probe ``r``) against the previous
    step's ``prev``: each batch row continues from its previous max + 1."""
    prev_max = prev.reshape(prev.shape[0], prev.shape[1], -1).max(axis=(0, 2))     # per batch row
    S = cur.shape[-1]
    exp = prev_max[None, :, None] + 1 + np.arange(S)[None, None, :]
    bad = cur != exp
    if not bad.any():
        return None
    p = ix.probes
    tok = np.nonzero(bad.any(axis=(0, 1)))[0]
    b = int(np.nonzero(bad[:, :, tok[0]].any(axis=0))[0][0])    # the first batch row that is off there
    cb = int(ix.steps["cache_before"][s])
    got = cur[:, b, tok[0]]
    off = int(got[0] - exp[0, b, tok[0]]) if len(got) else 0
    r = first_text_position_probe(ix, s, r)
    row = f" in batch row {b}" if b else ""
    return Violation(
        "positions.continuity", s, ix.module_path(int(p["module"][r])),
        f"position {int(exp[0, b, tok[0]])}{row} (previous step's max {int(prev_max[b])} + 1)",
        f"position {fmt_tokens(sorted(set(int(g) for g in got)))}" + (f" (off by {off:+d})" if len(got) else ""),
        _continuity_hint(ix, off), seq=int(p["seq"][r]),
        tokens=[cb + int(t) for t in tok] if cb >= 0 else [int(t) for t in tok], row=b)


def _continuity_hint(ix: TraceIndex, off: int) -> str:
    img = ix.steps["image_tokens"]
    n_img = int(img[0]) if len(img) else -1
    if n_img > 0 and abs(off) in (n_img, n_img - 1, n_img + 1):
        return ("decode positions are shifted by the image length: they were computed from the token count "
                "instead of continuing the M-RoPE positions (use the cached rope_deltas)")
    if off > 0:
        return "decode positions jump ahead of the previous step (cache length or rope delta counted twice?)"
    return "decode positions do not advance from the previous step (stale or recomputed position ids)"


# ---------------------------------------------------------------------------- M-RoPE over images


@rule("positions.mrope-text", "M-RoPE: text positions after an image continue from the image block's max + 1")
def rule_mrope_text(ix: TraceIndex) -> list[Violation]:
    return mrope_violations(ix)["positions.mrope-text"]


@rule("positions.mrope-grid", "M-RoPE: the image span's t/h/w rows match the merged grid from image_grid_thw")
def rule_mrope_grid(ix: TraceIndex) -> list[Violation]:
    return mrope_violations(ix)["positions.mrope-grid"]


@rule("positions.fallback-1d", "an M-RoPE model (Qwen2-VL / Qwen2.5-VL) gets 1-D positions over an image "
      "(e.g. Qwen2.5-VL without the processor's mm_token_type_ids)")
def rule_fallback_1d(ix: TraceIndex) -> list[Violation]:
    return mrope_violations(ix)["positions.fallback-1d"]


# ---------------------------------------------------------------------------- rope deltas


@rule("positions.rope-deltas", "M-RoPE: rope_deltas (position - KV index) stays constant across the decode steps "
      "of a call (calls positions.oracle reports on are left to it)")
def rule_rope_deltas(ix: TraceIndex) -> list[Violation]:
    rows = ix.probe_rows("rope_deltas", text_only=False)
    if rows.size:
        return _stored_delta_violations(ix, rows)
    return _derived_delta_violations(ix)


def _stored_delta_violations(ix: TraceIndex, rows: np.ndarray) -> list[Violation]:
    """The recorded ``rope_deltas`` of every decode step (its first probe: the argument, else the
    model's state) against the call's first decode step."""
    p = ix.probes
    st = ix.steps
    call = ix.call_of_step
    done = _oracle_reported(ix)
    out = []
    ref = None
    seen: set[int] = set()
    rows = rows[np.argsort(p["step"][rows].astype(np.int64) * (1 << 40) + p["seq"][rows], kind="stable")]
    for r in rows:
        s = int(p["step"][r])
        if st["kind"][s] != 1 or s in seen:
            continue
        seen.add(s)
        v = ix.value(int(r))
        if v is None:
            continue
        if ref is None or call[ref[0]] != call[s]:
            ref = (s, v)
        elif s in done:
            continue
        elif v.shape != ref[1].shape or (v != ref[1]).any():
            out.append(Violation("positions.rope-deltas", s, ix.module_path(int(p["module"][r])),
                                 f"rope_deltas {ref[1].ravel().tolist()} (as at step {ref[0]})",
                                 f"rope_deltas {v.ravel().tolist()}",
                                 "rope_deltas changed during decoding: it must be computed once at prefill "
                                 "and reused", seq=int(p["seq"][r]),
                                 row=_first_diff_row(v, ref[1])))
    return out


def _derived_delta_violations(ix: TraceIndex) -> list[Violation]:
    """Without recorded ``rope_deltas``: position - KV index of the last token, on M-RoPE decode
    steps, against the previous value."""
    p = ix.probes
    st = ix.steps
    used = used_positions(ix)
    call = ix.call_of_step
    done = _oracle_reported(ix)
    out = []
    ref = None
    for s in range(ix.n_steps):
        if st["kind"][s] != 1 or s not in used:
            continue
        if ref is not None and call[ref[0]] != call[s]:
            ref = None                      # a new call: its deltas are its own
        r, P, _ = used[s]
        if P.shape[0] != 3:
            continue
        cb, q = int(st["cache_before"][s]), int(st["q_len"][s])
        if cb < 0 or q <= 0:
            continue
        delta = P[0, :, -1] - (cb + q - 1)
        if ref is None:
            ref = (s, delta)
            continue
        if delta.shape == ref[1].shape and (delta != ref[1]).any():
            if s not in done:
                out.append(Violation("positions.rope-deltas", s, ix.module_path(int(p["module"][r])),
                                     f"rope delta {ref[1].tolist()} (position - KV index, as at step {ref[0]})",
                                     f"rope delta {delta.tolist()}",
                                     "the M-RoPE offset changed between decode steps: rope_deltas must stay "
                                     "constant after prefill", seq=int(p["seq"][r]),
                                     row=_first_diff_row(delta, ref[1])))
            ref = (s, delta)
    return out


# ---------------------------------------------------------------------------- KV index


@rule("positions.kv-index", "position ids a model computes agree with the KV index it actually uses")
def rule_positions_kv(ix: TraceIndex) -> list[Violation]:
    cand = _kv_candidates(ix)
    if not len(cand):
        return []
    p = ix.probes
    st = ix.steps
    used = used_positions(ix)
    vals = blob_values(ix, cand)
    padded = _padded_steps(ix)
    logical = _logical_kv_index(ix)
    out = []
    for r in cand.tolist():
        s = int(p["step"][r])
        v = kv_text(vals.get(r))
        if v is None:
            continue
        q = int(st["q_len"][s])
        if q >= 0 and v.shape[-1] != q:
            continue   # positions.length reports it
        u = used.get(s)
        if u is not None and u[2] and u[1].shape[0] == 1 and u[0] != r:
            ref, what = u[1][0], "the positions rotary used"
        elif int(st["cache_before"][s]) >= 0 and s not in padded and (st["q_len"][:s + 1] >= 0).all():
            k0 = int(logical[s])
            ref, what = np.arange(k0, k0 + v.shape[-1])[None, :], "the KV index"
        else:
            continue
        viol = _kv_violation(ix, r, s, v, ref, what)
        if viol is not None:
            out.append(viol)
    return out


def _kv_candidates(ix: TraceIndex) -> np.ndarray:
    """Per step, the first 1-D (KV-index style) position_ids probe: ``[B, S]``, ``[S]`` or the
    text row of a ``[4, B, S]``."""
    rows = ix.probe_rows("position_ids")
    if not len(rows):
        return rows
    p = ix.probes
    nd = p["ndim"][rows]
    lead = p["shape"][rows][:, 0]
    cand = rows[(nd == 2) | ((nd == 3) & (lead == 4)) | (nd == 1)]
    if not len(cand):
        return cand
    return cand[first_per_group(p["step"][cand].astype(np.int64), p["seq"][cand].astype(np.int64))]


def _logical_kv_index(ix: TraceIndex) -> np.ndarray:
    """Per step, the logical KV index of its first token: the tokens processed before it in its
    call, from the cache length at the call's first step (robust to a corrupted cache, which
    cache.growth reports on its own)."""
    st = ix.steps
    if not ix.n_steps:
        return np.zeros(0, np.int64)
    qs = np.maximum(st["q_len"].astype(np.int64), 0)
    before = np.concatenate([[0], np.cumsum(qs)[:-1]])          # tokens of all earlier steps
    call, firsts = ix.call_of_step, ix.call_first_steps
    start = firsts[np.maximum(call, 0)] if len(firsts) else np.zeros(ix.n_steps, np.int64)
    start = np.where(call >= 0, start, 0)      # decode steps before any prefill count from step 0
    return np.maximum(st["cache_before"][start].astype(np.int64), 0) + before - before[start]


def _kv_violation(ix: TraceIndex, r: int, s: int, v: np.ndarray, ref: np.ndarray, what: str) -> Violation | None:
    if ref.shape[-1] != v.shape[-1]:
        return None
    if ref.shape != v.shape:
        ref = np.broadcast_to(ref, v.shape)
    bad = v != ref
    if not bad.any():
        return None
    p = ix.probes
    b = int(np.nonzero(bad.any(axis=1))[0][0])    # the first batch row that disagrees
    tok = np.nonzero(bad[b])[0]
    row = f" in batch row {b}" if b else ""
    return Violation(
        "positions.kv-index", s, ix.module_path(int(p["module"][r])),
        f"position_ids {fmt_tokens(ref[b][tok].tolist(), 4)}{row} ({what})",
        f"position_ids {fmt_tokens(v[b][tok].tolist(), 4)}",
        _kv_hint(ix, v[b][tok]), seq=int(p["seq"][r]),
        tokens=[int(x) for x in ref[b][tok][:64]], row=b)


def _kv_hint(ix: TraceIndex, got: np.ndarray) -> str:
    heads = {int(ix.meta.get("num_key_value_heads") or -1), int(ix.meta.get("num_attention_heads") or -1)}
    start = int(got[0]) if len(got) else 0
    if start in heads:
        return ("the computed past length equals the head count: the cache length was read from the wrong "
                "dim of a [B, S, H, D] cache (size(-2) is H there)")
    return "the model's position ids disagree with the KV index it attends with (stale or miscomputed past length)"


def _padded_steps(ix: TraceIndex) -> set[int]:
    """Steps whose 2-D attention mask (at the root) has padding (positions then differ from the KV index)."""
    rows = ix.probe_rows("attention_mask", text_only=False)
    p = ix.probes
    out: set[int] = set()
    rows = rows[p["ndim"][rows] == 2]
    if not len(rows):
        return out
    vals = blob_values(ix, rows)
    for r in rows:
        v = vals.get(int(r))
        if v is not None and not np.asarray(v, bool).all():
            out.add(int(p["step"][r]))
    return out
