"""Rule family ``dtype``: an additive attention mask has the compute dtype, and no cat/stack
mixes floating dtypes (which silently promotes)."""

from __future__ import annotations

import numpy as np

from .._index import TraceIndex
from ._common import first_per_group, group_report, mask_rows
from .registry import rule
from .report import Violation


@rule("dtype.mask", "a floating (additive) attention mask has the compute dtype")
def rule_mask_dtype(ix: TraceIndex) -> list[Violation]:
    rows = mask_rows(ix)
    if not len(rows):
        return []
    cd = ix.compute_dtype
    if cd is None:
        return []
    p = ix.probes
    dt = p["dtype"][rows]
    isf = ix.is_float_dtype_id[dt]
    bad = isf & (ix.strings[dt] != cd)
    sel = rows[bad]
    if not len(sel):
        return []
    key = p["dtype"][sel].astype(np.int64)   # one violation per wrong dtype

    def make(r: int, n: int) -> Violation:
        s = int(p["step"][r])
        steps = np.unique(p["step"][sel[p["dtype"][sel] == p["dtype"][r]]])
        d = ix.s(int(p["dtype"][r]))
        return Violation("dtype.mask", s, ix.module_path(int(p["module"][r])), f"mask dtype {cd} (compute dtype)",
                         f"mask dtype {d}" + (f" in {len(steps)} steps" if len(steps) > 1 else ""),
                         f"the additive mask was left in {d} while the model runs in {cd}: adding it promotes "
                         f"the attention scores (or fails under SDPA); cast it with .to(hidden_states.dtype)",
                         seq=int(p["seq"][r]))

    return group_report(ix, sel, key, make)


_CAT_OPS = ("cat", "concat", "concatenate", "stack", "hstack", "vstack")
_FLOAT_NAMES = frozenset(("float64", "float32", "bfloat16", "float16"))
_OTHER_NAMES = frozenset(("bool", "int64", "int32", "uint8", "int8", "int16", "complex64"))


def _mixed_float_dtype_ids(ix: TraceIndex) -> list[int]:
    """Ids of the interned strings that list several floating dtypes (an op's ``in_dtypes``),
    in increasing order."""
    mixed = []
    for i, sv in enumerate(ix.strings):
        if " " in sv and sv.count("float") >= 2:
            parts = {x.removeprefix("torch.") for x in sv.split()}
            if len(parts & _FLOAT_NAMES) > 1 and parts <= _FLOAT_NAMES | _OTHER_NAMES:
                mixed.append(i)
    return mixed


@rule("dtype.cat-promotion", "cat/stack over different floating dtypes silently promotes (bf16 + fp16 -> fp32)")
def rule_cat_promotion(ix: TraceIndex) -> list[Violation]:
    op_ids = [ix.sid(o) for o in _CAT_OPS]
    op_ids = [o for o in op_ids if o >= 0]
    if not op_ids or not ix.trace.n_rows("reshapes"):
        return []
    mixed = _mixed_float_dtype_ids(ix)
    if not mixed:
        return []   # no interned string lists several floating dtypes: nothing to read
    rs = ix.reshapes
    is_cat = np.isin(rs["op"], op_ids)
    sel = np.nonzero(is_cat & np.isin(rs["in_dtypes"], mixed))[0]
    # group by (module, site line, dtypes): the first occurrence
    key = (rs["module"][sel].astype(np.int64) * (1 << 24) + rs["site_line"][sel].astype(np.int64)) * 4096 + \
        np.searchsorted(np.array(mixed), rs["in_dtypes"][sel])
    order = rs["step"][sel].astype(np.int64) * (1 << 32) + rs["seq"][sel].astype(np.int64)
    out = []
    for f in first_per_group(key, order):
        r = int(sel[f])
        n = int((key == key[f]).sum())
        site = f"{ix.s(int(rs['site_file'][r]))}:{int(rs['site_line'][r])}"
        ind, outd = ix.s(int(rs["in_dtypes"][r])), ix.s(int(rs["out_dtype"][r]))
        out.append(Violation("dtype.cat-promotion", int(rs["step"][r]), ix.module_path(int(rs["module"][r])),
                             f"{ix.s(int(rs['op'][r]))} of one dtype", f"{ind} -> {outd} at {site}"
                             + (f" ({n} times)" if n > 1 else ""),
                             "mixed floating dtypes in cat are silently promoted; cast the inputs to one dtype",
                             seq=int(rs["seq"][r]), count=n))
    return out
