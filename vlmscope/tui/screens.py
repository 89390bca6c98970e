"""The main screen: the header, the tree, the detail panel, the step context and the keys.

The modal screens (help, payload, the message for a bad file) are in :mod:`vlmscope.tui.modals`.
"""

from __future__ import annotations

import gc

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Input
from textual.worker import get_current_worker

from vlmscope.analyze.status import Status
from vlmscope.trace import TraceError
from vlmscope.tui import checks, navigate
from vlmscope.tui.analysis import Cancelled
from vlmscope.tui.items import B_KINDS, FILTER_LABELS, Item
from vlmscope.tui.modals import KEYS, HelpScreen, MessageScreen, PayloadScreen
from vlmscope.tui.session import Session
from vlmscope.tui.ui import to_ui
from vlmscope.tui.widgets.context import ContextPanel
from vlmscope.tui.widgets.detail import DetailPanel
from vlmscope.tui.widgets.header import TraceHeader
from vlmscope.tui.widgets.navigator import Navigator
from vlmscope.tui.widgets.search import GotoBar, SearchBar
from vlmscope.tui.widgets.strips import render_strips
from vlmscope.tui.widgets.summary import DiffSummary

#: the kind of a requested place "the k-th divergence of step s" (k < 0: from the end), resolved
#: once the step is indexed (d / D pressed towards a step still loading)
DIV_MARK = "D"

__all__ = ["KEYS", "HelpScreen", "MainScreen", "MessageScreen", "PayloadScreen"]


