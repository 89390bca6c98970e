"""``positions.oracle``: the positions that reach the rotary module, against the independent
M-RoPE oracle of :mod:`vlmscope.analyze.mrope` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Per generate call (its prefill step and the decode steps after it):

* the prefill's expected positions are ``mrope.rope_index`` of the root's ``input_ids`` (token
  types from the ids and the config's image / video token ids -- never the recorded
  ``mm_token_type_ids``, which may be the bug), the image / video grids, the root's 2-D
  attention mask, the merge size, ``tokens_per_second`` and ``second_per_grid_ts``;
* a decode step's are ``mrope.decode_positions`` of the call's oracle deltas at the step's
  cache positions (``cache_position``, else ``cache_before + arange(q_len)``), counted through
  that step's 2-D mask when there is one;
* they are compared, exactly, on the tokens that are not padding, with the positions the rotary
  module received (:func:`._positions.used_positions`).

The first wrong (step, row, token, axis) of a call is reported once, with how many of the
call's steps are wrong, and a hint naming the mechanism when one reproduces the recorded
positions *exactly*: the oracle is re-run under each hypothesis (a previous call's deltas, one
row's delta for all, the mask left out, the recorded ``mm_token_type_ids``, a truncated or
missing ``second_per_grid_ts``, generate's continuation of a right-padded row, ...) and the
first that gives the recorded values names it.

Calls the oracle cannot judge (not an M-RoPE family, no ``input_ids`` probe, grids that do not
fit the placeholders, positions of another length) are skipped; the older layout rules
(``positions.mrope-text``, ``-grid``, ``fallback-1d``) still judge those steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import mrope
from .._index import TraceIndex
from ._common import first_per_group, memo, root_mask_2d
from ._positions import first_text_position_probe, used_positions
from .registry import rule
from .report import ERROR, WARNING, Violation

ORACLE = "positions.oracle"
AXES = ("t", "h", "w")
KIND_NAMES = {mrope.TEXT: "text", mrope.IMAGE: "image", mrope.VIDEO: "video"}


@dataclass
class OracleResult:
    """What the oracle found, kept on the index for the other positions rules."""

    violations: list[Violation] = field(default_factory=list)
    checked: set[int] = field(default_factory=set)     # steps compared with the oracle
    reported: set[int] = field(default_factory=set)    # steps of calls the oracle reported on
    deltas: dict[int, np.ndarray] = field(default_factory=dict)   # call -> the oracle's deltas [B]


@rule(ORACLE, "the positions that reach the rotary module equal the model family's M-RoPE rule "
      "(independent oracle; prefill and decode, per call and batch row)")
def rule_positions_oracle(ix: TraceIndex) -> list[Violation]:
    return oracle_result(ix).violations


def oracle_result(ix: TraceIndex) -> OracleResult:
    """The oracle's verdict on every call (computed once per index)."""
    return memo(ix, "_oracle_result", _run)


# ---------------------------------------------------------------------------- probes per step


def _per_step(ix: TraceIndex, kind: str, pick: Callable[[np.ndarray], np.ndarray] | None = None,
              last: bool = False) -> dict[int, int]:
    """Per step, the probe row of ``kind`` to read: the root's (module path ``""``) first, then
    the earliest (``last``: the latest) by execution order. ``pick`` filters the rows."""
    rows = ix.probe_rows(kind, text_only=False)
    if pick is not None and len(rows):
        rows = rows[pick(rows)]
    if not len(rows):
        return {}
    p = ix.probes
    root = ix.module_paths[p["module"][rows]] == "" if len(ix.module_paths) else np.zeros(len(rows), bool)
    seq = p["seq"][rows].astype(np.int64)
    order = np.where(root, 0, 1 << 40) + (-seq if last else seq)
    f = first_per_group(p["step"][rows].astype(np.int64), order)
    return dict(zip(p["step"][rows[f]].tolist(), rows[f].tolist()))


