"""Step assembly: a finished step buffer becomes one block per table, appended to the trace.

This runs once per step, after the step's one device->host copy: it turns the typed rows
into the numpy structured arrays of :mod:`vlmscope.trace` (step-local row references
become global ones), derives the stats and the probes' info from the copied bytes, and
writes the step's ``/steps`` row.
"""

from __future__ import annotations

import json
import time
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vlmscope import trace as T
from vlmscope.recorder.buffer import ProbeRow, StepBuffer, columns
from vlmscope.trace.sketch import digests
from vlmscope.recorder.stats import StepSketches, copy_to_host, float_at, sketches_from_blob, stats_from_blob
from vlmscope.recorder.structure import ModelInfo
from vlmscope.semantics import image_spans, image_token_count, is_under, segments


@dataclass(frozen=True)
class Bases:
    """Global row index of the step's first row in each table."""

    events: int
    tensors: int
    reshapes: int
    probes: int


def write_step(w: T.TraceWriter, st: StepBuffer, model: ModelInfo,
               kind_of: Callable[[StepBuffer], int] | None = None) -> int:
    """Write the step ``st``; returns its number of events. ``kind_of`` decides the step's kind
    (prefill or decode) once its probes are derived; without it only step 0 is a prefill."""
    for row in st.events:  # calls still open (the step raised): keep what they saw
        if row.pending:
            st.flush_tensors(row)
    blob = copy_to_host(st)  # the one device->host copy of this step
    base = Bases(w.counts["events"], w.counts["tensors"], w.counts["reshapes"], w.counts["probes"])
    payload_ids = write_payloads(w, st, blob)
    events = events_table(st, base)
    sk = sketches_from_blob(blob, st) if st.sketch_rows else None
    tensors = tensors_table(st, blob, base, payload_ids, sk)
    reshapes = reshapes_table(st, base)
    probes, pos_rows = ProbeAssembly(w, st, blob, model).table(base)
    st.kind = kind_of(st) if kind_of is not None else (T.KIND_PREFILL if st.index == 0 else T.KIND_DECODE)
    w.append("events", events)
    w.append("tensors", tensors)
    w.append("reshapes", reshapes)
    w.append("probes", probes)
    if sk is not None:
        w.append("sketches", sketches_block(w, st, sk, base, tensors))
    w.append("steps", step_row(st, base, pos_rows))
    w.end_step()
    return len(events)


def write_payloads(w: T.TraceWriter, st: StepBuffer, blob: np.ndarray) -> list[int]:
    """Store the step's requested payloads; returns their /payloads numbers by request index."""
    ids: list[int] = []
    for req in st.payloads:
        arr = blob[req.off:req.off + req.nbytes].view(np.dtype(req.dtype) if req.dtype != "bool" else np.uint8)
        ids.append(w.add_payload(arr.reshape(req.shape).copy(), module=req.module, step=st.index, name=req.name,
                                 dtype=req.orig_dtype))
    return ids


def events_table(st: StepBuffer, base: Bases) -> np.ndarray:
    ev = np.zeros(len(st.events), T.EVENT_DTYPE)
    if not st.events:
        return ev
    seq, end_seq, module, nth, depth, parent, tstart, tcount, status, dur = columns(
        st.events, "seq", "end_seq", "module", "nth", "depth", "parent", "tensor_start", "tensor_count",
        "status", "dur_us")
    ev["step"] = st.index
    ev["seq"] = seq
    end = np.asarray(end_seq)
    ev["end_seq"] = np.where(end < 0, st.seq, end)  # calls still open end with the step
    ev["module"] = module
    ev["nth"] = nth
    ev["depth"] = depth
    par = np.asarray(parent, dtype=np.int64)
    ev["parent"] = np.where(par >= 0, par + base.events, -1)
    ev["tensor_start"] = np.asarray(tstart, dtype=np.int64) + base.tensors
    ev["tensor_count"] = tcount
    ev["status"] = status
    ev["dur_us"] = dur
    return ev


