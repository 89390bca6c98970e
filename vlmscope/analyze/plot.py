"""Matplotlib figures of one step, as the viewer's step-context panel draws them (``vlmscope.plot``).

::

    import vlmscope
    t = vlmscope.open_trace("traces/a.h5")
    vlmscope.plot.mask(t, step=0)        # the attention mask that reached the decoder layers
    vlmscope.plot.positions(t, step=1)   # position ids against token index, one line per M-RoPE row

Each returns a :class:`matplotlib.figure.Figure` (a notebook shows it; ``fig.savefig(...)``
writes it), or draws into ``ax=`` when given. The image span(s) of the prefill are shaded.
matplotlib is optional: without it these raise an ImportError that says how to install it.
This module imports numpy only; matplotlib is imported when a figure is made.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vlmscope.semantics import fmt_shape, image_spans, position_row_names, position_rows
from vlmscope.trace import Trace, open_trace
from vlmscope.trace.notebook import require

__all__ = ["mask", "positions", "pick_probe"]

#: a mask with more elements than this is drawn strided (every k-th query and key)
MAX_DRAWN = 4_000_000
_IMAGE = "#ffd75f"      # the viewer's image-span gold (tui/styles.py IMAGE_RGB; analyze cannot import the viewer)


def pick_probe(t: Trace, step: int, kind: str, prefer: str | None = None, rows: int | None = None,
               shape: tuple | None = None) -> np.void | None:
    """The probe of ``kind`` in ``step`` the viewer draws: one of ``shape`` when given, else one
    recorded under the module ``prefer`` (or inside it), with ``rows`` leading rows; first wins ties."""
    ps = t.probes(step, kind=kind)
    if not len(ps):
        return None
    best, best_score = None, None
    for p in ps:
        nd = int(p["ndim"])
        score = 0
        if shape is not None and tuple(int(d) for d in p["shape"][:nd]) == tuple(shape):
            score += 8
        path = t.module_path(int(p["module"]))
        if prefer and (path == prefer or path.startswith(prefer + ".")):
            score += 4
        if rows is not None and nd >= 1 and int(p["shape"][0]) == rows:
            score += 2
        if best_score is None or score > best_score:
            best, best_score = p, score
    return best


def _prefill_spans(t: Trace) -> list[tuple[int, int]]:
    """Image spans of the prefill's first batch row, in token positions (from step 0's
    ``input_ids`` probe: its recorded spans, else the runs of the image token id)."""
    if not t.n_steps:
        return []
    p = pick_probe(t, 0, "input_ids")
    if p is None:
        return []
    spans = [(int(a), int(b)) for r, a, b in (t.probe_info(p).get("spans") or []) if int(r) == 0]
    image_id = t.meta.get("image_token_id")
    if not spans and image_id is not None:
        ids = t.probe_value(p)
        if ids is not None and ids.size:
            spans = [(a, b) for r, a, b in image_spans(np.asarray(ids), int(image_id)) if r == 0]
    return spans


def _axes(ax: Any, size: tuple[float, float], what: str) -> tuple[Any, Any]:
    require("matplotlib", what)
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _trace(trace: Trace | str | os.PathLike) -> tuple[Trace, bool]:
    return (trace, False) if isinstance(trace, Trace) else (open_trace(trace), True)


def mask(trace: Trace | str | os.PathLike, step: int = 0, *, ax: Any = None) -> Any:
    """The attention mask that reached the decoder layers in ``step``: queries (rows) against
    keys (columns), may-attend in green, blocked dark, the image span's key columns shaded.
    Raises ``ValueError`` when the step recorded none (e.g. SDPA with ``is_causal``)."""
    fig, ax = _axes(ax, (6.0, 5.0), "vlmscope.plot.mask()")
    t, own = _trace(trace)
    try:
        st = t.steps[step]
        md = int(st["mask_ndim"])
        want = tuple(int(d) for d in st["mask_shape"][:md]) if md >= 2 else None
        p = pick_probe(t, step, "attention_mask", prefer=t.meta.get("decoder_layers"), shape=want)
        if p is None:
            raise ValueError(f"step {step} recorded no attention mask: none reached the decoder layers "
                             f"(e.g. SDPA with is_causal)")
        m = t.probe_value(p)
        if m is None:
            raise ValueError(f"step {step}: the attention mask's values were not recorded")
        m = np.asarray(m, dtype=bool)
        while m.ndim > 2:
            m = m[0]
        if m.ndim == 1:
            m = m[None, :]
        q, k = m.shape
        q_off = max(int(st["cache_before"]), 0) if q < k else 0
        stride = max(1, int(np.ceil(np.sqrt(m.size / MAX_DRAWN))))
        from matplotlib.colors import ListedColormap

        ax.imshow(m[::stride, ::stride], cmap=ListedColormap(["#262626", "#5faf5f"]), vmin=0, vmax=1,
                  interpolation="nearest", aspect="auto", extent=(-0.5, k - 0.5, q_off + q - 0.5, q_off - 0.5))
        spans = _prefill_spans(t)
        for i, (a, b) in enumerate(spans):
            ax.axvspan(a - 0.5, b - 0.5, color=_IMAGE, alpha=0.25, lw=0, label="image span" if not i else None)
        shape = tuple(int(d) for d in p["shape"][:int(p["ndim"])])
        info = t.probe_info(p)
        ax.set_title(f"step {step}: attention mask {fmt_shape(shape)} {info.get('style', '')}\n"
                     f"at {t.module_path(int(p['module'])) or '<root>'}", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        if spans:
            ax.legend(loc="upper right", fontsize=8)
        return fig
    finally:
        if own:
            t.close()


def positions(trace: Trace | str | os.PathLike, step: int = 0, *, ax: Any = None) -> Any:
    """Position ids against token index in ``step``, one line per row (M-RoPE ``t``/``h``/``w``,
    with a leading ``text`` row where the model records four), the image span shaded.
    Raises ``ValueError`` when the step recorded no position ids."""
    fig, ax = _axes(ax, (7.0, 3.5), "vlmscope.plot.positions()")
    t, own = _trace(trace)
    try:
        steps = t.steps
        st = steps[step]
        pr = int(st["pos_rows"])
        p = pick_probe(t, step, "position_ids", prefer=t.meta.get("text_model"), rows=pr if pr > 1 else None)
        if p is None:
            raise ValueError(f"step {step} recorded no position ids")
        pos = t.probe_value(p)
        if pos is None or not pos.size:
            raise ValueError(f"step {step}: the position ids' values were not recorded")
        pos = position_rows(pos)
        # token index: where this step's tokens sit among every token fed so far
        lens = np.clip(steps["input_len"][: step + 1].astype(np.int64), 0, None)
        total = int(lens.sum())
        first = total - int(lens[-1])
        off = first if pos.shape[-1] == total - first else 0
        x = off + np.arange(pos.shape[-1])
        names = position_row_names(len(pos))
        marker = "o" if pos.shape[-1] <= 8 else None
        for name, row in zip(names, pos):
            ax.plot(x, row, label=name, marker=marker, lw=1.2)
        for a, b in _prefill_spans(t):
            if b > x[0] and a <= x[-1]:
                ax.axvspan(a - 0.5, b - 0.5, color=_IMAGE, alpha=0.2, lw=0)
        shape = tuple(int(d) for d in p["shape"][:int(p["ndim"])])
        ax.set_title(f"step {step}: position ids {fmt_shape(shape)} at "
                     f"{t.module_path(int(p['module'])) or '<root>'}", fontsize=9)
        ax.set_xlabel("token index")
        ax.set_ylabel("position id")
        ax.legend(fontsize=8)
        return fig
    finally:
        if own:
            t.close()
