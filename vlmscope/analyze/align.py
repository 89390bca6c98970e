"""Align two traces node by node: module calls, their tensors, reshapes and probes.

Used by ``vlmscope diff`` and by the viewer's diff mode. Everything is vectorised: keys
are packed into int64 and matched with sorting / ``searchsorted`` (:mod:`.match`).

The two big tables (tensors, reshapes) are streamed, not loaded (:mod:`.stream`): one pass over
both traces, block by block (its second half done by a forked worker), finds the leading rows
that pair up row for row (two traces of one structure: nearly all of them), gives those their
status on the spot (:mod:`.compare`) and keeps a few compact columns. The rows after that
prefix are matched by key on the compact columns, and their pairs compared block by block.

- **Events** (module calls) are aligned by ``(step, module path, nth call)``.
- **Tensors** by ``(aligned call, input|output, argument name)``.
- **Reshapes** by ``(aligned call, op, occurrence of the op in the call)``.
- **Probes** by ``(aligned call, kind, argument name, occurrence)``.

Module paths of trace A can be rewritten with ``--map`` rules ``a_regex=b_replacement``
(applied in order with ``re.sub``, see :mod:`.maps`) so that two implementations line up, e.g.
``transformer\\.h\\.(\\d+)\\.attn=model.language_model.layers.\\1.self_attn``. A rule written
``arg:a_regex=b_replacement`` rewrites argument names instead.

API::

    al = align(trace_a, trace_b, maps=["transformer\\.h=model.layers"])
    al.events.a, al.events.b, al.events.status   # aligned rows (-1 = absent), in execution order
    al.event_status_a[row_in_a], al.event_status_b[row_in_b]   # per-row status, for viewers
    al.tensors, al.reshapes, al.probes            # the same for the other tables

Status codes (:mod:`.status`): :data:`SAME`, :data:`SHAPE` (shape or dtype differs), :data:`DRIFT`
(values drift beyond tolerance; for probes: the semantic values differ), :data:`MISSING_A` (only
in B), :data:`MISSING_B` (only in A).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from vlmscope.trace import ENC_NONE, ROLE_OUTPUT, Trace, open_trace

from ._index import TraceIndex, index_of
from .aligned import Aligned, Alignment, Projector, assemble, tensor_time_key, time_key
from .compare import (  # noqa: F401  (DEFAULT_TOLERANCES, tensor_metrics: re-exported)
    DEFAULT_TOLERANCES, RESHAPE_DERIVED, blobs_differ, reshape_block_status, reshape_fingerprints,
    reshape_status_derived, same_string_ids,
    tensor_block_status, tensor_metrics, tensor_status, tolerance_luts,
)
from .maps import MapRules, parse_maps
from .sketchdiff import sketch_drift
from .match import (
    match_cols, match_in_groups, match_keys, occurrence, pack, pair_col, sequence_match, take, translate_strings, with_prefix,
)
from .status import (  # noqa: F401  (re-exported: the status vocabulary of the results)
    DRIFT, MISSING_A, MISSING_B, SAME, SHAPE, STATUS_NAMES, STATUS_RANK, Status,
)
from .stream import child_prefix, stream_table

__all__ = ["align", "Aligned", "Alignment", "MapRules", "parse_maps", "tensor_metrics", "DEFAULT_TOLERANCES",
           "Status", "SAME", "SHAPE", "DRIFT", "MISSING_A", "MISSING_B", "STATUS_NAMES", "STATUS_RANK"]


def align(trace_a: Trace | str | os.PathLike, trace_b: Trace | str | os.PathLike,
          maps: Iterable[str] | str | MapRules | None = None, *, rtol: float | None = None,
          atol: float | None = None, payloads: bool = True, path_map: dict[int, str] | None = None) -> Alignment:
    """Align two traces (see the module docstring). Paths are opened (and stay open on the result).
    ``path_map``: A's module rows -> B's paths (an inferred module map, :mod:`.automap`), applied
    after the ``maps`` rules to the modules it names."""
    with ExitStack() as opened:          # closes what was opened here if anything fails
        ta = trace_a if isinstance(trace_a, Trace) else opened.enter_context(open_trace(trace_a))
        tb = trace_b if isinstance(trace_b, Trace) else opened.enter_context(open_trace(trace_b))
        rules = parse_maps(maps)
        A, B = index_of(ta), index_of(tb)
        tr = translate_strings(A, B)
        mapped = _mapped_paths(A, rules)
        if path_map:
            mapped = mapped.astype(object, copy=True)
            for m, p in path_map.items():
                mapped[m] = p
        calls = _match_calls(A, B, rules, mapped)
        proj = _projector(A, B, calls)
        tensors, metrics = _align_tensors(A, B, tr, _arg_lut(A, B, tr, rules), calls, proj, rtol, atol, payloads)
        _sketch_pass(A, B, tensors, rtol)
        events, status_a, status_b = _event_status(A, B, calls, tensors, proj)
        reshapes = _align_reshapes(A, B, tr, calls, proj)
        probes = _align_probes(A, B, tr, calls, proj)
        opened.pop_all()                 # success: the traces stay open on the result
    return Alignment(ta, tb, A, B, rules, events, tensors, reshapes, probes, status_a, status_b,
                     payload_metrics=metrics["payload"], rtol_opt=rtol, atol_opt=atol, module_key_a=mapped)


# ============================================================================ module calls


@dataclass
class _Calls:
    """Module calls (events) aligned across the traces: the pairs of rows ``(ia, ib)``, the length
    ``p_e`` of their row-for-row prefix, and each event row's pair (-1 when unaligned)."""

    ia: np.ndarray
    ib: np.ndarray
    p_e: int
    pair_of_a: np.ndarray
    pair_of_b: np.ndarray

    @property
    def n_pairs(self) -> int:
        return len(self.ia)


