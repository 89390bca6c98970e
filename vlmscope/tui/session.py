"""What the viewer is looking at: one trace (or two, in diff mode), the filter, check results.

The screens ask the session for tree children and labels; both come from memory once a
step is indexed (``ensure_step``, a worker call). Checks and the diff alignment come from
:mod:`vlmscope.analyze`, run in processes of their own (:mod:`vlmscope.tui.analysis`); the
session owns those processes and kills them when it closes. No textual here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from rich.text import Text

from vlmscope.analyze.status import Status
from vlmscope.trace import TraceError, preflight
from vlmscope.tui import analysis, checks
from vlmscope.tui.data import TraceModel
from vlmscope.tui.diffdata import DiffModel
from vlmscope.tui.items import B_KINDS, DIFF_FILTERS, FILTERS, Item, Violation
from vlmscope.tui.render import node_label, step_label
from vlmscope.tui.stepindex import StepIndex
from vlmscope.tui.styles import STATUS_GLYPH, STATUS_STYLE


class Session:
    def __init__(self, paths: list[str | os.PathLike], maps: list[str] | tuple[str, ...] = (), checks: bool = True):
        if not 1 <= len(paths) <= 2:
            raise ValueError("view takes one trace, or two to diff")
        self.paths = [Path(p) for p in paths]
        self.maps = list(maps or ())
        self.a: TraceModel | None = None
        self.b: TraceModel | None = None
        self.diff: DiffModel | None = None
        self.filter = "all"
        self.checks = bool(checks)
        self.checks_done = False
        self.check_error: str | None = None      # why the checks failed (shown, never hidden)
        self.violations: list[Violation] = []
        self.step_errors: dict[int, str] = {}    # steps that cannot be read: why (one line)
        self.row = 0                             # the selected batch row (r / R), kept across steps
        self.closed = False
        self._jobs: set[analysis.Job] = set()

    @property
    def diff_mode(self) -> bool:
        return len(self.paths) == 2

    # loading (worker) ------------------------------------------------------------
    def open(self) -> None:
        """Open and index the first step of each trace. Raises TraceError (one line) when a trace
        cannot be opened; a damaged first step is only noted (:meth:`step_error`)."""
        for p in self.paths:
            preflight(p)        # a file that would hang HDF5 is refused, not read (docs/trace-format.md)
        self.a = TraceModel(self.paths[0]).load()
        if self.diff_mode:
            self.b = TraceModel(self.paths[1]).load()
            self.diff = DiffModel(self.a, self.b, self.maps)
        if self.a.n_steps:
            try:
                self.ensure_step(0)
            except TraceError:
                pass            # noted: the tree opens, the step shows why it cannot be read

    def ensure_step(self, step: int) -> None:
        """Index ``step`` of each trace: reads HDF5, call from a worker. Raises TraceError (one
        line, also kept for :meth:`step_error`) when the step is damaged."""
        assert self.a is not None
        try:
            if 0 <= step < self.a.n_steps:
                self.a.index(step)
            if self.b is not None and 0 <= step < self.b.n_steps:
                self.b.index(step)
            if self.diff is not None:
                self.diff.cached(step)      # slice the alignment for the step here, not on the UI thread
        except TraceError as e:
            self.step_errors[step] = str(e)
            raise

    def step_error(self, step: int) -> str | None:
        """Why ``step`` cannot be read (None when it can, or was not tried)."""
        return self.step_errors.get(step)

    def ready(self, step: int) -> bool:
        if self.a is None or self.a.cached(step) is None:
            return False
        return self.b is None or step >= self.b.n_steps or self.b.cached(step) is not None

    # batch rows (memory) ------------------------------------------------------------------
    def batch(self, step: int) -> int | None:
        """B of ``step`` of trace A (None until the step is indexed); in diff mode, the larger of
        A's and B's (the selected row applies to both sides, each clamped to its rows)."""
        idx = self.a.cached(step) if self.a is not None else None
        if idx is None:
            return None
        idx_b = self.b.cached(step) if self.b is not None and step < self.b.n_steps else None
        return max(idx.batch, idx_b.batch) if idx_b is not None else idx.batch

    def row_for(self, step: int) -> int:
        """The selected row as ``step`` has it: the last row when the step has fewer rows (another
        call's batch)."""
        return max(0, min(self.row, (self.batch(step) or 1) - 1))

    def move_row(self, step: int, direction: int) -> int | None:
        """r / R: the next (previous) batch row of ``step``, wrapping around; None when the step
        has one row (or is not indexed yet)."""
        b = self.batch(step)
        if b is None or b <= 1:
            return None
        self.row = (self.row_for(step) + direction) % b
        return self.row

    # analysis (worker; each runs vlmscope.analyze in a process) ---------------------------
    def _run(self, fn: Callable, *args, cancelled: Callable[[], bool]):
        return analysis.run_job(fn, *args, cancelled=lambda: self.closed or cancelled(), jobs=self._jobs)

    def run_checks(self, cancelled: Callable[[], bool] = lambda: False) -> list[Violation]:
        """All violations of trace A, by the rules of ``vlmscope check`` (worker). When the
        analysis fails, ``check_error`` says why (the screen shows it) and there are none. Raises
        :class:`~vlmscope.tui.analysis.Cancelled`."""
        assert self.a is not None
        if self.checks:
            try:
                rows = self._run(analysis.check_rows, os.fspath(self.a.path), cancelled=cancelled)
                self.violations = checks.place(self.a, rows)     # reads steps: can fail on a damaged one
            except analysis.Cancelled:
                raise
            except Exception as e:  # noqa: BLE001 - whatever failed on the user's trace is shown, not hidden
                self.check_error = _one_line(e)
                self.violations = []
            self.a.set_violations(self.violations)
        self.checks_done = True
        return self.violations

    def align_traces(self, cancelled: Callable[[], bool] = lambda: False) -> tuple[Item, Status] | None:
        """Align A and B as ``vlmscope diff`` does, and return the first divergence (worker). When
        the alignment fails, ``diff.error`` says why. Raises like :meth:`run_checks`."""
        assert self.diff is not None and self.a is not None and self.b is not None
        try:
            res = self._run(analysis.align_sides, os.fspath(self.a.path), os.fspath(self.b.path), self.maps,
                            cancelled=cancelled)
        except analysis.Cancelled:
            raise
        except Exception as e:  # noqa: BLE001 - whatever failed on the user's traces is shown, not hidden
            self.diff.fail(_one_line(e))
            return None
        try:
            self.diff.set_result(res)      # reads steps: can fail on a damaged one
        except Exception as e:  # noqa: BLE001 - the user's traces (a damaged step): shown, not hidden
            self.diff.fail(_one_line(e))
            return None
        return self.diff.first

    def close(self) -> None:
        """Kill the analysis processes still running and close the traces."""
        self.closed = True
        for job in list(self._jobs):
            job.kill()
        for tm in (self.a, self.b):
            if tm is not None:
                tm.close()

    # tree questions (memory) -------------------------------------------------------
    def index(self, step: int) -> StepIndex | None:
        return self.a.cached(step) if self.a is not None else None

    def model_for(self, item: Item) -> tuple[TraceModel, StepIndex | None]:
        s, kind, _ = item
        if kind in B_KINDS:
            assert self.b is not None
            return self.b, self.b.cached(s)
        assert self.a is not None
        return self.a, self.a.cached(s)

    @staticmethod
    def b_item(item: Item) -> Item:
        """A B-only tree item as an ordinary item of trace B."""
        s, kind, i = item
        return (s, B_KINDS.get(kind, kind), i)

    def label(self, item: Item) -> Text:
        s, kind, _ = item
        if kind == "m":
            return Text(f"… {item[2]} more", "dim italic")
        tm, idx = self.model_for(item)
        if kind == "s":
            return step_label(tm, s, self.diff.step_status(s) if self.diff is not None else None)
        if idx is None:
            return Text("…", "dim")
        if kind in B_KINDS:
            only_b = Status.MISSING_A
            t = Text(STATUS_GLYPH[only_b] + " ", STATUS_STYLE[only_b])
            lab = node_label(tm, idx, self.b_item(item))
            lab.stylize(STATUS_STYLE[only_b])
            t.append_text(lab)
            return t
        return node_label(tm, idx, item, self.diff.status(item) if self.diff is not None else None)

    def children(self, item: Item) -> list[Item]:
        s, kind, _ = item
        tm, idx = self.model_for(item)
        if idx is None:
            return []
        if kind in B_KINDS:
            return self.diff.b_children(item, self.filter) if kind == "b" and self.diff is not None else []
        kids = idx.children(item, self.filter)
        if self.diff is not None and self.diff.cached(s) is not None and kind in ("s", "e"):
            extra = self.diff.b_only_children(item, self.filter)
            if extra:
                kids = list(kids)
                for b_item, anchor in extra:
                    pos = kids.index(anchor) + 1 if anchor in kids else 0
                    # keep earlier B-only items before later ones with the same anchor
                    while pos < len(kids) and kids[pos][1] in B_KINDS:
                        pos += 1
                    kids.insert(pos, b_item)
        return kids

    def has_children(self, item: Item) -> bool:
        s, kind, _ = item
        tm, idx = self.model_for(item)
        if idx is None:
            return kind == "s"
        if kind in ("q", "o"):
            return False
        if kind == "b":
            return self.diff is not None and bool(self.diff.b_children(item, "all"))
        if idx.has_children(item, self.filter):
            return True
        if self.diff is not None and self.diff.cached(s) is not None and kind in ("s", "e"):
            return bool(self.diff.b_only_children(item, self.filter))
        return False

    def cycle_filter(self) -> str:
        filters = DIFF_FILTERS if self.diff_mode else FILTERS
        self.filter = filters[(filters.index(self.filter) + 1) % len(filters)]
        return self.filter

    def visible(self, item: Item) -> bool:
        tm, idx = self.model_for(item)
        if idx is None:
            return item[1] == "s"
        if item[1] in B_KINDS or item[1] == "s":
            return True
        return idx.visible(item, self.filter)

    def output_payloads(self, item: Item) -> list[tuple[int, str, tuple]]:
        """(payload id, tensor name, shape) of the saved tensors of an item's module call."""
        tm, idx = self.model_for(item)
        if idx is None:
            return []
        it = self.b_item(item) if item[1] in B_KINDS else item
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
        if kind not in B_KINDS:
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


def _one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
