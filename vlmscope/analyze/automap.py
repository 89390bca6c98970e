"""Which module of one implementation corresponds to which module of another, without a map.

Two traces of one implementation share their module paths: the map is the identity. A port and
its reference do not (``lm.blocks.0.attn.out`` against ``model.language_model.layers.0.self_attn.o_proj``).
:func:`infer_map` pairs them from what both traces record, strongest evidence first:

1. ``--map`` rules the user gave (A's path rewritten onto a B path that exists);
2. identical paths;
3. the recognised structure (stored in each trace's metadata): the roots, the language models,
   the vision towers, the mergers, and decoder layer *i* with decoder layer *i*;
4. inside every pair, its children: the same name and class, then the same role
   (:func:`vlmscope.semantics.module_role`: norm, attention, MLP, projections ...) in call
   order (a layer's first norm with the other's first norm), then, for children left over, the
   same class and output shape in call order; recursively;
5. a module left over whose class is that of a module on the other side under the same pair of
   ancestors (a wrapper's inner tower: ``visual.tower`` and ``model.visual``), by the longest
   common path suffix.

A fused module (a port's ``qkv`` against separate ``q_proj``, ``k_proj``, ``v_proj``) has no
counterpart: the two are compared at the level where they agree (the attention block), and
the map says so in its notes.

The map may pair several modules of A with one module of B (a wrapper and the tower it wraps
both compute B's vision tower); :meth:`ModuleMap.one_to_one` keeps one per B module for the
node-by-node alignment.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from vlmscope.semantics import FUSED_ROLES, MERGER_NAMES, module_role

from ._index import TraceIndex
from .maps import MapRules


@dataclass
class ModuleMap:
    """A's module rows -> B's module rows, how each pair was found, and notes."""

    pairs: dict[int, int] = field(default_factory=dict)
    how: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    identity: bool = False           # the two traces share their module paths
    paths_a: list[str] = field(default_factory=list)
    paths_b: list[str] = field(default_factory=list)

    def one_to_one(self) -> dict[int, int]:
        """One A module per B module: the pair found by the strongest evidence (the first)."""
        seen: dict[int, int] = {}
        for a, b in self.pairs.items():
            if b not in seen or _RANK.get(self.how[a], 9) < _RANK.get(self.how[seen[b]], 9):
                seen[b] = a
        return {a: b for b, a in seen.items()}

    def counterpart(self, a: int) -> str | None:
        b = self.pairs.get(a)
        return None if b is None else self.paths_b[b]

    def unmatched(self) -> tuple[list[int], list[int]]:
        used_b = set(self.pairs.values())
        return ([a for a in range(len(self.paths_a)) if a not in self.pairs],
                [b for b in range(len(self.paths_b)) if b not in used_b])

    def lines(self) -> list[str]:
        """The map as text: one ``A -> B  (how)`` line per pair, then what has no counterpart."""
        w = max((len(self.paths_a[a] or "<root>") for a in self.pairs), default=0)
        out = [f"{(self.paths_a[a] or '<root>'):<{w}}  ->  {self.paths_b[b] or '<root>'}  ({self.how[a]})"
               for a, b in sorted(self.pairs.items())]
        ua, ub = self.unmatched()
        if ua:
            out.append(f"only in A ({len(ua)}): " + ", ".join(self.paths_a[a] for a in ua[:40])
                       + (" ..." if len(ua) > 40 else ""))
        if ub:
            out.append(f"only in B ({len(ub)}): " + ", ".join(self.paths_b[b] for b in ub[:40])
                       + (" ..." if len(ub) > 40 else ""))
        out.extend(f"note: {n}" for n in self.notes)
        return out

    def to_dict(self) -> dict:
        ua, ub = self.unmatched()
        return {"identity": self.identity,
                "pairs": [{"a": self.paths_a[a], "b": self.paths_b[b], "how": self.how[a]}
                          for a, b in sorted(self.pairs.items())],
                "only_in_a": [self.paths_a[a] for a in ua], "only_in_b": [self.paths_b[b] for b in ub],
                "notes": list(self.notes)}


_RANK = {"--map": 0, "same path": 1, "structure": 2, "name": 3, "role": 4, "class+shape": 5, "inner": 6}


class _Tree:
    """One trace's module tree: paths, classes, roles, children in call order, output shapes."""

    def __init__(self, ix: TraceIndex):
        self.ix = ix
        self.paths = [str(p) for p in ix.module_paths]
        self.classes = [str(c) for c in ix.module_classes]
        parent = ix.modules["parent"].astype(np.int64) if len(ix.modules) else np.zeros(0, np.int64)
        self.parent = parent
        n = len(self.paths)
        # first call of each module: (step, seq) order; never called: after everything
        order = np.full(n, np.iinfo(np.int64).max, np.int64)
        first_ev = np.full(n, -1, np.int64)
        if ix.n_rows("events"):
            mod = ix.col("events", "module").astype(np.int64)
            key = ix.col("events", "step").astype(np.int64) * (1 << 32) + ix.col("events", "seq").astype(np.int64)
            o = np.lexsort((key, mod))
            m_sorted = mod[o]
            starts = np.r_[0, np.nonzero(np.diff(m_sorted))[0] + 1] if len(o) else np.zeros(0, np.int64)
            ok = (m_sorted[starts] >= 0) & (m_sorted[starts] < n)
            order[m_sorted[starts][ok]] = key[o[starts]][ok]
            first_ev[m_sorted[starts][ok]] = o[starts][ok]
        self.order = order
        self.first_ev = first_ev
        self.children: list[list[int]] = [[] for _ in range(n)]
        for i in range(n):
            p = int(parent[i])
            if 0 <= p < n and p != i:
                self.children[p].append(i)
        for ch in self.children:
            ch.sort(key=lambda c: (int(order[c]), c))
        self.roles = [""] * n
        for i in self._preorder():
            p = int(parent[i])
            self.roles[i] = module_role(self.paths[i].rpartition(".")[2], self.classes[i],
                                        self.roles[p] if 0 <= p < n else "")
        self._shapes: dict[int, tuple] = {}

    def _preorder(self) -> list[int]:
        roots = [i for i in range(len(self.paths)) if not (0 <= int(self.parent[i]) < len(self.paths))]
        out, stack = [], list(reversed(roots))
        seen = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            out.append(i)
            stack.extend(reversed(self.children[i]))
        out.extend(i for i in range(len(self.paths)) if i not in seen)
        return out

    def index(self, path: str | None) -> int:
        if path is None:
            return -1
        try:
            return self.paths.index(path)
        except ValueError:
            return -1

    def out_shape(self, m: int) -> tuple:
        """Shape of the first output tensor of the module's first call (() when none)."""
        if m in self._shapes:
            return self._shapes[m]
        shape: tuple = ()
        e = int(self.first_ev[m])
        if e >= 0:
            ev = self.ix.fetch("events", np.array([e]))[0]
            n = int(ev["tensor_count"])
            if n:
                rows = self.ix.fetch("tensors", np.arange(int(ev["tensor_start"]), int(ev["tensor_start"]) + n))
                outs = rows[rows["role"] == 2]
                if len(outs):
                    r = outs[0]
                    shape = tuple(int(d) for d in r["shape"][: int(r["ndim"])])
        self._shapes[m] = shape
        return shape

    def under(self, m: int, anc: int) -> bool:
        while m >= 0:
            if m == anc:
                return True
            p = int(self.parent[m])
            m = p if p != m and 0 <= p < len(self.paths) else -1
        return False


