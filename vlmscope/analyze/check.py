"""``vlmscope check``: invariants of a multimodal Qwen forward, on every step and layer.

Each rule is a function ``rule(ix: TraceIndex) -> list[Violation]`` registered in
:data:`RULES` under an id ``group.name`` (``mask.length``, ``positions.continuity``, ...).
Rules read only the trace: the steps table, probes, tensors, reshapes and ``meta``
(``decoder_layers``, ``text_model``, ``num_key_value_heads``, ``image_token_id``...). They
are vectorised over table rows; Python loops run over steps or distinct values only.

Public API::

    from vlmscope.analyze import check
    report = check(trace_or_path, rules=["mask", "positions.continuity"], golden=None)
    report.violations        # list[Violation], in execution order (step, seq)
    report.errors            # the error-severity ones
    report.to_dict()         # JSON-able
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np

from vlmscope.trace import ROLE_OUTPUT, Trace, open_trace

from ._index import TraceIndex, index_of, shape_str

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass
class Violation:
    """One broken invariant."""

    rule: str
    step: int
    module: str
    expected: str
    actual: str
    hint: str
    severity: str = ERROR
    seq: int = -1                      # position in the step's execution order (-1 unknown)
    tokens: list[int] | None = None    # embedding-space token positions involved, when known
    count: int = 1                     # how many rows (modules, layers) this one stands for
    also: list[str] = field(default_factory=list)  # other modules with the same problem

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        where = f"step {self.step}" + (f" {self.module}" if self.module else "")
        return f"[{self.rule}] {where}: expected {self.expected}, got {self.actual} -- {self.hint}"


@dataclass
class Rule:
    id: str
    description: str
    fn: Callable[[TraceIndex], list[Violation]]


RULES: dict[str, Rule] = {}


def rule(rule_id: str, description: str):
    def deco(fn: Callable[[TraceIndex], list[Violation]]):
        RULES[rule_id] = Rule(rule_id, description, fn)
        return fn
    return deco


@dataclass
class CheckReport:
    path: str
    rules: list[str]
    violations: list[Violation]
    status: str = "complete"
    n_steps: int = 0
    golden_diff: str | None = None

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == ERROR]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def by_rule(self, rule_id: str) -> list[Violation]:
        return [v for v in self.violations if v.rule == rule_id or v.rule.startswith(rule_id + ".")]

    def to_dict(self) -> dict:
        return {
            "trace": self.path, "status": self.status, "n_steps": self.n_steps, "rules": self.rules,
            "ok": self.ok, "errors": len(self.errors), "warnings": len(self.warnings),
            "violations": [v.to_dict() for v in self.violations],
            **({"golden_diff": self.golden_diff} if self.golden_diff is not None else {}),
        }


def select_rules(spec: Iterable[str] | str | None) -> list[str]:
    """Rule ids from a selection: ids, group names (``mask``), comma lists; ``None`` = all.

    Raises ``KeyError`` naming an unknown rule.
    """
    if spec is None:
        return list(RULES)
    if isinstance(spec, str):
        spec = [spec]
    out: list[str] = []
    for item in spec:
        for tok in str(item).split(","):
            tok = tok.strip()
            if not tok:
                continue
            if tok in ("all", "*"):
                hits = list(RULES)
            else:
                hits = [r for r in RULES if r == tok or r.startswith(tok + ".")]
            if not hits:
                raise KeyError(f"unknown rule {tok!r}; known rules: {', '.join(RULES)}")
            out += [h for h in hits if h not in out]
    return out


def check(trace: Trace | str | os.PathLike, rules: Iterable[str] | str | None = None, *,
          golden: str | os.PathLike | None = None) -> CheckReport:
    """Run the selected rules (all by default) on a trace; optionally compare to a golden snapshot."""
    own = not isinstance(trace, Trace)
    t = open_trace(trace) if own else trace
    try:
        ids = select_rules(rules)
        ix = index_of(t)
        out: list[Violation] = []
        for rid in ids:
            out += RULES[rid].fn(ix)
        golden_diff = None
        if golden is not None:
            from .snapshot import compare_to_file

            golden_diff = compare_to_file(t, golden)
            if golden_diff:
                n = sum(1 for ln in golden_diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))
                out.append(Violation("snapshot.golden", -1, "", f"shapes as in {os.fspath(golden)}",
                                     f"{n} differing lines", "the shapes changed; see the unified diff "
                                     "(rewrite the golden file with `vlmscope snapshot` if intended)"))
        out.sort(key=lambda v: (v.step, v.seq if v.seq >= 0 else 1 << 40, v.rule))
        return CheckReport(str(t.path), ids, out, t.status, t.n_steps, golden_diff)
    finally:
        if own:
            t.close()


# ============================================================================ helpers


def _step_arrays(ix: TraceIndex):
    st = ix.steps
    return (st["q_len"].astype(np.int64), st["cache_before"].astype(np.int64),
            st["input_len"].astype(np.int64))


def _first_per_group(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indices (into ``keys``) of the first element of each distinct key, by ``order``."""
    if not len(keys):
        return np.zeros(0, np.int64)
    o = np.lexsort((order, keys))
    k = keys[o]
    first = np.ones(len(k), bool)
    first[1:] = k[1:] != k[:-1]
    return o[first]


def _group_report(ix: TraceIndex, rows: np.ndarray, group_key: np.ndarray, make: Callable[[int, int], Violation]
                  ) -> list[Violation]:
    """One violation per distinct ``group_key`` over probe ``rows``: at the earliest row, with
    the other modules of the group listed in ``also``."""
    out: list[Violation] = []
    if not len(rows):
        return out
    p = ix.probes
    t = p["step"][rows].astype(np.int64) * (1 << 32) + p["seq"][rows].astype(np.int64)
    o = np.lexsort((t, group_key))
    k = group_key[o]
    start = np.nonzero(np.r_[True, k[1:] != k[:-1]])[0]
    end = np.r_[start[1:], len(k)]
    for a, b in zip(start, end):
        members = rows[o[a:b]]
        v = make(int(members[0]), int(b - a))
        mods = np.unique(p["module"][members])
        v.also = [m for m in (ix.module_path(int(x)) for x in mods[:9]) if m != v.module][:8]
        v.count = int(b - a)
        out.append(v)
    return out


