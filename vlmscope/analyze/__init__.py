"""Trace analysis: ``check``, ``diff``, ``align``, ``expect`` and shape ``snapshot``s.

Needs only the trace reader and numpy: importing this package never imports torch or
textual. Every function accepts a :class:`vlmscope.Trace` or a path.
"""

from __future__ import annotations

from .align import Alignment, MapRules, align, parse_maps
from .check import RULES, CheckReport, Violation, check, select_rules
from .diff import DiffReport, diff
from .expect import ExpectResult, ShapeMismatch, expect
from .snapshot import compare_snapshots, compare_to_file, load_snapshot, snapshot, snapshot_text, write_snapshot

__all__ = [
    "align", "Alignment", "MapRules", "parse_maps",
    "check", "CheckReport", "Violation", "RULES", "select_rules",
    "diff", "DiffReport",
    "expect", "ExpectResult", "ShapeMismatch",
    "snapshot", "snapshot_text", "write_snapshot", "load_snapshot", "compare_snapshots", "compare_to_file",
]
