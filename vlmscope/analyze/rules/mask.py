"""Rule family ``mask``: the attention mask that reaches the decoder layers fits the keys and
the attention scores it is added to (``mask.length``), is causal for every real query of every
batch row (``mask.causal``), and masks each row's padding (``mask.padding``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmscope.semantics import fmt_shape

from .._index import TraceIndex
from vlmscope.trace import ENC_BITS

from ._common import (
    first_per_group, group_report, mask_rows, memo, padded_steps, prompt_padding, root_mask_2d,
    sliding_window_layers, step_arrays,
)
from .registry import rule
from .report import Violation


@dataclass
class _MaskGeometry:
    """Per mask probe row (aligned arrays): what the mask is and what the step needs."""

    rows: np.ndarray
    step: np.ndarray
    nd: np.ndarray
    shp: np.ndarray
    q: np.ndarray        # q_len of the step
    c: np.ndarray        # cache length before the step (0 when unknown)
    last: np.ndarray     # the mask's key length (last dim)
    qdim: np.ndarray     # its query length (q_len for a mask of fewer than 3 dims)
    b: np.ndarray        # the step's batch size (0 unknown)
    heads: int           # num_attention_heads (0 unknown)
    bad_k: np.ndarray
    bad_q: np.ndarray
    bad_b: np.ndarray
    bad_h: np.ndarray


def _mask_geometry(ix: TraceIndex, rows: np.ndarray) -> _MaskGeometry:
    p = ix.probes
    q_len, cb, _ = step_arrays(ix)
    step = p["step"][rows].astype(np.int64)
    nd = p["ndim"][rows].astype(np.int64)
    shp = p["shape"][rows]
    q = q_len[step]
    c = np.where(cb[step] < 0, 0, cb[step])
    last = shp[np.arange(len(rows)), np.clip(nd - 1, 0, 7)]
    qdim = np.where(nd >= 3, shp[np.arange(len(rows)), np.clip(nd - 2, 0, 7)], q)
    heads = int(ix.meta.get("num_attention_heads") or 0)
    b = _batch_per_step(ix)[step]
    return _MaskGeometry(
        rows, step, nd, shp, q, c, last, qdim, b, heads,
        bad_k=(q >= 0) & (last != c + q),
        bad_q=(q >= 0) & (nd >= 3) & (qdim != q) & (qdim != 1),
        bad_b=(nd >= 2) & (b > 0) & (shp[:, 0] != b) & (shp[:, 0] != 1),
        bad_h=(nd == 4) & (shp[:, 1] != 1) & ((shp[:, 1] != heads) if heads else False))


def _batch_per_step(ix: TraceIndex) -> np.ndarray:
    """Batch size per step: dim 0 of its first input_ids probe when that is 2-D (0 unknown)."""
    out = np.zeros(max(ix.n_steps, 1), np.int64)
    rows = ix.probe_rows("input_ids", text_only=False)
    if len(rows):
        p = ix.probes
        firsts = rows[first_per_group(p["step"][rows].astype(np.int64), p["seq"][rows].astype(np.int64))]
        ok = p["ndim"][firsts] == 2
        out[p["step"][firsts][ok]] = p["shape"][firsts][ok, 0]
    return out


@rule("mask.length", "the attention mask's key length equals cache length before the step + q_len; "
      "a 4-D mask's query length equals q_len and it broadcasts to [B, heads, q, k]")
def rule_mask_length(ix: TraceIndex) -> list[Violation]:
    rows = mask_rows(ix)
    if not len(rows):
        return []   # no mask reached the layers: SDPA is_causal, a valid case
    g = _mask_geometry(ix, rows)
    sel = np.nonzero(g.bad_k | g.bad_q | g.bad_b | g.bad_h)[0]
    if not len(sel):
        return []
    key = g.step[sel] * (1 << 20) + g.last[sel] * 8 + g.nd[sel]

    def make(r: int, n: int) -> Violation:
        return _mask_violation(ix, g, int(np.nonzero(rows == r)[0][0]), r)

    return group_report(ix, rows[sel], key, make)


def _mask_violation(ix: TraceIndex, g: _MaskGeometry, i: int, r: int) -> Violation:
    """The violation of mask probe ``r`` (index ``i`` in ``g``): key length first, then query
    length, then batch/head broadcasting."""
    p = ix.probes
    s = int(g.step[i])
    shape = fmt_shape(g.shp[i][: g.nd[i]])
    k, qq, cc = int(g.last[i]), int(g.q[i]), int(g.c[i])
    if g.bad_k[i]:
        expected = f"key length {cc + qq} (cache {cc} + q_len {qq})"
        actual = f"mask {shape}: key length {k}"
        _, _, in_len = step_arrays(ix)
        hint = _key_length_hint(k, cc, qq, int(in_len[s]))
    elif g.bad_q[i]:
        expected = f"query length {qq} (q_len) or 1"
        actual = f"mask {shape}: query length {int(g.qdim[i])}"
        hint = "mask query length does not match the hidden states entering the layer"
    else:
        expected = f"broadcastable to [B={int(g.b[i])}, heads={g.heads or '?'}, q={qq}, k={cc + qq}]"
        actual = f"mask {shape}"
        hint = "mask batch/head dims do not broadcast to the attention scores"
    return Violation("mask.length", s, ix.module_path(int(p["module"][r])), expected, actual, hint,
                     seq=int(p["seq"][r]))


def _key_length_hint(k: int, cc: int, qq: int, il: int) -> str:
    """Why a mask of key length ``k`` was built, given cache ``cc``, q_len ``qq`` and input_len ``il``."""
    if il >= 0 and il != qq and k in (cc + il, il):
        return "mask was built for the token sequence, not the embedding sequence after the image splice"
    if k == cc:
        return "mask covers only the cached keys, not this step's new tokens"
    if k == qq and cc > 0:
        return "mask covers only this step's tokens and ignores the cache"
    return "mask was built for a different sequence than the keys it is applied to"


# ---------------------------------------------------------------------------- contents
#
# What an attention mask that reached the decoder layers must hold, per batch row, on every
# step of a causal decoder with full attention (transformers' ``create_causal_mask``: a key is
# allowed when it is not after the query and is not padding):
#
# * each real query (not a padding position of the call's prompt) attends to itself, the key
#   at index ``cache_before + q``, and to no later key;
# * it attends to every earlier key of its row that is not padding (skipped when the model
#   has sliding-window layers);
# * no query attends to a padding key of its row (``mask.padding``).
#
# Padding is what the processor added to the call's prompt: the zeros of the 2-D mask at the
# call's prefill. Keys past the prompt are generated tokens, never padding, whatever the 2-D
# mask of a later step says (a mask "not extended" with a 1 for them is the bug). Padding
# queries are exempt: transformers may unmask a fully masked row (SDPA's NaN guard).
#
# A mask with one query row on a step of several tokens (``[B, 1, 1, K]``: Qwen-1's additive
# padding mask, the causal part applied inside attention) is judged as a padding mask only.
# Masks that do not fit the step (``mask.length``) are not judged here. Masks shared by many
# layers are one stored blob: each blob is judged once; decode-step blobs of calls without
# padding (all keys allowed) are judged from their bit count alone.


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int64)


@dataclass
class _Bad:
    """The first wrong cell of one mask blob, by kind: ``self`` (a query cannot see itself),
    ``later`` (a query sees a later key), ``earlier`` (a query cannot see an earlier real key),
    ``pad`` (a query sees a padding key)."""

    kind: str
    row: int
    query: int          # query index within the step (-1: the mask is broadcast over queries)
    key: int            # key index (in the cache + step sequence)
    n_rows: int         # batch rows with this kind of fault
    n_cells: int


@dataclass
class _Blob:
    rows: np.ndarray    # mask probe rows sharing one stored value
    step: int
    bad: list[_Bad]


def mask_contents(ix: TraceIndex) -> list[_Blob]:
    """Every mask blob that reached the decoder layers with a wrong cell (judged once)."""
    return memo(ix, "_mask_contents", _judge_all)


def _judge_all(ix: TraceIndex) -> list[_Blob]:
    rows = mask_rows(ix)
    if not len(rows):
        return []
    p = ix.probes
    rows = rows[p["enc"][rows] == ENC_BITS]
    if not len(rows):
        return []
    _, first, inv = np.unique(p["data_off"][rows].astype(np.int64), return_index=True, return_inverse=True)
    inv = inv.ravel()
    reps = rows[first]
    g = _mask_geometry(ix, reps)
    nd = g.nd
    fits = (g.q >= 0) & ~g.bad_k & ~g.bad_q & ~g.bad_b & (nd >= 2) & (nd <= 4)
    padded_call = padded_steps(ix)
    # decode blobs whose every cell must be allowed: one query, no padding in the call
    one_q = (g.q == 1) & ((nd < 3) | (g.qdim == 1))
    all_ones = fits & one_q & ~padded_call[g.step]
    out: list[_Blob] = []
    sliding = sliding_window_layers(ix)
    if all_ones.any():
        idx = np.nonzero(all_ones)[0]
        ok = _popcounts(ix, reps[idx]) == _cells(g.shp[idx], nd[idx])
        for i in idx[~ok]:
            out.append(_Blob(rows[inv == i], int(g.step[i]),
                             _judge_one(ix, int(reps[i]), g, int(i), sliding)))
    for i in np.nonzero(fits & ~all_ones)[0]:
        bad = _judge_one(ix, int(reps[i]), g, int(i), sliding)
        if bad:
            out.append(_Blob(rows[inv == i], int(g.step[i]), bad))
    return [b for b in out if b.bad]


def _cells(shp: np.ndarray, nd: np.ndarray) -> np.ndarray:
    c = np.ones(len(shp), np.int64)
    for d in range(int(nd.max()) if len(nd) else 0):
        c *= np.where(d < nd, shp[:, d], 1)
    return c


def _popcounts(ix: TraceIndex, rows: np.ndarray) -> np.ndarray:
    """Set bits of each probe's stored (packed) value, for all rows at once."""
    p = ix.probes
    off = p["data_off"][rows].astype(np.int64)
    ln = p["data_len"][rows].astype(np.int64)
    if not len(rows) or not ln.sum():
        return np.zeros(len(rows), np.int64)
    starts = np.cumsum(ln) - ln
    idx = np.repeat(off - starts, ln) + np.arange(int(ln.sum()))
    counts = _POPCOUNT[ix.probe_data[idx]]
    sums = np.add.reduceat(counts, np.clip(starts, 0, len(counts) - 1))
    return np.where(ln > 0, sums, 0)