def _blob_values(ix: TraceIndex, rows: np.ndarray) -> dict[int, np.ndarray | None]:
    """Decoded values of probe rows, decoding each distinct stored blob once."""
    p = ix.probes
    if not len(rows):
        return {}
    off = p["data_off"][rows].astype(np.int64)
    ln = p["data_len"][rows].astype(np.int64)
    nd = p["ndim"][rows].astype(np.int64)
    lead = np.clip(p["shape"][rows][:, 0], 0, None).astype(np.int64)
    key = ((off * (int(ln.max()) + 1) + ln) * 9 + nd) * (int(lead.max()) + 1) + lead
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    vals = [ix.value(int(rows[i])) for i in first]
    return {r: vals[j] for r, j in zip(rows.tolist(), inv.ravel().tolist())}


def _positions_norm(v: np.ndarray | None) -> np.ndarray | None:
    """Position ids as ``[R, B, S]``: R = 3 for M-RoPE (a leading text row of a 4-row tensor is
    dropped), 1 for 1-D."""
    if v is None:
        return None
    if v.ndim == 3:
        return v[1:] if v.shape[0] == 4 else v
    if v.ndim == 2:
        return v[None]
    if v.ndim == 1:
        return v[None, None]
    return None


def _kv_text(v: np.ndarray | None) -> np.ndarray | None:
    """The 1-D (KV-index style) positions inside a position_ids value, ``[B, S]``, or None."""
    if v is None:
        return None
    if v.ndim == 2:
        return v
    if v.ndim == 3 and v.shape[0] == 4:
        return v[0]
    if v.ndim == 1:
        return v[None]
    return None


def _is_mrope_model(ix: TraceIndex) -> bool:
    cfg = ix.config or {}
    tc = cfg.get("text_config") or cfg
    rp = (tc.get("rope_parameters") or tc.get("rope_scaling") or {}) if isinstance(tc, dict) else {}
    return bool(rp.get("mrope_section")) or ix.family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _used_positions(ix: TraceIndex) -> dict[int, tuple[int, np.ndarray, bool]]:
    """Per step: (probe row, positions [R,B,S], from_rope_probe) of the positions RoPE used.

    Preference: a ``rope_positions`` probe; else ``position_ids`` received by a rotary module;
    else by the text model; else the first ``position_ids`` probe on the text side.
    """
    p = ix.probes
    rope_rows = ix.probe_rows("rope_positions")
    pos_rows = ix.probe_rows("position_ids")
    if not len(rope_rows) and not len(pos_rows):
        return {}
    rows = np.concatenate([rope_rows, pos_rows])
    prio = np.concatenate([np.zeros(len(rope_rows), np.int64), np.full(len(pos_rows), 3, np.int64)])
    if len(pos_rows):
        mods = p["module"][pos_rows]
        rotary = np.array(["rotary" in str(c).lower() or "rotary" in str(pth).lower()
                           for c, pth in zip(ix.module_classes, ix.module_paths)], bool)
        is_rot = rotary[mods]
        is_tm = mods == ix.text_model_module
        is3 = p["ndim"][pos_rows] == 3
        prio[len(rope_rows):] = np.where(is_rot, 1, np.where(is_tm, 2, np.where(is3, 3, 4)))
    order_key = prio * (1 << 40) + p["seq"][rows].astype(np.int64)
    steps = p["step"][rows].astype(np.int64)
    firsts = _first_per_group(steps, order_key)
    chosen = rows[firsts]
    vals = _blob_values(ix, chosen)
    q_len = ix.steps["q_len"]
    out = {}
    for r, pr in zip(chosen, prio[firsts]):
        v = _positions_norm(vals.get(int(r)))
        if v is None:
            continue
        s = int(p["step"][r])
        q = int(q_len[s]) if s < len(q_len) else -1
        if pr == 0 and q > 0 and v.shape[-1] > q:   # rotary produced cos/sin for [0, kv_len)
            v = v[..., -q:]
        out[s] = (int(r), v, bool(pr == 0))
    return out


def _first_text_position_probe(ix: TraceIndex, step: int, fallback_row: int) -> int:
    """The earliest position_ids probe on the text side in ``step`` (where the positions
    first reach the language model); ``fallback_row`` when there is none."""
    cache = ix.__dict__.setdefault("_first_pos", {})
    if not cache and "_first_pos_done" not in ix.__dict__:
        rows = ix.probe_rows("position_ids")
        p = ix.probes
        if len(rows):
            f = rows[_first_per_group(p["step"][rows].astype(np.int64), p["seq"][rows].astype(np.int64))]
            cache.update(zip(p["step"][f].tolist(), f.tolist()))
        ix.__dict__["_first_pos_done"] = True
    r = cache.get(step)
    if r is None:
        return fallback_row
    return r if int(ix.probes["seq"][r]) <= int(ix.probes["seq"][fallback_row]) else fallback_row


def _image_spans(ix: TraceIndex) -> dict[int, tuple[int, list[tuple[int, int, int]]]]:
    """Per step with image placeholders: (probe row, [(batch_row, start, end), ...])."""
    rows = ix.probe_rows("input_ids", text_only=False)
    if not len(rows):
        return {}
    p = ix.probes
    firsts = _first_per_group(p["step"][rows].astype(np.int64), p["seq"][rows].astype(np.int64))
    out = {}
    img_id = ix.meta.get("image_token_id")
    for r in rows[firsts]:
        info = ix.info(int(r))
        spans = info.get("spans")
        if spans is None:
            tok = info.get("image_token_id", img_id)
            v = ix.value(int(r))
            if v is None or tok is None:
                continue
            spans = _spans_of(np.atleast_2d(v) == int(tok))
        spans = [tuple(int(x) for x in s) for s in spans]
        if spans:
            out[int(p["step"][r])] = (int(r), spans)
    return out


def _spans_of(is_img: np.ndarray) -> list[tuple[int, int, int]]:
    out = []
    for b, row in enumerate(is_img):
        d = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
        out += [(b, int(s), int(e)) for s, e in zip(starts, ends)]
    return out


def _fmt_tokens(tok: Iterable[int], limit: int = 8) -> str:
    tok = list(tok)
    s = ", ".join(str(t) for t in tok[:limit])
    return s + (f", ... ({len(tok)} in all)" if len(tok) > limit else "")


# ============================================================================ rule 1: mask


def _mask_rows(ix: TraceIndex) -> np.ndarray:
    """attention_mask probes that reached the decoder layers (or attention modules)."""
    rows = ix.probe_rows("attention_mask")
    if not len(rows):
        return rows
    mods = ix.probes["module"][rows]
    at_layer = ix.layer_of_module[mods] >= 0
    if at_layer.any():
        return rows[at_layer]
    inside = ix.layer_under_module[mods] >= 0
    if inside.any():
        return rows[inside]
    return rows[ix.probes["ndim"][rows] >= 3]


@rule("mask.length", "the attention mask's key length equals cache length before the step + q_len; "
      "a 4-D mask's query length equals q_len and it broadcasts to [B, heads, q, k]")
