"""``vlmscope view``: the Textual viewer. ``ViewerApp`` imports textual (never torch)."""

from __future__ import annotations

from typing import Any

__all__ = ["ViewerApp"]


def __getattr__(name: str) -> Any:
    # Lazy, so that the data modules (and the analysis processes) do not import textual.
    if name == "ViewerApp":
        from vlmscope.tui.app import ViewerApp

        return ViewerApp
    raise AttributeError(f"module 'vlmscope.tui' has no attribute {name!r}")
