"""Moving around a trace: the same module in another step, the next layer, search, and the tree
item a finding of :mod:`vlmscope.analyze` (a check violation, a divergence) points at.

Pure functions over a :class:`~vlmscope.tui.data.TraceModel` and indexed steps (memory only:
they run on the UI thread).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vlmscope.tui.data import match_paths
from vlmscope.tui.items import Item
from vlmscope.tui.stepindex import StepIndex

if TYPE_CHECKING:
    from vlmscope.tui.data import TraceModel


def same_in_step(tm: "TraceModel", src: StepIndex, item: Item, dst: StepIndex) -> Item:
    """The item of ``dst`` that matches ``item`` of ``src``: same module (and call number),
    same op / probe kind; falls back to the nearest match, then the step node."""
    s = dst.step
    if item[1] == "s" or src.n == 0:
        return (s, "s", -1)
    ev = src.event_of(item)
    if ev < 0:
        return (s, "s", -1)
    mod, nth = int(src.module[ev]), int(src.nth[ev])
    cand = np.nonzero(dst.module == mod)[0]
    if len(cand) == 0:
        pat = tm.mod_pattern[mod] if mod < len(tm.mod_pattern) else -1
        cand = np.nonzero(tm.mod_pattern[dst.module] == pat)[0] if dst.n else cand
        if len(cand) == 0:
            # walk up to the nearest ancestor that exists in dst
            p = int(src.parent[ev])
            while p >= 0:
                c = np.nonzero(dst.module == src.module[p])[0]
                if len(c):
                    return dst.canonical((s, "e", int(c[0])))
                p = int(src.parent[p])
            return (s, "s", -1)
    same = cand[dst.nth[cand] == nth]
    target = int(same[0]) if len(same) else int(cand[min(nth, len(cand) - 1)])
    if item[1] == "e" or item[1] == "s":
        return dst.canonical((s, "e", target))
    # a reshape or probe: same op / kind and occurrence in the matched call
    if item[1] == "r":
        r = src.reshapes[item[2]]
        kids = np.nonzero(dst.r_event == target)[0]
        for k in kids:
            if dst.reshapes[k]["op"] == r["op"] and dst.reshapes[k]["nth"] == r["nth"]:
                return (s, "r", int(k))
        for k in kids:
            if dst.reshapes[k]["op"] == r["op"]:
                return (s, "r", int(k))
    else:
        p = src.probes[item[2]]
        kids = np.nonzero(dst.p_event == target)[0]
        for k in kids:
            if dst.probes[k]["kind"] == p["kind"] and dst.probes[k]["name"] == p["name"]:
                return (s, "p", int(k))
    return dst.canonical((s, "e", target))


def next_same_depth(tm: "TraceModel", idx: StepIndex, item: Item, forward: bool, filt: str) -> Item | None:
    """The next (or previous) call at the same depth of the same kind of module: the next layer.

    "Same kind" is the module path with layer numbers wildcarded; when no such call follows,
    any module call at the same depth. Reshapes and probes move to the matching one in the
    next layer."""
    s, kind, i = item
    if kind == "s" or idx.n == 0:
        return None
    ev = idx.event_of(item)
    if ev < 0:
        return None
    depth, pat = idx.depth[ev], tm.mod_pattern[idx.module[ev]]
    seq = idx.seq[ev]
    same_depth = idx.depth == depth
    after = (idx.seq > seq) if forward else (idx.seq < seq)
    flags = idx.sub_flags(filt)
    vis = flags if flags is not None else np.ones(idx.n, dtype=bool)
    for extra in (tm.mod_pattern[idx.module] == pat, np.ones(idx.n, dtype=bool)):
        cand = np.nonzero(same_depth & after & vis & extra)[0]
        if len(cand):
            j = int(cand[np.argmin(idx.seq[cand])] if forward else cand[np.argmax(idx.seq[cand])])
            if kind == "e":
                return idx.canonical((s, "e", j))
            # reshape / probe: the matching child of the next layer's call
            return _child_like(idx, item, j)
    return None


def _child_like(idx: StepIndex, item: Item, j: int) -> Item:
    s, kind, i = item
    if kind == "r":
        r = idx.reshapes[i]
        for k in np.nonzero(idx.r_event == j)[0]:
            if idx.reshapes[k]["op"] == r["op"] and idx.reshapes[k]["nth"] == r["nth"]:
                return (s, "r", int(k))
    elif kind == "p":
        p = idx.probes[i]
        for k in np.nonzero(idx.p_event == j)[0]:
            if idx.probes[k]["kind"] == p["kind"] and idx.probes[k]["name"] == p["name"]:
                return (s, "p", int(k))
    return idx.canonical((s, "e", j))


def search(tm: "TraceModel", idx: StepIndex, query: str, after_seq: int, filt: str) -> tuple[Item | None, int]:
    """First call in the step whose module path matches ``query`` after ``after_seq`` (wrapping).
    Returns (item, number of matches in the step)."""
    mods = match_paths(tm.mod_paths, query)
    if len(mods) == 0 or idx.n == 0:
        return None, 0
    hit = np.isin(idx.module, mods)
    flags = idx.sub_flags(filt)
    if flags is not None:
        hit &= flags
    cand = np.nonzero(hit)[0]
    if len(cand) == 0:
        return None, 0
    cand = cand[np.argsort(idx.seq[cand])]
    later = cand[idx.seq[cand] > after_seq]
    j = int(later[0]) if len(later) else int(cand[0])
    return idx.canonical((idx.step, "e", j)), len(cand)


def locate(tm: "TraceModel", idx: StepIndex, seq: int, module: str) -> tuple[str, int]:
    """The tree item (kind, local row) of step ``idx`` that a finding at execution-order position
    ``seq`` in ``module`` points at: the call of ``module`` that spans ``seq``; else the call,
    reshape or probe at ``seq``; else the call of ``module`` nearest to ``seq``; else the step node."""
    s = idx.step
    calls = np.zeros(0, dtype=np.int64)
    if module:
        mods = np.nonzero(tm.mod_paths == module)[0]
        if len(mods):
            calls = np.nonzero(np.isin(idx.module, mods))[0]
    if len(calls) and seq >= 0:
        # the call that spans seq (an output's position may be the call's return, +1)
        inside = calls[(idx.seq[calls] <= seq) & (seq <= idx.end_seq[calls] + 1)]
        if len(inside):
            item = idx.canonical((s, "e", int(inside[np.argmax(idx.seq[inside])])))
            return item[1], item[2]
    if seq >= 0:
        for kind, seqs in (("r", idx.r_seq), ("p", idx.p_seq), ("e", idx.seq)):
            hit = np.nonzero(seqs == seq)[0]
            if len(hit):
                item = idx.canonical((s, kind, int(hit[0])))
                ev = idx.event_of(item)
                if not module or ev < 0 or tm.module_path(int(idx.module[ev])) == module:
                    return item[1], item[2]
    if len(calls):
        near = calls[np.argmin(np.abs(idx.seq[calls] - seq))] if seq >= 0 else calls[0]
        item = idx.canonical((s, "e", int(near)))
        return item[1], item[2]
    return "s", -1