def tensors_table(st: StepBuffer, blob: np.ndarray, base: Bases, payload_ids: list[int],
                  sk: StepSketches | None = None) -> np.ndarray:
    tt = np.zeros(len(st.tensors), T.TENSOR_DTYPE)
    if not st.tensors:
        return tt
    event, role, name, ndim, shape, dtype, device, numel, slots, payload, sketch = columns(
        st.tensors, "event", "role", "name", "ndim", "shape", "dtype", "device", "numel", "stats", "payload",
        "sketch")
    tt["step"] = st.index
    tt["event"] = np.asarray(event, dtype=np.int64) + base.events
    tt["role"] = role
    tt["name"] = name
    tt["ndim"] = ndim
    tt["shape"] = [T.pad_shape(s) for s in shape]
    tt["dtype"] = dtype
    tt["device"] = device
    tt["numel"] = numel
    stats = stats_from_blob(blob, slots, np.asarray(sketch, dtype=np.int64), sk)
    mn, mx, total, norm, nan, inf = stats.T
    n = np.maximum(np.asarray(numel, dtype=np.float64), 1)
    mean = total / n
    with np.errstate(invalid="ignore", over="ignore"):
        var = np.maximum(norm ** 2 / n - mean ** 2, 0.0)
    tt["min"], tt["max"], tt["mean"], tt["std"] = mn, mx, mean, np.sqrt(var)
    tt["absmax"] = np.maximum(np.abs(mn), np.abs(mx))
    tt["nan"] = np.nan_to_num(nan, nan=0).astype(np.int64)
    tt["inf"] = np.nan_to_num(inf, nan=0).astype(np.int64)
    tt["payload"] = [payload_ids[p] if p >= 0 else -1 for p in payload]
    return tt


def sketches_block(w: T.TraceWriter, st: StepBuffer, sk: StepSketches, base: "Bases",
                   tensors: np.ndarray) -> np.ndarray:
    """Write the step's encoded sketches into ``/sketch_data`` and return their ``/sketches`` rows
    (a tensor seen by several calls shares its sketch's values); ``tensors``: the step's
    ``/tensors`` rows."""
    scales, data, n = sk.scales, sk.data, sk.counts
    first = w.append_sketch_data(data)
    width = data.shape[1]
    slot_off = first + (np.cumsum(n) - n) * width
    sketch = np.fromiter(map(attrgetter("sketch"), st.tensors), np.int64, len(st.tensors))
    ti = np.flatnonzero(sketch >= 0)
    si = sketch[ti]
    rows = np.zeros(len(ti), T.OPTIONAL_TABLES["sketches"])
    if len(ti):
        rows["tensor"] = ti + base.tensors
        rows["rows"] = n[si]
        rows["width"] = width
        rows["scale"] = scales[si]
        rows["dtype"] = tensors["dtype"][ti]
        rows["digest"] = digests(data, n)[si]
        rows["off"] = slot_off[si]
    return rows


def reshapes_table(st: StepBuffer, base: Bases) -> np.ndarray:
    rr = np.zeros(len(st.reshapes), T.RESHAPE_DTYPE)
    if not st.reshapes:
        return rr
    (seq, event, module, op, nth, n_in, in_shape, in_shapes, in_dtypes, args, n_out, out_shape, out_dtype,
     site, status) = columns(st.reshapes, "seq", "event", "module", "op", "nth", "n_in", "in_shape", "in_shapes",
                             "in_dtypes", "args", "n_out", "out_shape", "out_dtype", "site", "status")
    rr["step"] = st.index
    rr["seq"] = seq
    e = np.asarray(event, dtype=np.int64)
    rr["event"] = np.where(e >= 0, e + base.events, -1)
    rr["module"] = module
    rr["op"] = op
    rr["nth"] = nth
    rr["n_in"] = n_in
    rr["in_ndim"] = [len(s) for s in in_shape]
    rr["in_shape"] = [T.pad_shape(s) for s in in_shape]
    rr["in_shapes"] = in_shapes
    rr["in_dtypes"] = in_dtypes
    rr["args"] = args
    rr["n_out"] = n_out
    rr["out_ndim"] = [len(s) for s in out_shape]
    rr["out_shape"] = [T.pad_shape(s) for s in out_shape]
    rr["out_dtype"] = out_dtype
    rr["site_file"] = [s.file for s in site]
    rr["site_line"] = [s.line for s in site]
    rr["site_func"] = [s.func for s in site]
    rr["status"] = status
    return rr