def infer_map(A: TraceIndex, B: TraceIndex, rules: MapRules | None = None) -> ModuleMap:
    """The module map from A to B (see the module docstring)."""
    if rules is None or not (rules.modules or rules.args):
        pa, pb = [str(p) for p in A.module_paths], [str(p) for p in B.module_paths]
        common = set(pa) & set(pb)
        if len(common) >= 0.9 * max(len(set(pa)), len(set(pb)), 1):
            # one implementation: the identity (read from the module tables alone)
            bi = {p: i for i, p in enumerate(pb)}
            mm = ModuleMap(paths_a=pa, paths_b=pb, identity=True)
            for a, p in enumerate(pa):
                if p in bi:
                    mm.pairs[a], mm.how[a] = bi[p], "same path"
            return mm
    ta, tb = _Tree(A), _Tree(B)
    mm = ModuleMap(paths_a=ta.paths, paths_b=tb.paths)
    b_index = {p: i for i, p in enumerate(tb.paths)}
    used_b: set[int] = set()

    def pair(a: int, b: int, how: str) -> None:
        if a >= 0 and b >= 0 and a not in mm.pairs:
            mm.pairs[a] = b
            mm.how[a] = how
            used_b.add(b)

    if rules is not None and (rules.modules or rules.args):
        for a, p in enumerate(ta.paths):
            q = rules.map_module(p)
            if q != p and q in b_index:
                pair(a, b_index[q], "--map")
    same = [a for a, p in enumerate(ta.paths) if p in b_index]
    for a in same:
        pair(a, b_index[ta.paths[a]], "same path")
    n_called_a = int((ta.order < np.iinfo(np.int64).max).sum())
    called_same = sum(1 for a in same if ta.order[a] < np.iinfo(np.int64).max)
    if n_called_a and called_same >= 0.9 * n_called_a:
        mm.identity = True
        return mm

    # the recognised structure
    anchors: list[tuple[int, int]] = []
    for key in ("text_model", "vision_model", "merger"):
        a, b = ta.index(_meta_path(A, key)), tb.index(_meta_path(B, key))
        if a >= 0 and b >= 0:
            anchors.append((a, b))
    anchors.append((ta.index(""), tb.index("")))
    la, lb = A.layer_paths, B.layer_paths
    for i in sorted(set(la) & set(lb)):
        anchors.append((ta.index(la[i]), tb.index(lb[i])))
    if la and lb and len(la) != len(lb):
        mm.notes.append(f"A has {len(la)} decoder layers and B {len(lb)}: the first {min(len(la), len(lb))} are paired")
    for a, b in anchors:
        pair(a, b, "structure")

    # children of every pair, recursively
    todo = list(mm.pairs.items())
    done: set[tuple[int, int]] = set()
    while todo:
        a, b = todo.pop()
        if (a, b) in done:
            continue
        done.add((a, b))
        for ca, cb, how in _match_children(ta, tb, a, b, mm, used_b):
            pair(ca, cb, how)
            todo.append((ca, cb))
        _note_fused(ta, tb, a, b, mm, used_b)

    # wrappers: a module left over with the class of a B module under the same pair of ancestors
    for a in ta._preorder():
        if a in mm.pairs:
            continue
        anc = _paired_ancestor(ta, a, mm)
        if anc is None:
            continue
        ancb = mm.pairs[anc]
        cands = [b for b in range(len(tb.paths)) if tb.classes[b] == ta.classes[a] and tb.under(b, ancb)]
        if not cands:
            continue
        best = max(_suffix(ta.paths[a], tb.paths[b]) for b in cands)
        top = [b for b in cands if _suffix(ta.paths[a], tb.paths[b]) == best]
        if len(top) == 1:
            pair(a, top[0], "inner")
            todo = [(a, top[0])]
            while todo:
                x, y = todo.pop()
                for ca, cb, how in _match_children(ta, tb, x, y, mm, used_b):
                    pair(ca, cb, how)
                    todo.append((ca, cb))
                _note_fused(ta, tb, x, y, mm, used_b)
    return mm


