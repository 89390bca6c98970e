"""What the viewer is looking at: one trace (or two, in diff mode), the filter, check results.

The screens ask the session for tree children and labels; both come from memory once a
step is indexed (``ensure_step``, a worker call). No textual here.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.text import Text

from vlmscope.tui.data import FILTERS, Item, StepIndex, TraceModel, Violation
from vlmscope.tui.diffdata import DiffModel
from vlmscope.tui.render import ONLY_B, STATUS_GLYPH, STATUS_STYLE, node_label, step_label


class Session:
    def __init__(self, paths: list[str | os.PathLike], maps: list[str] | tuple[str, ...] = (), checks: str = "auto",
                 align: str = "auto"):
        if not 1 <= len(paths) <= 2:
            raise ValueError("view takes one trace, or two to diff")
        self.paths = [Path(p) for p in paths]
        self.maps = list(maps or ())
        self.a: TraceModel | None = None
        self.b: TraceModel | None = None
        self.diff: DiffModel | None = None
        self.filter = "all"
        self.check_engine = ""
        self.checks_done = False
        if checks not in ("auto", "builtin", "off"):
            raise ValueError(f"checks must be auto, builtin or off, not {checks!r}")
        self.checks = checks
        if align not in ("auto", "builtin"):
            raise ValueError(f"align must be auto or builtin, not {align!r}")
        self.align = align
        self.violations: list[Violation] = []

    @property
    def diff_mode(self) -> bool:
        return len(self.paths) == 2

    # loading (worker) ------------------------------------------------------------
    def open(self) -> None:
        """Open and index the first step of each trace. Raises TraceError (one line)."""
        self.a = TraceModel(self.paths[0]).load()
        if self.diff_mode:
            self.b = TraceModel(self.paths[1]).load()
            self.diff = DiffModel(self.a, self.b, self.maps)
        if self.a.n_steps:
            self.ensure_step(0)

    def ensure_step(self, step: int) -> None:
        """Index ``step`` (and align it in diff mode): reads HDF5, call from a worker."""
        assert self.a is not None
        if 0 <= step < self.a.n_steps:
            self.a.index(step)
        if self.diff is not None and self.b is not None:
            if not hasattr(self.diff, "a_paths"):
                self.diff.prepare()
            if 0 <= step < self.b.n_steps:
                self.b.index(step)
            if step < self.diff.n_steps:
                self.diff.step_align(step)

    def ready(self, step: int) -> bool:
        if self.a is None or self.a.cached(step) is None:
            return False
        if self.diff is not None and step < self.diff.n_steps:
            return self.diff.cached(step) is not None and self.b is not None and self.b.cached(step) is not None
        return True

    def run_checks(self, cancelled=lambda: False) -> list[Violation]:
        """Failing check rules for trace A (worker): the analyze package's rules when present,
        else the built-in minimum (calls or reshapes that raised, NaN/Inf in outputs)."""
        assert self.a is not None
        from vlmscope.tui import checks

        if self.checks == "off":
            self.violations, self.check_engine = [], "no"
        elif self.checks == "builtin":
            self.violations, self.check_engine = checks.builtin_violations(self.a, cancelled), "built-in"
        else:
            self.violations, self.check_engine = checks.violations(self.a, cancelled)
        self.a.set_violations(self.violations)
        self.checks_done = True
        return self.violations

    def align_traces(self, cancelled=lambda: False):
        """Switch to the analyze alignment when asked and available, then find the first
        divergence (worker)."""
        from vlmscope.tui.diffdata import external_alignment

        assert self.diff is not None and self.a is not None and self.b is not None
        if self.align == "auto":
            ext = external_alignment(self.a, self.b, self.maps, cancelled)
            if ext is not None and not cancelled():
                self.diff.set_external(ext)
        return self.diff.find_first(cancelled)

    def close(self) -> None:
        for tm in (self.a, self.b):
            if tm is not None:
                tm.close()

    # tree questions (memory) -------------------------------------------------------
    def index(self, step: int) -> StepIndex | None:
        return self.a.cached(step) if self.a is not None else None

    def model_for(self, item: Item) -> tuple[TraceModel, StepIndex | None]:
        s, kind, _ = item
        if kind in ("b", "q"):
            assert self.b is not None
            return self.b, self.b.cached(s)
        assert self.a is not None
        return self.a, self.a.cached(s)

    @staticmethod
    def b_item(item: Item) -> Item:
        """A B-only tree item as an ordinary item of trace B."""
        s, kind, i = item
        return (s, {"b": "e", "q": "r"}.get(kind, kind), i)

    def label(self, item: Item) -> Text:
        s, kind, _ = item
        if kind == "m":
            return Text(f"… {item[2]} more", "dim italic")
        tm, idx = self.model_for(item)
        if kind == "s":
            return step_label(tm, s, self.diff.step_status(s) if self.diff is not None else None)
        if idx is None:
            return Text("…", "dim")
        if kind in ("b", "q"):
            t = Text(STATUS_GLYPH[ONLY_B] + " ", STATUS_STYLE[ONLY_B])
            lab = node_label(tm, idx, self.b_item(item))
            lab.stylize(STATUS_STYLE[ONLY_B])
            t.append_text(lab)
            return t
        status = self.diff.status(item) if self.diff is not None and self.diff.cached(s) is not None else None
        return node_label(tm, idx, item, status)

    def children(self, item: Item) -> list[Item]:
        s, kind, _ = item
        tm, idx = self.model_for(item)
        if idx is None:
            return []
        if kind in ("b", "q"):
            if kind == "q":
                return []
            kids = idx.children(self.b_item(item), "all" if self.filter == "failing" else self.filter)
            return [(s, {"e": "b", "r": "q"}[k], j) for (_, k, j) in kids if k in ("e", "r")]
        kids = idx.children(item, self.filter)
        if self.diff is not None and self.diff.cached(s) is not None and kind in ("s", "e"):
            extra = self.diff.b_only_children(item, self.filter)
            if extra:
                kids = list(kids)
                for b_item, anchor in extra:
                    pos = kids.index(anchor) + 1 if anchor in kids else 0
                    # keep earlier B-only items before later ones with the same anchor
                    while pos < len(kids) and kids[pos][1] in ("b", "q"):
                        pos += 1
                    kids.insert(pos, b_item)
        return kids

    def has_children(self, item: Item) -> bool:
        s, kind, _ = item
        tm, idx = self.model_for(item)
        if idx is None:
            return kind == "s"
        if kind == "q":
            return False
        if kind == "b":
            return idx.has_children(self.b_item(item), "all")
        if idx.has_children(item, self.filter):
            return True
        if self.diff is not None and self.diff.cached(s) is not None and kind in ("s", "e"):
            return bool(self.diff.b_only_children(item, self.filter))
        return False

    def cycle_filter(self) -> str:
        self.filter = FILTERS[(FILTERS.index(self.filter) + 1) % len(FILTERS)]
        return self.filter

    def visible(self, item: Item) -> bool:
        tm, idx = self.model_for(item)
        if idx is None:
            return item[1] == "s"
        if item[1] in ("b", "q", "s"):
            return True
        return idx.visible(item, self.filter)

    def output_payloads(self, item: Item) -> list[tuple[int, str, tuple]]:
        """(payload id, tensor name, shape) of the saved tensors of an item's module call."""
        tm, idx = self.model_for(item)
        if idx is None:
            return []
        it = self.b_item(item) if item[1] in ("b", "q") else item
        ev = idx.event_of(it)
        if ev < 0:
            return []
        rows = idx.event_tensors(tm, ev)
        out = []
        for r in rows[rows["payload"] >= 0]:
            nd = int(r["ndim"])
            out.append((int(r["payload"]), tm.s(int(r["name"])), tuple(int(d) for d in r["shape"][:nd])))
        return out

    def ancestors(self, item: Item) -> list[Item]:
        """Tree path from the step node to the item's parent (B-only items included)."""
        s, kind, i = item
        if kind not in ("b", "q"):
            idx = self.index(s)
            return idx.ancestors(item) if idx is not None else []
        assert self.b is not None and self.diff is not None
        ib = self.b.cached(s)
        al = self.diff.cached(s)
        if ib is None or al is None:
            return [(s, "s", -1)]
        chain: list[Item] = []
        cur = self.b_item(item)
        while True:
            p = ib.parent_item(cur)
            if p is None:
                break
            if p[1] == "s":
                chain.append(p)
                break
            a_i = int(al.b_to_a[p[2]])
            if a_i >= 0:
                ia = self.a.cached(s) if self.a is not None else None
                a_item = ia.canonical((s, "e", a_i)) if ia is not None else (s, "e", a_i)
                chain.extend([a_item] + (ia.ancestors(a_item)[::-1] if ia is not None else []))
                break
            chain.append((s, "b", p[2]))
            cur = p
        return chain[::-1]

