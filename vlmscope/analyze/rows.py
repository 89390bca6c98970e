"""The batch rows of a step, read from its probe values (numpy only: no textual, no torch).

A batched ``generate`` feeds B sequences at once: ``input_ids`` ``[B, L]``, the token mask
``[B, K]`` (0 on the padding), position ids ``[3|4, B, S]`` (M-RoPE) or ``[B, S]``. The summary's
step table (:mod:`vlmscope.cli.summary`) and the viewer (its row selector and the context panel)
read the rows here, so that both say the same thing.

Everything is computed from the probes' VALUES, never from the per-row ``info`` fields a newer
recorder adds (``row_pad``, ``row_spans``, ...): a trace recorded before them shows its rows too.
Nothing here judges (the viewer and the summary show what was recorded; verdicts come from
:mod:`vlmscope.analyze`).

* :func:`calls` -- the ``generate`` call of every step (a prefill step, kind 0, starts one).
* :func:`batch_size` -- B of a step, from the probes' shapes only (no value read).
* :func:`row_summaries` -- per row: its tokens in the step, its padding and allowed keys, its
  position range per axis over its tokens (padding left out), its image and video tokens.
* :func:`row_detail` -- one row: its spans (padding, text, image k, video k with the grid and
  ``second_per_grid_ts``) with their positions, its mask, its recorded ``rope_deltas``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlmscope.semantics import is_vision_path, runs
from vlmscope.trace import Trace

__all__ = ["RowSummary", "Span", "RowDetail", "StepValues", "calls", "prefill_of", "batch_size", "token_ids",
           "recorded_video_tokens", "read_step", "row_summaries", "row_detail", "fmt_range", "fmt_ranges", "runs"]

PAD, TEXT, IMAGE, VIDEO = -1, 0, 1, 2
KIND_NAME = {PAD: "pad", TEXT: "text", IMAGE: "image", VIDEO: "video"}


# ----------------------------------------------------------------------------- steps and calls


def call_index(kind: np.ndarray) -> np.ndarray:
    """The generate call of every step from the steps' ``kind`` column: a call begins at every
    prefill (kind 0), so step s is in call ``cumsum(kind == 0)[s] - 1`` (-1 before the first)."""
    return (np.cumsum(np.asarray(kind) == 0) - 1).astype(np.int64)


def calls(steps: np.ndarray) -> np.ndarray:
    """The call of every step (:func:`call_index`; a step before any prefill is call 0)."""
    return np.maximum(call_index(steps["kind"]), 0) if len(steps) else np.zeros(0, dtype=np.int64)


def prefill_of(steps: np.ndarray, step: int) -> int:
    """The first step of ``step``'s call (the step itself for a prefill)."""
    kinds = steps["kind"][: step + 1]
    starts = np.flatnonzero(kinds == 0)
    return int(starts[-1]) if len(starts) else 0


# ----------------------------------------------------------------------------- picking probes


def _shape(p: np.void) -> tuple[int, ...]:
    nd = int(p["ndim"])
    return tuple(int(d) for d in p["shape"][:nd]) if nd > 0 else ()


def _of_kind(trace: Trace, probes: np.ndarray, kind: str) -> np.ndarray:
    sid = trace.string_id(kind)
    return probes[probes["kind"] == sid] if sid >= 0 and len(probes) else probes[:0]


def _text_model(trace: Trace) -> str | None:
    meta = trace.meta if isinstance(trace.meta, dict) else {}
    tm = meta.get("text_model")
    return tm if isinstance(tm, str) else None


def _input_ids(trace: Trace, probes: np.ndarray) -> np.void | None:
    """The first 2-D ``input_ids`` probe of the step (the outermost module's: the step's tokens)."""
    rows = _of_kind(trace, probes, "input_ids")
    hit = np.flatnonzero(rows["ndim"] == 2)
    return rows[int(hit[0])] if len(hit) else None


def _token_mask(trace: Trace, probes: np.ndarray, batch: int | None) -> np.void | None:
    """The first 2-D attention mask ``[B, K]`` (the token mask ``generate`` passes)."""
    rows = _of_kind(trace, probes, "attention_mask")
    ok = rows["ndim"] == 2
    if batch is not None:
        ok &= rows["shape"][:, 0] == batch
    hit = np.flatnonzero(ok)
    return rows[int(hit[0])] if len(hit) else None


