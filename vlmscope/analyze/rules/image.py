"""Rule family ``image``: the image (and video) placeholder tokens, the grids and the vision
merger's output rows agree, per image and per batch row (``image.tokens``); and each row's
placeholder positions hold that row's own features (``image.features-row``).

How the features travel (Qwen2-VL, Qwen2.5-VL, and the Qwen-1 style of tiny-mqwen): the
vision tower runs once per modality on every image of the batch, in order (row 0's images
first); image ``k`` of grid ``(t, h, w)`` gives ``t*h*w / m^2`` feature rows (``m`` the spatial
merge size), and the merger's rows are those of every image, concatenated. The model then
writes them, in that order, over the placeholder positions of ``input_ids`` taken row by row
(``masked_scatter``). In Qwen2-VL the processor already expanded each image into as many
placeholders as it has features; in Qwen-1 style models one placeholder per image grows the
sequence by the image's features, in every row alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmscope.semantics import fmt_shape, image_spans

from .._index import TraceIndex
from ._common import first_per_group, memo, step_arrays
from .registry import rule
from .report import Violation

_KINDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


@dataclass
class _Call:
    """One run of the vision tower in a step: its merger probe and the grid it ran on."""

    row: int                        # the merger_rows probe
    seq: int
    n: int                          # feature rows it produced
    grid: np.ndarray | None         # [n_images, 3], None when unknown
    norms: int = -1                 # token_norms probe of the features in scatter order (-1 none)


@dataclass
class _Media:
    """One modality in one step."""

    name: str                                   # "image" | "video"
    runs: list[tuple[int, int, int]]            # placeholder runs (row, start, end), row by row
    per_row: np.ndarray                         # placeholders per batch row
    calls: list[_Call] = field(default_factory=list)

    @property
    def n_feat(self) -> int:
        return sum(c.n for c in self.calls)

    @property
    def grid(self) -> np.ndarray | None:
        gs = [c.grid for c in self.calls]
        if not gs or any(g is None for g in gs):
            return None
        return np.concatenate(gs) if len(gs) > 1 else gs[0]


@dataclass
class _Step:
    step: int
    B: int
    q: int
    il: int
    media: dict[str, _Media]
    module: str                      # the merger (where image.tokens reports)
    seq: int


def _steps(ix: TraceIndex) -> list[_Step]:
    return memo(ix, "_image_steps", _read_steps)


def _read_steps(ix: TraceIndex) -> list[_Step]:
    p = ix.probes
    mrows = ix.probe_rows("merger_rows", text_only=False)
    if not len(mrows):
        return []
    grid_rows = {name: ix.probe_rows(kind, text_only=False) for name, kind in _KINDS.items()}
    norm_rows = ix.probe_rows("token_norms", text_only=False)
    ids_rows = ix.probe_rows("input_ids", text_only=False)
    ids_first = {}
    if len(ids_rows):
        f = ids_rows[first_per_group(p["step"][ids_rows].astype(np.int64), p["seq"][ids_rows].astype(np.int64))]
        ids_first = {int(p["step"][r]): int(r) for r in f}
    q_len, _, in_len = step_arrays(ix)
    rope = _rope(ix)
    merger_path = str(ix.meta.get("merger") or "")
    out = []
    for s in np.unique(p["step"][mrows]).tolist():
        ms = mrows[p["step"][mrows] == s]
        ms = ms[np.argsort(p["seq"][ms], kind="stable")]
        r_ids = ids_first.get(s)
        runs, per_row, B = _placeholders(ix, r_ids, rope)
        media = {name: _Media(name, runs[name], per_row[name]) for name in _KINDS}
        grids = _grid_probes(ix, s, grid_rows)
        norms = _norm_probes(ix, s, norm_rows)
        seqs = p["seq"][ms].astype(np.int64).tolist() + [1 << 62]
        for i, r in enumerate(ms.tolist()):
            seq = seqs[i]
            prev = seqs[i - 1] if i else -1
            name, grid = "image", None
            before = [g for g in grids if prev < g[0] < seq] or [g for g in grids if g[0] < seq]
            if before:
                _, name, grid = before[-1]
            elif not media["image"].runs and media["video"].runs:
                name = "video"
            n = ix.info(r).get("rows")
            if n is None:
                nd = int(p["ndim"][r])
                sh = p["shape"][r][:nd]
                n = int(np.prod(sh[:-1])) if nd >= 2 else int(sh[0]) if nd else 0
            call = _Call(r, seq, int(n), grid)
            # the features in the order they are scattered: the vision tower's own output when it
            # differs from the merger's (Qwen2.5-VL un-permutes its windows), else the merger's
            ev = int(p["event"][r])
            pool = [x for x in norms if x[2] == "pooler_output" and seq < x[0] < seqs[i + 1]]
            own = [x for x in norms if x[2] == "out" and x[4] == ev]
            if pool:
                call.norms = pool[0][3]
            elif own:
                call.norms = own[0][3]
            media[name].calls.append(call)
        mod = ix.module_path(int(p["module"][ms[0]])) or merger_path
        out.append(_Step(s, B, int(q_len[s]) if s < len(q_len) else -1, int(in_len[s]) if s < len(in_len) else -1,
                         media, mod, int(p["seq"][ms[0]])))
    return out


def _rope(ix: TraceIndex) -> dict:
    rc = getattr(ix, "rope_config", None)
    return rc if isinstance(rc, dict) else {}


def _placeholders(ix: TraceIndex, r: int | None, rope: dict
                  ) -> tuple[dict[str, list], dict[str, np.ndarray], int]:
    """Runs and per-row counts of image and video placeholders in the step's ``input_ids``."""
    runs: dict[str, list] = {"image": [], "video": []}
    per_row = {"image": np.zeros(0, np.int64), "video": np.zeros(0, np.int64)}
    if r is None:
        return runs, per_row, 0
    p = ix.probes
    info = ix.info(r)
    nd = int(p["ndim"][r])
    B = int(p["shape"][r][0]) if nd == 2 else 1
    ids = None
    tok = {"image": info.get("image_token_id", ix.meta.get("image_token_id", rope.get("image_token_id"))),
           "video": info.get("video_token_id", rope.get("video_token_id"))}
    for name, key in (("image", "spans"), ("video", "video_spans")):
        sp = info.get(key)
        if sp is None and tok[name] is not None:
            if ids is None:
                ids = ix.value(r)
            if ids is not None:
                sp = image_spans(np.asarray(ids), int(tok[name]))
        sp = [tuple(int(x) for x in s) for s in (sp or [])]
        runs[name] = sp
        cnt = np.zeros(B, np.int64)
        for b, a, e in sp:
            if 0 <= b < B:
                cnt[b] += e - a
        per_row[name] = cnt
    return runs, per_row, B