class MainScreen(Screen):
    BINDINGS = [
        Binding("n", "layer(1)", "next layer", show=False),
        Binding("N", "layer(-1)", "prev layer", show=False),
        Binding("right_square_bracket", "step(1)", "step", key_display="]"),
        Binding("left_square_bracket", "step(-1)", "step", show=False, key_display="["),
        # priority: run before the next key is handed to the focused widget, so ':7<enter>' or
        # '/merger' typed in one burst lands in the bar the key opens
        Binding("colon", "goto", "go to step", show=False, key_display=":", priority=True),
        Binding("home", "step_to(0)", "first step", show=False),
        Binding("end", "step_to(-1)", "last step", show=False),
        Binding("G", "step_to(-1)", "last step", show=False),
        Binding("slash", "search", "search", key_display="/", priority=True),
        Binding("f", "filter", "filter"),
        Binding("c", "context", "context"),
        Binding("r", "row(1)", "next row", show=False),
        Binding("R", "row(-1)", "prev row", show=False),
        Binding("g", "first_divergence", "1st diff", show=False),
        Binding("d", "divergence(1)", "next diff", show=False),
        Binding("D", "divergence(-1)", "prev diff", show=False),
        Binding("e", "next_violation", "next ✗"),
        Binding("p", "payload", "payload", show=False),
    ]

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self.step = 0
        self.query_text = ""
        self.opened = False
        # The last requested place whose step is still loading: (step, item), item None for "the
        # same module in that step" (] [ : Home End). A newer request replaces it; ] counts from it.
        self.pending: tuple[int, Item | None] | None = None
        self._fetching: int | None = None     # the step the request worker is loading

    # layout --------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield TraceHeader(id="header")
        if self.session.diff_mode:
            yield DiffSummary(id="summary")
        with Horizontal(id="body"):
            yield Navigator(self.session, id="navigator")
            yield DetailPanel(self.session, id="detail")
        yield ContextPanel(self.session, id="context")
        yield SearchBar(id="search")
        yield GotoBar(id="goto")
        yield Footer()

    def on_mount(self) -> None:
        self.nav = self.query_one(Navigator)
        self.detail = self.query_one(DetailPanel)
        self.context = self.query_one(ContextPanel)
        self.query_one(TraceHeader).show_loading([p.name for p in self.session.paths])
        self.context.display = False
        self.query_one(SearchBar).display = False
        self.query_one(GotoBar).display = False
        if self.session.diff_mode:
            self.query_one(DiffSummary).show_pending()
        self.nav.focus()
        self._open()

    # opening (worker) -------------------------------------------------------------------
    @work(thread=True, group="open")
    def _open(self) -> None:
        try:
            self.session.open()
        except TraceError as e:
            to_ui(self.app, self._failed, str(e))
            return
        except (OSError, ValueError) as e:
            to_ui(self.app, self._failed, f"{type(e).__name__}: {e}")
            return
        to_ui(self.app, self._opened)

    def _failed(self, message: str) -> None:
        self.app.switch_screen(MessageScreen("cannot open the trace", message))

    def _opened(self) -> None:
        self.opened = True
        a = self.session.a
        assert a is not None
        self.nav.reset()
        self._header()
        if a.n_steps:
            node = self.nav.nodes[(0, "s", -1)]
            self.nav.populate(node)
            node.expand()
            self.nav.move_to(node)
            self._cursor((0, "s", -1))
        else:
            self.detail.set_strips(render_strips(
                Text("this trace has no complete step" + (f" ({a.status})" if a.status != "complete" else ""),
                     "bold yellow"), 60))
        if self.session.checks:
            self.query_one(TraceHeader).checks_started()    # "checking… 3s" until _checks_done
        self._checks()
        if self.session.diff_mode:
            self._first_divergence()
        self._prefetch(1)
        if getattr(self.app, "freeze_gc", False):
            self.call_after_refresh(gc.freeze)

    # analysis (workers waiting on vlmscope.analyze processes) -------------------------------
    @work(thread=True, group="checks")
    def _checks(self) -> None:
        worker = get_current_worker()
        try:
            self.session.run_checks(lambda: worker.is_cancelled)
        except Cancelled:
            return
        if not worker.is_cancelled:
            to_ui(self.app, self._checks_done)

    def _checks_done(self) -> None:
        self.query_one(TraceHeader).checks_finished()
        if self.session.check_error:
            self.notify(f"checks failed: {self.session.check_error}", severity="error", timeout=10)
            self._header()
        elif self.session.checks:
            text, severity = checks.done_message(self.session.violations)
            self.notify(text, severity=severity, timeout=5)
        self.nav.relabel()
        self.detail.redraw()
        self.context.show_step(self.step, force=True)    # expected values beside failing positions

    @work(thread=True, group="diff")
    def _first_divergence(self) -> None:
        worker = get_current_worker()
        try:
            first = self.session.align_traces(lambda: worker.is_cancelled)
        except Cancelled:
            return
        if not worker.is_cancelled:
            to_ui(self.app, self._aligned, first)

    def _aligned(self, first: tuple[Item, Status] | None) -> None:
        """The alignment arrived (or failed): statuses, B-only nodes and the first divergence."""
        summary = self.query_one(DiffSummary)
        diff = self.session.diff
        if diff is not None and diff.error:
            summary.show_failed(diff.error)
            self.notify(f"alignment failed: {diff.error}", severity="error", timeout=10)
            return
        if first is None and diff is not None and diff.unplaced:
            summary.show_unplaced(diff.unplaced)
        else:
            res = diff.result if diff is not None else None
            summary.show_first(None if first is None else self._where(first[0]), None if first is None else first[1],
                               res.culprit if res is not None else None,
                               first_is_culprit=res is not None and res.first_is_culprit)
        self.nav.rebuild()
        self.detail.redraw()

    def _where(self, item: Item) -> str:
        """A divergence's place for the summary line: the step, the module, the op of a reshape."""
        tm, idx = self.session.model_for(item)
        where = tm.step_name(item[0])
        if idx is not None:
            ev = idx.event_of(self.session.b_item(item) if item[1] in B_KINDS else item)
            if ev >= 0:
                where += " " + tm.module_name(int(idx.module[ev]))
            if item[1] in ("r", "q"):   # a reshape: its op
                r = idx.reshapes[item[2]]
                where += f" {tm.s(int(r['op']))}"
        return where

    @work(thread=True, group="prefetch", exclusive=True)
    def _prefetch(self, step: int) -> None:
        """Index the steps around ``step`` (next first) so that ] and [ find them ready."""
        a = self.session.a
        worker = get_current_worker()
        for s in (step, step + 1, step - 2):
            if worker.is_cancelled:
                return
            if a is not None and 0 <= s < a.n_steps and not self.session.ready(s) \
                    and self.session.step_error(s) is None:
                try:
                    self.session.ensure_step(s)
                except TraceError:      # a damaged step: noted by the session, shown when visited
                    continue
                to_ui(self.app, self._prefetched, s)

    def _prefetched(self, step: int) -> None:
        self._arrived(step)
        if self.detail.shown is not None and self.detail.shown == self.detail.wanted:
            self._warm_neighbours(self.detail.shown)

    def _arrived(self, step: int) -> None:
        """Step ``step`` got indexed (or turned out damaged): fill what waited for it."""
        self.nav.step_ready(step)
        self.detail.step_ready(step)
        if step == self.step:
            self._header()      # its batch row ("row 1 (2/3)") is known now

    @work(thread=True, group="load")
    def _load_step(self, step: int) -> None:
        """Index a step the tree or the detail panel waits for (a node expanded, a click)."""
        try:
            self.session.ensure_step(step)
        except TraceError as e:
            to_ui(self.app, self._step_failed, step, str(e))
            return
        to_ui(self.app, self._arrived, step)

    def _step_failed(self, step: int, message: str) -> None:
        self._arrived(step)
        self._damaged(step)

    def _damaged(self, step: int) -> None:
        error = self.session.step_error(step)
        if error is not None:
            self.notify(f"step {step}: {error}", severity="error", timeout=6)

    @on(Navigator.NeedStep)
    def _need_step(self, message: Navigator.NeedStep) -> None:
        if message.then is not None:
            self._request(message.step, message.then)
        elif self.session.step_error(message.step) is None:
            self._load_step(message.step)

    # requests: the last one wins ------------------------------------------------------
    def _request(self, step: int, item: Item | None) -> None:
        """Go to ``item`` (None: the same module in ``step``) once ``step`` is indexed. One worker
        loads requested steps, one at a time: when it finishes, only the latest request is
        carried out, and the worker goes on to its step if that is not indexed yet."""
        self.pending = (step, item)
        if self._fetching is None:
            self._fetching = step
            self._fetch(step)

    @work(thread=True, group="request")
    def _fetch(self, step: int) -> None:
        try:
            self.session.ensure_step(step)
        except TraceError:      # the session keeps why; the step's node shows it
            pass
        to_ui(self.app, self._fetched, step)

    def _fetched(self, step: int) -> None:
        self._fetching = None
        self._arrived(step)
        pending = self.pending
        if pending is None:
            return
        if pending[0] != step and not self._settled(pending[0]):
            self._request(*pending)         # a newer request: load its step now
            return
        self.pending = None
        if pending[1] is None:
            self._go_step(self._from_item(), pending[0])
        elif pending[1][1] == DIV_MARK:
            self._reveal_divergence(pending[1])
        else:
            self._reveal(pending[1])

    def _settled(self, step: int) -> bool:
        """Whether ``step`` is indexed, or known to be damaged (nothing more to wait for)."""
        return self.session.ready(step) or self.session.step_error(step) is not None

    # cursor ---------------------------------------------------------------------------
    @on(Navigator.NodeHighlighted)
    def _highlighted(self, event: Navigator.NodeHighlighted) -> None:
        if event.node.data is not None:
            self._cursor(event.node.data)

    def _cursor(self, item: Item) -> None:
        if item[1] == "g":
            self.detail.show(item)
            return
        if not self._settled(item[0]) and self._fetching != item[0]:
            self._load_step(item[0])
        if item[0] != self.step:
            self.step = item[0]
            self._header()
            self.context.show_step(self.step)
            self.call_after_refresh(self._prefetch, self.step + 1)
        self.detail.show(item)

    @on(DetailPanel.Shown)
    def _shown(self, message: DetailPanel.Shown) -> None:
        # after the paint: background work must not compete with it
        self.call_after_refresh(self._warm_neighbours, message.item)

    def _warm_neighbours(self, item: Item) -> None:
        """Pre-render what ] and [ would show from ``item`` (when those steps are indexed)."""
        a = self.session.a
        if a is None or item[1] not in ("s", "e", "r", "p") or self.session.diff_mode:
            return
        src = a.cached(item[0])
        if src is None:
            return
        targets = []
        for t in (item[0] + 1, item[0] - 1):
            dst = a.cached(t) if 0 <= t < a.n_steps else None
            if dst is not None:
                target = navigate.same_in_step(a, src, item, dst)
                if self.session.visible(target):
                    targets.append(target)
        if targets:
            self.detail.warm(targets)

    def _header(self) -> None:
        a = self.session.a
        if a is not None and a.loaded:
            b = self.session.batch(self.step)
            self.query_one(TraceHeader).show(a, self.step, self.session.filter, self.session.b, self.query_text,
                                             checks_failed=bool(self.session.check_error),
                                             row=(self.session.row_for(self.step), b) if b and b > 1 else None)

    @property
    def current(self) -> Item | None:
        return self.nav.current

    def _reveal(self, item: Item) -> bool:
        """Show ``item`` in the tree (switching the filter to "all" when it hides the item). An item
        of a step not indexed yet is requested (:meth:`_request`): shown when its step arrives."""
        if not self.session.ready(item[0]):
            if self.session.step_error(item[0]) is None:
                self._request(item[0], item)
                return True
            item = (item[0], "s", -1)       # a damaged step: its node says why
            self._damaged(item[0])
        self.pending = None
        if not self.session.visible(item):
            self.session.filter = "all"
            self.nav.reset()
            self.notify("filter set to all to show it")
        ok = self.nav.reveal(item)
        if ok:
            self._cursor(item)
        return ok

    # actions --------------------------------------------------------------------------
    def action_layer(self, direction: int) -> None:
        cur = self.current
        a = self.session.a
        if cur is None or a is None or (cur[1] in B_KINDS or cur[1] == "m") or not self.session.ready(cur[0]):
            return
        target = navigate.next_same_depth(a, a.cached(cur[0]), cur, direction > 0, self.session.filter)
        if target is None:
            self.notify("no " + ("next" if direction > 0 else "previous") + " module at this depth", timeout=2)
            return
        self._reveal(target)

    def _from_item(self) -> Item:
        """The item a step key starts from: the cursor's (a group node stands for its step)."""
        cur = self.current or (self.step, "s", -1)
        return (self.step, "s", -1) if cur[1] == "g" else cur

    def action_step(self, direction: int) -> None:
        """] and [: counted from the last requested step (quick presses all land), not from the
        step shown while the requested one still loads."""
        a = self.session.a
        if a is None or not a.n_steps:
            return
        base = self.pending[0] if self.pending is not None else self._from_item()[0]
        t = base + direction
        if not 0 <= t < a.n_steps:
            self.notify("no " + ("next" if direction > 0 else "previous") + " step", timeout=2)
            return
        self.step_to(t)

    def action_step_to(self, step: int) -> None:
        """Home (0), End and G (-1: the last step)."""
        a = self.session.a
        if a is None or not a.n_steps:
            return
        self.step_to(step if step >= 0 else a.n_steps + step)

    def step_to(self, t: int) -> None:
        """Go to step ``t``, the same module selected (as ] does), now or once the step is indexed."""
        a = self.session.a
        if a is None or not 0 <= t < a.n_steps:
            return
        if self._settled(t):
            self.pending = None
            self._go_step(self._from_item(), t)
        else:
            self._request(t, None)

    def _typing(self, char: str) -> bool:
        """A priority key pressed while a text bar has the focus is text: type it there."""
        if isinstance(self.focused, Input):
            self.focused.insert_text_at_cursor(char)
            return True
        return False

    def action_goto(self) -> None:
        if self._typing(":"):
            return
        a = self.session.a
        if a is None or not a.n_steps:
            return
        bar = self.query_one(GotoBar)
        bar.open(a.n_steps)
        self.set_focus(bar)     # now, not after a refresh: keys typed right after ':' go to the bar

    @on(GotoBar.Goto)
    def _goto(self, message: GotoBar.Goto) -> None:
        a = self.session.a
        if a is None:
            return
        if not 0 <= message.step < a.n_steps:
            self.notify(f"no step {message.step}: this trace has steps 0..{a.n_steps - 1}", severity="warning",
                        timeout=3)
            return
        self.step_to(message.step)

    @on(GotoBar.Closed)
    def _goto_closed(self) -> None:
        self.query_one(GotoBar).display = False
        self.nav.focus()

    def _go_step(self, cur: Item, t: int) -> None:
        a = self.session.a
        assert a is not None
        src_item = cur
        if cur[1] in B_KINDS or cur[1] == "m":
            anc = self.session.ancestors(cur)
            src_item = next((x for x in reversed(anc) if x[1] in ("s", "e")), (cur[0], "s", -1))
        src, dst = a.cached(src_item[0]), a.cached(t)
        if dst is None:                 # a damaged step: its node, which says why
            target: Item = (t, "s", -1)
            self._damaged(t)
        elif src is None:
            target = (t, "s", -1)
        else:
            target = navigate.same_in_step(a, src, src_item, dst)
        # keep the filter: climb to the nearest visible ancestor
        while dst is not None and not self.session.visible(target):
            anc = dst.ancestors(target)
            target = anc[-1] if anc else (t, "s", -1)
        old_node = self.nav.nodes.get((cur[0], "s", -1))
        was_open = old_node is not None and old_node.is_expanded
        self.nav.collapse_step(cur[0], keep_group=t)
        self._reveal(target)
        if target[1] == "s" and was_open:
            node = self.nav.nodes.get(target)
            if node is not None and node.allow_expand and not node.is_expanded:
                self.nav.populate(node)
                node.expand()

    def action_search(self) -> None:
        if self._typing("/"):
            return
        bar = self.query_one(SearchBar)
        bar.display = True
        self.set_focus(bar)     # now, not after a refresh: '/merger' typed fast keeps its letters

    @on(SearchBar.Search)
    def _search(self, message: SearchBar.Search) -> None:
        a = self.session.a
        query = message.query.strip()
        if a is None or not query:
            return
        cur = self.current or (self.step, "s", -1)
        if cur[1] == "g":
            cur = (self.step, "s", -1)
        idx = a.cached(cur[0])
        if idx is None:
            return
        it = cur if not (cur[1] in B_KINDS or cur[1] == "m") else (cur[0], "s", -1)
        item, count = navigate.search(a, idx, query, idx.seq_of(it), self.session.filter)
        self.query_text = f"{query} ({count} in this step)"
        self._header()
        if item is None:
            self.notify(f"no module path matches {query!r} in this step", severity="warning", timeout=3)
            return
        self._reveal(item)
        self.query_one(SearchBar).focus()

    @on(SearchBar.Closed)
    def _search_closed(self) -> None:
        bar = self.query_one(SearchBar)
        bar.display = False
        self.nav.focus()

    def action_filter(self) -> None:
        cur = self.current
        self.session.cycle_filter()
        self.nav.reset()
        self._header()
        target = cur if cur is not None else (self.step, "s", -1)
        if target[1] == "m":
            target = (target[0], "s", -1)
        if target[1] not in B_KINDS:
            idx = self.session.index(target[0])
            while idx is not None and not self.session.visible(target):
                anc = idx.ancestors(target)
                target = anc[-1] if anc else (target[0], "s", -1)
        else:
            target = (target[0], "s", -1)
        if self.session.ready(target[0]):
            self.nav.reveal(target)
            self._cursor(target)
            node = self.nav.nodes.get(target)
            if node is not None and node.allow_expand and not node.is_expanded:
                self.nav.populate(node)
                node.expand()
        self.notify(f"filter: {FILTER_LABELS[self.session.filter]}", timeout=2)

    def action_context(self) -> None:
        ctx = self.context
        ctx.display = not ctx.display
        if ctx.display:
            self.call_after_refresh(ctx.show_step, self.step, True)

    def action_row(self, direction: int) -> None:
        """r and R: the next / previous batch row of a batched step (wrapping around); the header
        and the context panel show it."""
        a = self.session.a
        if a is None or not a.n_steps:
            return
        b = self.session.batch(self.step)
        if b is None:
            self.notify("the step is still loading", timeout=2)
            return
        if self.session.move_row(self.step, direction) is None:
            self.notify("this step has one batch row", timeout=2)
            return
        self._header()
        self.context.show_step(self.step)

    def action_first_divergence(self) -> None:
        diff = self.session.diff
        if not self._diff_usable("g"):
            return
        assert diff is not None
        if diff.first is None and diff.unplaced:
            self.notify(f"first divergence (no node to go to): {diff.unplaced}", timeout=6)
        elif diff.first is None:
            self.notify("no divergence: A and B agree", timeout=3)
        else:
            self._reveal(diff.first[0])

    def _diff_usable(self, key: str) -> bool:
        """Whether the alignment is in; else say why ``key`` does nothing."""
        diff = self.session.diff
        if diff is None:
            self.notify(f"{key} works in diff mode (vlmscope view A.h5 B.h5)", timeout=3)
        elif diff.error:
            self.notify(f"alignment failed: {diff.error}", severity="error", timeout=5)
        elif not diff.done:
            self.notify("still aligning A and B …", timeout=2)
        else:
            return True
        return False

    def action_divergence(self, direction: int) -> None:
        """d and D: the next / previous divergent item (module call, reshape, probe, item only in B)
        in execution order, across steps. Counted from the last requested one (quick presses all
        land), else from the cursor."""
        if not self._diff_usable("d" if direction > 0 else "D"):
            return
        diff = self.session.diff
        assert diff is not None and self.session.a is not None
        pend = self.pending[1] if self.pending is not None else None
        if pend is not None and pend[1] == DIV_MARK:
            k = pend[2] + direction
            if (pend[2] >= 0) == (k >= 0):      # still inside that step's list: wait for it
                self._request(pend[0], (pend[0], DIV_MARK, k))
                return
            base: Item = (pend[0], "s", -1)
        elif pend is not None:
            base = pend
        else:
            base = self._from_item()
            if base[1] == "m":
                base = (base[0], "s", -1)
        lst = diff.divergences(base[0])
        if lst is None:     # its step is still loading: count from the step's start
            lst, base = [], (base[0], "s", -1)
        target = self._in_step(lst, base, direction)
        if target is not None:
            self._reveal(target)
            return
        n = self.session.a.n_steps
        t = base[0] + direction
        while 0 <= t < n:
            if diff.has_divergence(t):
                lst = diff.divergences(t)
                if lst is None:
                    self._request(t, (t, DIV_MARK, 0 if direction > 0 else -1))
                elif lst:
                    self._reveal(lst[0] if direction > 0 else lst[-1])
                else:
                    t += direction
                    continue
                return
            t += direction
        self.notify("no " + ("next" if direction > 0 else "previous") + " divergence" +
                    ("" if diff.first is not None else ": A and B agree"), timeout=2)

    def _in_step(self, lst: list[Item], base: Item, direction: int) -> Item | None:
        """The divergent item of the step's list ``lst`` after (before) ``base``."""
        if base in lst:
            k = lst.index(base) + direction
            return lst[k] if 0 <= k < len(lst) else None
        idx = self.session.index(base[0])
        if base[1] == "s" or base[1] == "g" or idx is None:
            return (lst[0] if lst else None) if direction > 0 else None
        here = idx.seq_of(base) if base[1] in ("e", "r", "p") else -1
        diff = self.session.diff
        assert diff is not None
        seqs = diff.divergence_keys(base[0])
        if direction > 0:
            return next((x for x, q in zip(lst, seqs) if q > here), None)
        return next((x for x, q in zip(reversed(lst), reversed(seqs)) if q < here), None)

    def _reveal_divergence(self, mark: Item) -> None:
        """A "k-th divergence of step s" request whose step arrived."""
        diff = self.session.diff
        lst = diff.divergences(mark[0]) if diff is not None else None
        if not lst:
            self._reveal((mark[0], "s", -1))
            return
        k = max(-len(lst), min(mark[2], len(lst) - 1))
        self._reveal(lst[k])

    def action_next_violation(self) -> None:
        a, session = self.session.a, self.session
        if a is None:
            return
        if not session.checks:
            self.notify("checks are off", timeout=3)
            return
        if not session.checks_done:
            self.notify("checks are still running …", timeout=2)
            return
        if session.check_error:
            self.notify(f"checks failed: {session.check_error}", severity="error", timeout=5)
            return
        vs = [v for v in a.violations if v.item is not None]
        if not vs:
            n = len(a.violations)
            self.notify(f"{n} check(s) fail, none at a node of the tree" if n else "no check fails in this trace",
                        timeout=3)
            return
        cur = self.current or (self.step, "s", -1)
        idx = a.cached(cur[0])
        here = (cur[0], idx.seq_of(cur) if idx is not None and cur[1] in ("s", "e", "r", "p") else -1)
        nxt = next((v for v in vs if v.order > here), vs[0])
        self._reveal(nxt.item)
        self.notify(f"✗ {nxt.rule}: {nxt.message}", timeout=4)

    def action_payload(self) -> None:
        cur = self.current
        if cur is None:
            return
        payloads = self.session.output_payloads(cur)
        if not payloads:
            self.notify("no saved tensor here (record with --save-tensors GLOB)", timeout=3)
            return
        tm, _ = self.session.model_for(cur)
        self.app.push_screen(PayloadScreen(tm, payloads))