def rule_mask_length(ix: TraceIndex) -> list[Violation]:
    rows = _mask_rows(ix)
    if not len(rows):
        return []   # no mask reached the layers: SDPA is_causal, a valid case
    p = ix.probes
    q_len, cb, in_len = _step_arrays(ix)
    step = p["step"][rows].astype(np.int64)
    nd = p["ndim"][rows].astype(np.int64)
    shp = p["shape"][rows]
    q = q_len[step]
    c = np.where(cb[step] < 0, 0, cb[step])
    k_exp = c + q
    last = shp[np.arange(len(rows)), np.clip(nd - 1, 0, 7)]
    qdim = np.where(nd >= 3, shp[np.arange(len(rows)), np.clip(nd - 2, 0, 7)], q)
    heads = int(ix.meta.get("num_attention_heads") or 0)
    batch = _batch_per_step(ix)
    b = batch[step]
    bad_k = (q >= 0) & (last != k_exp)
    bad_q = (q >= 0) & (nd >= 3) & (qdim != q) & (qdim != 1)
    bad_b = (nd >= 2) & (b > 0) & (shp[:, 0] != b) & (shp[:, 0] != 1)
    bad_h = (nd == 4) & (shp[:, 1] != 1) & ((shp[:, 1] != heads) if heads else False)
    bad = bad_k | bad_q | bad_b | bad_h
    sel = np.nonzero(bad)[0]
    if not len(sel):
        return []
    brow = rows[sel]
    key = step[sel] * (1 << 20) + last[sel] * 8 + nd[sel]

    def make(r: int, n: int) -> Violation:
        i = int(np.nonzero(rows == r)[0][0])
        s = int(step[i])
        shape = tuple(int(d) for d in shp[i][: nd[i]])
        k, qq, cc = int(last[i]), int(q[i]), int(c[i])
        if bad_k[i]:
            expected = f"key length {cc + qq} (cache {cc} + q_len {qq})"
            actual = f"mask {shape_str(shape)}: key length {k}"
            il = int(in_len[s])
            if il >= 0 and il != qq and k in (cc + il, il):
                hint = ("mask was built for the token sequence, not the embedding sequence after the "
                        "image splice")
            elif k == cc:
                hint = "mask covers only the cached keys, not this step's new tokens"
            elif k == qq and cc > 0:
                hint = "mask covers only this step's tokens and ignores the cache"
            else:
                hint = "mask was built for a different sequence than the keys it is applied to"
        elif bad_q[i]:
            expected = f"query length {qq} (q_len) or 1"
            actual = f"mask {shape_str(shape)}: query length {int(qdim[i])}"
            hint = "mask query length does not match the hidden states entering the layer"
        else:
            expected = f"broadcastable to [B={int(b[i])}, heads={heads or '?'}, q={qq}, k={cc + qq}]"
            actual = f"mask {shape_str(shape)}"
            hint = "mask batch/head dims do not broadcast to the attention scores"
        return Violation("mask.length", s, ix.module_path(int(p["module"][r])), expected, actual, hint,
                         seq=int(p["seq"][r]))

    return _group_report(ix, brow, key, make)


def _batch_per_step(ix: TraceIndex) -> np.ndarray:
    """Batch size per step from the first input_ids / position probe (0 unknown)."""
    out = np.zeros(max(ix.n_steps, 1), np.int64)
    rows = ix.probe_rows("input_ids", text_only=False)
    if len(rows):
        p = ix.probes
        firsts = rows[_first_per_group(p["step"][rows].astype(np.int64), p["seq"][rows].astype(np.int64))]
        ok = p["ndim"][firsts] == 2
        out[p["step"][firsts][ok]] = p["shape"][firsts][ok, 0]
    return out


# ============================================================================ rule 2: positions


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
        shape = tuple(int(d) for d in p["shape"][r][: p["ndim"][r]])
        return Violation("positions.length", s, ix.module_path(int(p["module"][r])),
                         f"last dim {int(q_len[s])} (q_len)", f"position_ids {shape_str(shape)}",
                         "position ids were built for a different sequence length than the hidden states",
                         seq=int(p["seq"][r]))

    return _group_report(ix, sel, key, make)


@rule("positions.continuity", "decode positions continue exactly from the previous step")
def rule_positions_continuity(ix: TraceIndex) -> list[Violation]:
    used = _used_positions(ix)
    st = ix.steps
    p = ix.probes
    out = []
    spans = _image_spans(ix)
    for s in range(1, ix.n_steps):
        if s not in used or (s - 1) not in used or st["kind"][s] == 0 or s in spans:
            continue
        r, cur, _ = used[s]
        _, prev, _ = used[s - 1]
        if cur.shape[1] != prev.shape[1] or cur.shape[0] != prev.shape[0]:
            continue
        prev_max = prev.reshape(prev.shape[0], prev.shape[1], -1).max(axis=(0, 2))     # per batch row
        S = cur.shape[-1]
        exp = prev_max[None, :, None] + 1 + np.arange(S)[None, None, :]
        bad = cur != exp
        if not bad.any():
            continue
        tok = np.nonzero(bad.any(axis=(0, 1)))[0]
        cb = int(st["cache_before"][s])
        got = cur[:, :, tok[0]].ravel()
        r = _first_text_position_probe(ix, s, r)
        out.append(Violation(
            "positions.continuity", s, ix.module_path(int(p["module"][r])),
            f"position {int(exp[0, 0, tok[0]])} (previous step's max {int(prev_max[0])} + 1)",
            f"position {_fmt_tokens(sorted(set(int(g) for g in got)))}" + (
                f" (off by {int(got[0] - exp[0, 0, tok[0]]):+d})" if len(got) else ""),
            _continuity_hint(ix, int(got[0] - exp[0, 0, tok[0]]) if len(got) else 0, s),
            seq=int(p["seq"][r]), tokens=[cb + int(t) for t in tok] if cb >= 0 else [int(t) for t in tok]))
    return out


def _continuity_hint(ix: TraceIndex, off: int, s: int) -> str:
    img = ix.steps["image_tokens"]
    n_img = int(img[0]) if len(img) else -1
    if n_img > 0 and abs(off) in (n_img, n_img - 1, n_img + 1):
        return ("decode positions are shifted by the image length: they were computed from the token count "
                "instead of continuing the M-RoPE positions (use the cached rope_deltas)")
    if off > 0:
        return "decode positions jump ahead of the previous step (cache length or rope delta counted twice?)"
    return "decode positions do not advance from the previous step (stale or recomputed position ids)"