def _judge_one(ix: TraceIndex, r: int, g: _MaskGeometry, i: int, sliding: bool) -> list[_Bad]:
    v = ix.value(r)
    if v is None:
        return []
    v = np.asarray(v, bool)
    v = v[:, None, None, :] if v.ndim == 2 else v[:, None] if v.ndim == 3 else v
    s, q, c = int(g.step[i]), int(g.q[i]), int(g.c[i])
    Bm, H, Q, K = v.shape
    B = int(g.b[i]) or Bm
    pk = prompt_padding(ix, s)
    if pk is not None and pk.shape[0] not in (B, 1):
        pk = None
    if Bm not in (1, B):
        return []
    v = np.broadcast_to(v, (B, H, Q, K))
    padk = np.zeros((B, K), bool)
    if pk is not None:
        L = min(pk.shape[1], K)
        padk[:, :L] = np.broadcast_to(pk, (B, pk.shape[1]))[:, :L]
    kk = np.arange(K)
    if Q == q:
        j = c + np.arange(Q)                                   # each query's own key index
        expect = (kk[None, :] <= j[:, None])[None, None] & ~padk[:, None, None, :]
        real_q = ~padk[:, j]
        jj = j[None, None, :, None]
    else:                                                      # one row for every query
        expect = np.broadcast_to(~padk[:, None, None, :], v.shape)
        real_q = np.ones((B, 1), bool)
        jj = None
    wrong = (v != expect) & real_q[:, None, :, None]
    if not wrong.any():
        return []
    padb = padk[:, None, None, :]
    k4 = kk[None, None, None, :]
    kinds = {"pad": wrong & v & padb}
    if jj is not None:
        kinds["self"] = wrong & ~v & (k4 == jj)
        kinds["later"] = wrong & v & ~padb & (k4 > jj)
        kinds["earlier"] = wrong & ~v & (k4 < jj)
    else:
        kinds["self"] = wrong & ~v & (k4 >= c)
        kinds["earlier"] = wrong & ~v & (k4 < c)
    if sliding:
        kinds.pop("earlier")
    out = []
    for kind in ("self", "later", "earlier", "pad"):
        m = kinds.get(kind)
        if m is None or not m.any():
            continue
        b, _, qi, k = (int(x) for x in np.argwhere(m)[0])
        out.append(_Bad(kind, b, qi if jj is not None else -1, k, int(m.any(axis=(1, 2, 3)).sum()), int(m.sum())))
    return out


