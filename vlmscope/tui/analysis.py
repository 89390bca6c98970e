"""The viewer's link to :mod:`vlmscope.analyze`: checks and the diff alignment, run in a process.

The viewer has no analysis of its own. ``vlmscope.analyze.check.check`` finds the violations and
``vlmscope.analyze.align.align`` (with ``vlmscope.analyze.diff.diff`` for the first divergence)
aligns two traces, exactly as ``vlmscope check`` and ``vlmscope diff`` do. Their rules read whole
tables (a 1M-event trace takes seconds and about a gigabyte), so each call runs in a process of
its own (:class:`Job`, a one-worker :class:`~concurrent.futures.ProcessPoolExecutor`): the
viewer's memory and its UI thread stay free, and a job can be killed when its screen closes.

The functions that run in the worker (:func:`check_rows`, :func:`align_sides`) return plain,
picklable results: dicts of the violations' fields, numpy arrays of partners and statuses.
This module imports no textual (a worker process imports it).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vlmscope.analyze.status import MISSING_A, MISSING_B

#: the fields of ``vlmscope.analyze.check.Violation`` the viewer shows
CHECK_FIELDS = ("rule", "step", "module", "expected", "actual", "hint", "severity", "seq")


# --------------------------------------------------------------------------- worker side


def check_rows(path: str) -> list[dict]:
    """All violations of the trace at ``path``, as ``vlmscope check`` reports them (worker)."""
    from vlmscope.analyze.check import check

    report = check(path)
    return [{k: getattr(v, k) for k in CHECK_FIELDS} for v in report.violations]


@dataclass
class Sides:
    """One table of an alignment, per row of each trace: the partner row in the other trace
    (global rows; -1 when none) and the row's status code
    (:class:`vlmscope.analyze.status.Status`; ``MISSING_B`` for A rows without a partner,
    ``MISSING_A`` for such B rows)."""

    partner_a: np.ndarray
    partner_b: np.ndarray
    status_a: np.ndarray
    status_b: np.ndarray


@dataclass
class AlignResult:
    """What the viewer needs of ``align`` + ``diff``: the four tables per row, and the first
    divergence as ``vlmscope diff`` names it (``Divergence.to_dict()``, or None)."""

    events: Sides
    tensors: Sides
    reshapes: Sides
    probes: Sides
    first: dict | None
    same: bool = True               # ``vlmscope diff``'s verdict, whether or not ``first`` can be placed
    headline: str | None = None     # the first divergence as ``vlmscope diff`` prints it
    culprit: str | None = None      # the module ``vlmscope diff`` names as the culprit (when established)
    first_is_culprit: bool = False  # ``first`` is that culprit call (two implementations)


def _sides(tbl, n_a: int, n_b: int) -> Sides:
    """Per-row partners and statuses of one aligned table (``align.Aligned``)."""
    pa, pb = np.full(n_a, -1, np.int64), np.full(n_b, -1, np.int64)
    sa, sb = np.full(n_a, MISSING_B, np.int8), np.full(n_b, MISSING_A, np.int8)
    ha, hb = tbl.a >= 0, tbl.b >= 0
    both = ha & hb
    pa[tbl.a[both]] = tbl.b[both]
    pb[tbl.b[both]] = tbl.a[both]
    sa[tbl.a[ha]] = tbl.status[ha]
    sb[tbl.b[hb]] = tbl.status[hb]
    return Sides(pa, pb, sa, sb)


def align_sides(path_a: str, path_b: str, maps: list[str]) -> AlignResult:
    """Align two traces as ``vlmscope diff`` does (``--map`` rules ``maps``) (worker)."""
    from vlmscope.analyze.diff import diff, diff_alignment
    from vlmscope.trace import open_trace

    ta = open_trace(path_a)
    try:
        tb = open_trace(path_b)
    except BaseException:
        ta.close()
        raise
    try:
        al = diff_alignment(ta, tb, maps or None)   # the module map diff infers, applied
    except BaseException:
        ta.close()
        tb.close()
        raise
    try:
        ta, tb = al.trace_a, al.trace_b
        events = _sides(al.events, len(al.event_status_a), len(al.event_status_b))
        # the per-row event statuses of the alignment itself (the same codes, by construction)
        events.status_a = np.asarray(al.event_status_a, np.int8)
        events.status_b = np.asarray(al.event_status_b, np.int8)
        tables = {name: _sides(getattr(al, name), ta.n_rows(name), tb.n_rows(name))
                  for name in ("tensors", "reshapes", "probes")}
        rep = diff(ta, tb, maps or None, alignment=al, limit=1)
        first = rep.first
        fdict = first.to_dict() if first is not None else None
        is_culprit = False
        if rep.culprit is not None and (fdict is None or rep.cross) and rep.culprit.as_divergence() is not None:
            # two implementations: the nodes on one side only are not divergences; g goes to the culprit
            fdict, is_culprit = rep.culprit.as_divergence(), True
        return AlignResult(events, tables["tensors"], tables["reshapes"], tables["probes"],
                           fdict, same=bool(rep.same),
                           headline=first.headline() if first is not None else
                           (rep.culprit.headline() if rep.culprit is not None and not rep.same else None),
                           culprit=None if is_culprit else _culprit_line(rep), first_is_culprit=is_culprit)
    finally:
        al.trace_a.close()
        al.trace_b.close()


def _culprit_line(rep) -> str | None:
    """The culprit for the summary line, when established and not the first divergence's module."""
    c = rep.culprit
    if c is None or c.status not in ("found", "upstream"):
        return None
    f = rep.first
    if f is not None and f.step == c.step_a and (f.module or "") == (c.module_a or ""):
        return None
    return f"step {c.step_a} {c.module_a or '<root>'}" + (" (cause may lie upstream)" if c.caveat else "")