@rule("positions.mrope-text", "M-RoPE: text positions after an image continue from the image block's max + 1")
def rule_mrope_text(ix: TraceIndex) -> list[Violation]:
    return _mrope_rules(ix)["positions.mrope-text"]


@rule("positions.mrope-grid", "M-RoPE: the image span's t/h/w rows match the merged grid from image_grid_thw")
def rule_mrope_grid(ix: TraceIndex) -> list[Violation]:
    return _mrope_rules(ix)["positions.mrope-grid"]


@rule("positions.fallback-1d", "an M-RoPE model (Qwen2-VL / Qwen2.5-VL) gets 1-D positions over an image "
      "(e.g. Qwen2.5-VL without the processor's mm_token_type_ids)")
def rule_fallback_1d(ix: TraceIndex) -> list[Violation]:
    return _mrope_rules(ix)["positions.fallback-1d"]


def _grids(ix: TraceIndex) -> dict[int, np.ndarray]:
    rows = ix.probe_rows("image_grid_thw", text_only=False)
    out: dict[int, np.ndarray] = {}
    p = ix.probes
    for r in rows:
        s = int(p["step"][r])
        if s not in out:
            v = ix.value(int(r))
            if v is not None:
                out[s] = np.atleast_2d(v)
    return out


def _mrope_rules(ix: TraceIndex) -> dict[str, list[Violation]]:
    cache = ix.__dict__.get("_mrope_cache")
    if cache is not None:
        return cache
    res: dict[str, list[Violation]] = {"positions.mrope-text": [], "positions.mrope-grid": [],
                                       "positions.fallback-1d": []}
    ix.__dict__["_mrope_cache"] = res
    used = _used_positions(ix)
    spans_by_step = _image_spans(ix)
    grids = _grids(ix)
    mrope = _is_mrope_model(ix)
    st = ix.steps
    p = ix.probes
    m = ix.merge_size
    fam = ix.family
    mmtt = set(int(s) for s in p["step"][ix.probe_rows("mm_token_type_ids", text_only=False)])
    for s, (_, spans) in spans_by_step.items():
        if s not in used:
            continue
        r, P, _ = used[s]
        q = int(st["q_len"][s])
        il = int(st["input_len"][s])
        if il >= 0 and q >= 0 and il != q:
            continue   # placeholders expand: token and embedding spaces differ, spans do not map 1:1
        r = _first_text_position_probe(ix, s, r)
        mod = ix.module_path(int(p["module"][r]))
        seq = int(p["seq"][r])
        if P.shape[0] == 1:
            if mrope:
                res["positions.fallback-1d"].append(_fallback_violation(s, mod, seq, spans, fam, s in mmtt,
                                                                        "1-D position ids [B, S]"))
            continue
        grid = grids.get(s)
        fallback_spans = []
        for k, (b, a, e) in enumerate(spans):
            if b >= P.shape[1] or e > P.shape[2]:
                continue
            seg = P[:, b, a:e]
            n = e - a
            if n > 1 and (seg[0] == seg[1]).all() and (seg[1] == seg[2]).all() and (np.diff(seg[0]) == 1).all():
                fallback_spans.append((b, a, e))
                continue
            # grid
            if grid is not None and k < len(grid):
                t, h, w = (int(x) for x in grid[k][:3])
                hh, ww = h // m, w // m
                if t * hh * ww == n and hh > 0 and ww > 0:
                    h_idx = np.tile(np.repeat(np.arange(hh), ww), t)
                    w_idx = np.tile(np.arange(ww), t * hh)
                    base = seg[:, 0]
                    bad_h = (seg[1] - base[1]) != h_idx
                    bad_w = (seg[2] - base[2]) != w_idx
                    bad_t = (seg[0] != base[0]) if t == 1 else np.zeros(n, bool)
                    bad = bad_h | bad_w | bad_t
                    if bad.any():
                        tok = np.nonzero(bad)[0]
                        res["positions.mrope-grid"].append(Violation(
                            "positions.mrope-grid", s, mod,
                            f"image {k} (row {b}, tokens {a}..{e - 1}) on a {t}x{hh}x{ww} merged grid: "
                            f"h = start + {{0..{hh - 1}}} per row, w = start + {{0..{ww - 1}}} per column",
                            f"t/h/w at token {a + int(tok[0])} = {[int(x) for x in seg[:, tok[0]]]}",
                            "the image's M-RoPE h/w positions do not follow the merged grid "
                            "(image_grid_thw / spatial_merge_size mismatch?)",
                            seq=seq, tokens=[a + int(x) for x in tok[:64]]))
            # text after the image
            if e < P.shape[2]:
                exp = int(seg.max()) + 1
                after = P[:, b, e]
                if (after != exp).any():
                    res["positions.mrope-text"].append(Violation(
                        "positions.mrope-text", s, mod,
                        f"text position {exp} after image {k} (image max {exp - 1} + 1) on t/h/w",
                        f"t/h/w = {[int(x) for x in after]} at token {e}",
                        "text after the image must continue from the image block's max position + 1, "
                        "not from the token index", seq=seq, tokens=[e]))
        if fallback_spans and mrope:
            res["positions.fallback-1d"].append(_fallback_violation(
                s, mod, seq, fallback_spans, fam, s in mmtt, "t = h = w rows, consecutive over the image"))
    return res


def _fallback_violation(s, mod, seq, spans, fam, has_mmtt, what) -> Violation:
    b, a, e = spans[0]
    if fam == "qwen2_5_vl" or not has_mmtt:
        hint = ("Qwen2.5-VL fell back to 1-D positions: the processor's mm_token_type_ids did not reach the "
                "model, so get_rope_index was skipped" if fam == "qwen2_5_vl" else
                "M-RoPE fell back to 1-D positions: mm_token_type_ids (needed by get_rope_index) is missing")
    else:
        hint = "M-RoPE fell back to 1-D positions over the image: the vision-aware rope index was not computed"
    return Violation("positions.fallback-1d", s, mod,
                     f"3-D (t/h/w) M-RoPE positions over image tokens {a}..{e - 1}",
                     what + ("" if has_mmtt else "; mm_token_type_ids: missing"), hint, seq=seq,
                     tokens=list(range(a, min(e, a + 64))))