def _prompt_len(ix: TraceIndex, s: int) -> int:
    pk = prompt_padding(ix, s)
    return int(pk.shape[1]) if pk is not None else -1


def _report(ix: TraceIndex, rule_id: str, kinds: tuple[str, ...], make) -> list[Violation]:
    """One violation per step: the first blob (in execution order) with a fault of ``kinds``,
    the other layers that received a wrong mask of the step listed in ``also``."""
    p = ix.probes
    per_step: dict[int, list[tuple[_Blob, _Bad]]] = {}
    for blob in mask_contents(ix):
        bad = [x for x in blob.bad if x.kind in kinds]
        if bad:
            per_step.setdefault(blob.step, []).append((blob, bad[0]))
    out = []
    for s in sorted(per_step):
        items = sorted(per_step[s], key=lambda t: int(p["seq"][t[0].rows].min()))
        blob, bad = items[0]
        members = np.concatenate([b.rows for b, _ in items])
        members = members[np.argsort(p["seq"][members], kind="stable")]
        r = int(members[0])
        v = make(s, bad, r)
        v.seq = int(p["seq"][r])
        v.row = bad.row
        mods = [ix.module_path(int(m)) for m in dict.fromkeys(p["module"][members].tolist())]
        v.also = [m for m in mods if m != v.module][:8]
        v.count = len(members)
        out.append(v)
    return out