def step_row(st: StepBuffer, base: Bases, pos_rows: list[list[int]] | None) -> np.ndarray:
    """The step's ``/steps`` row (``pos_rows``: [min, max] per row of the text model's position ids)."""
    row = np.zeros(1, T.STEP_DTYPE)
    row["step"] = st.index
    row["kind"] = st.kind if st.kind >= 0 else (T.KIND_PREFILL if st.index == 0 else T.KIND_DECODE)
    row["status"] = 1 if st.failed else 0
    row["input_len"], row["q_len"] = st.input_len, st.first_layer_q
    row["cache_before"], row["cache_after"] = st.cache_before, st.cache_after
    if pos_rows is not None:
        if len(pos_rows) == 4:  # [text, t, h, w]: the three M-RoPE rows
            pos_rows = pos_rows[1:]
        row["pos_rows"] = len(pos_rows)
        for j, (lo, hi) in enumerate(pos_rows[:3]):
            row["pos_min"][0, j], row["pos_max"][0, j] = lo, hi
    mask_shape = st.mask_shape or ()
    row["mask_ndim"] = len(mask_shape)
    row["mask_shape"] = (tuple(mask_shape) + (-1,) * 4)[:4]
    row["image_tokens"] = st.image_tokens
    row["event_start"], row["event_count"] = base.events, len(st.events)
    row["tensor_start"], row["tensor_count"] = base.tensors, len(st.tensors)
    row["reshape_start"], row["reshape_count"] = base.reshapes, len(st.reshapes)
    row["probe_start"], row["probe_count"] = base.probes, len(st.probes)
    row["wall_ms"] = (time.perf_counter() - st.t0) * 1e3
    return row


# ---------------------------------------------------------------------------- probes


