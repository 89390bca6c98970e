"""The detail panel: everything about the selected node, built in a worker.

For a module call: inputs, outputs and tensor kwargs with stats, the probes it received,
its reshape chain and the source line of each reshape. In diff mode: the deltas, then A
and B side by side (stacked when the panel is narrow).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work
from textual.message import Message
from textual.worker import get_current_worker

from vlmscope.analyze.status import Status
from vlmscope.semantics import fmt_shape
from vlmscope.trace import ROLE_NAMES, ROLE_OUTPUT
from vlmscope.tui.data import TraceModel, fmt_num
from vlmscope.tui.items import B_KINDS, Item
from vlmscope.tui.render import event_detail, probe_detail, reshape_detail, section, shape_of_row, step_detail
from vlmscope.tui.stepindex import StepIndex
from vlmscope.tui.styles import DIM, STATUS_GLYPH, STATUS_STYLE, STATUS_TEXT
from vlmscope.tui.ui import to_ui
from vlmscope.tui.widgets.strips import StripView, render_strips

if TYPE_CHECKING:
    from vlmscope.tui.session import Session

WIDE = 80


def item_detail(tm: TraceModel, idx: StepIndex, item: Item, width: int) -> list[RenderableType]:
    _, kind, i = item
    if kind == "s":
        return step_detail(tm, idx, width >= WIDE)
    if kind == "e":
        return event_detail(tm, idx, i, width >= WIDE)
    if kind == "r":
        return reshape_detail(tm, idx, i)
    if kind == "p":
        return probe_detail(tm, idx, i, width)
    return [Text("")]


def violation_lines(session: "Session", item: Item) -> list[RenderableType]:
    a = session.a
    if a is None or not a.violations or item[1] in B_KINDS or item[1] == "m":
        return []
    s, kind, i = item
    idx = a.cached(s)
    if idx is None:
        return []
    mine = {item, (s, "e", idx.event_of(item))} if kind in ("s", "e") else {item}
    hits = [v for v in a.violations if v.item in mine]
    if not hits:
        return []
    out: list[RenderableType] = [section(f"failing checks ({len(hits)})")]
    for v in hits[:20]:
        out.append(Text.assemble(("✗ ", "bold red"), (v.rule, "bold"), "  ", v.message))
    return out


def _delta_label(key: tuple[int, str]) -> Text:
    role, name = key
    t = Text(name, "bold")
    if role != ROLE_OUTPUT:
        t.append(f" ({ROLE_NAMES[role]})", DIM)
    t.append("  ")
    return t


def _only(status: Status) -> Text:
    return Text(STATUS_TEXT[status], STATUS_STYLE[status])


def _tensor_delta(a: TraceModel, b: TraceModel, r, other) -> Text | None:
    """How an aligned pair of tensors differs: shape/dtype, else the stats that moved."""
    sa, sb = shape_of_row(r), shape_of_row(other)
    da, db = a.s(int(r["dtype"])), b.s(int(other["dtype"]))
    if sa != sb or da != db:
        return Text.assemble((f"{fmt_shape(sa)} {da}", ""), " -> ", (f"{fmt_shape(sb)} {db}", "bold red"))
    parts = []
    for f in ("mean", "std", "min", "max"):
        x, y = float(r[f]), float(other[f])
        if x != y and not (x != x and y != y):
            parts.append(f"Δ{f} {fmt_num(y - x)}")
    for f in ("nan", "inf"):
        if int(r[f]) != int(other[f]):
            parts.append(f"{f} {int(r[f])}->{int(other[f])}")
    return Text("  ".join(parts), "yellow") if parts else None


def _tensor_deltas(session: "Session", ia: StepIndex, ib: StepIndex, a_item: Item) -> list[RenderableType]:
    """The tensors of a call and its partner that the alignment finds different (reads tensor rows)."""
    a, b, diff = session.a, session.b, session.diff
    ev_a = ia.event_of(a_item)       # a step node stands for its root call: that call's partner
    partner = diff.partner((a_item[0], "e", ev_a)) if ev_a >= 0 else None
    if partner is None:
        return []
    ev_b = partner[2]
    pairs, only_b = diff.tensor_pairs(ia, ib, ev_a, ev_b)
    out: list[RenderableType] = []
    for r, other, status in pairs:
        label = _delta_label((int(r["role"]), a.s(int(r["name"]))))
        if other is None:
            out.append(label + _only(Status.MISSING_B))
        elif status != Status.SAME:
            delta = _tensor_delta(a, b, r, other)
            out.append(label + (delta if delta is not None else Text(STATUS_TEXT[status], STATUS_STYLE[status])))
    for r in only_b:
        out.append(_delta_label((int(r["role"]), b.s(int(r["name"])))) + _only(Status.MISSING_A))
    return out or [Text("no difference in tensors", DIM)]


def _reshape_deltas(a: TraceModel, b: TraceModel, ra, rb) -> list[RenderableType]:
    out: list[RenderableType] = []
    for f, lab in (("in_shapes", "in"), ("args", "args")):
        x, y = a.s(int(ra[f])), b.s(int(rb[f]))
        out.append(Text.assemble((f"{lab} ", DIM), x, *(((" -> ", ""), (y, "bold red")) if x != y else ())))
    xa = fmt_shape(shape_of_row(ra, "out_shape", "out_ndim"))
    xb = fmt_shape(shape_of_row(rb, "out_shape", "out_ndim"))
    out.append(Text.assemble(("out ", DIM), xa, *(((" -> ", ""), (xb, "bold red")) if xa != xb else ())))
    return out


def _probe_deltas(a: TraceModel, b: TraceModel, pa, pb) -> list[RenderableType]:
    ia_info, ib_info = a.probe_info(pa), b.probe_info(pb)
    keys = sorted(set(ia_info) | set(ib_info))
    diff = [k for k in keys if ia_info.get(k) != ib_info.get(k)]
    out: list[RenderableType] = [
        Text.assemble((f"{k} ", DIM), str(ia_info.get(k)), " -> ", (str(ib_info.get(k)), "bold red")) for k in diff[:12]]
    return out or [Text("same values summary", DIM)]


def deltas(session: "Session", a_item: Item, b_item: Item) -> list[RenderableType]:
    """What differs between an aligned pair."""
    a, b = session.a, session.b
    assert a is not None and b is not None
    ia, ib = a.cached(a_item[0]), b.cached(b_item[0])
    if ia is None or ib is None:
        return []
    kind = a_item[1]
    if kind in ("s", "e"):
        body = _tensor_deltas(session, ia, ib, a_item)
    elif kind == "r":
        body = _reshape_deltas(a, b, ia.reshapes[a_item[2]], ib.reshapes[b_item[2]])
    elif kind == "p":
        body = _probe_deltas(a, b, ia.probes[a_item[2]], ib.probes[b_item[2]])
    else:
        body = []
    return [section("deltas (B - A)")] + body if body else []


def build(session: "Session", item: Item, width: int) -> RenderableType:
    """The whole detail for ``item`` (may read HDF5: worker)."""
    if item[1] == "m":
        return Text("press enter to load more", DIM)
    if item[1] == "g":
        a = session.a
        last = min(item[2] + 50, a.n_steps if a is not None else 0) - 1
        return Text.assemble(("decode steps ", "bold"), f"{item[2]}..{last}", ("  (enter expands)", DIM))
    tm, idx = session.model_for(item)
    if idx is None:
        error = session.step_error(item[0])
        if error is not None:
            return Text(f"cannot read step {item[0]}: {error}", "bold red")
        return Text("loading …", DIM)
    if item[1] in B_KINDS:
        only_b = Status.MISSING_A
        head = Text.assemble((STATUS_GLYPH[only_b] + " " + STATUS_TEXT[only_b], STATUS_STYLE[only_b]))
        return Group(head, *item_detail(tm, idx, session.b_item(item), width))
    status = session.diff.status(item) if session.diff is not None else None
    if status is None:     # one trace, or the alignment is not in yet
        return Group(*violation_lines(session, item), *item_detail(tm, idx, item, width))
    return _diff_detail(session, item, status, width)


def _diff_detail(session: "Session", item: Item, status: Status, width: int) -> RenderableType:
    """An A item in diff mode: its status, failing checks, the deltas, then A and B side by side."""
    tm, idx = session.model_for(item)
    partner = session.diff.partner(item)
    parts: list[RenderableType] = [Text.assemble((f"{STATUS_GLYPH[status]} {STATUS_TEXT[status]}".strip(),
                                                  STATUS_STYLE[status] or "green"))]
    parts += violation_lines(session, item)
    if partner is not None and status != Status.SAME:
        parts += deltas(session, item, partner)
    half = width // 2 if width >= WIDE else width
    a_parts = item_detail(tm, idx, item, half)
    b_parts: list[RenderableType] = [Text("missing in B", STATUS_STYLE[Status.MISSING_B])]
    if partner is not None and session.b is not None:
        ib = session.b.cached(partner[0])
        if ib is not None:
            b_parts = item_detail(session.b, ib, partner, half)
    if width >= WIDE:
        grid = Table.grid(padding=(0, 2), expand=True)
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        grid.add_row(Text("A", "bold reverse"), Text("B", "bold reverse"))
        grid.add_row(Group(*a_parts), Group(*b_parts))
        parts.append(grid)
    else:
        parts += [Text(" A ", "bold reverse"), *a_parts, Text(" B ", "bold reverse"), *b_parts]
    return Group(*parts)


class DetailPanel(StripView):
    """Scrollable detail of the node under the cursor, rendered in a worker."""

    class Shown(Message):
        """The detail of ``item`` is on screen."""

        def __init__(self, item: Item) -> None:
            super().__init__()
            self.item = item

    #: rendered details kept (moving back and forth costs nothing); strips are many small
    #: objects, so the garbage collector pays for every one kept
    CACHE = 24

    def __init__(self, session: "Session", **kwargs) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.wanted: Item | None = None
        self.shown: Item | None = None
        self.renderable: RenderableType = Text("")
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()
        self.generation = 0     # bumped when checks or the alignment change what a node shows
        self.placeholder = False    # what is shown waits for its step ("loading …"): see step_ready

    def on_mount(self) -> None:
        self.set_strips(render_strips(Text("opening …", DIM), 20))

    def _width(self) -> int:
        return max(20, self.scrollable_content_region.width or self.size.width or 80)

    def show(self, item: Item | None) -> None:
        if item is None or item == self.wanted:
            return
        self.wanted = item
        width = self._width()
        hit = self._cache.get((item, width, self.generation))
        if hit is not None:
            self._cache.move_to_end((item, width, self.generation))
            self._set(item, None, hit, False)
            return
        self._load(item, width)

    def waiting(self, item: Item) -> bool:
        """Whether ``item``'s detail can only say "loading …" now (its step is not indexed)."""
        if item[1] in ("g", "m"):
            return False
        return self.session.model_for(item)[1] is None

    def step_ready(self, step: int) -> None:
        """Step ``step`` got indexed (or failed): a node of it shown as "loading …" is built now."""
        item = self.wanted
        if item is not None and item[0] == step and self.placeholder:
            self.wanted = None
            self.show(item)

    def redraw(self) -> None:
        """Rebuild the shown node (its checks or diff status changed)."""
        self.generation += 1
        self._cache.clear()
        item, self.wanted = self.wanted, None
        self.show(item)

    def on_resize(self) -> None:
        if self.wanted is not None and self.shown is not None:
            self._load(self.wanted, self._width(), True)

    def warm(self, items: list[Item]) -> None:
        """Render the details of nodes the user is likely to go to next (the same module in the
        next and previous steps) in the background, so that ] and [ find them ready."""
        width = self._width()
        todo = [it for it in items if (it, width, self.generation) not in self._cache]
        if todo:
            self._warm(todo, width, self.generation)

    @work(thread=True, exclusive=True, group="warm")
    def _warm(self, items: list[Item], width: int, generation: int) -> None:
        worker = get_current_worker()
        for item in items:
            if worker.is_cancelled:
                return
            if self.waiting(item):
                continue
            try:
                content = build(self.session, item, width)
                strips = render_strips(content, width)
            except Exception:  # noqa: BLE001 - the user's file (a damaged row): _load shows the message
                continue
            if not worker.is_cancelled:
                to_ui(self.app, self._store, (item, width, generation), strips)

    def _store(self, key: tuple, strips) -> None:
        if key[2] == self.generation:
            self._cache[key] = strips
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)

    @work(thread=True, exclusive=True, group="detail")
    def _load(self, item: Item, width: int, keep_scroll: bool = False) -> None:
        worker = get_current_worker()
        placeholder = self.waiting(item)    # "loading …" (or why the step cannot be read): never cached
        try:
            content = build(self.session, item, width)
            strips = render_strips(content, width)
        except Exception as e:  # noqa: BLE001 - the user's file (damaged rows): a message, not a traceback
            content = Text(f"cannot show this node: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                           "bold red")
            strips = render_strips(content, width)
        if not worker.is_cancelled:
            to_ui(self.app, self._set, item, content, strips, keep_scroll, None if placeholder else width,
                  placeholder)

    def _set(self, item: Item, content: RenderableType | None, strips, keep_scroll: bool,
             width: int | None = None, placeholder: bool = False) -> None:
        if width is not None:
            self._store((item, width, self.generation), strips)
        if item != self.wanted:
            return
        if content is not None:
            self.renderable = content
        self.set_strips(strips, keep_scroll)
        self.shown = item
        self.placeholder = placeholder
        if placeholder and not self.waiting(item):     # the step arrived while this was built
            self.wanted = None
            self.show(item)
            return
        self.post_message(self.Shown(item))