# --------------------------------------------------------------------------- viewer side


class Cancelled(Exception):
    """The job was cancelled (its process killed) before it finished."""


_CONTEXT: Any = None


def _context():
    """``forkserver`` (fast starts: the server has ``vlmscope.analyze`` imported once) where the
    platform has it, else ``spawn``. Never ``fork``: the viewer runs threads."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["vlmscope.tui.analysis", "vlmscope.analyze"])
        else:
            ctx = multiprocessing.get_context("spawn")
        _CONTEXT = ctx
    return _CONTEXT


def prepare() -> None:
    """Start the helper processes of :mod:`multiprocessing` (the fork server, the resource
    tracker) now. Call it before Textual runs: they pass on ``sys.stderr``'s file descriptor, and
    while an app runs ``sys.stderr`` is Textual's capture, which has none (the start fails)."""
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
    elif os.name == "posix":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()


def _quiet() -> None:
    """Worker initializer: the terminal belongs to the viewer, so the analysis prints nothing there
    (warnings, a traceback: a failure comes back to the viewer as the exception). The worker forks
    no helper of its own (``VLMSCOPE_NO_FORK``): a job is stopped with SIGKILL, which would leave
    such a grandchild running on, orphaned."""
    os.environ["VLMSCOPE_NO_FORK"] = "1"
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


class Job:
    """``fn(*args)`` in a process of its own; :meth:`wait` for the result, :meth:`kill` to stop it."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.killed = False
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=_context(), initializer=_quiet)
        self._future = self._pool.submit(fn, *args)
        # The worker processes, kept to kill them (ProcessPoolExecutor has no public way before
        # Python 3.14's kill_workers(); shutdown() lets a running call finish, seconds later).
        self._procs = list((getattr(self._pool, "_processes", None) or {}).values())

    def wait(self, cancelled: Callable[[], bool] = lambda: False, poll: float = 0.05) -> Any:
        """The result. Raises :class:`Cancelled` when ``cancelled()`` turns true or the job was
        killed (the process is killed then), and the job's own exception when it raised."""
        try:
            while True:
                if self.killed or cancelled():
                    self.kill()
                    raise Cancelled()
                try:
                    return self._future.result(timeout=poll)
                except FutureTimeout:
                    continue
                except BrokenProcessPool as e:
                    if self.killed:
                        raise Cancelled() from None
                    raise RuntimeError(f"the analysis process died ({e})") from None
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)   # the worker exits once idle

    def kill(self) -> None:
        """Stop the job now (idempotent)."""
        self.killed = True
        kill_workers = getattr(self._pool, "kill_workers", None)
        if kill_workers is not None:
            try:
                kill_workers()
            except RuntimeError:   # already shut down
                pass
        for p in self._procs:
            if p.is_alive():
                p.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def alive(self) -> bool:
        """Whether a worker process of the job still runs."""
        return any(p.is_alive() for p in self._procs)


def run_job(fn: Callable[..., Any], *args: Any, cancelled: Callable[[], bool] = lambda: False,
            jobs: set | None = None) -> Any:
    """Run ``fn(*args)`` as a :class:`Job` and wait for it (call from a worker thread). The job is
    in ``jobs`` while it runs, so that whoever owns that set can kill it."""
    job = Job(fn, *args)
    if jobs is not None:
        jobs.add(job)
    try:
        return job.wait(cancelled)
    finally:
        if jobs is not None:
            jobs.discard(job)


__all__ = ["AlignResult", "Cancelled", "CHECK_FIELDS", "Job", "Sides", "align_sides", "check_rows", "prepare",
           "run_job"]
