"""The viewer's data layer: a lazily read trace and its step indexes. No textual, no torch.

A :class:`TraceModel` wraps one :class:`vlmscope.trace.Trace`. Everything that may read
HDF5 (``load``, ``index``, ``probe_value``) is meant to run in a worker thread; once a
step's :class:`~vlmscope.tui.stepindex.StepIndex` is loaded, every navigation question
(children of a node, the same module in another step, the next layer, search: see
:mod:`vlmscope.tui.navigate`) is answered from memory, fast enough for the UI thread.
Tree items and filters are described in :mod:`vlmscope.tui.items`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from vlmscope.analyze import rows as batchrows
from vlmscope.trace import ROLE_OUTPUT, Trace, open_trace
from vlmscope.trace.text import printable, printable_data
from vlmscope.tui.items import Violation
from vlmscope.tui.stepindex import StepIndex

#: Step indexes kept in memory.
STEP_CACHE = 12

_DIGITS = re.compile(r"(?<![^.])\d+(?![^.])")


def module_pattern(path: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.*.mlp``: the same module in every layer."""
    return _DIGITS.sub("*", path)


def fmt_num(x: float) -> str:
    if x != x:  # nan
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.3g}"
    return f"{x:.4g}"


def short_site(path: str) -> str:
    """A call-site file as a person reads it: relative to site-packages or the cwd when it can be."""
    if not path:
        return ""
    for marker in ("site-packages/", "dist-packages/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + len(marker):]
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel
    except ValueError:
        pass
    return path


def is_glob(query: str) -> bool:
    return any(c in query for c in "*?[")


def match_paths(paths: np.ndarray, query: str) -> np.ndarray:
    """Indexes of module paths matching ``query``: a glob when it has ``*?[``, the module itself when
    it is a whole path, else a substring."""
    q = query.strip()
    if not q:
        return np.zeros(0, dtype=np.int64)
    if is_glob(q):
        rx = re.compile(fnmatch.translate(q))
        hits = [i for i, p in enumerate(paths) if rx.match(p)]
    else:
        # a whole path means that module; anything else is a substring
        hits = [i for i, p in enumerate(paths) if p == q] or [i for i, p in enumerate(paths) if q in p]
    return np.asarray(hits, dtype=np.int64)


class TraceModel:
    """One trace, as the viewer sees it. ``load()`` and ``index()`` read HDF5: call them in workers.

    Names are for display: ``s``, ``module_name``, ``relative_name``, ``mod_cls``, ``probe_info``
    and ``error`` hand out printable strings (control characters escaped, see
    :func:`vlmscope.trace.text.printable`). ``module_path``, ``mod_paths`` and ``meta`` stay as
    recorded: they are matched against what the analysis reports (raw), and shown only through
    ``module_name`` or the header, which escapes them."""

    def __init__(self, path: str | os.PathLike, trace: Trace | None = None):
        self.path = Path(path)
        self.name = self.path.name
        self.trace = trace if trace is not None else open_trace(path)
        self._steps_cache: OrderedDict[int, StepIndex] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[int, threading.Event] = {}
        self.violations: list[Violation] = []
        self.failing_steps: set[int] = set()
        self.loaded = False

    # loading (worker) --------------------------------------------------------
    def load(self) -> "TraceModel":
        t = self.trace
        self.steps = t.steps
        self.n_steps = len(self.steps)
        self.calls = batchrows.calls(self.steps)         # the generate call of every step
        self.n_calls = int(self.calls[-1]) + 1 if self.n_steps else 0
        self.status = t.status
        self.meta = t.meta
        self.error = printable_data(t.error, newlines=True)    # shown only
        self.strings = t.strings
        modules = t.modules
        self.modules_depth = modules["depth"].astype(np.int64) if len(modules) else np.zeros(0, np.int64)
        self.mod_paths = np.asarray(t.module_paths, dtype=object)
        self.mod_cls = np.array([printable(c) for c in self.strings[modules["cls"]]], dtype=object) \
            if len(modules) else np.array([], dtype=object)
        patterns = [module_pattern(p) for p in self.mod_paths]
        uniq: dict[str, int] = {}
        self.mod_pattern = np.array([uniq.setdefault(p, len(uniq)) for p in patterns], dtype=np.int64)
        self.loaded = True
        return self

    def close(self) -> None:
        self.trace.close()

    def s(self, i: int) -> str:
        """String ``i`` of the trace, for display (printable)."""
        return printable(self.raw_s(i))

    def raw_s(self, i: int) -> str:
        """String ``i`` as recorded (to parse or to match; never shown)."""
        i = int(i)
        return str(self.strings[i]) if 0 <= i < len(self.strings) else ""

    def index(self, step: int) -> StepIndex:
        """The step's index (reads HDF5 the first time: call from a worker). Two workers asking
        for the same step read it once."""
        while True:
            with self._lock:
                idx = self._steps_cache.get(step)
                if idx is not None:
                    self._steps_cache.move_to_end(step)
                    return idx
                pending = self._loading.get(step)
                if pending is None:
                    pending = self._loading[step] = threading.Event()
                    break
            pending.wait()
        try:
            idx = StepIndex(self, step)
            if self.violations:
                idx.set_failing(self.violations)
            with self._lock:
                self._steps_cache[step] = idx
                while len(self._steps_cache) > STEP_CACHE:
                    self._steps_cache.popitem(last=False)
            return idx
        finally:
            with self._lock:
                self._loading.pop(step, None)
            pending.set()

    def cached(self, step: int) -> StepIndex | None:
        with self._lock:
            return self._steps_cache.get(step)

    def set_violations(self, violations: list[Violation]) -> None:
        """The violations of this trace (placed on items), in tree order."""
        self.violations = sorted(violations, key=lambda v: (v.item is None, v.order, v.item or (0, "", 0)))
        self.failing_steps = {v.item[0] for v in self.violations if v.item is not None}
        with self._lock:
            for idx in self._steps_cache.values():
                idx.set_failing(self.violations)

    # naming --------------------------------------------------------------------
    def step_name(self, step: int) -> str:
        """``prefill``, ``decode 3 of 7``; with several generate calls, the call first:
        ``call 1 prefill``, ``call 1 decode 2 of 4`` (counted within the call)."""
        if step < 0 or step >= self.n_steps:
            return "-"
        st = self.steps[step]
        if self.n_calls <= 1:
            if int(st["kind"]) == 0 and step == 0:
                return "prefill"
            return f"decode {step} of {self.n_steps - 1}"
        c = int(self.calls[step])
        first = batchrows.prefill_of(self.steps, step)
        n_dec = int((self.calls == c).sum()) - 1
        if step == first and int(st["kind"]) == 0:
            return f"call {c} prefill"
        return f"call {c} decode {step - first} of {n_dec}"

    def module_path(self, module: int) -> str:
        return str(self.mod_paths[module]) if 0 <= module < len(self.mod_paths) else ""

    def module_name(self, module: int) -> str:
        """A path for display: the root module is shown by its class."""
        p = self.module_path(module)
        if p:
            return printable(p)
        return str(self.mod_cls[module]) if 0 <= module < len(self.mod_cls) else "<root>"

    def relative_name(self, idx: StepIndex, i: int) -> str:
        """An event's path relative to its calling module's path (``layers.0`` under the text model)."""
        path = self.module_path(int(idx.module[i]))
        if not path:
            return str(self.mod_cls[int(idx.module[i])])
        p = int(idx.parent[i])
        ppath = self.module_path(int(idx.module[p])) if p >= 0 else ""
        if ppath and path.startswith(ppath + "."):
            path = path[len(ppath) + 1:]
        path = printable(path)
        if int(idx.nth[i]) > 0:
            path += f" #{int(idx.nth[i]) + 1}"
        return path

    def out_shape(self, idx: StepIndex, i: int) -> tuple[int, ...] | None:
        if idx.tensors is not None:
            nd = int(idx.out_ndim[i])
            return tuple(int(d) for d in idx.out_shape[i][:nd]) if nd >= 0 else None
        rows = idx.event_tensors(self, i)
        outs = rows[rows["role"] == ROLE_OUTPUT]
        if not len(outs):
            return None
        nd = int(outs[0]["ndim"])
        return tuple(int(d) for d in outs[0]["shape"][:nd])

    # probes ----------------------------------------------------------------------
    def probe_value(self, row: np.void) -> np.ndarray | None:
        return self.trace.probe_value(row)

    def probe_info(self, row: np.void) -> dict:
        """A probe's info record, its strings printable (for display)."""
        try:
            info = json.loads(self.raw_s(int(row["info"]))) if int(row["info"]) > 0 else {}
        except json.JSONDecodeError:
            return {}
        return printable_data(info) if isinstance(info, dict) else {}

    def step_probe(self, idx: StepIndex, kind: str, prefer: str | None = None,
                   rows: int | None = None, output: bool | None = None, last: bool = False) -> int:
        """Pick one probe of ``kind`` in the step: preferring modules under ``prefer``, a number of
        leading ``rows``, an output (``out...``) name. Returns a local probe row or -1."""
        kid = self.trace.string_id(kind)
        cand = np.nonzero(idx.probes["kind"] == kid)[0] if kid >= 0 else np.zeros(0, dtype=np.int64)
        if not len(cand):
            return -1
        scored = []
        for k in cand:
            p = idx.probes[k]
            score = 0
            path = self.module_path(int(p["module"]))
            if prefer and (path == prefer or path.startswith(prefer + ".")):
                score += 4
            if rows is not None and int(p["ndim"]) >= 1 and int(p["shape"][0]) == rows:
                score += 2
            if output is not None and self.s(int(p["name"])).startswith("out") == output:
                score += 1
            scored.append((-score, -int(k) if last else int(k)))
        scored.sort()
        return abs(scored[0][1])