def _grid_probes(ix: TraceIndex, s: int, grid_rows: dict[str, np.ndarray]) -> list[tuple[int, str, np.ndarray]]:
    """(seq, modality, grid) of every grid probe in step ``s``, in order."""
    p = ix.probes
    out = []
    for name, rows in grid_rows.items():
        for r in rows[p["step"][rows] == s].tolist() if len(rows) else []:
            v = ix.value(r)
            if v is not None and np.asarray(v).size and np.atleast_2d(v).shape[-1] == 3:
                out.append((int(p["seq"][r]), name, np.atleast_2d(np.asarray(v, np.int64))))
    return sorted(out, key=lambda x: x[0])


def _norm_probes(ix: TraceIndex, s: int, rows: np.ndarray) -> list[tuple[int, int, str, int, int]]:
    """(seq, module, name, probe row, event) of the token_norms probes in step ``s``."""
    if not len(rows):
        return []
    p = ix.probes
    rs = rows[p["step"][rows] == s]
    return sorted((int(p["seq"][r]), int(p["module"][r]), ix.s(int(p["name"][r])), int(r), int(p["event"][r]))
                  for r in rs)


def _image_feats(grid: np.ndarray | None, m: int) -> list[int] | None:
    return None if grid is None else [int(np.prod(g[:3])) // (m * m) for g in grid]


# ---------------------------------------------------------------------------- image.tokens


@rule("image.tokens", "image and video placeholder tokens, per image and per batch row, equal the features "
      "the vision merger produced for them (grids consumed in order across the batch)")
def rule_image_tokens(ix: TraceIndex) -> list[Violation]:
    out = []
    for st in _steps(ix):
        for md in st.media.values():
            if not md.calls:
                continue
            v = _media_violation(ix, st, md)
            if v is not None:
                out.append(v)
                break
    return out


def _violation(st: _Step, expected: str, actual: str, hint: str, row: int = -1,
               tokens: list[int] | None = None) -> Violation:
    return Violation("image.tokens", st.step, st.module, expected, actual, hint, seq=st.seq, tokens=tokens, row=row)


def _media_violation(ix: TraceIndex, st: _Step, md: _Media) -> Violation | None:
    """The first of: a merger call's rows vs its grid; a row's spliced span vs its features
    (placeholders that expand); each image's placeholder run vs its grid; a row's placeholders
    vs its images; the placeholders of the batch vs the merger's rows."""
    m = ix.merge_size
    what = md.name
    for c in md.calls:
        feats = _image_feats(c.grid, m)
        if feats is not None and sum(feats) != c.n:
            return _violation(st, f"{sum(feats)} {what} feature rows ({what}_grid_thw {c.grid[:, :3].tolist()} / "
                                  f"{m}x{m} merge)", f"{c.n} merger output rows",
                              f"the vision merger's output does not match the {what} grid (rows dropped or added, "
                              "or a wrong spatial_merge_size)")
    if not md.runs and not md.per_row.sum():
        return None   # placeholders unknown (the model's forward never ran)
    feats = _image_feats(md.grid, m)
    if st.q >= 0 and st.il >= 0 and st.q != st.il and what == "image":
        return _expanding_violation(st, md, feats)
    if feats is not None:
        return _per_image_violation(st, md, feats, m)
    n_ph = int(md.per_row.sum())
    if n_ph != md.n_feat:
        return _violation(st, f"{n_ph} {what} feature rows (placeholder tokens)", f"{md.n_feat} merger output rows",
                          f"the vision merger produced a different number of {what} features than there are "
                          f"{what} placeholder tokens in input_ids (processor grid and model disagree)")
    return None


def _row_images(md: _Media) -> list[list[int]]:
    """Per batch row, the indices (batch order) of its images: one placeholder run each."""
    out: list[list[int]] = [[] for _ in range(len(md.per_row))]
    for k, (b, _, _) in enumerate(md.runs):
        if 0 <= b < len(out):
            out[b].append(k)
    return out


def _per_image_violation(st: _Step, md: _Media, feats: list[int], m: int) -> Violation | None:
    """Images are one placeholder run each, taken in order across the batch: run ``k`` must be
    as long as image ``k``'s features. When the runs and the grids disagree in number, the
    grids are consumed row by row by each row's placeholder count."""
    what = md.name
    grid = md.grid
    if len(md.runs) == len(feats):
        nth = {}
        for k, (b, a, e) in enumerate(md.runs):
            i = nth[b] = nth.get(b, -1) + 1
            if e - a != feats[k]:
                extra = e - a - feats[k]
                more = "more" if extra > 0 else "fewer"
                return _violation(st, f"row {b} {what} {i} ({what} {k} of the batch): {feats[k]} placeholder tokens "
                                      f"(grid {fmt_shape(grid[k][:3])} / {m}x{m} merge)",
                                  f"{e - a} placeholders ({a}..{e - 1})",
                                  f"row {b}'s {what} {i} has {abs(extra)} placeholder token(s) {more} than its "
                                  "features: the processor's grid and the model's merger disagree, or the prompt "
                                  "holds a stray placeholder", row=b, tokens=[a])
        return None
    k = 0
    for b, n in enumerate(md.per_row.tolist()):
        got, first = 0, k
        while got < n and k < len(feats):
            got += feats[k]
            k += 1
        if got != n:
            left = len(feats) - first
            return _violation(st, f"row {b}: {n} {what} placeholder tokens = the features of the next {what}s of "
                                  f"{what}_grid_thw ({left} left of {len(feats)})",
                              f"{got} features from {what}s {first}..{k - 1}" if k > first else f"no {what} left",
                              f"row {b}'s {what} placeholders do not match the {what}s the grid lists for it, taken "
                              f"in batch order: one {what} is missing, extra, or in another row", row=b)
    if k != len(feats):
        return _violation(st, f"{len(feats)} {what}s of {what}_grid_thw placed in the batch",
                          f"{k} {what}s' placeholders in input_ids",
                          f"the grid lists {what}s that no row holds placeholders for", row=-1)
    return None


def _expanding_violation(st: _Step, md: _Media, feats: list[int] | None) -> Violation | None:
    """Each placeholder run grows its row by its image's features: every row ends at q_len, so
    row ``b`` has ``q_len - (input_len - placeholders of b)`` positions of features."""
    n_ph_all = int(md.per_row.sum())
    rows = _row_images(md)
    if feats is not None and len(feats) == len(md.runs):
        want = [sum(feats[k] for k in ks) for ks in rows]
    elif n_ph_all and md.n_feat % n_ph_all == 0:
        share = md.n_feat // n_ph_all          # each placeholder stands for an equal share
        want = [int(n) * share for n in md.per_row]
    else:
        span = st.q - (st.il - n_ph_all)
        if len(md.per_row) <= 1 and span != md.n_feat:
            return _violation(st, f"{md.n_feat} image feature rows spliced in",
                              f"a span of {span} positions ({st.il} tokens - {n_ph_all} placeholders -> q_len {st.q})",
                              "the embedding sequence does not grow by the number of image features that replace "
                              "the placeholders", row=0 if len(md.per_row) == 1 else -1)
        return None
    for b, n in enumerate(md.per_row.tolist()):
        span = st.q - (st.il - int(n))
        if span != want[b]:
            return _violation(st, f"row {b}: {want[b]} image feature rows spliced in for its {len(rows[b])} image(s)",
                              f"a span of {span} positions ({st.il} tokens - {n} placeholders -> q_len {st.q})",
                              "the embedding sequence of the row does not grow by the features of its own images "
                              "(rows with different numbers of images cannot share one sequence length)", row=b)
    return None


# ---------------------------------------------------------------------------- features-row

_RTOL = {"float32": 1e-5, "float64": 1e-9, "bfloat16": 1.6e-2, "float16": 2e-3}


@rule("image.features-row", "each batch row's placeholder positions hold the features of its own images, in "
      "order (token norms of the embeddings vs the merger's rows)")
def rule_image_features_row(ix: TraceIndex) -> list[Violation]:
    out = []
    for st in _steps(ix):
        emb = _embedding_norms(ix, st.step)
        if emb is None:
            continue
        r_emb, E = emb
        for md in st.media.values():
            v = _features_violation(ix, st, md, r_emb, E)
            if v is not None:
                out.append(v)
                break
    return out


def _embedding_norms(ix: TraceIndex, s: int) -> tuple[int, np.ndarray] | None:
    """The token norms of the embeddings entering the language model in step ``s``, ``[B, S]``."""
    rows = ix.probe_rows("token_norms", text_only=False)
    if not len(rows):
        return None
    p = ix.probes
    name = ix.sid("inputs_embeds")
    rs = rows[(p["step"][rows] == s) & (p["name"][rows] == name)]
    if not len(rs):
        return None
    r = int(rs[np.argmin(p["seq"][rs])])
    v = ix.value(r)
    if v is None:
        return None
    v = np.asarray(v, np.float64)
    return r, v.reshape(1, -1) if v.ndim == 1 else v.reshape(-1, v.shape[-1])


def _tol(ix: TraceIndex, rows: list[int]) -> float:
    p = ix.probes
    return max(_RTOL.get(ix.s(int(p["dtype"][r])).removeprefix("torch."), 1e-2) for r in rows)


def _features_violation(ix: TraceIndex, st: _Step, md: _Media, r_emb: int, E: np.ndarray) -> Violation | None:
    if not md.calls or not md.runs or any(c.norms < 0 for c in md.calls):
        return None
    F = np.concatenate([np.asarray(ix.value(c.norms), np.float64).ravel() for c in md.calls])
    n_img = len(md.runs)
    feats = _image_feats(md.grid, ix.merge_size)
    if feats is None or len(feats) != n_img:
        if not n_img or len(F) % n_img:
            return None
        feats = [len(F) // n_img] * n_img
    if sum(feats) != len(F):
        return None                      # image.tokens reports it
    rtol = _tol(ix, [r_emb] + [c.norms for c in md.calls])
    starts = np.r_[0, np.cumsum(feats)[:-1]].astype(np.int64)
    # embedding positions of each image: its run, shifted by the growth of earlier images of the row
    pos = []
    shift: dict[int, int] = {}
    for k, (b, a, e) in enumerate(md.runs):
        d = shift.get(b, 0)
        expand = st.q >= 0 and st.il >= 0 and st.q != st.il
        pos.append((b, a + d, feats[k]))
        if expand:
            shift[b] = d + feats[k] - (e - a)
    B, S = E.shape
    bad = []
    for k, (b, a, n) in enumerate(pos):
        if b >= B or a < 0 or a + n > S:
            return None
        if not _close(E[b, a:a + n], F[starts[k]:starts[k] + n], rtol):
            bad.append(k)
    if not bad:
        return None
    k = bad[0]
    b, a, n = pos[k]
    got = E[b, a:a + n]
    i = sum(1 for j in range(k) if pos[j][0] == b)
    mod = _splice_module(ix)
    hint = _features_hint(md, pos, feats, starts, F, E, k, rtol)
    first = int(np.argmax(~np.isclose(got, F[starts[k]:starts[k] + n], rtol=rtol, atol=rtol * 1e-3)))
    return Violation("image.features-row", st.step, mod,
                     f"row {b}'s {md.name} {i} ({md.name} {k} of the batch) at positions {a}..{a + n - 1}: the "
                     f"merger's rows {int(starts[k])}..{int(starts[k]) + n - 1}",
                     f"other values from position {a + first} on (token norm {got[first]:.6g}, expected "
                     f"{F[starts[k] + first]:.6g}); {len(bad)} of {len(pos)} {md.name}s wrong",
                     hint, seq=int(ix.probes["seq"][r_emb]), row=b, tokens=[a + first])


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    return a.shape == b.shape and bool(np.isclose(a, b, rtol=rtol, atol=rtol * 1e-3).all())


def _features_hint(md: _Media, pos: list, feats: list[int], starts: np.ndarray, F: np.ndarray, E: np.ndarray,
                   k: int, rtol: float) -> str:
    b, a, n = pos[k]
    got = E[b, a:a + n]
    for j in range(len(pos)):
        if j != k and feats[j] == n and _close(got, F[starts[j]:starts[j] + n], rtol):
            bj = pos[j][0]
            ij = sum(1 for x in range(j) if pos[x][0] == bj)
            if bj != b:
                return (f"features of another row (row {bj}'s {md.name} {ij}): the {md.name} features were "
                        "scattered in another row order than the placeholders")
            return f"features of another {md.name} of the same row ({md.name} {ij}): the {md.name}s are out of order"
    want = F[starts[k]:starts[k] + n]
    S = E.shape[1]
    for d in range(1, 9):
        for sgn in (1, -1):
            a2 = a + sgn * d
            if 0 <= a2 and a2 + n <= S and _close(E[b, a2:a2 + n], want, rtol):
                return (f"the {md.name} features were spliced {d} position(s) {'late' if sgn > 0 else 'early'}: they "
                        f"start at {a2}, not at the first placeholder {a}")
    return (f"the placeholder positions of row {b} do not hold the features of its {md.name}: they were replaced, "
            "scaled or mixed before the splice")


def _splice_module(ix: TraceIndex) -> str:
    """The module that builds the language model's input embeddings: the text model's caller in
    the multimodal layout (``model`` around ``model.language_model``), else the text model."""
    tm = ix.text_model_path or ""
    if "." in tm:
        return tm.rsplit(".", 1)[0]
    return tm
