"""Benchmark of ``vlmscope view``, driven headless.

Measures, on a synthetic 1M-event trace (:func:`vlmscope.testing.make_trace`):

- time to first screen: from creating the app to the first screen painted with the
  trace's data (header, tree, detail of the first step); target <= 1 s;
- cursor latency: a key press (``j``/``k``, ``n``/``N``) to the detail panel of the new node
  painted; target <= 50 ms;
- step-change latency: ``]``/``[`` (same module selected in the next/previous step) to the
  new step's node and detail painted; target <= 50 ms.

Keys are pressed at a person's pace (``--pace``, 0.15 s apart; 0 sends them back to back,
which measures a held key competing with the viewer's background prefetching), in a
160x48 terminal, after the background check run has finished.

Medians are reported (and the 90th percentile). Run from the repo root::

    python bench/bench_view.py                 # 1M events, writes /tmp/vlmscope-bench-1M.h5 once
    python bench/bench_view.py --events 200000 --runs 3 --no-checks

``--no-checks`` skips the background check run (``vlmscope check``'s rules in a process of their
own, which read the whole trace
and competes for CPU on small machines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textual import events  # noqa: E402

from vlmscope.tui.app import ViewerApp  # noqa: E402
from vlmscope.tui.screens import MainScreen  # noqa: E402

SIZE = (160, 48)


def make(path: Path, n_events: int) -> Path:
    from vlmscope.testing import cached_trace

    t0 = time.perf_counter()
    path, written = cached_trace(path, n_events=n_events)
    if written:
        print(f"wrote {path} ({n_events} events) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


async def painted(app) -> None:
    ev = asyncio.Event()
    app.call_after_refresh(ev.set)
    await ev.wait()


async def until(cond, timeout: float = 5.0) -> bool:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            return False
        await asyncio.sleep(0)
    return True


async def first_screen(path: Path, checks: bool) -> float:
    t0 = time.perf_counter()
    app = ViewerApp([path], checks=checks, freeze_gc=True)   # as `vlmscope view` runs it
    async with app.run_test(size=SIZE):
        ok = await until(lambda: isinstance(app.screen, MainScreen) and app.screen.detail.shown is not None, 30)
        await painted(app)
        dt = time.perf_counter() - t0
        assert ok, "the first screen never came"
    return dt


async def latencies(path: Path, checks: bool, moves: int, steps: int, pace: float) -> dict:
    t_start = time.perf_counter()
    app = ViewerApp([path], checks=checks, freeze_gc=True)   # as `vlmscope view` runs it
    out: dict = {"cursor": [], "layer": [], "step": []}
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: isinstance(app.screen, MainScreen) and app.screen.detail.shown is not None, 30)
        scr = app.screen
        nav = scr.nav

        async def press(key: str) -> float | None:
            await asyncio.sleep(pace)      # a person's pace: background prefetching gets its turn
            before = nav.current
            t0 = time.perf_counter()
            app._driver.send_message(events.Key(key, None))
            ok = await until(lambda: nav.current != before and scr.detail.shown == nav.current
                             and scr.detail.wanted == nav.current)
            if not ok:
                return None
            await painted(app)
            return (time.perf_counter() - t0) * 1000

        # a module deep in the text model: layers.<k>.self_attn of the prefill
        idx = scr.session.a.cached(0)
        a = scr.session.a
        target = next(i for i in range(idx.n) if a.module_path(int(idx.module[i])).endswith("layers.2.self_attn"))
        # steady state: the background check run (a process of its own) has finished
        await until(lambda: scr.session.checks_done, 120)
        out["checks_s"] = round(time.perf_counter() - t_start, 2) if checks else None
        out["violations"] = len(scr.session.violations)
        out["check_error"] = scr.session.check_error
        scr._reveal((0, "e", target))
        await pilot.pause()
        await asyncio.sleep(0.3)
        for k in range(moves):
            dt = await press("j" if k % 4 != 3 else "k")
            if dt is not None:
                out["cursor"].append(dt)
        scr._reveal((0, "e", target))
        await pilot.pause()
        for k in range(min(moves, 20)):
            dt = await press("n" if k % 2 == 0 else "N")
            if dt is not None:
                out["layer"].append(dt)
        scr._reveal((0, "e", target))
        await pilot.pause()
        for k in range(steps):
            dt = await press("right_square_bracket" if k % 5 != 4 else "left_square_bracket")
            if dt is not None:
                out["step"].append(dt)
    return out


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {"n": len(xs), "median": round(statistics.median(xs), 2),
            "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 2), "max": round(xs[-1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--trace", type=Path, default=None, help="use this trace instead of a synthetic one")
    ap.add_argument("--runs", type=int, default=5, help="first-screen runs")
    ap.add_argument("--moves", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--pace", type=float, default=0.15, help="seconds between key presses (0: back to back)")
    ap.add_argument("--size", default="160x48", help="terminal size, WxH")
    args = ap.parse_args()
    global SIZE
    SIZE = tuple(int(x) for x in args.size.lower().split("x"))
    path = args.trace or make(Path(tempfile.gettempdir()) / f"vlmscope-bench-{args.events}.h5", args.events)
    checks = not args.no_checks
    fs = [asyncio.run(first_screen(path, checks)) * 1000 for _ in range(args.runs)]
    lat = asyncio.run(latencies(path, checks, args.moves, args.steps, args.pace))
    report = {
        "trace": str(path), "events": args.events if args.trace is None else None, "checks": checks,
        "pace_s": args.pace, "size": list(SIZE),
        "first_screen_ms": summary(fs), "cursor_ms": summary(lat["cursor"]),
        "layer_ms": summary(lat["layer"]), "step_ms": summary(lat["step"]),
        "checks_done_s": lat["checks_s"], "violations": lat["violations"], "check_error": lat["check_error"],
        "targets": {"first_screen_ms": 1000, "cursor_ms": 50, "step_ms": 50},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