@rule("positions.rope-deltas", "M-RoPE: rope_deltas (position - KV index) stays constant across decode steps")
def rule_rope_deltas(ix: TraceIndex) -> list[Violation]:
    out = []
    p = ix.probes
    st = ix.steps
    # stored rope_deltas probes
    rows = ix.probe_rows("rope_deltas", text_only=False)
    ref = None
    seen: set[int] = set()
    for r in rows:
        s = int(p["step"][r])
        if st["kind"][s] != 1 or s in seen:
            continue
        seen.add(s)
        v = ix.value(int(r))
        if v is None:
            continue
        if ref is None:
            ref = (s, v)
        elif v.shape != ref[1].shape or (v != ref[1]).any():
            out.append(Violation("positions.rope-deltas", s, ix.module_path(int(p["module"][r])),
                                 f"rope_deltas {ref[1].ravel().tolist()} (as at step {ref[0]})",
                                 f"rope_deltas {v.ravel().tolist()}",
                                 "rope_deltas changed during decoding: it must be computed once at prefill "
                                 "and reused", seq=int(p["seq"][r])))
    if rows.size:
        return out
    # derived: position - KV index, M-RoPE decode steps only
    used = _used_positions(ix)
    ref = None
    for s in range(ix.n_steps):
        if st["kind"][s] != 1 or s not in used:
            continue
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
            out.append(Violation("positions.rope-deltas", s, ix.module_path(int(p["module"][r])),
                                 f"rope delta {ref[1].tolist()} (position - KV index, as at step {ref[0]})",
                                 f"rope delta {delta.tolist()}",
                                 "the M-RoPE offset changed between decode steps: rope_deltas must stay "
                                 "constant after prefill", seq=int(p["seq"][r])))
            ref = (s, delta)
    return out


@rule("positions.kv-index", "position ids a model computes agree with the KV index it actually uses")
def rule_positions_kv(ix: TraceIndex) -> list[Violation]:
    rows = ix.probe_rows("position_ids")
    if not len(rows):
        return []
    p = ix.probes
    st = ix.steps
    used = _used_positions(ix)
    # only 1-D (KV-index style) position ids: [B, S] or the text row of a [4, B, S]
    nd = p["ndim"][rows]
    lead = p["shape"][rows][:, 0]
    cand = rows[(nd == 2) | ((nd == 3) & (lead == 4)) | (nd == 1)]
    if not len(cand):
        return []
    # the first candidate of each step (in execution order)
    steps_c = p["step"][cand].astype(np.int64)
    cand = cand[_first_per_group(steps_c, p["seq"][cand].astype(np.int64))]
    vals = _blob_values(ix, cand)
    padded = _padded_steps(ix)
    # the logical KV index: tokens processed before each step (robust to a corrupted cache,
    # which cache.growth reports on its own)
    qs = np.maximum(st["q_len"].astype(np.int64), 0)
    base = max(int(st["cache_before"][0]), 0) if ix.n_steps else 0
    logical = base + np.concatenate([[0], np.cumsum(qs)[:-1]]) if ix.n_steps else np.zeros(0, np.int64)
    out = []
    for r in cand.tolist():
        s = int(p["step"][r])
        v = _kv_text(vals.get(r))
        if v is None:
            continue
        q = int(st["q_len"][s])
        cb = int(st["cache_before"][s])
        if q >= 0 and v.shape[-1] != q:
            continue   # positions.length reports it
        u = used.get(s)
        if u is not None and u[2] and u[1].shape[0] == 1 and u[0] != r:
            ref, what = u[1][0], "the positions rotary used"
        elif cb >= 0 and s not in padded and (st["q_len"][:s + 1] >= 0).all():
            k0 = int(logical[s])
            ref, what = np.arange(k0, k0 + v.shape[-1])[None, :], "the KV index"
        else:
            continue
        if ref.shape[-1] != v.shape[-1]:
            continue
        if ref.shape != v.shape:
            ref = np.broadcast_to(ref, v.shape)
        bad = v != ref
        if not bad.any():
            continue
        tok = np.nonzero(bad.any(axis=0))[0]
        out.append(Violation(
            "positions.kv-index", s, ix.module_path(int(p["module"][r])),
            f"position_ids {_fmt_tokens(ref[0][tok].tolist(), 4)} ({what})",
            f"position_ids {_fmt_tokens(v[0][tok].tolist(), 4)}",
            _kv_hint(ix, v[0][tok], ref[0][tok]), seq=int(p["seq"][r]),
            tokens=[int(x) for x in ref[0][tok][:64]]))
    return out


def _kv_hint(ix: TraceIndex, got: np.ndarray, exp: np.ndarray) -> str:
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
    vals = _blob_values(ix, rows)
    for r in rows:
        v = vals.get(int(r))
        if v is not None and not np.asarray(v, bool).all():
            out.add(int(p["step"][r]))
    return out


# ============================================================================ rule 3: cache


def _cache_series(ix: TraceIndex):
    """Per step: {"before": (row, lengths, info), "after": (row, lengths, info)} of the full cache.

    "before" is the first probe of the full cache (every layer) a module received as an
    argument; "after" the last one a module returned (``out.cache``), if any.
    """
    cache = ix.__dict__.get("_cache_series")
    if cache is not None:
        return cache
    rows = ix.probe_rows("cache", text_only=False)
    p = ix.probes
    out: dict[int, dict[str, tuple[int, np.ndarray, dict]]] = {}
    if len(rows):
        n = p["shape"][rows][:, 0]
        full = rows[(p["ndim"][rows] == 1) & (n == n.max()) & (n > 0)]
        is_out = np.array([ix.s(int(x)).startswith("out") for x in np.unique(p["name"][full])], bool)
        out_ids = np.unique(p["name"][full])[is_out]
        outp = np.isin(p["name"][full], out_ids)
        steps = p["step"][full].astype(np.int64)
        seq = p["seq"][full].astype(np.int64)
        for which, sel, order in (("before", ~outp, seq), ("after", outp, -seq)):
            cand = full[sel]
            if not len(cand):
                continue
            for r in cand[_first_per_group(steps[sel], order[sel])]:
                v = ix.value(int(r))
                if v is None:
                    continue
                out.setdefault(int(p["step"][r]), {})[which] = (int(r), np.asarray(v, np.int64).ravel(),
                                                                ix.info(int(r)))
    ix.__dict__["_cache_series"] = out
    return out


