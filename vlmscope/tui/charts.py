"""Charts of the step-context panel: the token strip, the attention-mask heatmap, position ids
against token index and cache lengths per layer.

Pure functions over numpy data (no textual, no HDF5), so they run in worker threads and in
unit tests.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from rich.text import Text

from vlmscope.semantics import image_spans, position_row_names, position_rows
from vlmscope.tui.styles import (ATTEND_RGB, BLOCKED_RGB, CURRENT_STYLE, DIM, IMAGE_RGB, IMAGE_STYLE, SHAPE_STYLE,
                                  TEXT_TOKEN_STYLE)


_BLOCKS = " ▁▂▃▄▅▆▇█"


def downsample_idx(n: int, width: int) -> np.ndarray:
    """Bin edges splitting ``n`` items into at most ``width`` bins."""
    bins = max(1, min(n, width))
    return np.linspace(0, n, bins + 1).astype(np.int64)


def in_spans(lo: int, hi: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(a < hi and lo < b for a, b in spans)


def token_strip(ids: np.ndarray, spans: Sequence[tuple[int, int]], current: tuple[int, int], width: int,
                image_token_id: int | None = None) -> Text:
    """One cell per token (several for short sequences, one per bin for long ones): text ░,
    image █ (``IMAGE_STYLE``), this step's tokens ▄ (green); a ruler marks 0, the image span and the end.
    Without ``spans``, the image spans are the runs of ``image_token_id`` in ``ids``."""
    n = len(ids)
    width = max(8, width)
    t = Text(no_wrap=True)
    if n == 0:
        return Text("no input_ids recorded", DIM)
    if image_token_id is not None and not spans:
        spans = [(a, b) for _, a, b in image_spans(np.asarray(ids)[None], image_token_id)]
    rep = max(1, min(3, width // n))
    edges = downsample_idx(n, width // rep)
    for a, b in zip(edges[:-1], edges[1:]):
        img = in_spans(a, b, spans)
        cur = current[0] < b and a < current[1]
        ch = "█" if img else "▄" if cur else "░"
        style = IMAGE_STYLE if img else CURRENT_STYLE if cur else TEXT_TOKEN_STYLE
        t.append(ch * rep, style)
    t.append("\n")
    # ruler: 0, span bounds, n
    marks = {0: "0"}
    for a, b in spans:
        marks[a] = str(a)
        marks[b] = str(b)
    marks[n] = str(n)
    bins = len(edges) - 1
    ruler = [" "] * (bins * rep + 8)
    for pos, label in sorted(marks.items()):
        if pos < n:
            col = (int(np.searchsorted(edges, pos, side="right") - 1)) * rep
        else:
            col = bins * rep - len(label)
        col = min(max(col, 0), len(ruler) - len(label))
        if all(c == " " for c in ruler[max(0, col - 1):col + len(label) + 1]):
            ruler[col:col + len(label)] = list(label)
    t.append("".join(ruler).rstrip(), DIM)
    return t


def _lerp(c0: tuple[int, int, int], c1: tuple[int, int, int], f: float) -> str:
    r, g, b = (int(c0[k] + (c1[k] - c0[k]) * f) for k in range(3))
    return f"#{r:02x}{g:02x}{b:02x}"


_OFF = BLOCKED_RGB
_ON = ATTEND_RGB
_ON_IMG = IMAGE_RGB


def mask_heatmap(mask: np.ndarray, spans: Sequence[tuple[int, int]], width: int, max_rows: int = 12,
                 q_offset: int = 0) -> Text:
    """The allowed-to-attend matrix (query rows × key columns), downsampled with half blocks.

    Key columns in the image span are drawn in the image colour (``IMAGE_RGB``); a left margin
    marks query rows in it."""
    m = np.asarray(mask, dtype=bool)
    while m.ndim > 2:
        m = m[0]
    if m.ndim == 1:
        m = m[None, :]
    q, k = m.shape
    width = max(8, width - 2)
    rep = max(1, min(3, width // max(k, 1)))
    cols = downsample_idx(k, width // rep)
    ncols = len(cols) - 1
    # aim for a square-ish picture: a cell is about twice as tall as wide, a half block square
    want_rows = max(1, min(max_rows * 2, int(round(q * ncols * rep / max(k, 1))) if q > 1 else 1))
    rows = downsample_idx(q, want_rows)
    csum = np.zeros((q + 1, k + 1), dtype=np.float64)
    csum[1:, 1:] = np.cumsum(np.cumsum(m, 0, dtype=np.float64), 1)
    r0, r1 = rows[:-1], rows[1:]
    c0, c1 = cols[:-1], cols[1:]
    tot = (csum[np.ix_(r1, c1)] - csum[np.ix_(r0, c1)] - csum[np.ix_(r1, c0)] + csum[np.ix_(r0, c0)])
    area = np.outer(r1 - r0, c1 - c0).astype(np.float64)
    frac = np.repeat(tot / np.maximum(area, 1), rep, axis=1)
    img_c = np.repeat(np.array([in_spans(a, b, spans) for a, b in zip(c0, c1)]), rep)
    nr = len(r0)
    rep_r = max(1, min(rep, (max_rows * 2) // max(nr, 1))) if q > 1 else 1
    frac = np.repeat(frac, rep_r, axis=0)
    img_r = np.repeat(np.array([in_spans(a + q_offset, b + q_offset, spans) for a, b in zip(r0, r1)]), rep_r)
    nr = frac.shape[0]
    t = Text(no_wrap=True)

    def colour(r: int, c: int) -> str:
        return _lerp(_OFF, _ON_IMG if img_c[c] else _ON, float(frac[r, c]))

    for top in range(0, nr, 2):
        bot = top + 1 if top + 1 < nr else None
        up_img, lo_img = bool(img_r[top]), bool(img_r[bot]) if bot is not None else False
        if up_img or lo_img:
            t.append("▀" if up_img and not lo_img else "▄" if lo_img and not up_img else "█", IMAGE_STYLE)
        else:
            t.append(" ")
        t.append(" ")
        for c in range(frac.shape[1]):
            up = colour(top, c)
            if bot is not None:
                t.append("▀", f"{up} on {colour(bot, c)}")
            else:
                t.append("▀", up)
        t.append("\n")
    t.rstrip()
    return t


def position_plot(pos: np.ndarray, spans: Sequence[tuple[int, int]], width: int) -> Text:
    """Position ids against token index: one sparkline per row (M-RoPE t/h/w), one shared scale."""
    p = position_rows(pos)
    R, S = p.shape
    names = position_row_names(R)
    label_w = max(len(nm) for nm in names) + 1
    rng_w = len(f"{int(p.min())}..{int(p.max())}") + 1
    plot_w = max(8, width - label_w - rng_w - 2)
    edges = downsample_idx(S, plot_w)
    lo, hi = float(p.min()), float(p.max())
    span = max(hi - lo, 1.0)
    t = Text(no_wrap=True)
    for r in range(R):
        t.append(names[r].ljust(label_w), "bold")
        row = p[r]
        for a, b in zip(edges[:-1], edges[1:]):
            v = float(row[a:b].max()) if b > a else lo
            level = 1 + int(round((v - lo) / span * 7)) if S > 1 or hi > lo else 8
            t.append(_BLOCKS[min(8, max(1, level))], IMAGE_STYLE if in_spans(a, b, spans) else SHAPE_STYLE)
        t.append(f" {int(row.min())}..{int(row.max())}\n", DIM)
    t.rstrip()
    return t


def cache_bars(lengths: Sequence[int], width: int, max_lines: int = 40) -> Text:
    """The cache length of every layer, as horizontal bars (one line when they are all equal)."""
    t = Text(no_wrap=True)
    n = len(lengths)
    if n == 0:
        return Text("no cache", DIM)
    mx = max(max(lengths), 1)
    if min(lengths) == max(lengths):
        t.append(f"all {n} layers ", DIM)
        t.append(str(lengths[0]), "bold")
        return t
    lab = len(f"L{n - 1}") + 1
    num = len(str(mx)) + 1
    bar_w = max(4, width - lab - num - 1)
    step = max(1, math.ceil(n / max_lines))
    for k in range(0, n, step):
        v = int(lengths[k])
        full = v / mx * bar_w
        t.append(f"L{k}".ljust(lab), DIM)
        t.append("█" * int(full) + ("▌" if full - int(full) >= 0.5 else ""), "green")
        t.append(" " * (bar_w - int(full) - (1 if full - int(full) >= 0.5 else 0) + 1))
        t.append(f"{v}\n")
    t.rstrip()
    return t