@dataclass
class ProbeAssembly:
    """The probe block of one step: decodes the values, derives each probe's info, stores the
    values compactly in /probe_data (a tensor seen by several probes is stored once), and picks
    the position ids that describe the step."""

    w: T.TraceWriter
    st: StepBuffer
    blob: np.ndarray
    model: ModelInfo
    stored: dict[tuple, tuple[int, int]] = field(default_factory=dict)  # values key -> (offset, length)
    chunks: list[np.ndarray] = field(default_factory=list)
    cursor: int = 0
    segments: tuple[int, list] | None = None
    pos: tuple[bool, list] | None = None  # (from the text model, rows) of the chosen position ids
    token_kinds: np.ndarray | None = None  # [B, L] int8 codes of SPAN_KINDS for the root's input_ids
    row_spans: dict[tuple, list] = field(default_factory=dict)  # values key -> position_ids row_spans

    def table(self, base: Bases) -> tuple[np.ndarray, list[list[int]] | None]:
        """The probe rows, and the [min, max] rows of the position ids that reached the text model."""
        st = self.st
        self.cursor = self.w.probe_bytes
        self.segments = self._root_segments()
        self.token_kinds = self._token_kinds()
        shapes, encs, offs, lens, infos = [], [], [], [], []
        for p in st.probes:
            data, shape, info = self._values(p)
            self._derive(p, data, info)
            off, n = self._store(p, data) if data is not None else (0, 0)
            shapes.append(shape)
            encs.append(p.enc if data is not None else T.ENC_NONE)
            offs.append(off)
            lens.append(n)
            infos.append(self.w.intern(json.dumps(info, separators=(",", ":"))) if info else 0)
        if self.chunks:
            self.w.append_probe_data(np.concatenate(self.chunks))
        pr = np.zeros(len(st.probes), T.PROBE_DTYPE)
        if st.probes:
            seq, event, module, kind, name, dtype = columns(st.probes, "seq", "event", "module", "kind", "name",
                                                            "dtype")
            pr["step"] = st.index
            pr["seq"] = seq
            pr["event"] = np.asarray(event, dtype=np.int64) + base.events
            pr["module"] = module
            pr["kind"] = kind
            pr["name"] = name
            pr["ndim"] = [len(s) for s in shapes]
            pr["shape"] = [T.pad_shape(s) for s in shapes]
            pr["dtype"] = dtype
            pr["enc"] = encs
            pr["data_off"] = offs
            pr["data_len"] = lens
            pr["info"] = infos
        return pr, self.pos[1] if self.pos is not None else None

    def _root_segments(self) -> tuple[int, list] | None:
        """(L, [[kind, start, end], ...]): the text/image spans of row 0 of the root's input_ids."""
        tok = self.model.image_token_id
        for p in self.st.probes:
            if p.derive == "input_ids" and p.event == self.st.root_ev and p.off >= 0 and tok is not None:
                ids = self.blob[p.off:p.off + p.nbytes].view(np.int64).reshape(p.shape)
                row = ids.reshape(-1, ids.shape[-1])[0] if ids.ndim else ids.reshape(1)
                return len(row), segments(row, tok)
        return None

    def _root_probe(self, derive: str, ndim: int | None = None) -> ProbeRow | None:
        """The root call's probe of a kind (the step's own inputs), queued on the device."""
        for p in self.st.probes:
            if p.derive == derive and p.event == self.st.root_ev and p.off >= 0 and (
                    ndim is None or len(p.shape) == ndim):
                return p
        return None

    def _token_kinds(self) -> np.ndarray | None:
        """What each token of the root's ``input_ids`` is, per batch row ([B, L] codes of
        SPAN_KINDS): text, image or video placeholder, or padding (masked out by the root's 2-D
        attention mask; its last L columns are the step's tokens). Also sets the step's
        padding side from that mask."""
        ids_p = self._root_probe("input_ids")
        mask_p = self._root_probe("attention_mask", ndim=2)
        mask = None
        if mask_p is not None:
            mask = self.blob[mask_p.off:mask_p.off + mask_p.nbytes].astype(bool).reshape(mask_p.shape)
            self.st.padding_side = padding_side(mask)
        if ids_p is None or not ids_p.shape:
            return None
        ids = self.blob[ids_p.off:ids_p.off + ids_p.nbytes].view(np.int64).reshape(ids_p.shape)
        ids = ids.reshape(-1, ids.shape[-1])
        kinds = np.zeros(ids.shape, dtype=np.int8)
        m = self.model
        if m.image_token_id is not None:
            kinds[ids == m.image_token_id] = 1
        if m.video_token_id is not None:
            kinds[ids == m.video_token_id] = 2
        L = ids.shape[1]
        if mask is not None and mask.shape[0] == ids.shape[0] and mask.shape[1] >= L:
            kinds[~mask[:, mask.shape[1] - L:]] = 3
        return kinds

    def _values(self, p: ProbeRow) -> tuple[np.ndarray | None, tuple, dict]:
        """The probe's values on the host (or None), its shape, and a fresh copy of its info."""
        info = p.info
        if p.enc == T.ENC_FLOAT64 and p.off >= 0:
            raw = self.blob[p.off:p.off + p.nbytes].view(np.float32 if p.width == 4 else np.float64)
            return raw.astype(np.float64).reshape(p.shape), p.shape, dict(info or {})
        if p.enc == T.ENC_FLOAT64 and p.host is not None:
            return p.host, p.shape, dict(info or {})
        if p.enc == T.ENC_INT64 and p.off >= 0:
            return self.blob[p.off:p.off + p.nbytes].view(np.int64).reshape(p.shape), p.shape, dict(info or {})
        if p.enc == T.ENC_INT64 and p.host is not None:
            return p.host, p.shape, dict(info or {})
        if p.derive == "rope":
            # the last q_len rows of a table built for KV indices 0..table_len-1
            st, table_len = self.st, info["table_len"]
            q = st.first_layer_q if st.first_layer_q > 0 else max(st.input_len, 0)
            data = np.arange(max(table_len - q, 0), table_len, dtype=np.int64)
            if data.size:
                info = {**info, "min": int(data[0]), "max": int(data[-1])}
            return data, data.shape, dict(info)
        if p.enc == T.ENC_BITS:
            return self.blob[p.off:p.off + p.nbytes].astype(bool).reshape(p.shape), p.shape, dict(info or {})
        return None, p.shape, dict(info or {})

    def _derive(self, p: ProbeRow, data: np.ndarray | None, info: dict) -> None:
        """Fill ``info`` with what the values say (ranges, image spans, the mask's fill value)."""
        kind = p.derive
        if kind == "position_ids" and data is not None:
            self._position_ids(p, data, info)
        elif kind == "input_ids" and data is not None:
            tok, vid = self.model.image_token_id, self.model.video_token_id
            rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, 1)
            if tok is not None:
                info.update({"image_token_id": int(tok), "spans": image_spans(data, tok),
                             "image_tokens": image_token_count(data, tok),
                             "row_image_tokens": (rows == tok).sum(axis=1).tolist()})
            if vid is not None:
                info.update({"video_token_id": int(vid), "video_spans": image_spans(data, vid),
                             "row_video_tokens": (rows == vid).sum(axis=1).tolist()})
            if p.event == self.st.root_ev and self.st.image_tokens < 0:
                self.st.image_tokens = info.get("image_tokens", -1)
        elif kind == "attention_mask":
            if p.stat_off >= 0:
                mn = float_at(self.blob, p.stat_off)
                if info["style"] == "additive":
                    # the blocked value; None when nothing is blocked (e.g. a decode step)
                    info["min"] = mn
                    info["fill"] = mn if data is not None and not data.all() else None
            if data is not None and data.ndim == 2:  # [B, K]: a padding mask
                keys = data.sum(axis=1)
                info["row_keys"] = keys.tolist()
                info["row_pad"] = (data.shape[1] - keys).tolist()
        elif p.enc == T.ENC_FLOAT64 and data is not None:
            if data.size and kind != "token_norms":
                info["min"], info["max"] = float(data.min()), float(data.max())
        elif kind is not None and kind != "rope" and data is not None and data.size:
            info["min"], info["max"] = int(data.min()), int(data.max())

    def _position_ids(self, p: ProbeRow, data: np.ndarray, info: dict) -> None:
        """Per-row ranges, per-span ranges, and whether these are the step's position ids."""
        rows = data.reshape(1, -1) if data.ndim <= 2 else data.reshape(data.shape[0], -1)
        info["rows"] = [[int(r.min()), int(r.max())] if r.size else [0, -1] for r in rows]
        segs = self.segments
        if segs and data.ndim and data.shape[-1] == segs[0]:
            # per text/image span of batch row 0: [kind, start, end, [[min, max] per row]]
            v = data.reshape(-1, *data.shape[-2:]) if data.ndim >= 2 else data.reshape(1, 1, -1)
            info["spans"] = [[kind, a, b, [[int(r[0, a:b].min()), int(r[0, a:b].max())] for r in v]]
                             for kind, a, b in segs[1]]
        m = self.model
        path = m.paths[p.module]
        if m.structure.vision_model and is_under(path, m.structure.vision_model):
            return  # the vision tower's own (2-D rotary) positions
        kinds = self.token_kinds
        if kinds is not None and data.ndim and data.shape[-1] == kinds.shape[1]:
            key = (p.off, p.nbytes) if p.off >= 0 else None
            spans = self.row_spans.get(key) if key is not None else None
            if spans is None:
                spans = row_spans(data, kinds)
                if key is not None:
                    self.row_spans[key] = spans
            if spans is not None:
                info["row_spans"] = spans
        in_text = p.module == m.text_model_id or bool(m.decoder_prefix and path.startswith(m.decoder_prefix))
        # the first position ids of the step, unless later ones reach the text model
        if self.pos is None or (in_text and not self.pos[0]):
            self.pos = (in_text, info["rows"])

    def _store(self, p: ProbeRow, data: np.ndarray) -> tuple[int, int]:
        """(offset, length) of the values in /probe_data, appending them the first time."""
        # values from the device blob are keyed by their place in it, host values by identity
        # (each stays alive, viewed by its chunk, until the step is written)
        key = (p.off, p.nbytes, p.enc) if p.off >= 0 else (id(data), -1, p.enc)
        stored = self.stored.get(key)
        if stored is None:
            raw = np.packbits(data.ravel()) if p.enc == T.ENC_BITS else np.ascontiguousarray(
                data, dtype=np.float64 if p.enc == T.ENC_FLOAT64 else np.int64).view(np.uint8).ravel()
            stored = self.stored[key] = (self.cursor, raw.size)
            self.cursor += raw.size
            self.chunks.append(raw)
        return stored


