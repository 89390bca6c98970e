"""``--map`` rules: regex rewrites of trace A's module paths and argument names, so that two
implementations with different module trees can be aligned (``vlmscope diff --map``, the viewer's
diff mode). The one parser of them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

@dataclass
class MapRules:
    """Regex rewrite rules applied (in order, with ``re.sub``) to trace A's names."""

    modules: list[tuple[re.Pattern, str]] = field(default_factory=list)
    args: list[tuple[re.Pattern, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.modules or self.args)

    def map_module(self, path: str) -> str:
        for pat, repl in self.modules:
            path = pat.sub(repl, path)
        return path

    def map_arg(self, name: str) -> str:
        for pat, repl in self.args:
            name = pat.sub(repl, name)
        return name


def _split_rule(spec: str) -> tuple[str, str]:
    if " => " in spec:
        a, b = spec.split(" => ", 1)
        return a.strip(), b.strip()
    depth, esc, klass = 0, False, False
    for i, ch in enumerate(spec):
        if esc:
            esc = False
            continue
        if ch == "\\":
            esc = True
        elif klass:
            klass = ch != "]"
        elif ch == "[":
            klass = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == "=" and depth == 0:
            return spec[:i], spec[i + 1:]
    raise ValueError(f"bad --map rule {spec!r}: expected 'a_regex=b_replacement'")


def parse_maps(specs: Iterable[str] | str | MapRules | None) -> MapRules:
    """Build :class:`MapRules` from rule strings and/or rule files.

    A spec is ``a_regex=b_replacement`` (or ``a_regex => b_replacement``), optionally
    prefixed by ``arg:`` to rewrite argument names; ``@FILE`` or the path of an existing
    file reads one rule per line (``#`` starts a comment). Raises ``ValueError`` on a bad rule.
    """
    if isinstance(specs, MapRules):
        return specs
    rules = MapRules()
    if specs is None:
        return rules
    if isinstance(specs, str):
        specs = [specs]
    for spec in specs:
        spec = str(spec)
        path = spec[1:] if spec.startswith("@") else spec
        if spec.startswith("@") or ("=" not in spec and os.path.isfile(path)) or \
                (os.path.isfile(path) and not re.search(r"[\\(\[]", spec)):
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise ValueError(f"cannot read map file {path}: {e.strerror}") from None
            sub = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            inner = parse_maps(sub)
            rules.modules += inner.modules
            rules.args += inner.args
            continue
        target = rules.modules
        if spec.startswith("arg:"):
            spec, target = spec[4:], rules.args
        a, b = _split_rule(spec)
        try:
            pat = re.compile(a)
            pat.sub(b, "")   # validates group references in the replacement
        except re.error as e:
            raise ValueError(f"bad --map rule {spec!r}: {e}") from None
        target.append((pat, b))
    return rules
