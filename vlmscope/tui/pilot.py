"""Driving the viewer headless through Textual's Pilot: wait until it is idle, press keys.
Used by ``view --screenshot`` (``export.py``) and by the viewer's tests."""

from __future__ import annotations

import asyncio

from textual.worker import WorkerState


async def settle(pilot, timeout: float = 30.0) -> None:
    """Wait until no worker runs (checks, alignment, step loads, the context's drawing) and the
    screen has caught up; ``TimeoutError`` after ``timeout`` seconds."""
    app = pilot.app
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    for _ in range(2):
        await pilot.pause()
        while any(w.state in (WorkerState.PENDING, WorkerState.RUNNING) for w in app.workers):
            if loop.time() > end:
                raise TimeoutError(f"the viewer was still busy after {timeout:.0f} s")
            await asyncio.sleep(0.01)
        await pilot.pause()


async def press(pilot, *keys: str, timeout: float = 30.0) -> None:
    """Press each key and let the viewer settle after it."""
    for k in keys:
        await pilot.press(k)
        await settle(pilot, timeout)


def notes_of(app) -> list[str]:
    """Record the app's notifications (their messages) from now on, into the returned list."""
    notes: list[str] = []
    notify = app.notify

    def record(message, **kwargs):
        notes.append(str(message))
        return notify(message, **kwargs)

    app.notify = record
    return notes
