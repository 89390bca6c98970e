"""Rule family ``cache``: the KV cache grows by q_len per step in every layer (also in a step
that raised, for the layers that finished) and starts empty at each call's prefill, its layers
agree on the length, its type and layout stay the same within a call (with the model's KV head
count), and the ``cache_position`` the model receives points at the slots after the cache."""

from __future__ import annotations

import numpy as np

from vlmscope.semantics import fmt_shape
from vlmscope.trace import ENC_INT64, KIND_PREFILL

from .._index import TraceIndex
from ._common import first_per_group, memo, root_module, step_arrays
from .registry import rule
from .report import Violation

# one step's full-cache probe: (probe row, per-layer lengths, info)
CacheItem = tuple[int, np.ndarray, dict]


def cache_series(ix: TraceIndex) -> dict[int, dict[str, CacheItem]]:
    """Per step: {"before": (row, lengths, info), "after": (row, lengths, info)} of the full cache.

    "before" is the first probe of the full cache (every layer) a module received as an
    argument; "after" the last one a module returned (``out.cache``), if any.
    """
    return memo(ix, "_cache_series", _read_cache_series)


def _read_cache_series(ix: TraceIndex) -> dict[int, dict[str, CacheItem]]:
    rows = ix.probe_rows("cache", text_only=False)
    p = ix.probes
    out: dict[int, dict[str, CacheItem]] = {}
    if not len(rows):
        return out
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
        for r in cand[first_per_group(steps[sel], order[sel])]:
            v = ix.value(int(r))
            if v is None:
                continue
            out.setdefault(int(p["step"][r]), {})[which] = (int(r), np.asarray(v, np.int64).ravel(),
                                                            ix.info(int(r)))
    return out


# ---------------------------------------------------------------------------- growth


@rule("cache.growth", "each layer's cache grows by exactly q_len per step (on a failed step: each layer that "
      "finished), and each call's prefill starts from an empty cache")
def rule_cache_growth(ix: TraceIndex) -> list[Violation]:
    return memo(ix, "_growth", _growth_violations)   # cache.uniform reads it too


def _growth_violations(ix: TraceIndex) -> list[Violation]:
    series = cache_series(ix)
    st = ix.steps
    kind = st["kind"]
    out = []
    for s in range(ix.n_steps):
        if kind[s] == KIND_PREFILL:
            v = _restart_violation(ix, series, s)
            if v is not None:
                out.append(v)
        q = int(st["q_len"][s])
        if q < 0:
            continue
        if st["status"][s] != 0:
            v = _failed_step_growth(ix, series, s, q)
            if v is not None:
                out.append(v)
            continue
        lengths = _lengths_around(ix, series, s)
        if lengths is None:
            continue
        b, a = lengths
        bad = np.nonzero(a - b != q)[0]
        if len(bad):
            out.append(_growth_violation(ix, s, q, b, a, bad))
    return out


def _restart_violation(ix: TraceIndex, series: dict[int, dict[str, CacheItem]], s: int) -> Violation | None:
    """A call's prefill starts from an empty cache: the cache of an earlier call is not reused."""
    item = series.get(s, {}).get("before")
    lens = item[1] if item is not None else np.array([int(ix.steps["cache_before"][s])])
    if not len(lens) or (lens <= 0).all():
        return None
    li = int(np.argmax(lens > 0))
    p = ix.probes
    call = int(ix.call_of_step[s])
    mod = ix.module_path(int(p["module"][item[0]])) if item is not None else ""
    return Violation("cache.growth", s, mod, f"an empty cache at the prefill of call {call}",
                     f"{int(lens[li])} cached tokens in layer {li}" + (f" ({int((lens > 0).sum())} layers)"
                                                                       if (lens > 0).sum() > 1 else ""),
                     "the cache of an earlier generate call was reused: the new call's prompt attends to the "
                     "previous call's keys (cache not reset between calls)",
                     seq=int(p["seq"][item[0]]) if item is not None else -1)


def _failed_step_growth(ix: TraceIndex, series: dict[int, dict[str, CacheItem]], s: int, q: int
                        ) -> Violation | None:
    """A step whose forward raised: each decoder layer that finished before the raise grew its
    cache by q_len (read from the first full-cache probe after the layer returned)."""
    before = series.get(s, {}).get("before")
    probes = _full_cache_probes(ix, s)
    if not probes:
        return None
    if before is not None:
        b = before[1]
    elif int(ix.steps["cache_before"][s]) == 0:
        b = np.zeros_like(probes[0][1])
    else:
        return None
    st = ix.steps[s]
    a, n = int(st["event_start"]), int(st["event_count"])
    ev = ix.events[a:a + n]
    layer = ix.layer_of_module[ev["module"]]
    done = (layer >= 0) & (ev["status"] == 0) & (ev["end_seq"] > ev["seq"])
    seqs = np.array([x[0] for x in probes], np.int64)
    after = b.copy()
    grew = np.zeros(len(b), bool)
    for li, end in zip(layer[done].tolist(), ev["end_seq"][done].tolist()):
        k = int(np.searchsorted(seqs, end))
        if li < len(b) and k < len(probes) and probes[k][1].shape == b.shape and not grew[li]:
            after[li] = probes[k][1][li]
            grew[li] = True
    bad = np.nonzero(grew & (after - b != q))[0]
    if not len(bad):
        return None
    v = _growth_violation(ix, s, q, b, after, bad)
    v.hint += f" (in the step that raised; {int(grew.sum())} layer(s) finished before the error)"
    return v


