"""The rule registry: :data:`RULES` (id -> :class:`Rule`, in registration order), the
:func:`rule` decorator the rule modules register with, and :func:`select_rules`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
    from .._index import TraceIndex
    from .report import Violation

RuleFn = Callable[["TraceIndex"], "list[Violation]"]


@dataclass
class Rule:
    id: str
    description: str
    fn: RuleFn


#: every registered rule, in registration order (the order ``check`` runs and lists them in)
RULES: dict[str, Rule] = {}


def rule(rule_id: str, description: str) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn(ix: TraceIndex) -> list[Violation]`` under ``rule_id`` (``group.name``)."""
    def deco(fn: RuleFn) -> RuleFn:
        RULES[rule_id] = Rule(rule_id, description, fn)
        return fn
    return deco


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
