"""Golden shape snapshots: a reviewable JSON text of every call's tensor shapes and dtypes.

One entry per line, per step, in execution order::

    {"vlmscope_snapshot": 1, "model": "tiny-qwen2-vl", "family": "qwen2_vl", ...
     "steps": [
      {"step": 0, "kind": "prefill", "input_len": 35, "q_len": 35, "cache_before": 0, "cache_after": 35, "calls": [
       ["model.language_model.layers.0", 0, "in", "hidden_states", [1, 35, 64], "float32"],
       ...

An entry is ``[module path, nth call, "in" | "out" | "call", argument, shape, dtype]`` (a call
without tensors is ``[path, nth, "call"]``). With ``reshapes=True`` the shape-changing ops
are listed too: ``[path, nth call, "reshape", "op#k", "in shapes", out shape, out dtype]``.

Comparison re-renders both sides canonically and returns a unified diff ('' when equal).
It serves ``vlmscope snapshot``, ``vlmscope check --golden`` and the pytest plugin.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vlmscope.trace import ROLE_OUTPUT, Trace, open_trace

from ._index import index_of

SNAPSHOT_VERSION = 1
_KIND = {0: "prefill", 1: "decode"}


def snapshot(trace: Trace | str | os.PathLike, *, reshapes: bool = False, steps: Any = None) -> dict:
    """The snapshot of a trace as a dict (see the module docstring).

    ``steps``: None for all, an int for the first N steps, or an iterable of step indices.
    """
    own = not isinstance(trace, Trace)
    t = open_trace(trace) if own else trace
    try:
        return _snapshot(t, reshapes, steps)
    finally:
        if own:
            t.close()


def _snapshot(t: Trace, with_reshapes: bool, steps: Any) -> dict:
    ix = index_of(t)
    meta = ix.meta
    wanted = _wanted_steps(steps, len(ix.steps))
    # the tables every step reads, loaded up front as before (a damaged one fails here even with no steps)
    _ = (ix.events, ix.tensors, ix.strings, ix.module_paths)
    out_steps = [_step_snapshot(ix, s, with_reshapes) for s in wanted]
    return {
        "vlmscope_snapshot": SNAPSHOT_VERSION,
        "model": meta.get("model"), "family": meta.get("family"), "dtype": meta.get("dtype"),
        "decoder_layers": meta.get("decoder_layers"), "reshapes": bool(with_reshapes),
        "n_steps": len(out_steps), "steps": out_steps,
    }


def _wanted_steps(steps: Any, n: int) -> Any:
    """The step indices to snapshot: all, the first N (an int), or the given ones that exist."""
    if steps is None:
        return range(n)
    if isinstance(steps, int):
        return range(min(steps, n))
    return [s for s in steps if 0 <= s < n]


def _step_snapshot(ix: Any, s: int, with_reshapes: bool) -> dict:
    """One step's header and its entries in execution order."""
    row = ix.steps[s]
    e0, ne = int(row["event_start"]), int(row["event_count"])
    t0, nt = int(row["tensor_start"]), int(row["tensor_count"])
    evs = ix.events[e0:e0 + ne]
    tes = ix.tensors[t0:t0 + nt]
    # entries: (time, tiebreak, index, entry); at equal times outputs, bare calls, inputs, reshapes
    items, has_tensor = _tensor_entries(ix, evs, tes, e0)
    items += _bare_call_entries(ix, evs, has_tensor)
    if with_reshapes:
        items += _reshape_entries(ix, row)
    items.sort(key=lambda x: (x[0], x[1], x[2]))
    return {
        "step": int(s), "kind": _KIND.get(int(row["kind"]), str(int(row["kind"]))),
        "input_len": int(row["input_len"]), "q_len": int(row["q_len"]),
        "cache_before": int(row["cache_before"]), "cache_after": int(row["cache_after"]),
        "calls": [it[3] for it in items],
    }


def _tensor_entries(ix: Any, evs: np.ndarray, tes: np.ndarray, e0: int) -> tuple[list, np.ndarray]:
    """The step's tensor entries, and which of its events (``evs``, from row ``e0``) have a tensor."""
    ne, nt = len(evs), len(tes)
    paths, strings = ix.module_paths, ix.strings
    items: list[tuple[int, int, int, list]] = []
    has_tensor = np.zeros(ne, bool)
    if not nt:
        return items, has_tensor
    loc = tes["event"].astype(np.int64) - e0
    valid = (loc >= 0) & (loc < ne)
    has_tensor[loc[valid]] = True
    role = tes["role"]
    time = np.where(role == ROLE_OUTPUT, evs["end_seq"][np.clip(loc, 0, max(ne - 1, 0))],
                    evs["seq"][np.clip(loc, 0, max(ne - 1, 0))])
    for j in range(nt):
        if not valid[j]:
            continue
        e = evs[loc[j]]
        nd = int(tes["ndim"][j])
        items.append((int(time[j]), 0 if role[j] == ROLE_OUTPUT else 2, j, [
            str(paths[int(e["module"])]), int(e["nth"]), "out" if role[j] == ROLE_OUTPUT else "in",
            str(strings[int(tes["name"][j])]), [int(d) for d in tes["shape"][j][:nd]],
            str(strings[int(tes["dtype"][j])])]))
    return items, has_tensor


