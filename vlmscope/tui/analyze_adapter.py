"""The one place where the viewer reads :mod:`vlmscope.analyze` results.

``violations`` runs ``vlmscope.analyze.check.check`` (all rules) on its own handle of the
trace (so that whole-table caches of the rules are freed afterwards) and places each
violation on a tree item through its step and execution-order position (``seq``),
falling back to the first call of its module. ``alignment`` returns None until the
analyze package exposes ``align``; the viewer then uses its built-in matcher
(:mod:`vlmscope.tui.diffdata`), which follows the same keys (mapped module path and call
number). Every function returns None when the analyze API is missing or changed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vlmscope.tui.data import StepIndex, TraceModel, Violation

#: severities shown as failing checks (info findings are not)
SHOWN = ("error", "warning")


def violations(tm: TraceModel, cancelled=lambda: False) -> list[Violation] | None:
    """Violations of ``tm`` by the analyze rules, or None when there are no such rules.

    The rules read whole tables (a 1M-event trace takes seconds and a gigabyte), so they run
    in a child process: the viewer's memory and its UI thread stay free."""
    if importlib.util.find_spec("vlmscope.analyze.check") is None:
        return None
    raw = _run_child(tm.path, cancelled)
    if raw is None:
        return None
    out: list[Violation] = []
    indexes: dict[int, StepIndex] = {}
    for v in raw:
        if v.get("severity", "error") not in SHOWN:
            continue
        step = int(v.get("step", -1))
        if not 0 <= step < tm.n_steps:
            continue
        idx = indexes.get(step) or tm.cached(step) or StepIndex(tm, step)
        indexes[step] = idx
        kind, local = locate(tm, idx, int(v.get("seq", -1)), str(v.get("module") or ""))
        msg = f"expected {v.get('expected')}, got {v.get('actual')}"
        if v.get("hint"):
            msg += f" ({v['hint']})"
        out.append(Violation(step, kind, local, str(v.get("rule", "?")), msg, str(v.get("severity", "error")),
                             seq=idx.seq_of((step, kind, local)) if kind != "s" else -1))
    return out


def _run_child(path: Path, cancelled) -> list[dict] | None:
    out = _run_child_args([os.fspath(path)], cancelled)
    if out is None:
        return None
    try:
        return json.loads(out.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def _run_child_args(args: list[str], cancelled) -> bytes | None:
    """Run this module in a child process; its stdout, or None (failed or cancelled)."""
    root = str(Path(__file__).resolve().parents[2])          # the directory holding vlmscope/
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "vlmscope.tui.analyze_adapter", *args],
                                stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
        try:
            while proc.poll() is None:
                if cancelled():
                    return None
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            return None
        out.seek(0)
        return out.read()


def _child(path: str) -> None:
    from vlmscope.analyze.check import check

    report = check(path)
    keep = ("rule", "step", "module", "expected", "actual", "hint", "severity", "seq")
    rows = [{k: getattr(v, k, None) for k in keep} for v in report.violations]
    sys.stdout.write(json.dumps(rows, default=str))


def locate(tm: TraceModel, idx: StepIndex, seq: int, module: str) -> tuple[str, int]:
    """The tree item a violation points at: the call of ``module`` at (or just around)
    execution-order position ``seq``; else the call, reshape or probe at ``seq``; else the first
    call of ``module``; else the step node."""
    s = idx.step
    calls = np.zeros(0, dtype=np.int64)
    if module:
        mods = np.nonzero(tm.mod_paths == module)[0]
        if len(mods):
            calls = np.nonzero(np.isin(idx.module, mods))[0]
    if len(calls) and seq >= 0:
        # the call that spans seq (an output's position may be the call's return, +1)
        inside = calls[(idx.seq[calls] <= seq) & (seq <= idx.end_seq[calls] + 1)]
        if len(inside):
            item = idx.canonical((s, "e", int(inside[np.argmax(idx.seq[inside])])))
            return item[1], item[2]
    if seq >= 0:
        for kind, seqs in (("r", idx.r_seq), ("p", idx.p_seq), ("e", idx.seq)):
            hit = np.nonzero(seqs == seq)[0]
            if len(hit):
                item = idx.canonical((s, kind, int(hit[0])))
                if not module or tm.module_path(int(idx.module[idx.event_of(item)])) == module \
                        or idx.event_of(item) < 0:
                    return item[1], item[2]
    if len(calls):
        near = calls[np.argmin(np.abs(idx.seq[calls] - seq))] if seq >= 0 else calls[0]
        item = idx.canonical((s, "e", int(near)))
        return item[1], item[2]
    return "s", -1


# --------------------------------------------------------------------------- alignment

#: analyze status codes -> the viewer's statuses
_STATUS = {0: "same", 1: "shape", 2: "drift", 3: "only_b", 4: "only_a"}