def _meta_path(ix: TraceIndex, key: str) -> str | None:
    if key == "text_model":
        return ix.text_model_path
    if key == "vision_model":
        return ix.vision_path
    p = ix.meta.get(key)
    if p:
        return str(p)
    if key == "merger":
        cands = [str(x) for x in ix.module_paths if str(x).rpartition(".")[2] in MERGER_NAMES]
        return min(cands, key=lambda x: x.count(".")) if cands else None
    return None


def _paired_ancestor(t: _Tree, a: int, mm: ModuleMap) -> int | None:
    p = int(t.parent[a])
    while 0 <= p < len(t.paths):
        if p in mm.pairs:
            return p
        q = int(t.parent[p])
        if q == p:
            break
        p = q
    return None


def _suffix(pa: str, pb: str) -> int:
    xa, xb = pa.split("."), pb.split(".")
    n = 0
    while n < min(len(xa), len(xb)) and xa[-1 - n] == xb[-1 - n]:
        n += 1
    return n


def _match_children(ta: _Tree, tb: _Tree, a: int, b: int, mm: ModuleMap, used_b: set[int]) -> list[tuple[int, int, str]]:
    ca = [c for c in ta.children[a] if c not in mm.pairs]
    cb = [c for c in tb.children[b] if c not in used_b]
    out: list[tuple[int, int, str]] = []
    if not ca or not cb:
        return out
    # the same name and class
    nb = {(tb.paths[c].rpartition(".")[2], tb.classes[c]): c for c in cb}
    for c in list(ca):
        hit = nb.get((ta.paths[c].rpartition(".")[2], ta.classes[c]))
        if hit is not None and hit in cb:
            out.append((c, hit, "name"))
            ca.remove(c)
            cb.remove(hit)
    # the same role, in call order (numbered lists: the same index)
    for role in dict.fromkeys(ta.roles[c] for c in ca):
        if role in ("other", "act"):
            continue
        xa = [c for c in ca if ta.roles[c] == role]
        xb = [c for c in cb if tb.roles[c] == role]
        if xa and len(xa) == len(xb):
            for x, y in zip(xa, xb):
                out.append((x, y, "role"))
                ca.remove(x)
                cb.remove(y)
    # what is left: the same class and output shape, in call order; a lone called child each
    called = lambda t, c: t.order[c] < np.iinfo(np.int64).max  # noqa: E731
    xa = [c for c in ca if called(ta, c)]
    xb = [c for c in cb if called(tb, c)]
    if len(xa) == 1 and len(xb) == 1 and ta.roles[xa[0]] == tb.roles[xb[0]] and ta.out_shape(xa[0]) == tb.out_shape(xb[0]):
        out.append((xa[0], xb[0], "class+shape"))
        return out
    for x in xa:
        for y in xb:
            if ta.classes[x] == tb.classes[y] and ta.out_shape(x) == tb.out_shape(y) and ta.out_shape(x):
                out.append((x, y, "class+shape"))
                xb.remove(y)
                break
    return out


