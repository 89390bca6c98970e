"""The M-RoPE scan behind ``positions.mrope-text``, ``positions.mrope-grid`` and
``positions.fallback-1d``: one pass over the image spans of every step, shared by the three
rules (memoised on the index). Steps that ``positions.oracle`` judged are left to it (it checks
every token of every axis against the family's rule); these rules judge the rest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._index import TraceIndex
from ._common import grids_by_step, image_spans_by_step, memo
from ._positions import first_text_position_probe, is_mrope_model, used_positions
from .report import Violation

TEXT, GRID, FALLBACK = "positions.mrope-text", "positions.mrope-grid", "positions.fallback-1d"


@dataclass
class _Where:
    """Where a step's positions are reported: the step, the module and seq of the probe."""

    step: int
    module: str
    seq: int


def mrope_violations(ix: TraceIndex) -> dict[str, list[Violation]]:
    """The violations of the three M-RoPE rules, by rule id."""
    return memo(ix, "_mrope_cache", _scan)


def _scan(ix: TraceIndex) -> dict[str, list[Violation]]:
    from .oracle import oracle_result   # (imported here: positions.oracle registers after these rules)

    res: dict[str, list[Violation]] = {TEXT: [], GRID: [], FALLBACK: []}
    judged = oracle_result(ix).checked   # steps positions.oracle judged: it subsumes these three rules there
    used = used_positions(ix)
    grids = grids_by_step(ix)
    mrope = is_mrope_model(ix)
    st = ix.steps
    p = ix.probes
    fam = ix.family
    mmtt = set(int(s) for s in p["step"][ix.probe_rows("mm_token_type_ids", text_only=False)])
    for s, (_, spans) in image_spans_by_step(ix).items():
        if s not in used or s in judged:
            continue
        r, P, _ = used[s]
        q = int(st["q_len"][s])
        il = int(st["input_len"][s])
        if il >= 0 and q >= 0 and il != q:
            continue   # placeholders expand: token and embedding spaces differ, spans do not map 1:1
        r = first_text_position_probe(ix, s, r)
        at = _Where(s, ix.module_path(int(p["module"][r])), int(p["seq"][r]))
        if P.shape[0] == 1:
            if mrope:
                res[FALLBACK].append(_fallback_violation(at, spans, fam, s in mmtt, "1-D position ids [B, S]"))
            continue
        fallback_spans = _scan_spans(res, at, P, spans, grids.get(s), ix.merge_size)
        if fallback_spans and mrope:
            res[FALLBACK].append(_fallback_violation(
                at, fallback_spans, fam, s in mmtt, "t = h = w rows, consecutive over the image"))
    return res


def _scan_spans(res: dict[str, list[Violation]], at: _Where, P: np.ndarray, spans: list[tuple[int, int, int]],
                grid: np.ndarray | None, m: int) -> list[tuple[int, int, int]]:
    """Check each image span of 3-row positions ``P``: its grid, and the text after it. Returns
    the spans whose three rows are equal and consecutive (a 1-D fallback; not checked further)."""
    fallback_spans = []
    for k, (b, a, e) in enumerate(spans):
        if b >= P.shape[1] or e > P.shape[2]:
            continue
        seg = P[:, b, a:e]
        n = e - a
        if n > 1 and (seg[0] == seg[1]).all() and (seg[1] == seg[2]).all() and (np.diff(seg[0]) == 1).all():
            fallback_spans.append((b, a, e))
            continue
        if grid is not None and k < len(grid):
            v = _grid_violation(at, seg, k, (b, a, e), grid[k], m)
            if v is not None:
                res[GRID].append(v)
        if e < P.shape[2]:
            v = _text_after_violation(at, P, seg, k, b, e)
            if v is not None:
                res[TEXT].append(v)
    return fallback_spans


def _grid_violation(at: _Where, seg: np.ndarray, k: int, span: tuple[int, int, int], thw: np.ndarray,
                    m: int) -> Violation | None:
    """Image ``k``'s t/h/w positions ``seg`` against its merged grid (``thw`` / ``m`` x ``m``)."""
    b, a, e = span
    n = e - a
    t, h, w = (int(x) for x in thw[:3])
    hh, ww = h // m, w // m
    if not (t * hh * ww == n and hh > 0 and ww > 0):
        return None
    h_idx = np.tile(np.repeat(np.arange(hh), ww), t)
    w_idx = np.tile(np.arange(ww), t * hh)
    base = seg[:, 0]
    bad_h = (seg[1] - base[1]) != h_idx
    bad_w = (seg[2] - base[2]) != w_idx
    bad_t = (seg[0] != base[0]) if t == 1 else np.zeros(n, bool)
    bad = bad_h | bad_w | bad_t
    if not bad.any():
        return None
    tok = np.nonzero(bad)[0]
    return Violation(
        GRID, at.step, at.module,
        f"image {k} (row {b}, tokens {a}..{e - 1}) on a {t}x{hh}x{ww} merged grid: "
        f"h = start + {{0..{hh - 1}}} per row, w = start + {{0..{ww - 1}}} per column",
        f"t/h/w at token {a + int(tok[0])} = {[int(x) for x in seg[:, tok[0]]]}",
        "the image's M-RoPE h/w positions do not follow the merged grid "
        "(image_grid_thw / spatial_merge_size mismatch?)",
        seq=at.seq, tokens=[a + int(x) for x in tok[:64]], row=b)


def _text_after_violation(at: _Where, P: np.ndarray, seg: np.ndarray, k: int, b: int, e: int) -> Violation | None:
    """The token right after image ``k`` (row ``b``, ending at ``e``) continues from the image's max + 1."""
    exp = int(seg.max()) + 1
    after = P[:, b, e]
    if not (after != exp).any():
        return None
    return Violation(
        TEXT, at.step, at.module,
        f"text position {exp} after image {k} (image max {exp - 1} + 1) on t/h/w",
        f"t/h/w = {[int(x) for x in after]} at token {e}",
        "text after the image must continue from the image block's max position + 1, "
        "not from the token index", seq=at.seq, tokens=[e], row=b)


def _fallback_violation(at: _Where, spans: list[tuple[int, int, int]], fam: str, has_mmtt: bool,
                        what: str) -> Violation:
    b, a, e = spans[0]
    if fam == "qwen2_5_vl" or not has_mmtt:
        hint = ("Qwen2.5-VL fell back to 1-D positions: the processor's mm_token_type_ids did not reach the "
                "model, so get_rope_index was skipped" if fam == "qwen2_5_vl" else
                "M-RoPE fell back to 1-D positions: mm_token_type_ids (needed by get_rope_index) is missing")
    else:
        hint = "M-RoPE fell back to 1-D positions over the image: the vision-aware rope index was not computed"
    return Violation(FALLBACK, at.step, at.module,
                     f"3-D (t/h/w) M-RoPE positions over image tokens {a}..{e - 1}",
                     what + ("" if has_mmtt else "; mm_token_type_ids: missing"), hint, seq=at.seq,
                     tokens=list(range(a, min(e, a + 64))), row=b)