@dataclass
class _Probes:
    input_ids: dict[int, int]
    mmtt: dict[int, int]
    cache_position: dict[int, int]
    spgt: dict[int, int]
    state: dict[int, int]


def _probes(ix: TraceIndex) -> _Probes:
    p = ix.probes
    nd = p["ndim"]
    names = ix.strings
    return _Probes(
        input_ids=_per_step(ix, "input_ids", lambda r: nd[r] == 2),
        mmtt=_per_step(ix, "mm_token_type_ids", lambda r: nd[r] == 2),
        cache_position=_per_step(ix, "cache_position", lambda r: nd[r] == 1),
        spgt=_per_step(ix, "second_per_grid_ts"),
        state=_per_step(ix, "rope_deltas", lambda r: names[p["name"][r]] == "state", last=True),
    )


def _grids(ix: TraceIndex, step: int, n_image: int, n_video: int, merge: int
           ) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """The (image, video) grids of a prefill: the probes named ``image_grid_thw`` /
    ``video_grid_thw`` (root first), else the vision tower's ``grid_thw`` calls, assigned by the
    placeholder counts they explain. None when they cannot be told apart."""
    p = ix.probes
    rows = np.concatenate([ix.probe_rows("image_grid_thw", text_only=False),
                           ix.probe_rows("video_grid_thw", text_only=False)])
    rows = rows[(p["step"][rows] == step) & (p["ndim"][rows] == 2)]
    if not len(rows):
        return (None, None) if n_image == 0 and n_video == 0 else None
    names = ix.strings[p["name"][rows]]
    root = ix.module_paths[p["module"][rows]] == ""
    order = np.lexsort((p["seq"][rows], ~root))
    rows, names = rows[order], names[order]
    named: dict[str, np.ndarray] = {}
    loose: list[np.ndarray] = []
    for r, nm in zip(rows.tolist(), names.tolist()):
        v = ix.value(r)
        if v is None or v.ndim != 2 or v.shape[1] != 3:
            continue
        v = v.astype(np.int64)
        if nm in ("image_grid_thw", "video_grid_thw"):
            named.setdefault(nm, v)
        else:
            loose.append(v)
    img, vid = named.get("image_grid_thw"), named.get("video_grid_thw")
    if n_image == 0:
        img = None
    if n_video == 0:
        vid = None
    if (img is not None or n_image == 0) and (vid is not None or n_video == 0):
        return img, vid

    def tokens(g: np.ndarray) -> int:
        return int((g[:, 0] * (g[:, 1] // merge) * (g[:, 2] // merge)).sum())

    for g in loose:           # the vision tower's calls: images first, then videos
        if img is None and n_image and tokens(g) == n_image:
            img = g
        elif vid is None and n_video and tokens(g) == n_video:
            vid = g
    if (img is None and n_image) or (vid is None and n_video):
        return None
    return img, vid


# ---------------------------------------------------------------------------- the run


@dataclass
class _Call:
    """One generate call's inputs and its oracle (prefill) expectation."""

    index: int
    first: int
    steps: np.ndarray                 # every step of the call, the prefill first
    ids: np.ndarray                   # [B, S0]
    keep: np.ndarray                  # [B, S0] attended (True without a mask)
    has_mask: bool
    types: np.ndarray                 # [B, S0] token types from the ids
    expected: np.ndarray              # [3, B, S0]
    deltas: np.ndarray                # [B]
    actual: np.ndarray                # [3, B, S0]
    oracle_args: dict[str, Any]       # what rope_index was called with (hypotheses re-run it)


def _run(ix: TraceIndex) -> OracleResult:
    res = OracleResult()
    if not ix.n_steps:
        return res
    cfg = ix.rope_config
    fam = cfg.get("family")
    try:
        fam = mrope.normalize_family(fam) if fam else None
    except ValueError:
        fam = None
    img_id, vid_id = cfg.get("image_token_id"), cfg.get("video_token_id")
    if fam is None or (img_id is None and vid_id is None):
        return res
    used = used_positions(ix)
    if not used:
        return res
    pr = _probes(ix)
    firsts = ix.call_first_steps
    bounds = np.r_[firsts, ix.n_steps]
    calls: dict[int, _Call] = {}
    for c, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        call = _prefill(ix, c, a, np.arange(a, b), fam, cfg, used, pr)
        if call is None:
            continue
        calls[c] = call
        res.deltas[c] = call.deltas
        v, checked = _judge_call(ix, call, calls, used, pr)
        res.checked.update(checked)
        if v is not None:
            res.violations.append(v)
            res.reported.update(checked)
    return res


def _int_or_none(x: Any) -> int | None:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None


def _prefill(ix: TraceIndex, c: int, s0: int, steps: np.ndarray, fam: str, cfg: dict,
             used: dict, pr: _Probes) -> _Call | None:
    """The call's prefill inputs and the oracle's positions, or None when it cannot be judged."""
    if s0 not in used or s0 not in pr.input_ids:
        return None
    ids = ix.value(pr.input_ids[s0])
    if ids is None or ids.ndim != 2 or not ids.size:
        return None
    ids = ids.astype(np.int64)
    B, S0 = ids.shape
    act = _three(used[s0][1])
    if act is None or act.shape[1:] != (B, S0):
        return None
    img_id, vid_id = _int_or_none(cfg.get("image_token_id")), _int_or_none(cfg.get("video_token_id"))
    types = mrope.token_types(ids, image_token_id=-1 if img_id is None else img_id,
                              video_token_id=-1 if vid_id is None else vid_id)
    keep = np.ones((B, S0), bool)
    has_mask = False
    m = root_mask_2d(ix, s0)           # the padding the mask rules read too
    if m is not None and m.shape == (B, S0):
        keep, has_mask = m, True
    merge = _int_or_none(cfg.get("spatial_merge_size")) or ix.merge_size
    n_img = int(((types == mrope.IMAGE) & keep).sum())
    n_vid = int(((types == mrope.VIDEO) & keep).sum())
    grids = _grids(ix, s0, n_img, n_vid, merge)
    if grids is None:
        return None
    spgt = None
    if s0 in pr.spgt:
        v = ix.value(pr.spgt[s0])
        if v is not None:
            dt = ix.s(int(ix.probes["dtype"][pr.spgt[s0]])).removeprefix("torch.")
            spgt = v.reshape(-1).astype(np.float32 if dt in ("float32", "bfloat16", "float16") else np.float64)
    if spgt is None and fam == "qwen2_5_vl" and grids[1] is not None:
        # the processor's values as the recording stored them with the call's rows; without them
        # the videos' temporal positions cannot be judged
        spgt = _spgt_of_call(ix, c, len(grids[1]))
        if spgt is None:
            return None
    args = dict(image_token_id=img_id, video_token_id=vid_id, image_grid_thw=grids[0], video_grid_thw=grids[1],
                spatial_merge_size=merge, tokens_per_second=cfg.get("tokens_per_second"),
                second_per_grid_ts=spgt)
    try:
        exp, deltas = mrope.rope_index(fam, ids, attention_mask=keep if has_mask else None, **args)
    except ValueError:
        return None
    args["family"] = fam
    return _Call(c, s0, steps, ids, keep, has_mask, types, exp, deltas, act, args)


def _spgt_of_call(ix: TraceIndex, c: int, n_videos: int) -> np.ndarray | None:
    """``second_per_grid_ts`` of call ``c``'s videos from run_json ``calls`` (the rows' video
    info, in order), as the processor's float32; None unless there is one per video."""
    calls = ix.meta.get("calls")
    call = next((x for x in calls if isinstance(x, dict) and x.get("call") == c), None) \
        if isinstance(calls, list) else None
    found: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "second_per_grid_ts" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    found.append(float(v))
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(call.get("rows") if call else None)
    return np.asarray(found, np.float32) if len(found) == n_videos and n_videos else None


def _three(v: np.ndarray | None) -> np.ndarray | None:
    """Positions ``[R, B, S]`` as three axes: a 1-D row is the same on t, h and w."""
    if v is None or v.ndim != 3:
        return None
    if v.shape[0] == 3:
        return v
    if v.shape[0] == 1:
        return np.broadcast_to(v, (3,) + v.shape[1:])
    return None


@dataclass
class _Decode:
    """The decode steps of a call, as columns (one per new token)."""

    step: np.ndarray       # [N] step of each column
    cpos: np.ndarray       # [N] cache position (KV index) of each column
    actual: np.ndarray     # [3, B, N]
    counted: np.ndarray    # [B, N] attended tokens up to the column - 1 (the cache position without a mask)
    valid: np.ndarray      # [B, N] the column is attended in its row
    masked: bool           # a 2-D mask was read for every step


def _decode_columns(ix: TraceIndex, call: _Call, used: dict, pr: _Probes) -> _Decode | None:
    st = ix.steps
    B = call.ids.shape[0]
    steps, acts, cps = [], [], []
    logical = call.ids.shape[1]
    for s in call.steps[1:].tolist():
        if int(st["image_tokens"][s]) > 0:
            continue              # new images after the prefill: positions from a new rope index, not judged
        u = used.get(s)
        a = _three(u[1]) if u is not None else None
        if a is None or a.shape[1] != B:
            continue
        q = a.shape[2]
        cp = None
        if s in pr.cache_position:
            v = ix.value(pr.cache_position[s])
            if v is not None and v.shape == (q,):
                cp = v.astype(np.int64)
        if cp is None:
            cb = int(st["cache_before"][s])
            cp = (cb if cb >= 0 else logical) + np.arange(q, dtype=np.int64)
        logical = int(cp[-1]) + 1 if q else logical
        steps.append(np.full(q, s, np.int64))
        acts.append(a)
        cps.append(cp)
    if not steps:
        return None
    step = np.concatenate(steps)
    cpos = np.concatenate(cps)
    actual = np.concatenate(acts, axis=2)
    counted = np.broadcast_to(cpos, (B, len(cpos))).copy()
    valid = np.ones((B, len(cpos)), bool)
    # Padding is the prompt's: the prefill's 2-D mask, every generated token attended. The decode
    # steps' own masks are not read here (a mask that was not extended is mask.causal's finding,
    # and must not move the expected positions).
    masked = bool(call.has_mask) and bool((cpos >= 0).all())
    if masked:
        width = max(int(cpos.max()) + 1, call.keep.shape[1])
        ext = np.ones((B, width), bool)
        ext[:, :call.keep.shape[1]] = call.keep
        cs = np.cumsum(ext, axis=1, dtype=np.int64) - 1
        counted = cs[:, cpos]
        valid = ext[:, cpos]
    return _Decode(step, cpos, actual, counted, valid, masked)


def _judge_call(ix: TraceIndex, call: _Call, calls: dict[int, _Call], used: dict, pr: _Probes
                ) -> tuple[Violation | None, set[int]]:
    checked = {call.first}
    bad0 = (call.actual != call.expected) & call.keep[None]
    dec = _decode_columns(ix, call, used, pr)
    bad_steps: list[int] = [call.first] if bad0.any() else []
    dec_bad = None
    if dec is not None:
        checked.update(np.unique(dec.step).tolist())
        exp = dec.counted + call.deltas[:, None]
        dec_bad = (dec.actual != exp[None]) & dec.valid[None]
        cols = dec_bad.any(axis=(0, 1))
        bad_steps += np.unique(dec.step[cols]).tolist()
    if not bad_steps:
        return None, checked
    s = bad_steps[0]
    if s == call.first:
        v = _prefill_violation(ix, call, calls, bad0, pr)
    else:
        v = _decode_violation(ix, call, calls, dec, dec_bad, s, pr)
    v.count = len(bad_steps)
    v.actual += (f"; {len(bad_steps)} of {len(checked)} steps of call {call.index} wrong"
                 if len(checked) > 1 else "")
    return v, checked


# ---------------------------------------------------------------------------- reports


def _first_bad(bad: np.ndarray) -> tuple[int, int, int]:
    """(row, token, axis) of the first wrong value: the lowest row, then token, then axis."""
    b = int(np.nonzero(bad.any(axis=(0, 2)))[0][0])
    k = int(np.nonzero(bad[:, b, :].any(axis=0))[0][0])
    a = int(np.nonzero(bad[:, b, k])[0][0])
    return b, k, a


def _where(ix: TraceIndex, s: int, used: dict) -> tuple[str, int]:
    r = first_text_position_probe(ix, s, used[s][0])
    return ix.module_path(int(ix.probes["module"][r])), int(ix.probes["seq"][r])


def _fmt(v: np.ndarray) -> str:
    return "/".join(str(int(x)) for x in v)


def _make(ix: TraceIndex, s: int, b: int, tok: int, kv: int, a: int, exp: np.ndarray, act: np.ndarray, what: str,
          hint: str, severity: str = ERROR) -> Violation:
    module, seq = _where(ix, s, used_positions(ix))
    off = int(act[a]) - int(exp[a])
    return Violation(
        ORACLE, s, module,
        f"{AXES[a]} = {int(exp[a])} at row {b} token {tok} ({what}; t/h/w {_fmt(exp)})",
        f"{AXES[a]} = {int(act[a])} (t/h/w {_fmt(act)}, off by {off:+d})",
        hint, severity=severity, seq=seq, tokens=[kv], row=b)


def _same(actual: np.ndarray, expected: np.ndarray, keep: np.ndarray) -> bool:
    """``actual`` equals ``expected`` on every kept token (``keep`` broadcasts over the axes)."""
    return bool(((actual == expected) | ~keep).all())


def _rerun(call: _Call, **change: Any) -> np.ndarray | None:
    args = dict(call.oracle_args)
    fam = args.pop("family")
    mask = change.pop("attention_mask", call.keep if call.has_mask else None)
    args.update(change)
    try:
        return mrope.rope_index(fam, call.ids, attention_mask=mask, **args)[0]
    except ValueError:
        return None


def _previous_deltas(ix: TraceIndex, call: _Call, calls: dict[int, _Call], pr: _Probes
                     ) -> list[tuple[int, np.ndarray]]:
    """(call, deltas [B]) of earlier calls, the most recent first: the oracle's and the model's
    recorded ``rope_deltas`` state at the end of that call, repeated to this call's batch as
    the models do (``repeat_interleave``)."""
    B = call.ids.shape[0]
    out = []
    for c in sorted((k for k in calls if k < call.index), reverse=True):
        cands = [calls[c].deltas]
        last = int(calls[c].steps[-1])
        if last in pr.state:
            v = ix.value(pr.state[last])
            if v is not None and v.size:
                cands.append(v.reshape(-1).astype(np.int64))
        for d in cands:
            if d.size and B % d.size == 0:
                out.append((c, np.repeat(d, B // d.size)))
    return out


def _prefill_violation(ix: TraceIndex, call: _Call, calls: dict[int, _Call], bad: np.ndarray,
                       pr: _Probes) -> Violation:
    s = call.first
    b, k, a = _first_bad(bad)
    t = int(call.types[b, k])
    what = KIND_NAMES.get(t, "token") + " token" + ("" if call.keep[b, k] else ", padding")
    exp, act = call.expected[:, b, k], call.actual[:, b, k]
    hint, sev = _prefill_hint(ix, call, calls, pr, b, k)
    return _make(ix, s, b, k, k, a, exp, act, what, hint, sev)


def _prefill_hint(ix: TraceIndex, call: _Call, calls: dict[int, _Call], pr: _Probes, b: int, k: int
                  ) -> tuple[str, str]:
    A, keep = call.actual, call.keep[None]
    counted = np.cumsum(call.keep, axis=1, dtype=np.int64) - 1
    pad = (~call.keep).sum(axis=1)
    vision = call.types != mrope.TEXT
    # 1-D positions over the images: get_rope_index never ran
    if ((vision & call.keep).any() and (A[0] == A[1]).all() and (A[1] == A[2]).all()
            and (_same(A[0], counted, call.keep) or _same(A[0], np.arange(A.shape[2])[None], call.keep))):
        return _fallback_hint(ix, call.oracle_args["family"], call.first in pr.mmtt), ERROR
    for c, d in _previous_deltas(ix, call, calls, pr):
        if _same(A, (counted + d[:, None])[None], keep):
            return (f"stale rope_deltas: the positions are this call's text positions plus call {c}'s rope deltas "
                    f"{d.tolist()} -- rope_deltas kept from an earlier generate call instead of recomputed "
                    "by get_rope_index at this call's prefill"), ERROR
    if pad.any():
        e = _rerun(call, attention_mask=None)
        if e is not None and _same(A, e, keep):
            return (f"padding counted: row {b}'s positions count its {int(pad[b])} padding token(s) -- the rope index "
                    "was computed without the attention mask"), ERROR
    if call.first in pr.mmtt:
        mm = ix.value(pr.mmtt[call.first])
        if mm is not None and mm.shape == call.ids.shape and (mm != call.types).any():
            e = _rerun(call, mm_token_type_ids=mm.astype(np.int64))
            if e is not None and _same(A, e, keep):
                rows = np.nonzero((mm != call.types).any(axis=1))[0].tolist()
                return (f"mm_token_type_ids disagree with input_ids' placeholders (row{'s' if len(rows) > 1 else ''} "
                        f"{', '.join(map(str, rows))}): the positions follow the recorded mm_token_type_ids, e.g. "
                        "padded on the other side from the prompts"), ERROR
    spgt = call.oracle_args.get("second_per_grid_ts")
    if (call.types == mrope.VIDEO).any() and call.oracle_args["family"] == "qwen2_5_vl":
        recorded = np.asarray(spgt).tolist() if spgt is not None else None
        tries = [(np.floor(spgt) if spgt is not None else None,
                  f"second_per_grid_ts truncated to an integer ({recorded} -> "
                  f"{np.floor(spgt).astype(int).tolist() if spgt is not None else None}): the temporal (t) axis of "
                  "the video tokens collapses"),
                 (None, f"second_per_grid_ts not passed to the rope index (recorded {recorded}; 1 second per "
                        "temporal patch assumed): the t axis of the video tokens is spaced by tokens_per_second")]
        for alt, why in tries:
            if (alt is None and spgt is None) or (alt is not None and spgt is not None and (alt == spgt).all()):
                continue
            e = _rerun(call, second_per_grid_ts=alt)
            if e is not None and _same(A, e, keep):
                return why + " (the interval is tokens_per_second * second_per_grid_ts)", ERROR
    row = A[:, b][:, call.keep[b]]
    restart = np.nonzero((row[:, 1:] == 0).all(axis=0) & (row[:, :-1] > 0).any(axis=0))[0]
    if len(restart):
        return (f"packed: positions restart at 0 inside row {b} (attended token {int(restart[0]) + 1}): the row "
                "reads as packed sequences, one per restart"), ERROR
    if call.types[b, k] == mrope.TEXT and k > 0 and (call.types[b, :k][call.keep[b, :k]] != mrope.TEXT).any():
        if (A[:, b, k] == counted[b, k]).all():
            return ("text after an image continues from the token index, not from the image block's max + 1 "
                    "(M-RoPE start = max + 1 of the previous span)"), ERROR
    if call.types[b, k] != mrope.TEXT:
        return ("the vision tokens' t/h/w positions do not follow the oracle's grid layout (image_grid_thw / "
                "video_grid_thw / spatial_merge_size mismatch?)"), ERROR
    return _NEUTRAL, ERROR


_NEUTRAL = ("the positions differ from the family's M-RoPE rule (get_rope_index at the prefill, text position + "
            "rope_deltas after it); no known mechanism reproduces them")


def _fallback_hint(ix: TraceIndex, fam: str, has_mmtt: bool) -> str:
    if fam == "qwen2_5_vl" or not has_mmtt:
        return ("Qwen2.5-VL fell back to 1-D positions: the processor's mm_token_type_ids did not reach the "
                "model, so get_rope_index was skipped" if fam == "qwen2_5_vl" else
                "M-RoPE fell back to 1-D positions: mm_token_type_ids (needed by get_rope_index) is missing")
    return "M-RoPE fell back to 1-D positions over the image: the vision-aware rope index was not computed"


def _decode_violation(ix: TraceIndex, call: _Call, calls: dict[int, _Call], dec: _Decode, bad: np.ndarray, s: int,
                      pr: _Probes) -> Violation:
    sel = dec.step == s
    A = dec.actual[:, :, sel]
    counted, valid, cpos = dec.counted[:, sel], dec.valid[:, sel], dec.cpos[sel]
    b, j, a = _first_bad(bad[:, :, sel])
    exp = counted + call.deltas[:, None]
    hint, sev = _decode_hint(ix, call, calls, pr, A, counted, valid, cpos, exp, b, j, a, dec.masked)
    return _make(ix, s, b, int(cpos[j]), int(cpos[j]), a, np.full(3, exp[b, j]), A[:, b, j],
                 "new token", hint, sev)


def _decode_hint(ix: TraceIndex, call: _Call, calls: dict[int, _Call], pr: _Probes, A: np.ndarray,
                 counted: np.ndarray, valid: np.ndarray, cpos: np.ndarray, exp: np.ndarray, b: int, j: int, a: int,
                 masked: bool) -> tuple[str, str]:
    D = call.deltas
    keep = valid[None]
    for c, d in _previous_deltas(ix, call, calls, pr):
        if (d != D).any() and _same(A, (counted + d[:, None])[None], keep):
            return (f"stale rope_deltas: the new tokens' positions use call {c}'s rope deltas {d.tolist()}, not this "
                    f"call's {D.tolist()} -- rope_deltas kept from an earlier generate call"), ERROR
    if len(D) > 1 and (D != D[0]).any():
        for r in range(len(D)):
            if (D != D[r]).any() and _same(A, (counted + D[r])[None], keep):
                return (f"shared rope delta: every row got row {r}'s rope delta {int(D[r])} (the deltas are "
                        f"{D.tolist()}, one per row: rope_deltas is [B, 1])"), ERROR
    pad = (~call.keep).sum(axis=1)
    if masked and pad.any() and _same(A, (cpos[None, :] + D[:, None])[None], keep):
        return (f"padding counted: row {b}'s new token is placed at its cache index + delta, counting its "
                f"{int(pad[b])} padding token(s); positions must come from the attention mask (cumsum - 1)"), ERROR
    if not call.keep[:, -1].all():
        cont = call.actual[:, :, -1][:, :, None] + (cpos - (call.ids.shape[1] - 1))[None, None, :]
        if _same(A, cont, keep) and not call.keep[b, -1]:
            return (f"right padding: generate continued row {b}'s positions from its last column, a padding token "
                    f"(position {int(call.actual[0, b, -1])}), not from its last real token; decoder-only "
                    "generation needs padding_side='left' (transformers warns about right padding)"), WARNING
    if (D != 0).any() and _same(A, counted[None], keep):
        return ("rope_deltas not applied: the new tokens' positions are the plain text positions (KV index), "
                f"without the M-RoPE offset {D.tolist()}"), ERROR
    n_img = int(((call.types[b] != mrope.TEXT) & call.keep[b]).sum())
    off = int(A[a, b, j]) - int(exp[b, j])
    if n_img and abs(off) in (n_img - 1, n_img, n_img + 1):
        return ("decode positions are shifted by the image length: they were computed from the token count "
                "instead of continuing the M-RoPE positions (use the cached rope_deltas)"), ERROR
    return _NEUTRAL, ERROR