def _note_fused(ta: _Tree, tb: _Tree, a: int, b: int, mm: ModuleMap, used_b: set[int]) -> None:
    """Say where one side fuses what the other splits (compared at the enclosing pair)."""
    ra = {ta.roles[c]: c for c in ta.children[a] if c not in mm.pairs}
    rb = {tb.roles[c]: c for c in tb.children[b] if c not in used_b}
    for fused, parts in FUSED_ROLES.items():
        for x, y, one, other in ((ra, rb, ta, tb), (rb, ra, tb, ta)):
            if fused in x and all(p in y for p in parts):
                side = "A" if one is ta else "B"
                mm.notes.append(
                    f"{side}'s {one.paths[x[fused]]} fuses {'B' if side == 'A' else 'A'}'s "
                    f"{', '.join(other.paths[y[p]].rpartition('.')[2] for p in parts)}: compared at "
                    f"{ta.paths[a] or '<root>'} <-> {tb.paths[b] or '<root>'}")


def in_scope(path: str, only: list[str] | None, ignore: list[str] | None) -> bool:
    """``--only`` / ``--ignore``: glob patterns over module paths; a pattern also covers what lies
    below a matching module (``lm.blocks.1`` covers ``lm.blocks.1.attn``)."""
    def hit(pats: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(path, p) or any(fnmatch.fnmatchcase(path[:i], p)
                                                       for i in _prefix_ends(path)) for p in pats)
    if only and not hit(only):
        return False
    return not (ignore and hit(ignore))


def _prefix_ends(path: str) -> list[int]:
    return [i for i, ch in enumerate(path) if ch == "."]