def _positions(trace: Trace, probes: np.ndarray, batch: int | None) -> np.void | None:
    """The position ids the text model received: ``[3|4, B, S]`` preferred, else ``[B, S]``;
    the text model's own first, then the outermost module's; never the vision tower's."""
    rows = _of_kind(trace, probes, "position_ids")
    if not len(rows):
        return None
    nd, sh = rows["ndim"].astype(np.int64), rows["shape"].astype(np.int64)
    m3 = (nd == 3) & np.isin(sh[:, 0], (3, 4))
    m2 = nd == 2
    if batch is not None:
        m3 &= sh[:, 1] == batch
        m2 &= sh[:, 0] == batch
    ok = m3 | m2
    if not ok.any():
        return None
    paths = trace.module_paths
    mods = rows["module"].astype(np.int64)
    text = _text_model(trace)
    text_ids = np.flatnonzero(paths == text) if text is not None else np.zeros(0, np.int64)
    score = np.where(m3, 0, 2) + ~np.isin(mods, text_ids)
    for j in np.flatnonzero(ok)[np.argsort(score[ok], kind="stable")]:
        m = int(mods[j])
        if not is_vision_path(str(paths[m]) if 0 <= m < len(paths) else ""):
            return rows[int(j)]
    return None


def _values(trace: Trace, probes: np.ndarray, kind: str, last: bool = False,
            name: str | None = None) -> tuple[np.void, np.ndarray] | None:
    """The first (or last) probe of ``kind`` holding values (optionally under argument ``name``)."""
    rows = _of_kind(trace, probes, kind)
    if name is not None and len(rows):
        sid = trace.string_id(name)
        named = rows[rows["name"] == sid] if sid >= 0 else rows[:0]
        rows = named if len(named) else rows
    order = range(len(rows) - 1, -1, -1) if last else range(len(rows))
    for j in order:
        v = trace.probe_value(rows[j])
        if v is not None:
            return rows[j], v
    return None


def batch_size(trace: Trace, probes: np.ndarray) -> int:
    """B of a step from its probes' shapes (no value is read): ``input_ids`` ``[B, L]``, else the
    text model's position ids; 1 when neither was recorded."""
    p = _input_ids(trace, probes)
    if p is not None:
        return max(1, _shape(p)[0])
    p = _positions(trace, probes, None)
    if p is not None:
        sh = _shape(p)
        return max(1, sh[1] if len(sh) == 3 else sh[0])
    return 1


def recorded_video_tokens(trace: Trace, probes: np.ndarray) -> int | None:
    """The step's video tokens as its ``input_ids`` probe info counted them (``row_video_tokens``;
    None when the recorder did not count them): no value is read."""
    p = _input_ids(trace, probes)
    if p is None:
        return None
    try:
        counts = trace.probe_info(p).get("row_video_tokens")
    except Exception:  # noqa: BLE001 - a damaged info string: not counted
        return None
    if isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        return int(sum(counts))
    return None


def token_ids(trace: Trace, probes: np.ndarray | None = None) -> tuple[int | None, int | None]:
    """(image token id, video token id): the run metadata's, else the ``input_ids`` probe info's,
    else the model config's."""
    meta = trace.meta if isinstance(trace.meta, dict) else {}
    rope = meta.get("rope") if isinstance(meta.get("rope"), dict) else {}
    cfg = trace.config if isinstance(trace.config, dict) else {}
    info: dict = {}
    if probes is not None:
        p = _input_ids(trace, probes)
        if p is not None:
            try:
                info = trace.probe_info(p)
            except Exception:  # noqa: BLE001 - a damaged info string: the ids come from elsewhere
                info = {}

    def first(*vals: Any) -> int | None:
        for v in vals:
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                return int(v)
        return None

    image = first(rope.get("image_token_id"), meta.get("image_token_id"), info.get("image_token_id"),
                  cfg.get("image_token_id"))
    video = first(rope.get("video_token_id"), info.get("video_token_id"), cfg.get("video_token_id"))
    return image, video


# ----------------------------------------------------------------------------- one step's values