def _mapped_paths(A: TraceIndex, rules: MapRules) -> np.ndarray:
    """A's module paths, rewritten by the ``--map`` module rules."""
    pa = A.module_paths
    return np.array([rules.map_module(str(p)) for p in pa], dtype=object) if rules.modules else pa


def _match_calls(A: TraceIndex, B: TraceIndex, rules: MapRules, mapped: np.ndarray) -> _Calls:
    """Events matched by (step, module path, nth call), A's paths as the rules rewrote them."""
    pb = B.module_paths
    vocab: dict[str, int] = {}
    mk_a = np.fromiter((vocab.setdefault(str(p), len(vocab)) for p in mapped), np.int64, count=len(mapped))
    mk_b = np.fromiter((vocab.setdefault(str(p), len(vocab)) for p in pb), np.int64, count=len(pb))
    na, nb = len(A.events), len(B.events)
    step_ea, step_eb = A.col("events", "step"), B.col("events", "step")
    mod_a = mk_a[A.col("events", "module")] if na else np.zeros(0, np.int64)
    mod_b = mk_b[B.col("events", "module")] if nb else np.zeros(0, np.int64)
    if rules.modules and len(set(mapped.tolist())) < len(mapped):
        nth_a = occurrence(pack([step_ea, mod_a]))   # maps merged modules: recount the calls
    else:
        nth_a = A.col("events", "nth")
    ia, ib, p_e = match_cols([step_ea, mod_a, nth_a], [step_eb, mod_b, B.col("events", "nth")])
    pair_of_a = np.full(na, -1, np.int64)
    pair_of_b = np.full(nb, -1, np.int64)
    pair_of_a[ia] = np.arange(len(ia))
    pair_of_b[ib] = np.arange(len(ib))
    return _Calls(ia, ib, p_e, pair_of_a, pair_of_b)


def _event_time(ix: TraceIndex):
    return lambda rows: time_key(ix.col("events", "step")[rows], ix.col("events", "seq")[rows])


def _projector(A: TraceIndex, B: TraceIndex, calls: _Calls) -> Projector:
    """Projects B's timeline into A's through the start and the end of each aligned call."""
    def anchors(ix: TraceIndex, rows: np.ndarray):
        def keys() -> np.ndarray:
            step = ix.col("events", "step")[rows]
            end_sub = 31 - np.minimum(ix.col("events", "depth")[rows].astype(np.int64), 31)
            return np.concatenate([time_key(step, ix.col("events", "seq")[rows]),
                                   time_key(step, ix.col("events", "end_seq")[rows], end_sub)])
        return keys

    return Projector(anchors(B, calls.ib), anchors(A, calls.ia))