def _bare_call_entries(ix: Any, evs: np.ndarray, has_tensor: np.ndarray) -> list:
    """``[path, nth, "call"]`` entries for the step's calls that recorded no tensor."""
    paths = ix.module_paths
    items = []
    for k in np.nonzero(~has_tensor)[0]:
        e = evs[k]
        items.append((int(e["seq"]), 1, int(k), [str(paths[int(e["module"])]), int(e["nth"]), "call"]))
    return items


def _reshape_entries(ix: Any, row: np.void) -> list:
    """The step's shape-changing ops as ``reshape`` entries."""
    ev, paths, strings = ix.events, ix.module_paths, ix.strings
    r0, nr = int(row["reshape_start"]), int(row["reshape_count"])
    rs = ix.reshapes[r0:r0 + nr]
    items = []
    for j in range(nr):
        r = rs[j]
        nth_call = int(ev["nth"][int(r["event"])]) if r["event"] >= 0 else 0
        mod = str(paths[int(r["module"])]) if r["module"] >= 0 else ""
        nd = int(r["out_ndim"])
        items.append((int(r["seq"]), 3, j, [mod, nth_call, "reshape",
                                             f"{strings[int(r['op'])]}#{int(r['nth'])}",
                                             str(strings[int(r["in_shapes"])]),
                                             [int(d) for d in r["out_shape"][:nd]],
                                             str(strings[int(r["out_dtype"])])]))
    return items


def _dump(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(", ", ": "))


def snapshot_text(snap: dict | Trace | str | os.PathLike, **kw: Any) -> str:
    """Canonical text of a snapshot (a dict, or a trace to snapshot): one entry per line."""
    if not isinstance(snap, dict):
        snap = snapshot(snap, **kw)
    lines = ["{"]
    head = [k for k in snap if k != "steps"]
    for k in head:
        lines.append(f"  {_dump(k)}: {_dump(snap[k])},")
    lines.append('  "steps": [')
    steps = snap.get("steps", [])
    for i, st in enumerate(steps):
        hdr = {k: v for k, v in st.items() if k != "calls"}
        lines.append("    " + _dump(hdr)[:-1] + ', "calls": [')
        calls = st.get("calls", [])
        for j, c in enumerate(calls):
            lines.append("      " + _dump(c) + ("," if j < len(calls) - 1 else ""))
        lines.append("    ]}" + ("," if i < len(steps) - 1 else ""))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_snapshot(trace: Trace | str | os.PathLike | dict, path: str | os.PathLike, **kw: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(snapshot_text(trace, **kw), encoding="utf-8")
    return p


def load_snapshot(path: str | os.PathLike) -> dict:
    """Read a snapshot file. Raises ``ValueError`` when it is not a vlmscope snapshot."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        snap = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a vlmscope snapshot (invalid JSON: {e.msg} at line {e.lineno}): {path}") from None
    if not isinstance(snap, dict) or "vlmscope_snapshot" not in snap:
        raise ValueError(f"not a vlmscope snapshot (no 'vlmscope_snapshot' key): {path}")
    if int(snap["vlmscope_snapshot"]) > SNAPSHOT_VERSION:
        raise ValueError(f"snapshot version {snap['vlmscope_snapshot']} is newer than this vlmscope reads: {path}")
    return snap


def compare_snapshots(expected: dict | str, actual: dict | str, *, fromfile: str = "golden",
                      tofile: str = "actual", context: int = 3) -> str:
    """Unified diff between two snapshots (dicts or texts), '' when they are equal."""
    ea = snapshot_text(json.loads(expected) if isinstance(expected, str) else expected)
    aa = snapshot_text(json.loads(actual) if isinstance(actual, str) else actual)
    if ea == aa:
        return ""
    return "".join(difflib.unified_diff(ea.splitlines(True), aa.splitlines(True), fromfile=fromfile,
                                        tofile=tofile, n=context))


def compare_to_file(trace: Trace | str | os.PathLike, golden: str | os.PathLike) -> str:
    """Unified diff of ``trace``'s snapshot against the golden file ('' when equal).

    The trace is snapshotted with the golden file's own options (``reshapes``). Raises
    ``FileNotFoundError`` when the golden file is missing, ``ValueError`` when it is not a snapshot.
    """
    g = load_snapshot(golden)
    snap = snapshot(trace, reshapes=bool(g.get("reshapes", False)))
    return compare_snapshots(g, snap, fromfile=os.fspath(golden), tofile=str(getattr(trace, "path", trace)))