def _full_cache_probes(ix: TraceIndex, s: int) -> list[tuple[int, np.ndarray]]:
    """(seq, per-layer lengths) of every probe of the full cache in step ``s``, in order."""
    rows = ix.probe_rows("cache", text_only=False)
    p = ix.probes
    if not len(rows):
        return []
    n = p["shape"][rows][:, 0]
    full = rows[(p["ndim"][rows] == 1) & (n == n.max()) & (n > 0) & (p["step"][rows] == s)]
    out = []
    for r in full[np.argsort(p["seq"][full], kind="stable")]:
        v = ix.value(int(r))
        if v is not None:
            out.append((int(p["seq"][r]), np.asarray(v, np.int64).ravel()))
    return out


def _lengths_around(ix: TraceIndex, series: dict[int, dict[str, CacheItem]], s: int
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-layer cache lengths before and after step ``s``: from the full-cache probes (the
    next step's "before" stands for a missing "after", unless the next step starts a new call),
    else layer 0 from the steps table."""
    st = ix.steps
    cur = series.get(s, {})
    nxt = series.get(s + 1, {}) if s + 1 < len(st) and st["kind"][s + 1] != KIND_PREFILL else {}
    before = cur.get("before")
    after = cur.get("after") or nxt.get("before")
    if before is None and int(st["cache_before"][s]) == 0 and after is not None:
        before = (-1, np.zeros_like(after[1]), {})      # prefill without a cache object yet
    if before is not None and after is not None and before[1].shape == after[1].shape:
        return before[1], after[1]
    cbf, caf = int(st["cache_before"][s]), int(st["cache_after"][s])   # no per-layer probes
    if cbf < 0 or caf < 0:
        return None
    return np.array([cbf]), np.array([caf])


def _growth_violation(ix: TraceIndex, s: int, q: int, b: np.ndarray, a: np.ndarray, bad: np.ndarray) -> Violation:
    """Step ``s``: layer ``bad[0]`` (the first of ``bad``) grew from ``b`` to ``a`` instead of by ``q``."""
    li = int(bad[0])
    g = int(a[li] - b[li])
    dl = ix.decoder_layers_path
    mod = ix.layer_paths.get(li, f"{dl}.{li}" if dl else "")
    hint = ("the layer appended its keys/values twice in one step" if g == 2 * q else
            "the cache was not updated in this step" if g == 0 else
            "the cache grew by a different amount than the tokens processed")
    more = f"; {len(bad) - 1} more layer(s)" if len(bad) > 1 else ""
    return Violation("cache.growth", s, mod, f"+{q} (q_len) in layer {li}",
                     f"+{g} ({int(b[li])} -> {int(a[li])}){more}", hint,
                     seq=_layer_seq(ix, s, li), count=len(bad))


def _layer_seq(ix: TraceIndex, s: int, li: int) -> int:
    """seq of decoder layer ``li``'s first call in step ``s`` (-1 when it has none)."""
    lo = ix.layer_of_module
    mods = np.nonzero(lo == li)[0]
    if not len(mods):
        return -1
    st = ix.steps[s]
    a, n = int(st["event_start"]), int(st["event_count"])
    ev = ix.events[a:a + n]
    hit = np.nonzero(ev["module"] == mods[0])[0]
    return int(ev["seq"][hit[0]]) if len(hit) else -1


# ---------------------------------------------------------------------------- uniform


@rule("cache.uniform", "the cache length is equal across layers")
def rule_cache_uniform(ix: TraceIndex) -> list[Violation]:
    series = cache_series(ix)
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


# ---------------------------------------------------------------------------- layout


@rule("cache.layout", "the cache type and layout stay the same across the steps of a call (and heads match "
      "num_key_value_heads)")
def rule_cache_layout(ix: TraceIndex) -> list[Violation]:
    series = cache_series(ix)
    p = ix.probes
    out = []
    ref = None
    kvh = ix.meta.get("num_key_value_heads")
    kind = ix.steps["kind"]
    for s in sorted(series):
        if s < len(kind) and kind[s] == KIND_PREFILL:
            ref = None          # a new call builds a new cache (its batch size may differ)
        for which in ("before", "after"):
            item = series[s].get(which)
            if item is None:
                continue
            r, _, info = item
            ks = info.get("key_shape") or []
            if not ks:
                continue   # an empty cache says nothing about its layout
            lay, hd = _layout_of(info, ks)
            mod, seq = ix.module_path(int(p["module"][r])), int(p["seq"][r])
            if ref is None:
                ref = (s, lay, hd)
                if hd is not None and kvh and int(hd[1]) != int(kvh):
                    out.append(Violation("cache.layout", s, mod, f"{kvh} KV heads in a {lay[1]} cache",
                                         f"key shape {fmt_shape(ks)}",
                                         "the cache layout is misread (heads and sequence dims swapped?)", seq=seq))
                continue
            if lay != ref[1] or (hd is not None and ref[2] is not None and hd != ref[2]):
                out.append(Violation("cache.layout", s, mod,
                                     f"{ref[1][0]} {ref[1][1]} {ref[1][2]}, [B, heads, head_dim] = "
                                     f"{fmt_shape(ref[2] or ())} (as at step {ref[0]})",
                                     f"{lay[0]} {lay[1]} {lay[2]}, [B, heads, head_dim] = {fmt_shape(hd or ())}",
                                     "the cache changed type or layout between steps", seq=seq))
                ref = (s, lay, hd)
    return out


def _layout_of(info: dict, ks: list) -> tuple[tuple, tuple | None]:
    """(type, layout, dtype) of a cache probe, and its [B, heads, head_dim] from the key shape
    ``ks`` when the layout says where they are (else None)."""
    layout = str(info.get("layout") or "")
    lay = (info.get("type"), layout, info.get("dtype"))
    hd = None
    if len(ks) == 4 and layout.endswith("BHSD"):
        hd = (ks[0], ks[1], ks[3])
    elif len(ks) == 4 and layout.endswith("BSHD"):
        hd = (ks[0], ks[2], ks[3])
    return lay, hd


# ---------------------------------------------------------------------------- position


@rule("cache.position", "the cache_position the model receives equals the cache length before the step + "
      "arange(q_len)")
def rule_cache_position(ix: TraceIndex) -> list[Violation]:
    rows = ix.probe_rows("cache_position", text_only=False)
    if not len(rows):
        return []
    p = ix.probes
    root = root_module(ix)
    at_root = rows[p["module"][rows] == root]
    rows = at_root if len(at_root) else rows
    rows = rows[first_per_group(p["step"][rows].astype(np.int64), p["seq"][rows].astype(np.int64))]
    rows = rows[p["enc"][rows] == ENC_INT64]
    q_len, cb, il = step_arrays(ix)
    steps = p["step"][rows].astype(np.int64)
    known = (cb[steps] >= 0) & (q_len[steps] >= 0)
    rows, steps = rows[known], steps[known]
    n = np.where(p["ndim"][rows] == 1, p["shape"][rows][:, 0], -1)
    # one value (a decode step): read from the probe bytes at once
    one = (n == 1) & (p["data_len"][rows] == 8)
    off = p["data_off"][rows[one]].astype(np.int64)
    first = (ix.probe_data[off[:, None] + np.arange(8)].copy().view("<i8").ravel() if len(off)
             else np.zeros(0, np.int64))
    ok_one = (first == cb[steps[one]]) & (q_len[steps[one]] == 1)
    check = np.r_[rows[one][~ok_one], rows[~one]]
    out = []
    for r in check[np.argsort(p["step"][check], kind="stable")].tolist():
        s = int(p["step"][r])
        v = ix.value(r)
        if v is None:
            continue
        v = np.asarray(v, np.int64).ravel()
        c, q, tokens = int(cb[s]), int(q_len[s]), int(il[s])
        m = len(v)
        want = c + np.arange(m)
        if m in (q, tokens) and (v == want).all():
            continue
        out.append(Violation("cache.position", s, ix.module_path(int(p["module"][r])),
                             f"cache_position {_span(c, c + q)} (cache {c} + q_len {q})",
                             f"{_span(int(v[0]), int(v[-1]) + 1) if m and (np.diff(v) == 1).all() else v[:8].tolist()}"
                             f" ({m} values)", _position_hint(v, c, q, tokens), seq=int(p["seq"][r]),
                             tokens=[c]))
    return out


def _span(a: int, b: int) -> str:
    return f"{a}" if b == a + 1 else f"{a}..{b - 1}"


def _position_hint(v: np.ndarray, c: int, q: int, tokens: int) -> str:
    m = len(v)
    if m not in (q, tokens):
        return (f"cache_position covers {m} tokens but the step processes {q}: it was built for another "
                "sequence (token space vs embedding space, or a stale length)")
    if m > 1 and not (np.diff(v) == 1).all():
        return "cache_position is not a contiguous range of cache slots"
    d = int(v[0]) - c
    if int(v[0]) == 0 and c > 0:
        return (f"cache_position restarts at 0 although the cache holds {c} tokens: it ignores the cache (or the "
                "cache was not reset for a new call while the positions were)")
    if d < 0:
        return (f"cache_position lags the cache by {-d}: the cache holds more tokens than the positions say "
                "(tokens appended twice, or a stale cache)")
    return (f"cache_position runs {d} ahead of the cache: the cache lost tokens or was not updated "
            "(the new keys land past the end of the cache)")