@rule("mask.causal", "each real query attends to itself and to no later key, and (full attention) to "
      "every earlier non-padding key of its batch row")
def rule_mask_causal(ix: TraceIndex) -> list[Violation]:
    _, cb, _ = step_arrays(ix)

    def make(s: int, bad: _Bad, r: int) -> Violation:
        c = max(int(cb[s]), 0)
        b, k = bad.row, bad.key
        j = c + bad.query if bad.query >= 0 else k
        who = (f"row {b} query {j}" if bad.query >= 0 else f"row {b} (one mask row for every query)")
        more = f" ({bad.n_rows} rows)" if bad.n_rows > 1 else ""
        L = _prompt_len(ix, s)
        if bad.kind == "self":
            expected = f"{who} attends to its own key {j}"
            actual = f"key {j} masked{more}"
            hint = _self_hint(s, b, j, c, root_mask_2d(ix, s))
        elif bad.kind == "later":
            expected = f"{who} attends to no key after {j}"
            actual = f"later key {k} allowed{more}"
            hint = "the mask is not causal: a query sees a later token (bidirectional, or shifted by the cache)"
        else:
            expected = f"{who} attends to every earlier non-padding key of its row"
            actual = f"earlier key {k} masked{more}"
            hint = _earlier_hint(ix, s, b, j, k, c, L)
        return Violation("mask.causal", s, ix.module_path(int(ix.probes["module"][r])), expected, actual, hint,
                         tokens=[j, k] if j != k else [j])

    return _report(ix, "mask.causal", ("self", "later", "earlier"), make)


def _self_hint(s: int, b: int, j: int, c: int, m2: np.ndarray | None) -> str:
    if c > 0:
        why = ""
        if m2 is not None and m2.shape[1] <= j:
            why = f" (the 2-D attention_mask has {m2.shape[1]} entries for {j + 1} keys)"
        elif m2 is not None and b < m2.shape[0] and not m2[b, j]:
            why = f" (the 2-D attention_mask holds 0 for row {b}'s new token)"
        return ("the mask was not extended for the new token: the decode step's query cannot see its own key"
                + why)
    return "the query cannot see its own key: the mask is shifted or was built for another sequence"


def _earlier_hint(ix: TraceIndex, s: int, b: int, j: int, k: int, c: int, L: int) -> str:
    if L >= 0 and k >= L:
        return (f"the mask was not extended for a generated token: key {k} (generated after the {L}-token "
                "prompt) is masked for a later query, as if it were padding")
    restart = _position_restart(ix, s, b, j - c, k - c) if k >= c else None
    if restart is not None:
        axis, at = restart
        return (f"the mask was built as if the sequence were packed: positions restart at token {at} "
                f"({axis}), and keys before the restart are masked (M-RoPE positions read as packed sequences)")
    return "the mask hides earlier tokens of the row (a sliding window, or a mask built for another row)"


