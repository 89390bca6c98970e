"""Handing results from worker threads to the UI thread."""

from __future__ import annotations

from typing import Any, Callable


def to_ui(app, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``app.call_from_thread``, except that a result arriving while the app shuts down is
    dropped instead of raising in the worker (which would print a traceback on exit)."""
    try:
        app.call_from_thread(fn, *args, **kwargs)
    except RuntimeError:
        pass
