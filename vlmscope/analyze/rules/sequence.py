"""Rule family ``sequence``: the sequence length through the decoder layers (``seq.length``)
and the trace's own status (``trace.status``: a failed forward, an interrupted recording)."""

from __future__ import annotations

import numpy as np

from vlmscope.semantics import fmt_shape
from vlmscope.trace import ROLE_OUTPUT

from .._index import TraceIndex
from ._common import first_per_group
from .registry import rule
from .report import WARNING, Violation


@rule("seq.length", "the embedding-space sequence length is the same through every decoder layer of a step")
def rule_seq_length(ix: TraceIndex) -> list[Violation]:
    rows = ix.layer_tensor_rows()
    if not len(rows):
        return []
    is_in, is_out = _layer_io_selectors(ix, rows)
    out: list[Violation] = []
    for sel, what in ((is_in, "input"), (is_out, "output")):
        idx = rows[sel]
        if len(idx):
            out += _length_violations(ix, idx, what)
    return _once_per_layer(out)


def _layer_io_selectors(ix: TraceIndex, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over the decoder-layer tensor ``rows``: the hidden-state inputs, and the float outputs."""
    te = ix.tensors
    role, dt, nm = te["role"][rows], te["dtype"][rows], te["name"][rows]
    evr = te["event"][rows].astype(np.int64)
    hs = ix.sid("hidden_states")
    is_in = (role != ROLE_OUTPUT) & ix.is_float_dtype_id[dt] & ~ix.is_mask_name_id[nm]
    if hs >= 0:
        # calls that have a hidden_states input use it; the others their first float input
        has_named = np.zeros(len(ix.events), bool)
        has_named[evr[is_in & (nm == hs)]] = True
        is_in &= np.where(has_named[evr], nm == hs, True)
    is_out = (role == ROLE_OUTPUT) & ix.is_float_dtype_id[dt]
    return is_in, is_out


def _length_violations(ix: TraceIndex, idx: np.ndarray, what: str) -> list[Violation]:
    """Per step, the first layer call whose first ``what`` tensor (among ``idx``) has a sequence
    length other than q_len (or, with q_len unknown, the step's first layer's length)."""
    te = ix.tensors
    q_len = ix.steps["q_len"].astype(np.int64)
    idx = idx[first_per_group(te["event"][idx].astype(np.int64), idx)]   # first such tensor per call
    nd = te["ndim"][idx].astype(np.int64)
    shp = te["shape"][idx]
    sdim = np.where(nd >= 3, shp[:, 1], np.where(nd == 2, shp[:, 0], -1))
    steps = te["step"][idx].astype(np.int64)
    ref = q_len[steps]
    times = ix.tensor_time_of(idx)
    if (ref < 0).any():   # unknown q_len: the first layer's length in the step
        f = first_per_group(steps, times)
        first_len = dict(zip(steps[f].tolist(), sdim[f].tolist()))
        ref = np.where(ref < 0, [first_len.get(int(s), -1) for s in steps], ref)
    bad = (sdim >= 0) & (ref >= 0) & (sdim != ref)
    bidx = idx[bad]
    out = []
    for f in first_per_group(steps[bad], times[bad]):
        r = int(bidx[f])
        s = int(te["step"][r])
        e = int(te["event"][r])
        n = int((steps[bad] == s).sum())
        want = f"{int(q_len[s])} (q_len)" if q_len[s] >= 0 else f"{int(ref[bad][f])} (the step's first layer)"
        out.append(Violation(
            "seq.length", s, ix.module_path(int(ix.event_module[e])),
            f"sequence length {want} at every decoder layer {what}",
            f"{ix.s(int(te['name'][r]))} {fmt_shape(te['shape'][r][: te['ndim'][r]])}"
            + (f"; {n - 1} more layer(s)" if n > 1 else ""),
            "the hidden states changed length between decoder layers of one step "
            "(tokens inserted or dropped inside the stack?)", seq=int(times[bad][f]), count=n))
    return out


def _once_per_layer(out: list[Violation]) -> list[Violation]:
    """Report inputs and outputs of the same layer once: the earliest per (step, module)."""
    seen = set()
    uniq = []
    for v in sorted(out, key=lambda v: (v.step, v.seq)):
        if (v.step, v.module) in seen:
            continue
        seen.add((v.step, v.module))
        uniq.append(v)
    return uniq


@rule("trace.status", "the recording completed (a failed forward or an interrupted recording is reported)")
def rule_trace_status(ix: TraceIndex) -> list[Violation]:
    t = ix.trace
    status = t.status
    if status == "complete":
        return []
    if status == "failed":
        return [_failed_violation(ix)]
    return [Violation("trace.status", ix.n_steps, "", "a complete recording", f"status {status}",
                      "the recording was interrupted; later steps are missing", severity=WARNING)]


def _failed_violation(ix: TraceIndex) -> Violation:
    """A failed trace: the exception, the innermost module and the last reshape from ``/error``,
    at the step row that raised."""
    err = ix.trace.error or {}
    stack = err.get("module_stack") or []
    lr = err.get("last_reshape") or None
    hint = f"{err.get('type', 'error')}: {err.get('message', '')}".strip()
    if lr:
        hint += (f" (last reshape: {lr.get('op')} {lr.get('in_shapes', '')} {lr.get('args', '')} "
                 f"at {lr.get('site', '')})")
    step = int(err.get("step", -1))
    failed = np.nonzero(ix.steps["status"] != 0)[0] if ix.n_steps else []
    if len(failed) and not (0 <= step < ix.n_steps and ix.steps["status"][step] != 0):
        step = int(failed[0])   # the step row that raised
    return Violation("trace.status", step, stack[-1] if stack else "",
                     "a complete forward", "the forward raised", hint)
