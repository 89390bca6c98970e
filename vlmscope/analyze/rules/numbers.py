"""Rule family ``numbers``: no NaN or Inf in any activation, reported at the module that
produced the first one."""

from __future__ import annotations

import numpy as np

from vlmscope.semantics import fmt_shape
from vlmscope.trace import ROLE_OUTPUT

from .._index import TraceIndex
from ._common import first_per_group
from .registry import rule
from .report import Violation


@rule("numbers.nonfinite", "no NaN or Inf in any activation; names the first module that produced one")
def rule_nonfinite(ix: TraceIndex) -> list[Violation]:
    te = ix.tensors
    if not len(te):
        return []
    # NaN anywhere; Inf outside attention masks (an additive mask may hold -inf)
    bad = (te["nan"] > 0) | ((te["inf"] > 0) & ~ix.is_mask_name_id[te["name"]])
    idx = np.nonzero(bad)[0]
    if not len(idx):
        return []
    steps = te["step"][idx].astype(np.int64)
    time = ix.tensor_time[idx]
    # order: by step, then time; outputs before inputs at equal time
    order = np.lexsort((te["role"][idx] != ROLE_OUTPUT, time, steps))
    idx, steps = idx[order], steps[order]
    # the first offending tensor of the first step, and of any later step whose previous step was clean
    firsts = first_per_group(steps, np.arange(len(steps)))
    bad_steps = set(int(s) for s in np.unique(steps))
    out = []
    for j, f in enumerate(firsts):
        s = int(steps[f])
        if j > 0 and (s - 1) in bad_steps:
            continue
        in_step = int((steps == s).sum())
        later = sum(1 for x in bad_steps if x > s)
        out.append(_nonfinite_violation(ix, int(idx[f]), s, in_step, later))
    return out


def _nonfinite_violation(ix: TraceIndex, r: int, s: int, in_step: int, later: int) -> Violation:
    """Tensor row ``r``, the first non-finite one of step ``s`` (``in_step`` such tensors in the
    step, ``later`` later steps with some)."""
    te = ix.tensors
    ev = int(te["event"][r])
    mod = ix.module_path(int(ix.event_module[ev]))
    role = int(te["role"][r])
    n_nan, n_inf = int(te["nan"][r]), int(te["inf"][r])
    name = ix.s(int(te["name"][r]))
    what = f"{n_nan} NaN" if n_nan else f"{n_inf} Inf"
    if n_nan and n_inf:
        what = f"{n_nan} NaN, {n_inf} Inf"
    shape = fmt_shape(te["shape"][r][: te["ndim"][r]])
    hint = (f"{mod or '<root>'} produced the first non-finite value" if role == ROLE_OUTPUT else
            f"{mod or '<root>'} received non-finite input {name!r}")
    hint += f"; {in_step} tensors in this step" + (f" and {later} later step(s)" if later else "") + " carry it"
    return Violation("numbers.nonfinite", s, mod, "finite values",
                     f"{what} in {name} {shape} ({'output' if role == ROLE_OUTPUT else 'input'})",
                     hint, seq=int(ix.tensor_time[r]), count=in_step)
