"""The navigator: steps, then module calls in call order, expanded lazily.

Children come from the :class:`Session` (memory, once a step is indexed). When a step is
not indexed yet, the navigator posts :class:`Navigator.NeedStep` and the screen loads it
in a worker, then calls :meth:`Navigator.step_ready`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from vlmscope.tui.items import Item
from vlmscope.tui.safe import safe_text

if TYPE_CHECKING:
    from vlmscope.tui.session import Session

#: children added at a time under one node; a "… N more" node loads the next page
PAGE = 400
#: decode steps per group node when there are more than this many
GROUP = 50


class Navigator(Tree[Item]):
    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        # the first and last step (the screen's keys; a tree would scroll to its top and bottom)
        Binding("home", "screen.step_to(0)", "first step", show=False),
        Binding("end", "screen.step_to(-1)", "last step", show=False),
    ]

    class NeedStep(Message):
        """A step must be indexed before its node can show children."""

        def __init__(self, step: int, then: Item | None = None) -> None:
            super().__init__()
            self.step = step
            self.then = then

    def __init__(self, session: "Session", **kwargs) -> None:
        super().__init__("trace", **kwargs)
        self.session = session
        self.show_root = False
        self.guide_depth = 2
        self.auto_expand = True
        self.nodes: dict[Item, TreeNode[Item]] = {}
        self._filled: dict[Item, int] = {}    # item -> children added so far
        self._pending_expand: set[Item] = set()

    # Rendering a tree line looks up five component styles; with thousands of lines re-rendered
    # whenever a node expands, that dominates a step change. They cannot change within one paint.
    def render_lines(self, crop):
        self._style_memo: dict | None = {}
        self._paint_style = self.rich_style
        try:
            return super().render_lines(crop)
        finally:
            self._style_memo = None
            self._paint_style = None

    def render_line(self, y: int):
        style = getattr(self, "_paint_style", None)
        if style is None:
            return super().render_line(y)
        scroll_x, scroll_y = self.scroll_offset
        return self._render_line(y + scroll_y, scroll_x, scroll_x + self.size.width, style)

    def get_component_rich_style(self, *names: str, partial: bool = False, default=None):
        memo = getattr(self, "_style_memo", None)
        if memo is None:
            return super().get_component_rich_style(*names, partial=partial, default=default)
        key = ("rich", names, partial, default)
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = super().get_component_rich_style(*names, partial=partial, default=default)
        return hit

    def get_component_styles(self, *names: str):
        memo = getattr(self, "_style_memo", None)
        if memo is None:
            return super().get_component_styles(*names)
        key = ("styles", names)
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = super().get_component_styles(*names)
        return hit

    def process_label(self, label) -> Text:
        """A label as text: a ``str`` is never parsed as markup, and no control character of a
        trace string gets through (the labels are built from printable names already)."""
        return safe_text(label, newlines=False).split()[0]

    def get_label_width(self, node: TreeNode[Item]) -> int:
        # The default renders every label on every rebuild (thousands of step nodes): the
        # label's cell length plus the icon is all the width needs.
        return node.label.cell_len + 2 if hasattr(node.label, "cell_len") else super().get_label_width(node)

    # building --------------------------------------------------------------------
    def reset(self) -> None:
        """One node per step (collapsed, children loaded on expansion). Long generations put
        the decode steps in groups of :data:`GROUP` (``("g", first step)`` nodes), so that the
        tree stays small whatever the number of steps."""
        self.clear()
        self.nodes.clear()
        self._filled.clear()
        a = self.session.a
        if a is None:
            return
        if a.n_steps <= GROUP + 1:
            for s in range(a.n_steps):
                self._add_step(self.root, s)
            return
        self._add_step(self.root, 0)
        for first in range(1, a.n_steps, GROUP):
            item = group_item(first)
            self.nodes[item] = self.root.add(self._group_label(first), data=item, allow_expand=True)

    def _add_step(self, parent: TreeNode[Item], s: int) -> None:
        item = (s, "s", -1)
        self.nodes[item] = parent.add(self.session.label(item), data=item,
                                      allow_expand=self.session.has_children(item))

    def _group_label(self, first: int) -> Text:
        a = self.session.a
        last = min(first + GROUP, a.n_steps) - 1
        return Text.assemble(("decode ", "bold"), (f"{first}..{last}", "bold"), (f" of {a.n_steps - 1}", "dim"))

    def group_of(self, step: int) -> Item | None:
        a = self.session.a
        if a is None or a.n_steps <= GROUP + 1 or step <= 0:
            return None
        return group_item(1 + ((step - 1) // GROUP) * GROUP)

    def populate(self, node: TreeNode[Item], upto: int = 0) -> None:
        """Add the children of ``node`` (first page, or enough pages to include index ``upto``)."""
        item = node.data
        if item is None:
            return
        if item[1] == "g":
            if item not in self._filled:
                a = self.session.a
                for s in range(item[2], min(item[2] + GROUP, a.n_steps)):
                    self._add_step(node, s)
                self._filled[item] = GROUP
            return
        kids = self.session.children(item)
        have = self._filled.get(item, 0)
        want = min(len(kids), max(PAGE, ((upto // PAGE) + 1) * PAGE))
        if have and want <= have:
            return
        # drop a previous "more" node
        for child in list(node.children):
            if child.data is not None and child.data[1] == "m":
                child.remove()
        for child_item in kids[have:want]:
            self.nodes[child_item] = node.add(self.session.label(child_item), data=child_item,
                                              allow_expand=self.session.has_children(child_item))
        self._filled[item] = want
        if want < len(kids):
            more = (item[0], "m", len(kids) - want)
            node.add_leaf(self.session.label(more), data=more)

    def step_ready(self, step: int) -> None:
        """A step got indexed: relabel its node and fill nodes that waited for it."""
        item = (step, "s", -1)
        node = self.nodes.get(item)
        if node is None:
            return
        node.set_label(self.session.label(item))
        node.allow_expand = self.session.has_children(item)
        if item in self._pending_expand or node.is_expanded:
            self._pending_expand.discard(item)
            self.populate(node)

    def rebuild(self) -> None:
        """Rebuild the tree (its children changed: the diff alignment brought B-only nodes),
        keeping the expanded nodes and the cursor."""
        cur = self.current
        expanded = [it for it, node in self.nodes.items() if node.is_expanded]   # parents first
        self.reset()
        for it in expanded:
            node = self.nodes.get(it)
            if node is not None and node.allow_expand and (it[1] == "g" or self.session.ready(it[0])):
                self.populate(node)
                node.expand()
        if cur is not None and cur[1] != "m" and not self.reveal(cur) and cur in self.nodes:
            self.move_to(self.nodes[cur])

    def relabel(self) -> None:
        """Recompute every label (check results or the alignment arrived)."""
        for item, node in self.nodes.items():
            if item[1] == "s" or (item[1] != "g" and self.session.ready(item[0])):
                node.set_label(self.session.label(item))

    # events ------------------------------------------------------------------------
    def on_tree_node_expanded(self, event: Tree.NodeExpanded[Item]) -> None:
        node = event.node
        item = node.data
        if item is None or item in self._filled:
            return
        if item[1] == "g" or self.session.ready(item[0]):
            self.populate(node)
        else:
            self._pending_expand.add(item)
            self.post_message(self.NeedStep(item[0]))

    def on_tree_node_selected(self, event: Tree.NodeSelected[Item]) -> None:
        node = event.node
        item = node.data
        if item is not None and item[1] == "m" and node.parent is not None:
            event.stop()
            parent = node.parent
            old = self._filled.get(parent.data, 0)
            self.populate(parent, upto=old)
            self.move_to(parent.children[old] if len(parent.children) > old else parent)

    # navigation ----------------------------------------------------------------------
    @property
    def current(self) -> Item | None:
        node = self.cursor_node
        return node.data if node is not None else None

    def refresh_lines(self) -> None:
        """Rebuild line numbers now, so that nodes just added can take the cursor."""
        self._tree_lines  # noqa: B018 - property rebuilds the line cache

    def move_to(self, node: TreeNode[Item]) -> None:
        self.refresh_lines()
        self.move_cursor(node, animate=False)
        self.scroll_to_node(node, animate=False)

    def reveal(self, item: Item) -> bool:
        """Expand the path to ``item`` (its step must be indexed) and put the cursor on it."""
        chain = self.session.ancestors(item) + [item]
        group = self.group_of(item[0]) if item[1] != "g" else None
        if group is not None:
            chain.insert(0, group)
        node: TreeNode[Item] | None = None
        for k, it in enumerate(chain):
            node = self.nodes.get(it)
            if node is None:
                return False
            if k + 1 < len(chain):
                nxt = chain[k + 1]
                if it[1] == "g":
                    self.populate(node)
                elif nxt not in self.nodes or self.nodes[nxt].parent is not node:
                    kids = self.session.children(it)
                    if nxt not in kids:
                        return False
                    self.populate(node, upto=kids.index(nxt))
                if not node.is_expanded:
                    node.expand()
        if node is None:
            return False
        self.move_to(node)
        return True

    def collapse_step(self, step: int, keep_group: int | None = None) -> None:
        """Collapse a step's node (and its group, unless step ``keep_group`` is in it)."""
        node = self.nodes.get((step, "s", -1))
        if node is not None and node.is_expanded:
            node.collapse()
        group = self.group_of(step)
        if group is not None and (keep_group is None or self.group_of(keep_group) != group):
            gnode = self.nodes.get(group)
            if gnode is not None and gnode.is_expanded:
                gnode.collapse()


def group_item(first: int) -> Item:
    """The tree item of the group of decode steps starting at ``first``."""
    return (-1, "g", first)