def _event_status(A: TraceIndex, B: TraceIndex, calls: _Calls, tensors: Aligned, proj: Projector):
    """The aligned events, with each pair's status the worst of its tensors'; and the status of
    each event row of A and of B (MISSING_* where unaligned)."""
    ia, ib = calls.ia, calls.ib
    ev_rank_a = _event_rank(A, tensors.a, tensors.status)
    ev_rank_b = _event_rank(B, tensors.b, tensors.status)
    rank_to_status = np.array([SAME, DRIFT, SHAPE], np.int8)
    pair_rank = np.maximum(ev_rank_a[ia], ev_rank_b[ib]) if len(ia) else np.zeros(0, np.int8)
    e_status = rank_to_status[np.minimum(pair_rank, 2)]
    na, nb = len(A.events), len(B.events)
    events = assemble(ia, ib, e_status, na, nb, A.col("events", "step"), B.col("events", "step"), _event_time(A),
                      _event_time(B), proj)
    status_a = np.full(na, MISSING_B, np.int8)
    status_b = np.full(nb, MISSING_A, np.int8)
    status_a[ia] = e_status
    status_b[ib] = e_status
    return events, status_a, status_b


def _event_rank(ix: TraceIndex, rows: np.ndarray, status: np.ndarray) -> np.ndarray:
    """Worst status rank of each call's tensors (tensor rows of a call are contiguous)."""
    ne, nt = len(ix.events), ix.n_rows("tensors")
    out = np.zeros(ne, np.int8)
    if not ne or not nt:
        return out
    rank = STATUS_RANK[status]
    rank = np.where(status >= MISSING_A, STATUS_RANK[SHAPE], rank).astype(np.int8)
    if len(rows) >= nt and (rows[:nt] == np.arange(nt)).all():
        per_row = rank[:nt]                    # aligned row i is table row i (the usual case)
    else:
        per_row = np.zeros(nt, np.int8)
        h = rows >= 0
        per_row[rows[h]] = rank[h]
    # a call's rows are contiguous (a parent's come after its children's: they are flushed
    # when it returns), so each run of one event id in row order is one call's rows
    ev = ix.col("tensors", "event")
    starts = np.flatnonzero(np.concatenate([[True], ev[1:] != ev[:-1]]))
    ok = (ev[starts] >= 0) & (ev[starts] < ne)
    out[ev[starts][ok]] = np.maximum.reduceat(per_row, starts)[ok]
    return out


# ============================================================================ tensors


def _arg_lut(A: TraceIndex, B: TraceIndex, tr: np.ndarray, rules: MapRules) -> np.ndarray:
    """For every string id of A used as an argument name, B's id of that name as the ``arg:``
    rules rewrite it (:func:`translate_strings` ids when there are no such rules)."""
    if not rules.args:
        return tr
    nbs = len(B.strings)
    b_ids = {s: i for i, s in enumerate(B.strings)}
    name_lut = tr.copy()
    for u, name in enumerate(A.strings):
        new = rules.map_arg(str(name))
        if new != name:
            name_lut[u] = b_ids.get(new, nbs + u)
    return name_lut


def _align_tensors(A: TraceIndex, B: TraceIndex, tr: np.ndarray, name_lut: np.ndarray, calls: _Calls,
                   proj: Projector, rtol: float | None, atol: float | None, payloads: bool):
    """Tensors aligned by (aligned call, input|output, argument name), with their status; and
    the payload metrics of the pairs compared on their saved tensors."""
    nta, ntb = A.n_rows("tensors"), B.n_rows("tensors")
    r_lut, a_lut = tolerance_luts(A, rtol, atol)
    p0, pre_status, pre_more, _, _ = stream_table(
        A, B, "tensors", calls.p_e, [("role", None), ("name", name_lut)],
        lambda xa, xb: tensor_block_status(xa, xb, tr, r_lut, a_lut))
    # the rows after the prefix are matched on their compact columns (never read whole)
    t_pair_a = calls.pair_of_a[A.col("tensors", "event")[p0:]]
    t_pair_b = calls.pair_of_b[B.col("tensors", "event")[p0:]]
    ra, rb, _ = match_cols([t_pair_a, A.col("tensors", "role")[p0:] == ROLE_OUTPUT,
                            name_lut[A.col("tensors", "name")[p0:]]],
                           [t_pair_b, B.col("tensors", "role")[p0:] == ROLE_OUTPUT, B.col("tensors", "name")[p0:]],
                           t_pair_a >= 0, t_pair_b >= 0)
    ra, rb = with_prefix(p0, ra, rb)
    t_status, metrics = tensor_status(A, B, tr, ra, rb, p0, pre_status, pre_more, r_lut, a_lut, payloads)
    tensors = assemble(ra, rb, t_status, nta, ntb, A.col("tensors", "step") if nta else np.zeros(0, np.int64),
                       B.col("tensors", "step") if ntb else np.zeros(0, np.int64),
                       lambda r: tensor_time_key(A, r), lambda r: tensor_time_key(B, r), proj)
    return tensors, metrics