@dataclass
class StepValues:
    """The values a step's rows are read from (each None when not recorded)."""

    batch: int
    ids: np.ndarray | None = None          # [B, L]
    mask: np.ndarray | None = None         # [B, K] bool, True: may attend
    pos: np.ndarray | None = None          # [R, B, S] (a [B, S] probe as R = 1)
    pos_module: int = -1
    image_id: int | None = None
    video_id: int | None = None

    @property
    def S(self) -> int:
        if self.pos is not None:
            return int(self.pos.shape[-1])
        return int(self.ids.shape[-1]) if self.ids is not None else 0

    def types(self) -> np.ndarray | None:
        """Token type per row and token of the step: PAD, TEXT, IMAGE, VIDEO ([B, L])."""
        if self.ids is None:
            return None
        t = np.full(self.ids.shape, TEXT, dtype=np.int64)
        if self.image_id is not None:
            t[self.ids == self.image_id] = IMAGE
        if self.video_id is not None:
            t[self.ids == self.video_id] = VIDEO
        pad = self.pad_tokens(self.ids.shape[-1])
        if pad is not None:
            t[pad] = PAD
        return t

    def pad_tokens(self, n: int) -> np.ndarray | None:
        """[B, n] True where the step's last ``n`` tokens are padding (masked in the token mask)."""
        if self.mask is None or self.mask.shape[-1] < n or self.mask.shape[0] != self.batch:
            return None
        return ~self.mask[:, self.mask.shape[-1] - n:]


def read_step(trace: Trace, probes: np.ndarray) -> StepValues:
    """Read the values of a step's ``input_ids``, token mask and text-model position ids."""
    b = batch_size(trace, probes)
    image_id, video_id = token_ids(trace, probes)
    sv = StepValues(batch=b, image_id=image_id, video_id=video_id)
    p = _input_ids(trace, probes)
    if p is not None:
        v = trace.probe_value(p)
        if v is not None and v.ndim == 2:
            sv.ids = np.asarray(v)
    p = _token_mask(trace, probes, b)
    if p is not None:
        v = trace.probe_value(p)
        if v is not None and v.ndim == 2:
            sv.mask = np.asarray(v, dtype=bool)
    p = _positions(trace, probes, b)
    if p is not None:
        v = trace.probe_value(p)
        if v is not None and v.ndim in (2, 3):
            sv.pos = np.asarray(v)[None] if v.ndim == 2 else np.asarray(v)
            sv.pos_module = int(p["module"])
    return sv


def _ranges(p: np.ndarray) -> list[list[int]]:
    """[min, max] per position row of ``p`` ([R, n]); [] when n is 0."""
    if p.size == 0 or p.shape[-1] == 0:
        return []
    return [[int(a), int(b)] for a, b in zip(p.min(axis=-1), p.max(axis=-1))]


def fmt_range(r: list[int]) -> str:
    return f"{r[0]}..{r[1]}"


def fmt_ranges(ranges: list[list[int]], names: list[str] | None = None) -> str:
    """Position ranges per axis as the step table writes them: ``0..40 x3`` when the axes agree,
    else ``0..40/0..38/0..40`` (``t 0..40 h 0..38 w 0..40`` with ``names``); ``-`` for none."""
    if not ranges:
        return "-"
    rng = [fmt_range(r) for r in ranges]
    if len(rng) == 1:
        return rng[0]
    if len(set(rng)) == 1:
        return f"{rng[0]} x{len(rng)}"
    if names:
        return " ".join(f"{n} {r}" for n, r in zip(names, rng))
    return "/".join(rng)


# ----------------------------------------------------------------------------- per-row summaries


@dataclass
class RowSummary:
    """One batch row in one step."""

    row: int
    tokens: int | None            # the row's tokens in the step, padding left out (None: unknown)
    pad: int | None               # keys masked for the row (None: no 2-D token mask recorded)
    keys: int | None              # keys the row may attend to
    positions: list[list[int]]    # [min, max] per M-RoPE axis (t, h, w) over the row's tokens
    image_tokens: int | None
    video_tokens: int | None

    def to_dict(self) -> dict:
        return {"row": self.row, "tokens": self.tokens, "pad": self.pad, "keys": self.keys,
                "positions": self.positions, "image_tokens": self.image_tokens, "video_tokens": self.video_tokens}