def _position_restart(ix: TraceIndex, s: int, b: int, qj: int, qk: int) -> tuple[str, int] | None:
    """Where the position ids of step ``s`` (any axis) restart between tokens ``qk`` and ``qj``
    of row ``b`` (step-local indices), as transformers' packed-sequence detection reads them
    (a step of other than +1 starts a new sequence)."""
    rows = ix.probe_rows("position_ids")
    p = ix.probes
    rows = rows[p["step"][rows] == s] if len(rows) else rows
    seen = set()
    for r in rows:
        key = (int(p["data_off"][r]), int(p["data_len"][r]))
        if key in seen:
            continue
        seen.add(key)
        v = ix.value(int(r))
        if v is None or v.ndim not in (2, 3) or v.shape[-1] <= qj:
            continue
        v = np.asarray(v, np.int64).reshape((-1,) + v.shape[-2:])
        names = ("text", "t", "h", "w") if len(v) == 4 else ("t", "h", "w") if len(v) == 3 else ("1-D",)
        for a in range(len(v)):
            pos = v[a, min(b, v.shape[1] - 1)]
            step_ = np.diff(pos[qk:qj + 1])
            hit = np.nonzero(step_ != 1)[0]
            if len(hit):
                return (f"the {names[a] if a < len(names) else a} row of position_ids", int(qk + hit[0] + 1))
    return None


@rule("mask.padding", "the padding keys of each batch row are masked for every query of that row, and a "
      "batch with padding has a mask reaching the decoder layers")
def rule_mask_padding(ix: TraceIndex) -> list[Violation]:
    _, cb, _ = step_arrays(ix)

    def make(s: int, bad: _Bad, r: int) -> Violation:
        b, k = bad.row, bad.key
        c = max(int(cb[s]), 0)
        pk = prompt_padding(ix, s)
        n = int(pk[b].sum()) if pk is not None and b < len(pk) else 0
        who = f"query {c + bad.query}" if bad.query >= 0 else "its queries"
        more = f" ({bad.n_rows} rows)" if bad.n_rows > 1 else ""
        return Violation("mask.padding", s, ix.module_path(int(ix.probes["module"][r])),
                         f"row {b}'s {n} padding key(s) masked for every query of the row",
                         f"padding key {k} visible to {who}{more}", _padding_hint(ix, s, b, pk, r),
                         tokens=[k])

    return _report(ix, "mask.padding", ("pad",), make) + _no_mask_violations(ix)


def _padding_hint(ix: TraceIndex, s: int, b: int, pk: np.ndarray | None, r: int) -> str:
    v = ix.value(r)
    if v is not None and pk is not None:
        v = np.asarray(v, bool)
        last = v.reshape((v.shape[0], -1, v.shape[-1]))[min(b, v.shape[0] - 1), -1]
        blocked = ~last[: pk.shape[1]]
        for o in range(pk.shape[0]):
            if o != b and (blocked == pk[o]).all() and pk[o].any():
                return f"the row is masked with another row's padding (row {o}'s): the mask rows are out of order"
        if blocked.sum() == pk[b].sum() and blocked.any():
            return "padding is masked on the other side of the row (left and right padding confused)"
    return "padding keys are not masked: the 2-D attention_mask did not reach the mask the layers use"


def _no_mask_violations(ix: TraceIndex) -> list[Violation]:
    """Steps of a padded batch whose decoder layers got no mask at all (SDPA's ``is_causal``
    path, or a dropped mask, attends to the padding)."""
    st = ix.steps
    if not len(st):
        return []
    with_mask = np.zeros(len(st), bool)
    rows = mask_rows(ix)
    if len(rows):
        with_mask[ix.probes["step"][rows]] = True
    layers_ran = (st["q_len"] > 0) & (st["status"] == 0)
    out = []
    dl = ix.decoder_layers_path or ""
    cand = padded_steps(ix)[: len(st)] & ~with_mask & layers_ran & (st["mask_ndim"] == 0)
    for s in np.nonzero(cand)[0].tolist():
        pk = prompt_padding(ix, s)
        b = int(np.nonzero(pk.any(axis=1))[0][0])
        out.append(Violation("mask.padding", s, ix.layer_paths.get(0, dl), "an attention mask at the decoder "
                             f"layers that masks row {b}'s {int(pk[b].sum())} padding key(s)",
                             "no mask reached the decoder layers",
                             "padding is attended: SDPA's is_causal path (or a dropped mask) ignores the "
                             "padding of a batch", row=b))
    return out