def _sketch_pass(A: TraceIndex, B: TraceIndex, tensors: Aligned, rtol: float | None) -> None:
    """Pairs whose statistics agree but whose value sketches do not (reordered or shifted
    tokens) drift."""
    same = np.nonzero(tensors.status == SAME)[0]
    same = same[(tensors.a[same] >= 0) & (tensors.b[same] >= 0)]
    if len(same):
        hit = sketch_drift(A, B, tensors.a[same], tensors.b[same], rtol)
        tensors.status[same[hit]] = DRIFT


# ============================================================================ reshapes and probes


def _align_reshapes(A: TraceIndex, B: TraceIndex, tr: np.ndarray, calls: _Calls, proj: Projector) -> Aligned:
    pair_of_a, pair_of_b, n_pairs, p_e = calls.pair_of_a, calls.pair_of_b, calls.n_pairs, calls.p_e
    na, nb = A.n_rows("reshapes"), B.n_rows("reshapes")
    if not na and not nb:
        z = np.zeros(0, np.int64)
        return Aligned(z, z, np.zeros(0, np.int8))
    ok_id = same_string_ids(tr)
    all_ok = bool(ok_id.all())
    # one streamed pass: the row-for-row prefix (same call, op, occurrence and call site) and
    # its status; then only the rows after it are read whole and matched
    # the same pass fingerprints every row (reshape_fingerprints), so the rows after the prefix
    # get their status without reading the table a second time
    p0, pre_status, _, da, db = stream_table(
        A, B, "reshapes", p_e, [("op", tr), ("nth", None), ("site_file", tr), ("site_line", None)],
        lambda xa, xb: reshape_block_status(xa, xb, tr, ok_id, all_ok),
        derive=(reshape_fingerprints(tr), RESHAPE_DERIVED))
    pa = pair_col(A, "reshapes", pair_of_a, n_pairs, 0, p0)
    pb = pair_col(B, "reshapes", pair_of_b, n_pairs, 1, p0)
    ta_, tb_ = na - p0, nb - p0
    keys = pack([np.concatenate([np.maximum(pa, 0), np.maximum(pb, 0)]),
                 np.concatenate([tr[A.col("reshapes", "op")[p0:]], B.col("reshapes", "op")[p0:]]),
                 np.concatenate([A.col("reshapes", "nth")[p0:], B.col("reshapes", "nth")[p0:]])])
    # calls whose op sequences differ in length (an op inserted or removed) are aligned with a
    # sequence matcher instead, so one extra op does not shift every later occurrence (the
    # prefix holds as many rows of a call on both sides, so counting the tail is enough)
    n_p = int(max(pa.max(initial=-1), pb.max(initial=-1))) + 1
    ca = np.bincount(pa[pa >= 0], minlength=n_p)
    cb = np.bincount(pb[pb >= 0], minlength=n_p)
    irregular = np.nonzero(ca != cb)[0]
    irr_a = np.isin(pa, irregular) if len(irregular) else np.zeros(ta_, bool)
    irr_b = np.isin(pb, irregular) if len(irregular) else np.zeros(tb_, bool)
    # the rows of calls with as many reshapes on both sides pair up call by call, mostly in order
    ia, ib = match_in_groups(np.where(irr_a, -1, pa), keys[:ta_], np.where(irr_b, -1, pb), keys[ta_:])
    ia, ib = with_prefix(p0, ia, ib)
    if len(irregular):
        xa_, xb_ = sequence_match(A, B, tr, pa, pb, irr_a, irr_b, p0)
        if len(xa_):
            ia, ib = np.concatenate([ia, xa_]), np.concatenate([ib, xb_])
            o = np.argsort(ia, kind="stable")
            ia, ib = ia[o], ib[o]
    st = np.zeros(len(ia), np.int8)
    st[:p0] = pre_status
    ja, jb = ia[p0:], ib[p0:]
    st[p0:] = reshape_status_derived(da["shape_fp"][ja], db["shape_fp"][jb], da["args"][ja], db["args"][jb])
    return assemble(ia, ib, st, na, nb, A.col("reshapes", "step") if na else np.zeros(0, np.int64),
                    B.col("reshapes", "step") if nb else np.zeros(0, np.int64),
                    lambda r: time_key(A.col("reshapes", "step")[r], A.col("reshapes", "seq")[r]),
                    lambda r: time_key(B.col("reshapes", "step")[r], B.col("reshapes", "seq")[r]), proj)


