"""Rule family ``image``: the image placeholder tokens, the image grid and the vision merger's
output rows agree (in total, per image, and with the growth of the embedding sequence)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmscope.semantics import fmt_shape

from .._index import TraceIndex
from ._common import grids_by_step, image_spans_by_step
from .registry import rule
from .report import Violation


@dataclass
class _ImageStep:
    """What one step says about its images."""

    step: int
    module: str                          # the merger (where violations are reported)
    seq: int
    spans: list[tuple[int, int, int]]    # placeholder runs (batch_row, start, end)
    n_ph: int                            # placeholder tokens (<= 0 unknown)
    n_feat: int                          # merger output rows
    grid: np.ndarray | None              # image_grid_thw, [n_images, 3]

    def violation(self, expected: str, actual: str, hint: str, tokens: list[int] | None = None) -> Violation:
        return Violation("image.tokens", self.step, self.module, expected, actual, hint, seq=self.seq, tokens=tokens)


@rule("image.tokens", "image placeholder tokens (per image and per batch row) equal the vision merger's "
      "output rows")
def rule_image_tokens(ix: TraceIndex) -> list[Violation]:
    p = ix.probes
    out = []
    spans = image_spans_by_step(ix)
    grids = grids_by_step(ix)
    mrows = ix.probe_rows("merger_rows", text_only=False)
    merger_by_step = _merger_rows_by_step(ix, mrows)
    merger_path = str(ix.meta.get("merger") or "")
    st = ix.steps
    for s in sorted(set(spans) | set(merger_by_step)):
        feats = merger_by_step.get(s)
        if feats is None:
            continue   # no merger probe recorded: nothing to compare
        sp = spans.get(s, (None, []))[1]
        n_ph = sum(e - a for _, a, e in sp)
        if not sp and s < len(st) and st["image_tokens"][s] > 0:
            n_ph = int(st["image_tokens"][s])
        mods_row = mrows[p["step"][mrows] == s]
        mod = ix.module_path(int(p["module"][mods_row[0]])) if len(mods_row) else merger_path
        seq = int(p["seq"][mods_row[0]]) if len(mods_row) else -1
        v = _step_violation(ix, _ImageStep(s, mod, seq, sp, n_ph, sum(feats), grids.get(s)))
        if v is not None:
            out.append(v)
    return out


def _merger_rows_by_step(ix: TraceIndex, mrows: np.ndarray) -> dict[int, list[int]]:
    """Per step: the image feature rows of each merger probe (its ``rows`` info, else its shape)."""
    p = ix.probes
    out: dict[int, list[int]] = {}
    for r in mrows:
        n = ix.info(int(r)).get("rows")
        if n is None:
            nd = int(p["ndim"][r])
            sh = p["shape"][r][:nd]
            n = int(np.prod(sh[:-1])) if nd >= 2 else int(sh[0]) if nd else 0
        out.setdefault(int(p["step"][r]), []).append(int(n))
    return out


def _step_violation(ix: TraceIndex, it: _ImageStep) -> Violation | None:
    """The first of: merger rows vs the grid; the spliced span vs the merger rows (when the
    placeholders expand); merger rows vs placeholders; placeholders per image vs the grid."""
    m = ix.merge_size
    grid = it.grid
    if grid is not None and len(grid) and grid.shape[-1] == 3:
        want = int(sum(int(np.prod(g[:3])) // (m * m) for g in grid))
        if want != it.n_feat:
            return it.violation(f"{want} image feature rows (image_grid_thw {grid[:, :3].tolist()} / {m}x{m} merge)",
                                f"{it.n_feat} merger output rows",
                                "the vision merger's output does not match the image grid (rows dropped or "
                                "added, or a wrong spatial_merge_size)")
    if not it.spans and it.n_ph <= 0:
        return None   # placeholders unknown (the model's forward never ran)
    st, s = ix.steps, it.step
    q, il = (int(st["q_len"][s]), int(st["input_len"][s])) if s < len(st) else (-1, -1)
    if q >= 0 and il >= 0 and q != il:
        # each placeholder expands into its features: the spliced span is q_len - (input_len - n_ph)
        span = q - (il - it.n_ph)
        if span == it.n_feat:
            return None
        return it.violation(f"{it.n_feat} image feature rows spliced in",
                            f"a span of {span} positions ({il} tokens - {it.n_ph} placeholders -> q_len {q})",
                            "the embedding sequence does not grow by the number of image features that replace "
                            "the placeholders")
    if it.n_feat != it.n_ph:
        return it.violation(f"{it.n_ph} image feature rows (placeholder tokens)", f"{it.n_feat} merger output rows",
                            "the vision merger produced a different number of image features than there are "
                            "image placeholder tokens in input_ids (processor grid and model disagree)")
    if grid is not None and it.spans and len(grid) == len(it.spans):
        return _per_image_violation(it, grid, m)
    return None


def _per_image_violation(it: _ImageStep, grid: np.ndarray, m: int) -> Violation | None:
    """The first image whose placeholder run differs from its grid / ``m`` x ``m``."""
    per_img = [int(np.prod(g[:3])) // (m * m) for g in grid]
    lens = [e - a for _, a, e in it.spans]
    for k, (want, got) in enumerate(zip(per_img, lens)):
        if want != got:
            b, a, e = it.spans[k]
            return it.violation(f"image {k}: {want} placeholder tokens (grid {fmt_shape(grid[k][:3])} / {m}x{m} merge)",
                                f"{got} placeholders in row {b} ({a}..{e - 1})",
                                "per-image placeholder count disagrees with image_grid_thw", tokens=[a])
    return None
