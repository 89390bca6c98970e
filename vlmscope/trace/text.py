"""Strings from a trace, made safe to show: control characters neutralised.

A trace is the user's file, and every string in it (module paths, class names, the prompt, the
generated text, warnings, error messages, call sites) may hold terminal escape sequences.
Written raw, ``ESC ] 0 ; ... BEL`` retitles the terminal, ``ESC [ 31 m`` restyles it, an
``ESC ] 8`` sequence makes a hyperlink. :func:`printable` writes every such character as a
visible Python-style escape (``\\x1b``, ``\\x9b``, ``\\u202e``), so the string shows as text.

Markup (Rich's ``[bold]``, ``[link=...]``) is not this module's business: the UI layers build
``rich.text.Text`` objects, which never parse markup, from these strings.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["printable", "printable_data", "json_printable", "has_unsafe"]

# C0 controls (and, separately, newline and tab), DEL, C1 controls (0x80-0x9f: 0x9b is a
# one-byte CSI, 0x9d a one-byte OSC), the Unicode line and paragraph separators, the bidi
# embedding/override/isolate controls (text that reads differently than it is), the byte-order
# mark, and lone surrogates (which a UTF-8 terminal cannot even encode).
_CORE = ("\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff"
         "\ud800-\udfff")
_UNSAFE_ONE_LINE = re.compile(f"[{_CORE}\n\t]")
_UNSAFE_LINES = re.compile(f"[{_CORE}]")
_UNSAFE_JSON = re.compile(f"[{_CORE}]")


_SHORT = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(m: re.Match) -> str:
    ch = m.group()
    if ch in _SHORT:
        return _SHORT[ch]
    c = ord(ch)
    if c < 0x100:
        return f"\\x{c:02x}"
    return f"\\u{c:04x}"


def has_unsafe(s: str, newlines: bool = False) -> bool:
    """Whether :func:`printable` would change ``s``."""
    return (_UNSAFE_LINES if newlines else _UNSAFE_ONE_LINE).search(s) is not None


def printable(s: Any, newlines: bool = False) -> str:
    """``s`` (made a ``str``) with every control character written as a visible escape: ESC as
    ``\\x1b``, BEL as ``\\x07``, the C1 CSI as ``\\x9b``. Newline and tab are kept only when
    ``newlines`` is true (a traceback, a multi-line message); a carriage return never is.
    Returns ``s`` itself when there is nothing to change (the common case: one regex scan)."""
    if not isinstance(s, str):
        s = str(s)
    rx = _UNSAFE_LINES if newlines else _UNSAFE_ONE_LINE
    if rx.search(s) is None:
        return s
    return rx.sub(_escape, s)


def printable_data(obj: Any, newlines: bool = False) -> Any:
    """:func:`printable` applied to every string (keys too) in nested dicts, lists and tuples
    (a trace's metadata or error record); other values are returned as they are."""
    if isinstance(obj, str):
        return printable(obj, newlines)
    if isinstance(obj, dict):
        return {printable_data(k, newlines): printable_data(v, newlines) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(printable_data(v, newlines) for v in obj)
    return obj


def json_printable(text: str) -> str:
    """JSON text (one document or JSON lines) with the control characters that ``json.dumps``
    leaves raw (DEL, C1, bidi controls, ``ensure_ascii=False`` output) written as ``\\uXXXX``:
    the same JSON values, safe to print. Newlines (between documents) are kept. Valid only for
    JSON, where such characters can only occur inside strings."""
    if _UNSAFE_JSON.search(text) is None:
        return text
    return _UNSAFE_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