def _axes(pos: np.ndarray) -> np.ndarray:
    """The three M-RoPE axes of ``[4, B, S]`` position ids (the step table's rows: no text row)."""
    return pos[1:] if pos.shape[0] == 4 else pos


def row_summaries(trace: Trace, probes: np.ndarray, sv: StepValues | None = None) -> list[RowSummary]:
    """Every batch row of the step (reads the step's values unless ``sv`` is given)."""
    sv = sv if sv is not None else read_step(trace, probes)
    B = sv.batch
    out: list[RowSummary] = []
    mask = sv.mask if sv.mask is not None and sv.mask.shape[0] == B else None
    types = sv.types() if sv.ids is not None and sv.ids.shape[0] == B else None
    pos = sv.pos if sv.pos is not None and sv.pos.shape[1] == B else None
    pos_pad = sv.pad_tokens(pos.shape[-1]) if pos is not None else None
    for b in range(B):
        keys = int(mask[b].sum()) if mask is not None else None
        pad = int(mask.shape[-1] - keys) if mask is not None and keys is not None else None
        if types is not None:
            tokens = int((types[b] != PAD).sum())
            img, vid = int((types[b] == IMAGE).sum()), int((types[b] == VIDEO).sum())
        else:
            tokens, img, vid = None, None, None
        if pos is not None:
            p = _axes(pos)[:, b, :]
            if pos_pad is not None:
                p = p[:, ~pos_pad[b]]
            ranges = _ranges(p)
            if tokens is None:
                tokens = int(p.shape[-1])
        else:
            ranges = []
        out.append(RowSummary(b, tokens, pad, keys, ranges, img, vid))
    return out


# ----------------------------------------------------------------------------- one row in detail


@dataclass
class Span:
    """A run of one token type in one row of a step."""

    kind: str                      # "pad", "text", "image", "video"
    start: int
    end: int
    index: int = -1                # image k / video k of the row (0-based)
    number: int = -1               # its place among the call's images (videos): the grid it takes
    grid: tuple[int, int, int] | None = None
    second: float | None = None    # second_per_grid_ts of a video
    positions: list[list[int]] = field(default_factory=list)   # [min, max] per position row

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class RowDetail:
    """One row of one step, as the context panel shows it."""

    row: int
    batch: int
    step: int
    call: int
    prefill: int                      # the call's first step
    length: int                       # the row's length in the step (tokens, padding included)
    spans: list[Span]                 # this step's tokens
    pos_names: list[str]              # the position rows' names ("t h w"; "pos" for 1-D RoPE)
    positions: list[list[int]]        # per position row, over the row's tokens (padding left out)
    keys: int | None = None           # key length of the mask (K)
    allowed: int | None = None
    pad_keys: list[tuple[int, int]] = field(default_factory=list)  # runs of masked keys
    rope_delta: list[int] | None = None     # the recorded value(s) for the row
    rope_delta_from: str | None = None      # the argument name it came under ("state": the model's attribute)
    rope_delta_shape: tuple[int, ...] | None = None
    media: list[Span] = field(default_factory=list)   # the row's image/video spans in the call's prefill


def _grids(trace: Trace, probes: np.ndarray, kind: str) -> np.ndarray | None:
    got = _values(trace, probes, kind)
    if got is None:
        return None
    v = np.asarray(got[1])
    return v if v.ndim == 2 and v.shape[-1] == 3 else None