#: token kinds of ``position_ids`` row_spans, by code
SPAN_KINDS = ("text", "image", "video", "pad")


def padding_side(mask: np.ndarray) -> str | None:
    """``"left"`` or ``"right"`` from a 2-D ``[B, K]`` allowed-mask whose padded rows are masked at
    the start or at the end; None when no row is padded (or the sides are mixed)."""
    if mask.ndim != 2 or not mask.size:
        return None
    left, right = bool((~mask[:, 0]).any()), bool((~mask[:, -1]).any())
    if left == right:
        return None
    return "left" if left else "right"


def row_spans(data: np.ndarray, kinds: np.ndarray) -> list | None:
    """``[[kind, row, start, end, [[min, max] per axis]], ...]``: the runs of one token kind of
    every batch row, with the range of each position axis over the run. ``data`` is position
    ids ``[B, S]``, ``[A, B, S]`` (M-RoPE) or ``[S]``; a batch dimension of 1 is broadcast."""
    B, S = kinds.shape
    if data.ndim == 1:
        v = data.reshape(1, 1, S)
    elif data.ndim == 2:
        v = data[None]
    elif data.ndim == 3:
        v = data
    else:
        return None
    if v.shape[1] not in (1, B) or S == 0:
        return None
    out: list = []
    for b in range(B):
        k = kinds[b]
        starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        ends = np.append(starts[1:], S)
        vb = v[:, b if v.shape[1] == B else 0, :]
        lo = np.minimum.reduceat(vb, starts, axis=1).tolist()
        hi = np.maximum.reduceat(vb, starts, axis=1).tolist()
        for j, (a, e) in enumerate(zip(starts.tolist(), ends.tolist())):
            out.append([SPAN_KINDS[k[a]], b, a, e, [[lo[ax][j], hi[ax][j]] for ax in range(len(lo))]])
    return out
