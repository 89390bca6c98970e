"""The forked helper processes of ``diff``: the second half of a streamed pass
(:class:`.stream.HalfWorker`) and the tables read ahead (:class:`TablePrefetch`).

Decompressing the tables is most of a ``diff``, and h5py serialises it across threads, so the
streamed pass over a big table hands the second half of its rows to a forked child, which leaves
its results in shared memory, and another child reads the probe and sketch tables while the
parent works on. This module is the process side of that: fork, shared arrays, exit status,
reaping.

It is fail-safe. A child is started only where :func:`fork_allowed` says so. It opens its files
afresh, runs its task and leaves with ``os._exit`` whatever happens. Any failure (starting it,
in the child, the child dying) makes :meth:`ForkedWorker.join` answer False, and the parent then
does the work itself, so results never depend on the child. :meth:`ForkedWorker.close` kills
and reaps a child still running: no zombie is left, even when the parent's own work fails.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import threading
from typing import Callable

import numpy as np


def fork_allowed() -> bool:
    """Whether a helper process may be forked: POSIX ``fork``, a single-threaded parent (no
    lock can be held across the fork) and ``VLMSCOPE_NO_FORK`` unset."""
    return (hasattr(os, "fork") and sys.platform != "win32" and threading.active_count() == 1
            and not os.environ.get("VLMSCOPE_NO_FORK"))


class ForkedWorker:
    """A forked child running one task. The task writes its results into arrays shared with the
    parent (:meth:`shared`, allocated before :meth:`start`); the parent waits for it with
    :meth:`join`, which says whether the task finished, and must :meth:`close` it in any case."""

    def __init__(self) -> None:
        self.pid = -1

    @staticmethod
    def shared(dtype, count: int) -> np.ndarray:
        """A zeroed 1-D array in memory shared with the child (allocate it before :meth:`start`).
        Raises OSError when the system has no memory to share."""
        buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))   # anonymous, MAP_SHARED
        return np.frombuffer(buf, dtype=dtype, count=count)

    def start(self, task: Callable[[], None]) -> bool:
        """Fork a child that runs ``task()``. False when no child was started (not allowed here,
        or the system refused): then do the work here."""
        if not fork_allowed():
            return False
        try:
            self.pid = os.fork()
        except OSError:
            self.pid = -1
            return False
        if self.pid == 0:
            self._run_child(task)
        return True

    @staticmethod
    def _run_child(task: Callable[[], None]) -> None:  # pragma: no cover - the forked process
        code = 1
        try:
            task()
            code = 0
        # fail-safe: whatever goes wrong in the child (an unreadable file, a signal turned into
        # KeyboardInterrupt) must end here, in os._exit with a non-zero status, and never unwind
        # into the parent's code; the parent sees the status in join() and does the work itself
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)

    def join(self) -> bool:
        """Wait for the child to end and reap it; True when its task finished (exit status 0)."""
        if self.pid <= 0:
            return False
        try:
            _, st = os.waitpid(self.pid, 0)
            ok = os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
        except OSError:
            ok = False
        self.pid = -1
        return ok

    def close(self) -> None:
        """Kill the child if it still runs, and reap it. Safe to call more than once, and after
        :meth:`join`. (The shared arrays stay valid.)"""
        if self.pid > 0:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(self.pid, 0)
            except OSError:
                pass
            self.pid = -1


#: tables worth reading in a helper process (:class:`TablePrefetch`): read whole by the later
#: passes of ``diff``, and not needed at its start
PREFETCH_TABLES = ("probes", "probe_data", "sketches")
#: below this many bytes in all, a trace's tables are read where they are needed (a fork costs
#: more than it saves)
PREFETCH_MIN_BYTES = 32 << 20


class TablePrefetch:
    """Whole tables of some traces, read by a forked child into shared memory while this process
    does other work (``diff`` starts one before it reads strings, events and the streamed tables,
    and the probe and sketch tables are ready when it gets to them).

    Each trace is told (:meth:`Trace.expect_table <vlmscope.trace.Trace.expect_table>`) to ask
    for its tables here first: the first such request waits for the child, and the rows are
    checked by the trace as rows it read itself. If the child failed, or was closed before it
    finished, the trace reads them itself. :meth:`close` kills and reaps the child."""

    def __init__(self, traces, tables: tuple[str, ...] | None = None, min_bytes: int | None = None):
        self.worker = ForkedWorker()
        self.items: list[tuple[object, str, np.ndarray]] = []
        self._ok: bool | None = None
        tables = PREFETCH_TABLES if tables is None else tables
        min_bytes = PREFETCH_MIN_BYTES if min_bytes is None else min_bytes
        wanted = []
        for t in traces:
            names = [n for n in tables if _present(t, n) and not t.is_loaded(n)]
            size = sum(t.n_rows(n) * t.dataset_dtype(n).itemsize for n in names)
            if names and size >= min_bytes and t.file_identity() is not None:   # a file on disk
                wanted += [(t, n) for n in names]
        # the child opens each file by its path: it checks that it is still the file each trace has open
        self.identity = {str(t.path): t.file_identity() for t, _ in wanted}
        try:
            self.items = [(t, n, ForkedWorker.shared(t.dataset_dtype(n), t.n_rows(n))) for t, n in wanted]
        except OSError:             # no shared memory: the traces read their tables themselves
            self.items = []

    def start(self) -> bool:
        """Fork the child; True when it runs (the traces then expect their tables from it)."""
        if not self.items or not self.worker.start(self._read):
            return False
        for t, n, arr in self.items:
            t.expect_table(n, lambda arr=arr: self._result(arr))
        return True

    def _read(self) -> None:  # pragma: no cover - runs in the forked process
        from vlmscope.trace import open_same_file

        files: dict = {}
        try:
            for t, n, arr in self.items:
                p = str(t.path)
                if p not in files:
                    files[p] = open_same_file(p, self.identity[p])
                if len(arr):
                    files[p][n].read_direct(arr)
        finally:
            for f in files.values():
                f.close()

    def _result(self, arr: np.ndarray) -> np.ndarray | None:
        if self._ok is None:
            self._ok = self.worker.join()
        return arr if self._ok else None

    def close(self) -> None:
        """Kill and reap the child if it still runs; tables not asked for yet are then read by
        the traces themselves (and the shared memory is let go)."""
        if self._ok is None and self.worker.pid > 0:
            self._ok = False
        self.worker.close()
        for t, n, _ in self.items:
            t.expect_table(n, None)
        self.items = []


def _present(t, name: str) -> bool:
    """Whether trace ``t`` has dataset ``name`` with rows (the sketch tables are optional)."""
    if name == "sketches":
        return t.has_sketches()
    try:
        return t.n_rows(name) > 0
    except Exception:  # noqa: BLE001 - a table a damaged trace lacks: read (and reported) later
        return False
