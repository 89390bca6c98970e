"""Assertions on a command's result, for the tests of the CLI (click's ``CliRunner``)."""

from __future__ import annotations

from typing import Any


def one_line_error(result: Any, *needles: str, code: int = 2) -> str:
    """The command failed with exit ``code`` and exactly one line on stderr, ``vlmscope: error:
    ...``, no traceback, mentioning every one of ``needles``. Returns the line."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlmscope: error: "), result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
