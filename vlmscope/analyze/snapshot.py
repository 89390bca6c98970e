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

``model`` is the model's name as the user would write it, however the model was loaded: an
embedded model's name (``tiny-qwen2.5-vl``, also for ``vlmscope_models/tiny-qwen2.5-vl``), a
checkpoint directory's basename, else the model type (see :func:`model_name`). A comparison
ignores it: goldens do not depend on how the model was named.

Comparison re-renders both sides canonically and returns a unified diff ('' when equal), with a
one-line summary (:func:`golden_summary`): ``golden has 4 steps, trace has 8`` (then there is no
line-by-line diff: the diff is that line), ``12 differing lines, first at step 0: ...``.
It serves ``vlmscope snapshot``, ``vlmscope check --golden`` and the pytest plugin.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from vlmscope.trace import ROLE_OUTPUT, Trace, open_trace
from vlmscope.trace.validate import check_tensor_shapes

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
        "model": model_name(meta), "family": meta.get("family"), "dtype": meta.get("dtype"),
        "decoder_layers": meta.get("decoder_layers"), "reshapes": bool(with_reshapes),
        "n_steps": len(out_steps), "steps": out_steps,
    }


_EMBEDDED_PREFIX = "vlmscope_models/"


def model_name(meta: dict) -> Any:
    """The model's name as a snapshot records it, independent of how the model was loaded: an
    embedded model's name (``vlmscope_models/tiny-qwen2.5-vl`` -> ``tiny-qwen2.5-vl``), a
    checkpoint directory's basename (``/models/Qwen2.5-VL-3B/`` -> ``Qwen2.5-VL-3B``), the model
    type when the recorder only knew the class (``MQwenForCausalLM`` -> ``mqwen``)."""
    name = meta.get("model")
    if not isinstance(name, str) or not name:
        return meta.get("family") or name
    if name.startswith(_EMBEDDED_PREFIX):
        return name[len(_EMBEDDED_PREFIX):] or name
    if name == meta.get("model_class") and isinstance(meta.get("family"), str) and meta.get("family"):
        return meta["family"]
    if meta.get("model_kind") == "checkpoint" or name.startswith(("/", "~", "./", "../", ".\\", "..\\")) \
            or re.match(r"[A-Za-z]:[\\/]", name):
        base = (PureWindowsPath if "\\" in name else PurePosixPath)(name.rstrip("/\\")).name
        return base or name
    return name


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
    check_tensor_shapes(tes, ix.trace.path, "a tensor")     # the shapes this snapshot is about to show
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


def _as_dict(snap: dict | str) -> dict:
    return json.loads(snap) if isinstance(snap, str) else snap


def compare_snapshots(expected: dict | str, actual: dict | str, *, fromfile: str = "golden",
                      tofile: str = "actual", context: int = 3) -> str:
    """Unified diff between two snapshots (dicts or texts), '' when they are equal.

    The model's name is not compared. When the numbers of steps differ, the steps are not diffed
    line by line (every line would differ): the result is the one line of :func:`golden_summary`."""
    return _compare(_as_dict(expected), _as_dict(actual), fromfile, tofile, context)[1]


def golden_summary(expected: dict | str, actual: dict | str) -> str:
    """One line saying how two snapshots differ ('' when they are equal): ``golden has 4 steps,
    trace has 8``, ``golden is qwen2_vl float32, trace is qwen2_5_vl float32``, or ``N differing
    lines, first at step S: MODULE``."""
    return _compare(_as_dict(expected), _as_dict(actual), "golden", "actual", 0)[0]


def _compare(exp: dict, act: dict, fromfile: str, tofile: str, context: int) -> tuple[str, str]:
    """(one-line summary, unified diff); both '' when the snapshots are equal."""
    act = {**act, "model": exp.get("model")}     # goldens do not depend on how the model was named
    ea, aa = snapshot_text(exp), snapshot_text(act)
    if ea == aa:
        return "", ""
    ns_e, ns_a = len(exp.get("steps") or []), len(act.get("steps") or [])
    if ns_e != ns_a:
        line = f"golden has {ns_e} step{'s' * (ns_e != 1)}, trace has {ns_a}"
        return line, line + "\n"
    diff = "".join(difflib.unified_diff(ea.splitlines(True), aa.splitlines(True), fromfile=fromfile,
                                        tofile=tofile, n=context))
    return _diff_summary(exp, act, diff), diff


def _diff_summary(exp: dict, act: dict, diff: str) -> str:
    n = sum(1 for ln in diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))
    head = [k for k in ("family", "dtype", "decoder_layers", "reshapes") if exp.get(k) != act.get(k)]
    if head:
        return "; ".join(f"golden {k} {_dump(exp.get(k))}, trace {_dump(act.get(k))}" for k in head) + \
            f" ({n} differing lines)"
    for se, sa in zip(exp.get("steps") or [], act.get("steps") or []):
        if se == sa:
            continue
        step = se.get("step", "?")
        hdr = [k for k in se if k != "calls" and se.get(k) != sa.get(k)]
        if hdr:
            k = hdr[0]
            return f"{n} differing lines, first at step {step}: {k} {_dump(se.get(k))} in the golden, " \
                   f"{_dump(sa.get(k))} in the trace"
        ce, ca = se.get("calls") or [], sa.get("calls") or []
        for x, y in zip(ce, ca):
            if x != y:
                return f"{n} differing lines, first at step {step}: {_entry(x)} in the golden, {_entry(y)} in the trace"
        extra, side = (ce[len(ca):], "the golden") if len(ce) > len(ca) else (ca[len(ce):], "the trace")
        return f"{n} differing lines, first at step {step}: {_entry(extra[0])} only in {side}"
    return f"{n} differing lines"


def _entry(e: Any) -> str:
    if isinstance(e, list) and len(e) >= 3:
        return " ".join(str(x) if not isinstance(x, list) else _dump(x) for x in e)
    return _dump(e)


def compare_golden(trace: Trace | str | os.PathLike, golden: str | os.PathLike) -> tuple[str, str]:
    """(one-line summary, unified diff) of ``trace``'s snapshot against the golden file; both ''
    when equal. As :func:`compare_to_file`."""
    g = load_snapshot(golden)
    snap = snapshot(trace, reshapes=bool(g.get("reshapes", False)))
    return _compare(g, snap, os.fspath(golden), str(getattr(trace, "path", trace)), 3)


def compare_to_file(trace: Trace | str | os.PathLike, golden: str | os.PathLike) -> str:
    """Unified diff of ``trace``'s snapshot against the golden file ('' when equal).

    The trace is snapshotted with the golden file's own options (``reshapes``). Raises
    ``FileNotFoundError`` when the golden file is missing, ``ValueError`` when it is not a snapshot.
    """
    return compare_golden(trace, golden)[1]