@rule("cache.growth", "each layer's cache grows by exactly q_len per step")
def rule_cache_growth(ix: TraceIndex) -> list[Violation]:
    cached = ix.__dict__.get("_growth")
    if cached is not None:
        return cached
    series = _cache_series(ix)
    st = ix.steps
    out = []
    layer_paths = ix.layer_paths
    dl = ix.decoder_layers_path
    for s in range(ix.n_steps):
        q = int(st["q_len"][s])
        if q < 0 or st["status"][s] != 0:
            continue
        cur, nxt = series.get(s, {}), series.get(s + 1, {})
        before = cur.get("before")
        after = cur.get("after") or nxt.get("before")
        if before is None and int(st["cache_before"][s]) == 0 and after is not None:
            before = (-1, np.zeros_like(after[1]), {})      # prefill without a cache object yet
        if before is not None and after is not None and before[1].shape == after[1].shape:
            b, a = before[1], after[1]
        else:   # no per-layer probes: layer 0 from the steps table
            cbf, caf = int(st["cache_before"][s]), int(st["cache_after"][s])
            if cbf < 0 or caf < 0:
                continue
            b, a = np.array([cbf]), np.array([caf])
        growth = a - b
        bad = np.nonzero(growth != q)[0]
        if not len(bad):
            continue
        li = int(bad[0])
        g = int(growth[li])
        mod = layer_paths.get(li, f"{dl}.{li}" if dl else "")
        hint = ("the layer appended its keys/values twice in one step" if g == 2 * q else
                "the cache was not updated in this step" if g == 0 else
                "the cache grew by a different amount than the tokens processed")
        more = f"; {len(bad) - 1} more layer(s)" if len(bad) > 1 else ""
        out.append(Violation("cache.growth", s, mod, f"+{q} (q_len) in layer {li}",
                             f"+{g} ({int(b[li])} -> {int(a[li])}){more}", hint,
                             seq=_layer_seq(ix, s, li), count=len(bad)))
    ix.__dict__["_growth"] = out
    return out


def _layer_seq(ix: TraceIndex, s: int, li: int) -> int:
    lo = ix.layer_of_module
    mods = np.nonzero(lo == li)[0]
    if not len(mods):
        return -1
    st = ix.steps[s]
    a, n = int(st["event_start"]), int(st["event_count"])
    ev = ix.events[a:a + n]
    hit = np.nonzero(ev["module"] == mods[0])[0]
    return int(ev["seq"][hit[0]]) if len(hit) else -1


@rule("cache.uniform", "the cache length is equal across layers")
def rule_cache_uniform(ix: TraceIndex) -> list[Violation]:
    series = _cache_series(ix)
    growth_bad = {v.step for v in rule_cache_growth(ix)}
    out = []
    p = ix.probes
    prev_pattern = None
    for s in sorted(series):
        b = series[s].get("before")
        if b is None:
            continue
        r, lens, _ = b
        if not len(lens) or (lens == lens[0]).all():
            prev_pattern = None
            continue
        vals, counts = np.unique(lens, return_counts=True)
        maj = int(vals[np.argmax(counts)])
        pattern = tuple((lens - maj).tolist())
        explained = (s - 1) in growth_bad or pattern == prev_pattern
        prev_pattern = pattern
        if explained:
            continue   # the growth violation that caused it is already reported
        odd = np.nonzero(lens != maj)[0]
        out.append(Violation("cache.uniform", s, ix.module_path(int(p["module"][r])),
                             f"every layer at length {maj}",
                             "; ".join(f"layer {int(i)}: {int(lens[i])}" for i in odd[:6]),
                             "layers disagree on the cache length", seq=int(p["seq"][r])))
    return out


@rule("cache.layout", "the cache type and layout stay the same across steps (and heads match num_key_value_heads)")
def rule_cache_layout(ix: TraceIndex) -> list[Violation]:
    series = _cache_series(ix)
    p = ix.probes
    out = []
    ref = None
    kvh = ix.meta.get("num_key_value_heads")
    for s in sorted(series):
        for which in ("before", "after"):
            item = series[s].get(which)
            if item is None:
                continue
            r, lens, info = item
            ks = info.get("key_shape") or []
            if not ks:
                continue   # an empty cache says nothing about its layout
            layout = str(info.get("layout") or "")
            lay = (info.get("type"), layout, info.get("dtype"))
            hd = None
            if len(ks) == 4 and layout.endswith("BHSD"):
                hd = (ks[0], ks[1], ks[3])
            elif len(ks) == 4 and layout.endswith("BSHD"):
                hd = (ks[0], ks[2], ks[3])
            if ref is None:
                ref = (s, lay, hd)
                if hd is not None and kvh and int(hd[1]) != int(kvh):
                    out.append(Violation("cache.layout", s, ix.module_path(int(p["module"][r])),
                                         f"{kvh} KV heads in a {layout} cache", f"key shape {ks}",
                                         "the cache layout is misread (heads and sequence dims swapped?)",
                                         seq=int(p["seq"][r])))
                continue
            if lay != ref[1] or (hd is not None and ref[2] is not None and hd != ref[2]):
                out.append(Violation("cache.layout", s, ix.module_path(int(p["module"][r])),
                                     f"{ref[1][0]} {ref[1][1]} {ref[1][2]}, [B, heads, head_dim] = {list(ref[2] or [])}"
                                     f" (as at step {ref[0]})",
                                     f"{lay[0]} {lay[1]} {lay[2]}, [B, heads, head_dim] = {list(hd or [])}",
                                     "the cache changed type or layout between steps", seq=int(p["seq"][r])))
                ref = (s, lay, hd)
    return out


# ============================================================================ rule 4: image tokens


@rule("image.tokens", "image placeholder tokens (per image and per batch row) equal the vision merger's "
      "output rows")