def _spans(sv: StepValues, b: int, grids: dict[int, np.ndarray | None], seconds: np.ndarray | None,
           pos: np.ndarray | None) -> list[Span]:
    """Row ``b``'s spans, numbered: image k of the row, and its place among all the step's images
    (rows before ``b`` first: the grids are consumed in batch order)."""
    types = sv.types()
    if types is None:
        return []
    before = {IMAGE: 0, VIDEO: 0}
    for r in range(b):
        for kind in (IMAGE, VIDEO):
            before[kind] += len(runs(types[r] == kind))
    row = types[b]
    cuts = np.flatnonzero(np.diff(row)) + 1
    bounds = [0, *cuts.tolist(), len(row)]
    seen = {IMAGE: 0, VIDEO: 0}
    out: list[Span] = []
    for a, e in zip(bounds, bounds[1:]):
        if e <= a:
            continue
        k = int(row[a])
        sp = Span(KIND_NAME[k], a, e)
        if k in (IMAGE, VIDEO):
            sp.index, sp.number = seen[k], before[k] + seen[k]
            seen[k] += 1
            g = grids.get(k)
            if g is not None and sp.number < len(g):
                sp.grid = tuple(int(x) for x in g[sp.number])
            if k == VIDEO and seconds is not None and sp.number < seconds.size:
                sp.second = float(seconds.ravel()[sp.number])
        if pos is not None and k != PAD:
            sp.positions = _ranges(pos[:, b, a:e])
        out.append(sp)
    return out


def row_detail(trace: Trace, step: int, row: int, probes: np.ndarray,
               prefill_probes: np.ndarray | None = None) -> RowDetail:
    """Row ``row`` of ``step``: its spans with their positions, its mask, its recorded rope delta,
    and (``prefill_probes``: the call's first step) its image and video spans in the call."""
    from vlmscope.semantics import position_row_names

    steps = trace.steps
    sv = read_step(trace, probes)
    b = min(max(row, 0), sv.batch - 1)
    pos = _axes(sv.pos) if sv.pos is not None and sv.pos.shape[1] == sv.batch else None
    L = sv.ids.shape[-1] if sv.ids is not None else (pos.shape[-1] if pos is not None else 0)
    grids = {IMAGE: _grids(trace, probes, "image_grid_thw"), VIDEO: _grids(trace, probes, "video_grid_thw")}
    sec = _values(trace, probes, "second_per_grid_ts")
    seconds = np.asarray(sec[1], dtype=np.float64) if sec is not None else None
    span_pos = pos if pos is not None and pos.shape[-1] == L else None
    spans = _spans(sv, b, grids, seconds, span_pos)
    if not spans and L:
        spans = [Span("text", 0, L, positions=_ranges(pos[:, b]) if pos is not None else [])]
    ranges: list[list[int]] = []
    if pos is not None:
        p = pos[:, b, :]
        pad = sv.pad_tokens(pos.shape[-1])
        ranges = _ranges(p[:, ~pad[b]] if pad is not None else p)
    prefill = prefill_of(steps, step)
    d = RowDetail(row=b, batch=sv.batch, step=step, call=int(calls(steps)[step]) if len(steps) > step else 0,
                  prefill=prefill, length=int(L), spans=spans,
                  pos_names=position_row_names(pos.shape[0]) if pos is not None else [], positions=ranges)
    if sv.mask is not None and sv.mask.shape[0] == sv.batch:
        d.keys, d.allowed = int(sv.mask.shape[-1]), int(sv.mask[b].sum())
        d.pad_keys = runs(~sv.mask[b])
    got = _values(trace, probes, "rope_deltas", last=True, name="state")
    if got is not None:
        p, v = got
        v = np.asarray(v)
        d.rope_delta_shape = tuple(v.shape)
        d.rope_delta_from = trace.s(int(p["name"]))
        if v.ndim >= 1 and v.shape[0] == sv.batch:
            d.rope_delta = [int(x) for x in v[b].ravel()]
        else:
            d.rope_delta = [int(x) for x in v.ravel()[:4]]
    if step == prefill:
        d.media = [s for s in spans if s.kind in ("image", "video")]
    elif prefill_probes is not None:
        psv = read_step(trace, prefill_probes)
        if psv.batch == sv.batch:
            pgr = {IMAGE: _grids(trace, prefill_probes, "image_grid_thw"),
                   VIDEO: _grids(trace, prefill_probes, "video_grid_thw")}
            psec = _values(trace, prefill_probes, "second_per_grid_ts")
            ppos = _axes(psv.pos) if psv.pos is not None and psv.ids is not None \
                and psv.pos.shape[-1] == psv.ids.shape[-1] and psv.pos.shape[1] == psv.batch else None
            d.media = [s for s in _spans(psv, b, pgr, np.asarray(psec[1], dtype=np.float64) if psec else None, ppos)
                       if s.kind in ("image", "video")]
    return d
