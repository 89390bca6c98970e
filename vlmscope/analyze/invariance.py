"""Batch invariance: does row i of a batched run compute what row i computes alone?

``vlmscope invariance`` records a batch (left- and right-padded) and each of its rows alone,
saving the output of every module (``--save-tensors '*'``). This module compares them, numpy
only: for each row and each step, every module call's output *slice that belongs to the row*
in the batch against the same call's output in the row-alone run.

Which part of a tensor belongs to row ``b`` (the models' documented layouts):

- **Language side** (a batch axis of size B): the row, and on the sequence axis the row's real
  tokens, read from the 2-D ``attention_mask`` the model received (allowed keys of row ``b``;
  the step's queries are the last S of them: left padding keeps the last L positions, right
  padding the first L). A key axis (attention weights ``[B, H, S, K]``) keeps the row's allowed
  keys. A sequence axis shorter than the step's input on the prefill (``logits_to_keep``: the
  logits of the last position only) holds the *last* positions, the ones ``generate`` reads the
  next token from: they are compared with the row-alone run's last positions (with right
  padding that is a padding position for a shorter row, which is why right-padded generation
  is not batch invariant).
- **Vision side** (the vision tower's flattened patches ``[N, D]``): the patches and merged
  features of the row's images. Image k has ``t*h*w`` patches and ``t*h*w/m^2`` merged
  features (``image_grid_thw``, ``m`` = ``spatial_merge_size``); the images of every row are
  concatenated in batch order (one tower call for the images, one for the videos). A per-image
  list (``pooler_output[k]``) is matched item by item.

Modules are matched by path, call number and output name (the same model, the same module
tree). A slice differs when ``max|batch - alone| > atol + rtol * scale``, ``scale`` being
``max|alone|`` of the slice; the defaults by dtype (``DEFAULT_RTOL``; ``atol`` 0):

==========  =========  =========================================================
dtype       rtol       why
==========  =========  =========================================================
float64     1e-10      a different reduction order, amplified through the layers
float32     1e-5       about 80 ulps (2^-23) relative to the slice's largest value
float16     4e-3       about 8 ulps (2^-10)
bfloat16    3e-2       about 4 ulps (2^-7): bf16 batched kernels differ that much
integers    exact
==========  =========  =========================================================

A row's verdict names the first module in execution order (the first call to *return*: the
innermost module, not its parents) whose slice differs, with its step, token, max abs diff and
scale. Comparison of a row stops at its first divergent step (everything after depends on it),
and the divergent module outputs of that step are counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from vlmscope.analyze.rows import read_step
from vlmscope.semantics import image_token_id_of, is_under, merge_size_of, runs, video_token_id_of
from vlmscope.trace import ROLE_OUTPUT, Trace, shape_of

#: Relative tolerance by the recorded tensor's dtype (see the module docstring).
DEFAULT_RTOL: dict[str, float] = {"float64": 1e-10, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
#: Relative tolerance of a float dtype not listed above (float8 and the like).
OTHER_FLOAT_RTOL = 1e-1
DEFAULT_ATOL = 0.0

INVARIANT, DIFFERS, NOT_COMPARED = "invariant", "differs", "not compared"

_ITEM = re.compile(r"^(.*)\[(\d+)\]$")


# ============================================================================ results


@dataclass
class Divergence:
    """One module output whose row slice differs beyond tolerance."""

    step: int
    module: str           # module path ("" is the root model; "input_ids" for a differing input token)
    nth: int              # call number of the module within the step
    name: str             # output name ("out", "out[0]", "out.logits", ...)
    dtype: str
    max_abs: float
    scale: float
    tol: float
    where: str            # "token 12 of 29", "new token", "image 0 patch 40", ...
    token: int = -1       # row-local token index on the language side (-1: not a token axis)

    def line(self) -> str:
        mod = self.module or "(root)"
        return (f"step {self.step} {mod} [{self.nth}] {self.name} {self.where}: "
                f"max |diff| {_g(self.max_abs)}, scale {_g(self.scale)} (tolerance {_g(self.tol)})")


@dataclass
class RowResult:
    """The verdict of one row against one batch run (one padding side)."""

    row: int
    side: str                      # "left" / "right" (the batch run's padding side)
    verdict: str                   # invariant / differs / not compared
    first: Divergence | None = None
    n_divergent: int = 0           # divergent module outputs in the first divergent step
    divergent_modules: list[str] = field(default_factory=list)   # their paths, execution order
    n_compared: int = 0            # module outputs compared, all steps
    max_rel: float = 0.0           # the largest max|diff| / scale of the compared outputs within tolerance
    steps_compared: int = 0
    not_compared: list[str] = field(default_factory=list)        # module paths not compared (no payload)
    unmatched: list[str] = field(default_factory=list)           # outputs with no layout / counterpart
    note: str = ""                 # why the row was not compared, or what limited the comparison

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Tolerance:
    """``rtol`` / ``atol`` overrides (None: the dtype's default)."""

    rtol: float | None = None
    atol: float | None = None

    def of(self, dtype: str) -> tuple[float, float]:
        atol = DEFAULT_ATOL if self.atol is None else float(self.atol)
        if self.rtol is not None:
            return float(self.rtol), atol
        if dtype in DEFAULT_RTOL:
            return DEFAULT_RTOL[dtype], atol
        if dtype.startswith("float"):
            return OTHER_FLOAT_RTOL, atol
        return 0.0, 0.0   # integers, bool: exact


def _g(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


# ============================================================================ one trace's view


@dataclass
class _Out:
    """One output tensor of one module call."""

    key: tuple                    # matching key
    path: str
    nth: int
    name: str
    order: tuple[int, int]        # (end_seq of the call, tensor row): execution order of return
    shape: tuple[int, ...]
    dtype: str
    payload: int
    call: int = -1                # vision call index (-1: language side)
    item: int = -1                # per-image list item index (-1: none)


class _Run:
    """What the comparison needs from one trace: steps, masks, token ids, vision calls, outputs."""

    def __init__(self, trace: Trace):
        self.t = trace
        meta = trace.meta
        cfg = trace.config or {}
        rope = meta.get("rope") if isinstance(meta.get("rope"), dict) else {}
        self.image_token_id = _int(rope.get("image_token_id")) or _int(meta.get("image_token_id")) \
            or image_token_id_of(cfg)
        self.video_token_id = _int(rope.get("video_token_id")) or video_token_id_of(cfg)
        self.merge = _int(rope.get("spatial_merge_size")) or merge_size_of(cfg)
        vm = meta.get("vision_model")
        self.vision = vm if isinstance(vm, str) and vm else None
        self.paths = trace.module_paths
        self.n_steps = trace.n_steps
        self._steps = trace.steps
        self._cache: dict[int, dict] = {}

    # ---- per step -------------------------------------------------------------------------
    def step(self, s: int) -> dict:
        got = self._cache.get(s)
        if got is None:
            got = self._cache[s] = self._read_step(s)
        return got

    def _read_step(self, s: int) -> dict:
        t = self.t
        row = self._steps[s]
        ev = t.events(s)
        tens = t.tensors(s)
        probes = t.probes(s)
        ev0 = int(row["event_start"])
        kind = [t.s(int(k)) for k in probes["kind"]]
        names = [t.s(int(n)) for n in probes["name"]]
        # the model's own inputs: the step's token ids and token mask, read as the summary reads them
        sv = read_step(t, probes)
        ids, mask = sv.ids, sv.mask
        S = int(row["input_len"])
        B = ids.shape[0] if ids is not None else mask.shape[0] if mask is not None else -1
        # vision calls: each call of the vision tower, its grid (grid_thw probe) and seq range
        calls: list[dict] = []
        if self.vision is not None:
            vid = [i for i, p in enumerate(self.paths) if p == self.vision]
            for j in np.flatnonzero(np.isin(ev["module"], vid)):
                e = ev[j]
                grid = None
                for i, p in enumerate(probes):
                    if int(p["event"]) == ev0 + j and kind[i] in ("image_grid_thw", "video_grid_thw") \
                            and names[i] in ("grid_thw", "image_grid_thw", "video_grid_thw"):
                        grid = np.asarray(t.probe_value(p)).reshape(-1, 3)
                        break
                calls.append({"seq": int(e["seq"]), "end": int(e["end_seq"]), "grid": grid})
        outs: list[_Out] = []
        occ: dict[tuple, int] = {}
        sel = np.flatnonzero(tens["role"] == ROLE_OUTPUT)
        for r in sel:
            tr = tens[r]
            e = ev[int(tr["event"]) - ev0]
            path = self.paths[int(e["module"])]
            name = t.s(int(tr["name"]))
            nth = int(e["nth"])
            call = -1
            if self.vision is not None and is_under(path, self.vision):
                for c, vc in enumerate(calls):
                    if vc["seq"] <= int(e["seq"]) < vc["end"] or (vc["seq"] == int(e["seq"])):
                        call = c
                        break
            item = -1
            m = _ITEM.match(name)
            if m is not None and ("image" in m.group(1) or "video" in m.group(1)):
                item = int(m.group(2))
            if call >= 0:
                k0 = (path, call, name)
                n = occ.get(k0, 0)
                occ[k0] = n + 1
                key: tuple = ("v", path, n, name)        # the call's kind is added by the comparison
            elif item >= 0:
                key = ("i", path, nth, m.group(1), item)
            else:
                key = ("l", path, nth, name)
            outs.append(_Out(key, path, nth, name, (int(e["end_seq"]), int(r)), tuple(shape_of(tr)),
                             t.s(int(tr["dtype"])), int(tr["payload"]), call, item))
        outs.sort(key=lambda o: o.order)
        return {"S": S, "B": B, "ids": ids, "mask": mask, "calls": calls, "outs": outs,
                "cache_before": int(row["cache_before"]), "kind": int(row["kind"])}

    def payload(self, i: int) -> np.ndarray:
        return np.asarray(self.t.payload(i))

    # ---- rows -----------------------------------------------------------------------------
    def tokens(self, st: dict, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(query indices, key indices) of row ``b`` in the step: its allowed (non-padding) ones."""
        S, mask = st["S"], st["mask"]
        if mask is None:
            K = S + max(st["cache_before"], 0)
            return np.arange(S), np.arange(K)
        m = mask[b]
        K = m.shape[0]
        return np.flatnonzero(m[K - S:]) if S <= K else np.arange(S), np.flatnonzero(m)

    def media_counts(self, st: dict, b: int, q: np.ndarray) -> tuple[int, int]:
        """(images, videos) in row ``b``'s real tokens: runs of placeholder tokens."""
        ids = st["ids"]
        if ids is None or ids.ndim != 2:
            return 0, 0
        row = ids[b][q]
        return _runs(row, self.image_token_id), _runs(row, self.video_token_id)


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


def _runs(row: np.ndarray, token: int | None) -> int:
    if token is None or row.size == 0:
        return 0
    return len(runs(row == token))


# ============================================================================ slices


def _call_kinds(n_images: int, n_videos: int) -> list[str]:
    """The vision tower's calls in a step, in order: the images (if any), then the videos."""
    return (["image"] if n_images else []) + (["video"] if n_videos else [])


class _Media:
    """The row's part of each vision call: patch and feature ranges, per-item index offsets."""

    def __init__(self, kind: str, grid: np.ndarray | None, first: int, count: int, merge: int):
        self.kind, self.first, self.count = kind, first, count
        self.ok = grid is not None and first + count <= len(grid)
        if not self.ok:
            return
        p = (grid[:, 0] * grid[:, 1] * grid[:, 2]).astype(np.int64)
        f = p // (merge * merge)
        po = np.concatenate([[0], np.cumsum(p)])
        fo = np.concatenate([[0], np.cumsum(f)])
        self.grid = grid
        self.n_patches, self.n_features = int(po[-1]), int(fo[-1])
        self.patches = (int(po[first]), int(po[first + count]))
        self.features = (int(fo[first]), int(fo[first + count]))
        self.item_patches, self.item_features = p, f
        self.po, self.fo = po, fo


def _language_select(bshape, ashape, B, S, q, qa, K, k, ka):
    """Index tuples (batch, alone) for a language tensor, or None when no layout fits.

    Candidates: a batch axis (size B in the batch, 1 alone), then a query axis (the step's S,
    or a shorter tail), then optionally a key axis last (K)."""
    nd = len(bshape)
    if nd != len(ashape) or nd < 1:
        return None
    for a in range(min(nd, 2)):
        if bshape[a] != B or ashape[a] != 1:
            continue
        for qa_ax in [*range(a + 1, nd), None]:
            for ka_ax in ([None] if qa_ax is None else [None, nd - 1]):
                if ka_ax is not None and ka_ax <= qa_ax:
                    continue
                bi: list[Any] = [slice(None)] * nd
                ai: list[Any] = [slice(None)] * nd
                pred = list(bshape)
                pred[a] = 1
                mode = None
                if qa_ax is not None:
                    n = bshape[qa_ax]
                    if n == S and ashape[qa_ax] == len(qa) and len(q) == len(qa):
                        bi[qa_ax], ai[qa_ax], pred[qa_ax], mode = q, qa, len(qa), "tokens"
                    elif n < S and ashape[qa_ax] == n and n <= len(qa):
                        bi[qa_ax], ai[qa_ax], mode = slice(n and -n, None), slice(n and -n, None), "tail"
                    else:
                        continue
                if ka_ax is not None:
                    if bshape[ka_ax] != K or ashape[ka_ax] != len(ka) or len(k) != len(ka):
                        continue
                    bi[ka_ax], ai[ka_ax], pred[ka_ax] = k, ka, len(ka)
                if tuple(pred) != tuple(ashape):
                    continue
                return a, qa_ax, mode, bi, ai
    return None


def _fancy(x: np.ndarray, index: Sequence[Any]) -> np.ndarray:
    """``x`` indexed axis by axis (integer arrays select independently on each axis)."""
    for ax, ix in enumerate(index):
        if isinstance(ix, slice) and ix == slice(None):
            continue
        x = x[(slice(None),) * ax + (ix,)]
    return x


# ============================================================================ comparison


def _differs(x: np.ndarray, y: np.ndarray, dtype: str, tol: Tolerance) -> tuple[bool, float, float, float, int]:
    """(differs, max |x - y|, scale, tolerance, flat index of the largest difference)."""
    rtol, atol = tol.of(dtype)
    x = np.asarray(x)
    y = np.asarray(y)
    if x.size == 0:
        return False, 0.0, 0.0, atol, -1
    if x.dtype.kind in "biu" and y.dtype.kind in "biu":
        d = np.abs(x.astype(np.int64) - y.astype(np.int64)).astype(np.float64)
        scale = float(np.abs(y).max())
    else:
        xf = x.astype(np.float64, copy=False)
        yf = y.astype(np.float64, copy=False)
        d = np.abs(xf - yf)
        nan_x, nan_y = np.isnan(xf), np.isnan(yf)
        same_nonfinite = (nan_x & nan_y) | (np.isinf(xf) & (xf == yf))
        d[same_nonfinite] = 0.0
        d[np.isnan(d)] = np.inf          # NaN on one side only, or inf - inf of opposite signs
        fin = np.abs(yf[np.isfinite(yf)])
        scale = float(fin.max()) if fin.size else 0.0
    i = int(np.argmax(d))
    worst = float(d.reshape(-1)[i])
    limit = atol + rtol * scale
    return worst > limit, worst, scale, limit, i


def compare_row(batch: Trace, alone: Trace, row: int, *, side: str = "", tol: Tolerance | None = None) -> RowResult:
    """Compare row ``row`` of the batch trace with the trace of that row run alone."""
    return compare_rows(batch, [alone], rows=[row], side=side, tol=tol)[0]


def compare_rows(batch: Trace, alones: Sequence[Trace], *, rows: Sequence[int] | None = None, side: str = "",
                 tol: Tolerance | None = None) -> list[RowResult]:
    """Compare every row of ``batch`` (``rows[j]`` for ``alones[j]``; all rows in order by
    default) with its row-alone trace. The batch's payloads are read once for all rows."""
    tol = tol or Tolerance()
    rows = list(range(len(alones))) if rows is None else list(rows)
    if len(rows) != len(alones):
        raise ValueError("one row index per row-alone trace")
    br = _Run(batch)
    ars = [_Run(a) for a in alones]
    res = [RowResult(row=r, side=side, verdict=INVARIANT) for r in rows]
    active = [True] * len(rows)
    if br.n_steps == 0:
        for rr in res:
            rr.verdict, rr.note = NOT_COMPARED, "the batch trace has no steps"
        return res
    st0 = br.step(0)
    B = st0["B"]
    if B < 1:
        for rr in res:
            rr.verdict, rr.note = NOT_COMPARED, "the batch trace has no input_ids or attention_mask at its prefill"
        return res
    # prefill: the same inputs, and which images/videos of the batch belong to each row
    media_first: list[tuple[int, int]] = []
    n_media = [br.media_counts(st0, b, br.tokens(st0, b)[0]) for b in range(B)]
    for j, (r, ar) in enumerate(zip(rows, ars)):
        media_first.append((sum(n[0] for n in n_media[:r]), sum(n[1] for n in n_media[:r])))
        if not 0 <= r < B:
            res[j].verdict, res[j].note = NOT_COMPARED, f"the batch has {B} rows, not row {r}"
            active[j] = False
            continue
        if ar.n_steps == 0:
            res[j].verdict, res[j].note = NOT_COMPARED, "the row-alone trace has no steps"
            active[j] = False
            continue
        a0 = ar.step(0)
        q, _ = br.tokens(st0, r)
        qa, _ = ar.tokens(a0, 0)
        bid = st0["ids"][r][q] if st0["ids"] is not None else None
        aid = a0["ids"][0][qa] if a0["ids"] is not None else None
        if a0["B"] != 1:
            res[j].verdict, res[j].note = NOT_COMPARED, f"the row-alone trace has a batch of {a0['B']}, not 1"
            active[j] = False
        elif bid is None or aid is None or bid.shape != aid.shape or not np.array_equal(bid, aid):
            res[j].verdict = NOT_COMPARED
            res[j].note = (f"different inputs: row {r} has {len(q)} real tokens in the batch and "
                           f"{len(qa)} alone" + ("" if bid is None or aid is None or len(q) != len(qa)
                                                  else ", with different token ids"))
            active[j] = False
    n_steps = br.n_steps
    for s in range(n_steps):
        if not any(active):
            break
        bst = br.step(s)
        for j, r in enumerate(rows):
            if active[j] and s >= ars[j].n_steps:
                active[j] = False   # the row finished alone (end of sequence): nothing more to compare
        live = [j for j in range(len(rows)) if active[j]]
        if not live:
            break
        ctx = {j: _row_context(br, bst, ars[j], ars[j].step(s), rows[j], media_first[j], n_media, s) for j in live}
        found: dict[int, list[Divergence]] = {j: [] for j in live}
        # input tokens of decode steps (the previous step's choice)
        for j in live:
            c = ctx[j]
            if s > 0 and c["bid"] is not None and c["aid"] is not None and not np.array_equal(c["bid"], c["aid"]):
                found[j].append(Divergence(s, "input_ids", 0, "input_ids", "int64", 1.0, 0.0, 0.0,
                                           "the generated token differs", token=-1))
        amap = {j: {o.key if o.call < 0 else _vkey(o, ctx[j]["a_kinds"]): o for o in ars[j].step(s)["outs"]}
                for j in live}
        for o in bst["outs"]:
            need = [j for j in live if not (o.call >= 0 and not _row_has_call(o, ctx[j]))]
            if not need:
                continue
            if o.payload < 0:
                for j in need:
                    _add_unique(res[j].not_compared, o.path or "(root)")
                continue
            data = None
            for j in need:
                c = ctx[j]
                sel = _select(o, c, amap[j])
                if sel is None:
                    continue
                if isinstance(sel, str):
                    _add_unique(res[j].unmatched, f"{o.path or '(root)'} {o.name} ({sel})")
                    continue
                ao, bi, ai, describe = sel
                if ao.payload < 0:
                    _add_unique(res[j].not_compared, o.path or "(root)")
                    continue
                if data is None:
                    data = br.payload(o.payload)
                if data.shape != o.shape:
                    _add_unique(res[j].unmatched, f"{o.path or '(root)'} {o.name} (payload shape)")
                    continue
                adata = ars[j].payload(ao.payload)
                x, y = _fancy(data, bi), _fancy(adata, ai)
                if x.shape != y.shape:
                    _add_unique(res[j].unmatched, f"{o.path or '(root)'} {o.name} (slice shapes)")
                    continue
                res[j].n_compared += 1
                bad, worst, scale, limit, flat = _differs(x, y, o.dtype, tol)
                if not bad and worst > 0:
                    res[j].max_rel = max(res[j].max_rel, worst / scale if scale > 0 else math.inf)
                if bad:
                    where, token = describe(np.unravel_index(flat, x.shape))
                    found[j].append(Divergence(s, o.path, o.nth, o.name, o.dtype, worst, scale, limit, where, token))
        for j in live:
            res[j].steps_compared = s + 1
            if found[j]:
                res[j].verdict = DIFFERS
                res[j].first = found[j][0]
                res[j].n_divergent = len(found[j])
                res[j].divergent_modules = [d.module or "(root)" for d in found[j]]
                active[j] = False
    for rr in res:
        if rr.verdict == INVARIANT and rr.n_compared == 0:
            rr.verdict = NOT_COMPARED
            rr.note = rr.note or "no module output could be compared (were tensors saved?)"
    return res


def _add_unique(lst: list[str], item: str) -> None:
    if item not in lst:
        lst.append(item)


def _vkey(o: _Out, kinds: list[str]) -> tuple:
    kind = kinds[o.call] if 0 <= o.call < len(kinds) else "?"
    return (*o.key, kind)


def _row_has_call(o: _Out, c: dict) -> bool:
    kind = c["b_kinds"][o.call] if 0 <= o.call < len(c["b_kinds"]) else None
    return kind is not None and c["media"].get(kind) is not None and c["media"][kind].count > 0


def _row_context(br: _Run, bst: dict, ar: _Run, ast: dict, r: int, first: tuple[int, int],
                 n_media: list[tuple[int, int]], s: int) -> dict:
    q, k = br.tokens(bst, r)
    qa, ka = ar.tokens(ast, 0)
    bid = bst["ids"][r][q] if bst["ids"] is not None and bst["ids"].ndim == 2 else None
    aid = ast["ids"][0][qa] if ast["ids"] is not None and ast["ids"].ndim == 2 else None
    tot_img = sum(n[0] for n in n_media)
    tot_vid = sum(n[1] for n in n_media)
    mine = n_media[r]
    b_kinds = _call_kinds(tot_img, tot_vid) if bst["calls"] else []
    a_kinds = _call_kinds(*mine) if ast["calls"] else []
    media: dict[str, _Media | None] = {}
    for kind, f, n in (("image", first[0], mine[0]), ("video", first[1], mine[1])):
        if kind in b_kinds and len(b_kinds) == len(bst["calls"]):
            media[kind] = _Media(kind, bst["calls"][b_kinds.index(kind)]["grid"], f, n, br.merge)
        else:
            media[kind] = None
    mask = bst["mask"]
    tail_real = mask[r][-bst["S"]:] if mask is not None else np.ones(bst["S"], bool)
    return {"q": q, "k": k, "qa": qa, "ka": ka, "tail_real": tail_real, "bid": bid, "aid": aid, "B": bst["B"], "S": bst["S"],
            "K": len(bst["mask"][r]) if bst["mask"] is not None else bst["S"] + max(bst["cache_before"], 0),
            "b_kinds": b_kinds, "a_kinds": a_kinds, "media": media, "step": s, "kind": bst["kind"],
            "first": first, "row": r}


def _select(o: _Out, c: dict, amap: dict):
    """(alone output, batch index, alone index, describe) for this row, a reason string when the
    output belongs to the row but cannot be compared, or None when it is not the row's."""
    # the vision tower's own calls
    if o.call >= 0:
        kind = c["b_kinds"][o.call]
        med: _Media = c["media"][kind]
        ao = amap.get((*o.key, kind))
        if ao is None:
            return "no counterpart alone"
        if not med.ok:
            return "no grid"
        return _vision_select(o, ao, med) or "layout"
    # a per-image list item (pooler_output[k]) outside the tower
    if o.item >= 0:
        kind = "video" if "video" in o.key[3] else "image"
        med = c["media"].get(kind)
        if med is None or not med.ok:
            return None
        local = o.item - med.first
        if not 0 <= local < med.count:
            return None
        ao = amap.get((*o.key[:4], local))
        if ao is None:
            return "no counterpart alone"
        if tuple(ao.shape) != tuple(o.shape):
            return "shape"
        idx = [slice(None)] * len(o.shape)
        return ao, idx, idx, lambda at, k=kind, l=local: (f"{k} {l}", -1)
    kind = "video" if "video" in o.name else "image"
    med = c["media"].get(kind)
    if (med is not None and med.ok and med.count == 0 and len(o.shape)
            and o.shape[0] in (med.n_patches, med.n_features) and o.shape[0] != c["B"]):
        return None   # vision-shaped, and the row has none of this call's images
    ao = amap.get(o.key)
    if ao is None:
        return "no counterpart alone"
    lang = _language_select(o.shape, ao.shape, c["B"], c["S"], c["q"], c["qa"], c["K"], c["k"], c["ka"])
    if lang is not None:
        a, q_ax, mode, bi, ai = lang
        return ao, _with_row(bi, a, c), ai, _describe_tokens(q_ax, mode, c, o.shape)
    # vision-shaped outputs of non-tower modules (out.image_outputs.last_hidden_state)
    if med is not None and med.ok and med.count > 0:
        v = _vision_select(o, ao, med)
        if v is not None:
            return v
    return "layout"


def _with_row(bi: list, a: int, c: dict) -> list:
    bi = list(bi)
    bi[a] = slice(c["row"], c["row"] + 1)
    return bi


def _describe_tokens(q_ax, mode, c, shape):
    def describe(at):
        if q_ax is None:
            return "(no token axis)", -1
        i = int(at[q_ax])
        if mode == "tail":
            n = shape[q_ax]
            tok = len(c["qa"]) - n + i
            what = "the last position" if n == 1 else f"position {tok} (last {n})"
            if not c["tail_real"][-n:][i]:
                what += " (padding in the batch)"
            return what, tok
        if c["kind"] != 0 and len(c["qa"]) == 1:
            return "new token", int(c["qa"][i])
        return f"token {int(c['qa'][i])} of {len(c['qa'])}", int(c["qa"][i])
    return describe


def _vision_select(o: _Out, ao: _Out, med: _Media):
    nd = len(o.shape)
    if nd != len(ao.shape):
        return None
    for ax in range(min(nd, 2)):
        n = o.shape[ax]
        if ax == 1 and o.shape[0] != 1:
            break
        for unit, (lo, hi), total, per in (("patch", med.patches, med.n_patches, med.item_patches),
                                           ("feature", med.features, med.n_features, med.item_features)):
            if n != total:
                continue
            pred = list(o.shape)
            pred[ax] = hi - lo
            if tuple(pred) != tuple(ao.shape):
                continue
            bi: list[Any] = [slice(None)] * nd
            ai: list[Any] = [slice(None)] * nd
            bi[ax] = slice(lo, hi)

            def describe(at, ax=ax, unit=unit, per=per, first=med.first, count=med.count, kind=med.kind):
                i = int(at[ax])
                ends = np.cumsum(per[first:first + count])
                k = int(np.searchsorted(ends, i, side="right"))
                start = int(ends[k - 1]) if k else 0
                return f"{kind} {k} {unit} {i - start}", -1
            return ao, bi, ai, describe
    return None


# ============================================================================ the whole report


@dataclass
class InvarianceReport:
    """Every row against each batch run (``sides``: padding side -> its rows' results)."""

    rows: int
    sides: dict[str, list[RowResult]]
    tolerance: dict[str, Any]
    traces: dict[str, Any] = field(default_factory=dict)

    @property
    def invariant(self) -> bool:
        return all(r.verdict == INVARIANT for rs in self.sides.values() for r in rs)

    @property
    def differs(self) -> bool:
        return any(r.verdict == DIFFERS for rs in self.sides.values() for r in rs)

    def result(self, row: int, side: str) -> RowResult:
        return next(r for r in self.sides[side] if r.row == row)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "invariant": self.invariant, "tolerance": self.tolerance,
                "traces": self.traces,
                "sides": {s: [r.to_dict() for r in rs] for s, rs in self.sides.items()}}


def invariance(batches: dict[str, Trace], alones: Sequence[Trace], *, tol: Tolerance | None = None,
               traces: dict[str, Any] | None = None) -> InvarianceReport:
    """Compare each batch run (by padding side) with the rows run alone (``alones[i]``: row i)."""
    tol = tol or Tolerance()
    sides = {side: compare_rows(bt, alones, side=side, tol=tol) for side, bt in batches.items()}
    tinfo = {"rtol": tol.rtol if tol.rtol is not None else DEFAULT_RTOL, "atol": tol.atol if tol.atol is not None
             else DEFAULT_ATOL, "scale": "max |row alone| of the slice",
             "rule": "max |batch - alone| <= atol + rtol * scale"}
    return InvarianceReport(rows=len(alones), sides=sides, tolerance=tinfo, traces=dict(traces or {}))