def rule_image_tokens(ix: TraceIndex) -> list[Violation]:
    p = ix.probes
    out = []
    spans = _image_spans(ix)
    grids = _grids(ix)
    mrows = ix.probe_rows("merger_rows", text_only=False)
    merger_by_step: dict[int, list[int]] = {}
    for r in mrows:
        info = ix.info(int(r))
        n = info.get("rows")
        if n is None:
            nd = int(p["ndim"][r])
            sh = p["shape"][r][:nd]
            n = int(np.prod(sh[:-1])) if nd >= 2 else int(sh[0]) if nd else 0
        merger_by_step.setdefault(int(p["step"][r]), []).append(int(n))
    m = ix.merge_size
    merger_path = str(ix.meta.get("merger") or "")
    st = ix.steps
    for s in sorted(set(spans) | set(merger_by_step)):
        sp = spans.get(s, (None, []))[1]
        n_ph = sum(e - a for _, a, e in sp)
        if not sp and s < len(st) and st["image_tokens"][s] > 0:
            n_ph = int(st["image_tokens"][s])
        feats = merger_by_step.get(s)
        mods_row = mrows[p["step"][mrows] == s]
        mod = ix.module_path(int(p["module"][mods_row[0]])) if len(mods_row) else merger_path
        seq = int(p["seq"][mods_row[0]]) if len(mods_row) else -1
        if feats is None:
            continue   # no merger probe recorded: nothing to compare
        n_feat = sum(feats)
        grid = grids.get(s)
        if grid is not None and len(grid) and grid.shape[-1] == 3:
            want = int(sum(int(np.prod(g[:3])) // (m * m) for g in grid))
            if want != n_feat:
                out.append(Violation("image.tokens", s, mod,
                                     f"{want} image feature rows (image_grid_thw {grid[:, :3].tolist()} / {m}x{m} merge)",
                                     f"{n_feat} merger output rows",
                                     "the vision merger's output does not match the image grid (rows dropped or "
                                     "added, or a wrong spatial_merge_size)", seq=seq))
                continue
        if not sp and n_ph <= 0:
            continue   # placeholders unknown (the model's forward never ran)
        q, il = (int(st["q_len"][s]), int(st["input_len"][s])) if s < len(st) else (-1, -1)
        if q >= 0 and il >= 0 and q != il:
            # each placeholder expands into its features: the spliced span is q_len - (input_len - n_ph)
            span = q - (il - n_ph)
            if span != n_feat:
                out.append(Violation("image.tokens", s, mod, f"{n_feat} image feature rows spliced in",
                                     f"a span of {span} positions ({il} tokens - {n_ph} placeholders -> "
                                     f"q_len {q})", "the embedding sequence does not grow by the number of "
                                     "image features that replace the placeholders", seq=seq))
            continue
        if n_feat != n_ph:
            hint = ("the vision merger produced a different number of image features than there are image "
                    "placeholder tokens in input_ids (processor grid and model disagree)")
            out.append(Violation("image.tokens", s, mod, f"{n_ph} image feature rows (placeholder tokens)",
                                 f"{n_feat} merger output rows", hint, seq=seq))
            continue
        if grid is not None and sp and len(grid) == len(sp):
            per_img = [int(np.prod(g[:3])) // (m * m) for g in grid]
            lens = [e - a for _, a, e in sp]
            for k, (want, got) in enumerate(zip(per_img, lens)):
                if want != got:
                    b, a, e = sp[k]
                    out.append(Violation("image.tokens", s, mod,
                                         f"image {k}: {want} placeholder tokens (grid {list(map(int, grid[k][:3]))}"
                                         f" / {m}x{m} merge)", f"{got} placeholders in row {b} ({a}..{e - 1})",
                                         "per-image placeholder count disagrees with image_grid_thw", seq=seq,
                                         tokens=[a]))
                    break
    return out


# ============================================================================ rule 5: numbers


@rule("numbers.nonfinite", "no NaN or Inf in any activation; names the first module that produced one")
def rule_nonfinite(ix: TraceIndex) -> list[Violation]:
    te = ix.tensors
    if not len(te):
        return []
    bad = (te["nan"] > 0) | ((te["inf"] > 0) & ~ix.is_mask_name_id[te["name"]])
    idx = np.nonzero(bad)[0]
    if not len(idx):
        return []
    steps = te["step"][idx].astype(np.int64)
    time = ix.tensor_time[idx]
    # order: by step, then time; outputs before inputs at equal time
    order = np.lexsort((te["role"][idx] != ROLE_OUTPUT, time, steps))
    idx, steps = idx[order], steps[order]
    # the first offending tensor of the first step, and of any later step whose previous step was clean
    firsts = _first_per_group(steps, np.arange(len(steps)))
    clean_prev = np.ones(len(firsts), bool)
    bad_steps = set(int(s) for s in np.unique(steps))
    out = []
    for j, f in enumerate(firsts):
        s = int(steps[f])
        if j > 0 and (s - 1) in bad_steps:
            clean_prev[j] = False
            continue
        r = int(idx[f])
        ev = int(te["event"][r])
        mod = ix.module_path(int(ix.event_module[ev]))
        role = int(te["role"][r])
        n_nan, n_inf = int(te["nan"][r]), int(te["inf"][r])
        name = ix.s(int(te["name"][r]))
        what = f"{n_nan} NaN" if n_nan else f"{n_inf} Inf"
        if n_nan and n_inf:
            what = f"{n_nan} NaN, {n_inf} Inf"
        in_step = int((steps == s).sum())
        later = sum(1 for x in bad_steps if x > s)
        shape = tuple(int(d) for d in te["shape"][r][: te["ndim"][r]])
        hint = (f"{mod or '<root>'} produced the first non-finite value" if role == ROLE_OUTPUT else
                f"{mod or '<root>'} received non-finite input {name!r}")
        hint += f"; {in_step} tensors in this step" + (f" and {later} later step(s)" if later else "") + " carry it"
        out.append(Violation("numbers.nonfinite", s, mod, "finite values",
                             f"{what} in {name} {shape_str(shape)} ({'output' if role == ROLE_OUTPUT else 'input'})",
                             hint, seq=int(ix.tensor_time[r]), count=in_step))
    return out


# ============================================================================ rule 6: dtypes


@rule("dtype.mask", "a floating (additive) attention mask has the compute dtype")
def rule_mask_dtype(ix: TraceIndex) -> list[Violation]:
    rows = _mask_rows(ix)
    if not len(rows):
        return []
    cd = ix.compute_dtype
    if cd is None:
        return []
    p = ix.probes
    dt = p["dtype"][rows]
    isf = ix.is_float_dtype_id[dt]
    bad = isf & (ix.strings[dt] != cd)
    sel = rows[bad]
    if not len(sel):
        return []
    key = p["dtype"][sel].astype(np.int64)   # one violation per wrong dtype

    def make(r: int, n: int) -> Violation:
        s = int(p["step"][r])
        steps = np.unique(p["step"][sel[p["dtype"][sel] == p["dtype"][r]]])
        d = ix.s(int(p["dtype"][r]))
        return Violation("dtype.mask", s, ix.module_path(int(p["module"][r])), f"mask dtype {cd} (compute dtype)",
                         f"mask dtype {d}" + (f" in {len(steps)} steps" if len(steps) > 1 else ""),
                         f"the additive mask was left in {d} while the model runs in {cd}: adding it promotes "
                         f"the attention scores (or fails under SDPA); cast it with .to(hidden_states.dtype)",
                         seq=int(p["seq"][r]))

    return _group_report(ix, sel, key, make)


_CAT_OPS = ("cat", "concat", "concatenate", "stack", "hstack", "vstack")


@rule("dtype.cat-promotion", "cat/stack over different floating dtypes silently promotes (bf16 + fp16 -> fp32)")
def rule_cat_promotion(ix: TraceIndex) -> list[Violation]:
    op_ids = [ix.sid(o) for o in _CAT_OPS]
    op_ids = [o for o in op_ids if o >= 0]
    if not op_ids or not ix.trace.n_rows("reshapes"):
        return []
    # which interned strings list several floating dtypes: without one, nothing to read
    fl_names = ("float64", "float32", "bfloat16", "float16")
    mixed = []
    for i, sv in enumerate(ix.strings):
        if " " in sv and sv.count("float") >= 2:
            parts = {x.removeprefix("torch.") for x in sv.split()}
            if len(parts & set(fl_names)) > 1 and parts <= set(fl_names) | {"bool", "int64", "int32", "uint8",
                                                                           "int8", "int16", "complex64"}:
                mixed.append(i)
    if not mixed:
        return []
    rs = ix.reshapes
    is_cat = np.isin(rs["op"], op_ids)
    sel = np.nonzero(is_cat & np.isin(rs["in_dtypes"], mixed))[0]
    # group by (module, site, dtypes): the first occurrence
    key = (rs["module"][sel].astype(np.int64) * (1 << 24) + rs["site_line"][sel].astype(np.int64)) * 4096 + \
        np.searchsorted(np.array(mixed), rs["in_dtypes"][sel])
    order = rs["step"][sel].astype(np.int64) * (1 << 32) + rs["seq"][sel].astype(np.int64)
    out = []
    for f in _first_per_group(key, order):
        r = int(sel[f])
        n = int((key == key[f]).sum())
        site = f"{ix.s(int(rs['site_file'][r]))}:{int(rs['site_line'][r])}"
        ind, outd = ix.s(int(rs["in_dtypes"][r])), ix.s(int(rs["out_dtype"][r]))
        out.append(Violation("dtype.cat-promotion", int(rs["step"][r]), ix.module_path(int(rs["module"][r])),
                             f"{ix.s(int(rs['op'][r]))} of one dtype", f"{ind} -> {outd} at {site}"
                             + (f" ({n} times)" if n > 1 else ""),
                             "mixed floating dtypes in cat are silently promoted; cast the inputs to one dtype",
                             seq=int(rs["seq"][r]), count=n))
    return out


# ============================================================================ rule 7: sequence length


@rule("seq.length", "the embedding-space sequence length is the same through every decoder layer of a step")
def rule_seq_length(ix: TraceIndex) -> list[Violation]:
    rows = ix.layer_tensor_rows()
    if not len(rows):
        return []
    te = ix.tensors
    role, dt, nm = te["role"][rows], te["dtype"][rows], te["name"][rows]
    evr = te["event"][rows].astype(np.int64)
    hs = ix.sid("hidden_states")
    is_in = (role != ROLE_OUTPUT) & ix.is_float_dtype_id[dt] & ~ix.is_mask_name_id[nm]
    if hs >= 0:
        # calls that have a hidden_states input use it; the others their first float input
        has_named = np.zeros(len(ix.events), bool)
        has_named[evr[is_in & (nm == hs)]] = True
        is_in &= np.where(has_named[evr], nm == hs, True)
    is_out = (role == ROLE_OUTPUT) & ix.is_float_dtype_id[dt]
    out: list[Violation] = []
    q_len = ix.steps["q_len"].astype(np.int64)
    for sel, what in ((is_in, "input"), (is_out, "output")):
        idx = rows[sel]
        if not len(idx):
            continue
        idx = idx[_first_per_group(te["event"][idx].astype(np.int64), idx)]   # first such tensor per call
        nd = te["ndim"][idx].astype(np.int64)
        shp = te["shape"][idx]
        sdim = np.where(nd >= 3, shp[:, 1], np.where(nd == 2, shp[:, 0], -1))
        steps = te["step"][idx].astype(np.int64)
        ref = q_len[steps]
        times = ix.tensor_time_of(idx)
        if (ref < 0).any():   # unknown q_len: the first layer's length in the step
            f = _first_per_group(steps, times)
            first_len = dict(zip(steps[f].tolist(), sdim[f].tolist()))
            ref = np.where(ref < 0, [first_len.get(int(s), -1) for s in steps], ref)
        bad = (sdim >= 0) & (ref >= 0) & (sdim != ref)
        bidx = idx[bad]
        for f in _first_per_group(steps[bad], times[bad]):
            r = int(bidx[f])
            s = int(te["step"][r])
            e = int(te["event"][r])
            shape = tuple(int(d) for d in te["shape"][r][: te["ndim"][r]])
            n = int((steps[bad] == s).sum())
            out.append(Violation(
                "seq.length", s, ix.module_path(int(ix.event_module[e])),
                f"sequence length {int(q_len[s])} (q_len) at every decoder layer {what}",
                f"{ix.s(int(te['name'][r]))} {shape_str(shape)}" + (f"; {n - 1} more layer(s)" if n > 1 else ""),
                "the hidden states changed length between decoder layers of one step "
                "(tokens inserted or dropped inside the stack?)", seq=int(times[bad][f]), count=n))
    # report inputs and outputs of the same layer once
    seen = set()
    uniq = []
    for v in sorted(out, key=lambda v: (v.step, v.seq)):
        if (v.step, v.module) in seen:
            continue
        seen.add((v.step, v.module))
        uniq.append(v)
    return uniq


# ============================================================================ trace status


@rule("trace.status", "the recording completed (a failed forward or an interrupted recording is reported)")
def rule_trace_status(ix: TraceIndex) -> list[Violation]:
    t = ix.trace
    status = t.status
    if status == "complete":
        return []
    if status == "failed":
        err = t.error or {}
        stack = err.get("module_stack") or []
        lr = err.get("last_reshape") or None
        hint = f"{err.get('type', 'error')}: {err.get('message', '')}".strip()
        if lr:
            hint += f" (last reshape: {lr.get('op')} {lr.get('in_shapes', '')} {lr.get('args', '')} at {lr.get('site', '')})"
        step = int(err.get("step", -1))
        failed = np.nonzero(ix.steps["status"] != 0)[0] if ix.n_steps else []
        if len(failed) and not (0 <= step < ix.n_steps and ix.steps["status"][step] != 0):
            step = int(failed[0])   # the step row that raised
        return [Violation("trace.status", step, stack[-1] if stack else "",
                          "a complete forward", "the forward raised", hint)]
    return [Violation("trace.status", ix.n_steps, "", "a complete recording", f"status {status}",
                      "the recording was interrupted; later steps are missing", severity=WARNING)]


def run_checks(trace: Trace | str | os.PathLike, rules: Iterable[str] | str | None = None) -> list[Violation]:
    """The violations of the selected rules (all but ``trace.status``, which a summary shows
    itself), in execution order. Used by ``vlmscope summary``."""
    ids = [r for r in select_rules(rules) if r != "trace.status"] if rules is None else select_rules(rules)
    return check(trace, ids).violations