class ExternalAlignment:
    """``vlmscope.analyze.align`` + ``diff`` results, read back from the child process: per-row
    partners and statuses of every table, and the first divergence as ``vlmscope diff`` names it."""

    def __init__(self, arrays: dict[str, np.ndarray], first: dict | None):
        self.x = arrays
        self.first_raw = first

    def _status(self, codes: np.ndarray) -> np.ndarray:
        out = np.empty(len(codes), dtype=object)
        for code, name in _STATUS.items():
            out[codes == code] = name
        return out

    def refine(self, al, ia: StepIndex, ib: StepIndex) -> None:
        """Overwrite a built-in per-step alignment (``diffdata.StepAlign``) with these results."""
        x = self.x
        a0, b0 = ia.ev_start, ib.ev_start
        pa = x["ev_partner_a"][a0:a0 + ia.n]
        al.a_to_b = np.where((pa >= b0) & (pa < b0 + ib.n), pa - b0, -1)
        pb = x["ev_partner_b"][b0:b0 + ib.n]
        al.b_to_a = np.where((pb >= a0) & (pb < a0 + ia.n), pb - a0, -1)
        al.status_a = self._status(x["ev_status_a"][a0:a0 + ia.n])
        for name, n_a, n_b, start_a, start_b in (
                ("rs", len(ia.reshapes), len(ib.reshapes), _start(ia, "reshape"), _start(ib, "reshape")),
                ("pr", len(ia.probes), len(ib.probes), _start(ia, "probe"), _start(ib, "probe"))):
            part = x[f"{name}_partner_a"][start_a:start_a + n_a]
            local = np.where((part >= start_b) & (part < start_b + n_b), part - start_b, -1)
            status = self._status(x[f"{name}_status_a"][start_a:start_a + n_a])
            if name == "rs":
                al.r_a_to_b, al.r_status = local, status
                back = x["rs_partner_b"][start_b:start_b + n_b]
                al.b_only_rs = np.nonzero(back < 0)[0]
            else:
                al.p_a_to_b, al.p_status = local, status
        counts = {"same": 0, "shape": 0, "drift": 0, "only_a": 0, "only_b": int((al.b_to_a < 0).sum())}
        for st in al.status_a:
            counts[st] = counts.get(st, 0) + 1
        al.counts = counts

    def first(self, a: TraceModel, b: TraceModel) -> tuple[tuple[int, str, int], str] | None:
        """The first divergence as a tree item of A (or a B-only item) and its status."""
        f = self.first_raw
        if not f:
            return None
        step = int(f.get("step", -1))
        status = {"missing_in_a": "only_b", "missing_in_b": "only_a"}.get(f.get("status"), f.get("status"))
        if status not in ("same", "shape", "drift", "only_a", "only_b"):
            status = "drift"
        if not 0 <= step < a.n_steps:
            return None
        if status == "only_b" and 0 <= step < b.n_steps:
            ib = b.cached(step) or StepIndex(b, step)
            kind, local = locate(b, ib, int(f.get("seq_b", -1)), str(f.get("module_b") or f.get("module") or ""))
            kind = {"e": "b", "r": "q"}.get(kind, kind)
            if kind in ("b", "q"):
                return (step, kind, local), status
        ia = a.cached(step) or StepIndex(a, step)
        kind, local = locate(a, ia, int(f.get("seq_a", -1)), str(f.get("module") or ""))
        if f.get("node") == "reshape" and kind == "e":
            # the reshape of that call at that position
            hit = np.nonzero((ia.r_event == local) & (ia.r_seq == int(f.get("seq_a", -1))))[0]
            if len(hit):
                kind, local = "r", int(hit[0])
        return (step, kind, local), status


def _start(idx: StepIndex, table: str) -> int:
    return int(idx.step_row[f"{table}_start"])


def alignment(a: TraceModel, b: TraceModel, maps: list[str], cancelled=lambda: False) -> ExternalAlignment | None:
    """Align A and B with ``vlmscope.analyze`` in a child process (it reads whole tables), or None
    when that package has no ``align``/``diff`` or the child fails."""
    if importlib.util.find_spec("vlmscope.analyze.align") is None or \
            importlib.util.find_spec("vlmscope.analyze.diff") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="vlmscope-view-") as d:
        out = Path(d) / "align.npz"
        args = ["--align", os.fspath(a.path), os.fspath(b.path), os.fspath(out)]
        for m in maps:
            args += ["--map", m]
        if _run_child_args(args, cancelled) is None or not out.exists():
            return None
        with np.load(out, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "first"}
            first = json.loads(str(z["first"])) if "first" in z.files else None
    return ExternalAlignment(arrays, first)


def _child_align(a: str, b: str, out: str, maps: list[str]) -> None:
    from vlmscope.analyze.align import align
    from vlmscope.analyze.diff import diff

    al = align(a, b, maps or None)
    rep = diff(al.trace_a, al.trace_b, maps or None, alignment=al, limit=1)
    arrays: dict[str, np.ndarray] = {}
    n_ev_a, n_ev_b = len(al.event_status_a), len(al.event_status_b)
    for name, tbl, n_a, n_b, missing_b in (
            ("ev", al.events, n_ev_a, n_ev_b, 4),
            ("rs", al.reshapes, al.trace_a.n_rows("reshapes"), al.trace_b.n_rows("reshapes"), 4),
            ("pr", al.probes, al.trace_a.n_rows("probes"), al.trace_b.n_rows("probes"), 4)):
        pa = np.full(n_a, -1, np.int64)
        pb = np.full(n_b, -1, np.int64)
        st = np.full(n_a, missing_b, np.int8)
        both = (tbl.a >= 0) & (tbl.b >= 0)
        pa[tbl.a[both]] = tbl.b[both]
        pb[tbl.b[both]] = tbl.a[both]
        has_a = tbl.a >= 0
        st[tbl.a[has_a]] = tbl.status[has_a]
        arrays[f"{name}_partner_a"], arrays[f"{name}_partner_b"], arrays[f"{name}_status_a"] = pa, pb, st
    arrays["ev_status_a"] = np.asarray(al.event_status_a, np.int8)
    first = rep.first.to_dict() if rep.first is not None else None
    if first is not None:
        first.pop("tokens", None)
    arrays["first"] = np.array(json.dumps(first, default=str))
    np.savez(out, **arrays)


if __name__ == "__main__":  # the child process of `violations` / `alignment`
    if sys.argv[1] == "--align":
        _a, _b, _out = sys.argv[2:5]
        _maps = [sys.argv[i + 1] for i in range(5, len(sys.argv) - 1) if sys.argv[i] == "--map"]
        _child_align(_a, _b, _out, _maps)
    else:
        _child(sys.argv[1])