def _align_probes(A: TraceIndex, B: TraceIndex, tr: np.ndarray, calls: _Calls, proj: Projector) -> Aligned:
    pair_of_a, pair_of_b, n_pairs, p_e = calls.pair_of_a, calls.pair_of_b, calls.n_pairs, calls.p_e
    na, nb = len(A.probes), len(B.probes)
    if not na and not nb:
        z = np.zeros(0, np.int64)
        return Aligned(z, z, np.zeros(0, np.int8))
    PA, PB = A.probes, B.probes
    p0 = child_prefix(A, B, "probes", p_e, [("kind", tr), ("name", tr)])
    pa = pair_col(A, "probes", pair_of_a, n_pairs, 0, p0)
    pb = pair_col(B, "probes", pair_of_b, n_pairs, 1, p0)
    ta_, tb_ = na - p0, nb - p0
    # occurrences counted from the prefix on: the prefix holds the same keys on both sides
    base = pack([np.concatenate([np.maximum(pa, 0), np.maximum(pb, 0)]),
                 np.concatenate([tr[PA["kind"][p0:]], PB["kind"][p0:]]),
                 np.concatenate([tr[PA["name"][p0:]], PB["name"][p0:]])])
    occ = np.concatenate([occurrence(base[:ta_]), occurrence(base[ta_:])])
    keys = pack([base, occ])
    ka = np.where(pa >= 0, keys[:ta_], -1 - np.arange(ta_))
    kb = np.where(pb >= 0, keys[ta_:], -(ta_ + 1) - np.arange(tb_))
    ia, ib, p = match_keys(ka, kb)
    ia, ib = with_prefix(p0, ia, ib)
    p += p0

    def ca(f):
        return take(A.col("probes", f), ia, p)

    def cb(f):
        return take(B.col("probes", f), ib, p)

    shape_diff = (ca("ndim") != cb("ndim")) | (ca("shape") != cb("shape")).any(axis=1) | \
        (tr[ca("dtype")] != cb("dtype"))
    enc_a, enc_b = ca("enc"), cb("enc")
    has_data = (enc_a != ENC_NONE) | (enc_b != ENC_NONE)
    val_diff = np.zeros(len(ia), bool)
    hd = np.nonzero(has_data)[0]
    if len(hd):
        val_diff[hd] = blobs_differ(A, B, ia[hd], ib[hd]) | (enc_a[hd] != enc_b[hd])
    nd = np.nonzero(~has_data)[0]
    val_diff[nd] = tr[ca("info")[nd]] != cb("info")[nd]
    st = np.where(shape_diff, SHAPE, np.where(val_diff, DRIFT, SAME)).astype(np.int8)
    return assemble(ia, ib, st, na, nb, A.col("probes", "step") if na else np.zeros(0, np.int64),
                    B.col("probes", "step") if nb else np.zeros(0, np.int64),
                    lambda r: time_key(A.col("probes", "step")[r], A.col("probes", "seq")[r]),
                    lambda r: time_key(B.col("probes", "step")[r], B.col("probes", "seq")[r]), proj)
