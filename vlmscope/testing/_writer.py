"""The one writer behind every synthetic trace.

A fake forward pass drives an :class:`Emitter` (module calls with their tensors, reshapes,
probes, in execution order); :func:`build_tables` turns one step's emission into table rows,
with string ids from the one :class:`Strings` interner; :func:`place` puts a step's rows at
their global row numbers; :class:`ProbeData` lays out a step's probe values; and
:class:`TableSink` is the one place that hands tables to :class:`vlmscope.trace.TraceWriter`.
The module table is built by :func:`write_modules` (from :mod:`vlmscope.testing._modules`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from vlmscope.trace import (
    ENC_BITS, ENC_INT64, EVENT_DTYPE, MODULE_DTYPE, PROBE_DTYPE, RESHAPE_DTYPE, STEP_DTYPE, TENSOR_DTYPE,
    TraceWriter, pad_shape,
)

DEVICE = "cpu"

# Shape sentinels of a step template (a decode step emitted once, patched per step with numpy):
# the real key length (cache before + q_len), the cache length before the step, and the key
# length of the 4-D mask (which a fault may make differ from the real one).
SENT_K, SENT_C, SENT_KM = -100, -101, -102
_SENT_NAMES = {SENT_K: "{K}", SENT_C: "{C}", SENT_KM: "{KM}"}
_TEMPLATE = re.compile(r"\{[A-Za-z_]")


def fmt_shape(shape) -> str:
    """``[1, 5, 64]``; a sentinel dimension is written as its template field (``{K}``)."""
    return "[" + ", ".join(_SENT_NAMES.get(int(d), str(int(d))) for d in shape) + "]"


def sub_sentinels(shapes: np.ndarray, K: int, C: int, KM: int) -> None:
    """Replace the sentinels of a shape column in place."""
    shapes[shapes == SENT_K] = K
    shapes[shapes == SENT_C] = C
    shapes[shapes == SENT_KM] = KM


class Strings:
    """The string interner (ids of the trace's ``/strings``), with optional per-step templates.

    With ``templates=True``, a string holding a ``{field}`` is a template: it gets a negative id
    ``-(index + 1)`` and :meth:`resolve` interns its formatted value once per step.
    """

    def __init__(self, writer: TraceWriter, templates: bool = False):
        self.intern = writer.intern
        self.use_templates = templates
        self.templates: list[str] = []
        self._template_ids: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        return self.intern(s)

    def tpl(self, s: str) -> int:
        if not self.use_templates or not _TEMPLATE.search(s):
            return self.intern(s)
        i = self._template_ids.get(s)
        if i is None:
            i = self._template_ids[s] = len(self.templates)
            self.templates.append(s)
        return -(i + 1)

    def resolve(self, values: dict[str, Any], *columns: np.ndarray) -> None:
        """Intern every template formatted with ``values`` (in template order), and replace the
        template ids in ``columns`` (views into a step's tables) by those strings' ids."""
        ids = np.array([self.intern(t.format(**values)) for t in self.templates] or [0], np.int64)
        for v in columns:
            neg = v < 0
            v[neg] = ids[-v[neg] - 1]


@dataclass(frozen=True)
class Layout:
    """How an emission becomes rows. The two settings reproduce, bit for bit, the two writers
    this package replaced (the tests' numbers and the viewer's SVG snapshots depend on them)."""

    #: a return consumes a seq number (``end_seq`` is the number before it), as a call does
    return_takes_seq: bool
    #: a call's tensor rows are written when it returns (children first), as the recorder does;
    #: else in call order
    tensors_on_return: bool
    #: strings are interned in the order the forward produced them (tensor devices last);
    #: else table by table (tensors, then reshapes, then probes)
    intern_as_seen: bool


SYNTH_LAYOUT = Layout(return_takes_seq=False, tensors_on_return=True, intern_as_seen=True)
DEMO_LAYOUT = Layout(return_takes_seq=True, tensors_on_return=False, intern_as_seen=False)


def _tensor(role: int, spec: tuple) -> tuple:
    """(role, name, shape, dtype, tag, same) from a (name, shape, dtype[, tag[, same]]) spec.

    ``same`` names the logical tensor within the step: rows with the same ``same`` (and shape and
    dtype) are one tensor object seen by several calls (an output passed on as the next module's
    input), so they share one value sketch. None: a tensor of its own."""
    return (role, spec[0], tuple(spec[1]), spec[2], spec[3] if len(spec) > 3 else "",
            spec[4] if len(spec) > 4 else None)


class Emitter:
    """Collects one step's module calls, tensors, reshapes and probes as a fake forward runs.

    Shapes may hold the ``SENT_*`` sentinels; strings stay strings until :func:`build_tables`.
    """

    def __init__(self, modules: dict[str, int], layout: Layout):
        self.modules = modules
        self.layout = layout
        self.seq = 0
        self.calls: list[list[int]] = []        # [seq, end_seq, module, nth, depth, parent]
        self.call_tensors: list[list[tuple]] = []
        self.returned: list[int] = []           # calls in return order
        self.reshapes: list[tuple] = []
        self.probes: list[tuple] = []
        self.seen: list[tuple[str, Any]] = []   # ("t", tensors) / ("r", reshape) / ("p", probe), as emitted
        self.stack: list[int] = []
        self._nth: dict[int, int] = {}
        self._op_nth: dict[tuple[int, str], int] = {}

    def enter(self, path: str, inputs=(), kwargs=()) -> int:
        m = self.modules[path]
        nth = self._nth.get(m, 0)
        self._nth[m] = nth + 1
        ev = len(self.calls)
        self.calls.append([self.seq, 0, m, nth, len(self.stack), self.stack[-1] if self.stack else -1])
        self.seq += 1
        own = [_tensor(0, t) for t in inputs] + [_tensor(1, t) for t in kwargs]
        self.call_tensors.append(own)
        self.seen.append(("t", tuple(own)))
        self.stack.append(ev)
        return ev

    def exit(self, outputs=()) -> None:
        ev = self.stack.pop()
        outs = [_tensor(2, t) for t in outputs]
        self.call_tensors[ev].extend(outs)
        self.seen.append(("t", tuple(outs)))
        self.calls[ev][1] = self.seq
        if self.layout.return_takes_seq:
            self.seq += 1
        self.returned.append(ev)

    def call(self, path: str, inputs=(), outputs=(), body=None, kwargs=()) -> None:
        """A module call: enter, run ``body`` (the children), return."""
        self.enter(path, inputs, kwargs)
        if body is not None:
            body()
        self.exit(outputs)

    def leaf(self, path: str, inp: tuple, out: tuple, in_name: str = "input") -> None:
        """A call without children: one positional input ``(shape, dtype[, tag[, same]])``, one output."""
        self.call(path, [(in_name, *inp)], [("out", *out)])

    def reshape(self, op: str, ins, out, *, args: str, in_dtypes: str, out_dtype: str,
                site: tuple[str, int | None, str], n_out: int = 1) -> None:
        """A shape-changing op in the running call. ``site`` is (file, line, function); a line of
        None is made up from the op's string id and its ``nth`` (stable, not a real line)."""
        ev = self.stack[-1] if self.stack else -1
        key = (ev, op)
        nth = self._op_nth.get(key, 0)
        self._op_nth[key] = nth + 1
        row = (self.seq, ev, self.calls[ev][2] if ev >= 0 else -1, op, nth, [tuple(s) for s in ins], tuple(out),
               in_dtypes, args, out_dtype, n_out, *site)
        self.reshapes.append(row)
        self.seen.append(("r", row))
        self.seq += 1

    def probe(self, kind: str, name: str, shape, dtype: str, info: str, data: Any = None) -> None:
        """A probe of the running call. ``data`` is an array of values, a key the caller resolves
        per step (see :func:`attach_probe_data`), or None."""
        ev = self.stack[-1]
        row = (self.seq, ev, self.calls[ev][2], kind, name, tuple(shape), dtype, info, data)
        self.probes.append(row)
        self.seen.append(("p", row))
        self.seq += 1


# --------------------------------------------------------------------------- rows


def _tensor_strings(tensors, device: bool) -> Iterator[tuple[str, bool]]:
    """(string, may be a template) of tensor rows, in interning order."""
    for t in tensors:
        yield t[1], False
        yield t[3], False
        if device:
            yield DEVICE, False


def _reshape_strings(r: tuple) -> Iterator[tuple[str, bool]]:
    yield r[3], False                                    # op
    yield " ".join(fmt_shape(s) for s in r[5]), True     # in_shapes
    yield r[7], False                                    # in_dtypes
    yield r[8], True                                     # args
    yield r[9], False                                    # out_dtype
    yield r[11], False                                   # site file
    yield r[13], False                                   # site function


def _probe_strings(p: tuple) -> Iterator[tuple[str, bool]]:
    yield from ((p[3], False), (p[4], False), (p[6], False), (p[7], True))   # kind, name, dtype, info


def _step_strings(em: Emitter, tensor_order: list[int]) -> Iterator[tuple[str, bool]]:
    """Every string of the step, in the layout's interning order."""
    if em.layout.intern_as_seen:
        for kind, item in em.seen:
            yield from (_tensor_strings(item, device=False) if kind == "t" else
                        _reshape_strings(item) if kind == "r" else _probe_strings(item))
        for ev in tensor_order:
            yield from ((DEVICE, False) for _ in em.call_tensors[ev])
    else:
        for ev in tensor_order:
            yield from _tensor_strings(em.call_tensors[ev], device=True)
        for r in em.reshapes:
            yield from _reshape_strings(r)
        for p in em.probes:
            yield from _probe_strings(p)


def _columns(dtype: np.dtype, rows: list[tuple], fields: tuple[str, ...]) -> np.ndarray:
    """A table of ``dtype`` with ``fields`` filled from ``rows`` (one tuple per row)."""
    out = np.zeros(len(rows), dtype)
    if rows:
        for i, f in enumerate(fields):
            out[f] = np.array([r[i] for r in rows], dtype=np.int64).reshape(out[f].shape)
    return out


def build_tables(em: Emitter, S: Strings) -> dict[str, Any]:
    """One step's rows, with row references local to the step (see :func:`place`).

    Returns the four tables, ``tensor_specs`` ((module, role, name, shape, dtype) of each tensor
    row), ``tensor_tags`` (the emitter's tensor tags, for faults), ``probe_data`` (each
    probe's ``data``, for :func:`attach_probe_data`) and ``sketch_src`` (see :func:`sketch_sources`).
    """
    order = em.returned if em.layout.tensors_on_return else list(range(len(em.calls)))
    for text, maybe_template in _step_strings(em, order):   # ids first, in the layout's order
        (S.tpl if maybe_template else S)(text)
    starts, trows, specs, all_t = [0] * len(em.calls), [], [], []
    for ev in order:
        starts[ev] = len(trows)
        all_t += em.call_tensors[ev]
        trows += [(ev, t[0], S(t[1]), len(t[2]), pad_shape(t[2]), S(t[3]), S(DEVICE), t[4])
                  for t in em.call_tensors[ev]]
        specs += [(em.calls[ev][2], *t[:4]) for t in em.call_tensors[ev]]
    events = _columns(EVENT_DTYPE, [(*c, starts[i], len(em.call_tensors[i])) for i, c in enumerate(em.calls)],
                      ("seq", "end_seq", "module", "nth", "depth", "parent", "tensor_start", "tensor_count"))
    tensors = _columns(TENSOR_DTYPE, trows, ("event", "role", "name", "ndim", "shape", "dtype", "device"))
    rrows = []
    for r in em.reshapes:
        (seq, ev, m, op, nth, ins, out, in_dtypes, args, out_dtype, n_out, file, line, func) = r
        op_id = S(op)
        rrows.append((seq, ev, m, op_id, nth, len(ins), len(ins[0]), pad_shape(ins[0]),
                      S.tpl(" ".join(fmt_shape(s) for s in ins)), S(in_dtypes), S.tpl(args), n_out, len(out),
                      pad_shape(out), S(out_dtype), S(file), 100 + 7 * (op_id % 50) + nth if line is None else line,
                      S(func)))
    reshapes = _columns(RESHAPE_DTYPE, rrows, (
        "seq", "event", "module", "op", "nth", "n_in", "in_ndim", "in_shape", "in_shapes", "in_dtypes", "args",
        "n_out", "out_ndim", "out_shape", "out_dtype", "site_file", "site_line", "site_func"))
    probes = _columns(PROBE_DTYPE, [(seq, ev, m, S(kind), S(name), len(shape), pad_shape(shape), S(dt), S.tpl(info))
                                    for (seq, ev, m, kind, name, shape, dt, info, _) in em.probes],
                      ("seq", "event", "module", "kind", "name", "ndim", "shape", "dtype", "info"))
    return {"events": events, "tensors": tensors, "reshapes": reshapes, "probes": probes,
            "tensor_specs": specs,
            "tensor_tags": np.array([r[7] for r in trows], dtype=str) if trows else np.zeros(0, str),
            "probe_data": [p[8] for p in em.probes], "sketch_src": sketch_sources(all_t)}


def sketch_sources(tensors: list[tuple]) -> np.ndarray:
    """Per tensor row (emitter tuples, in row order): the row whose value sketch it shares (the
    first row of its logical tensor, itself when alone), or -1 when it gets none (not floating,
    a mask, a 0-d tensor). Rows share when their ``same`` names, shapes and dtypes agree."""
    src = np.full(len(tensors), -1, np.int64)
    first: dict[tuple, int] = {}
    for i, t in enumerate(tensors):
        if "float" not in t[3] or "mask" in t[1] or not t[2]:
            continue
        src[i] = first.setdefault((t[5], t[2], t[3]) if t[5] is not None else (i,), i)
    return src


def place(tables: dict[str, Any], step: int, e0: int, t0: int) -> dict[str, np.ndarray]:
    """Copies of a step's tables at their global rows: events from ``e0``, tensors from ``t0``."""
    ev, te = tables["events"].copy(), tables["tensors"].copy()
    rs, pr = tables["reshapes"].copy(), tables["probes"].copy()
    ev["step"] = step
    ev["parent"] = np.where(ev["parent"] >= 0, ev["parent"] + e0, -1)
    ev["tensor_start"] += t0
    te["step"] = step
    te["event"] += e0
    rs["step"] = step
    rs["event"] = np.where(rs["event"] >= 0, rs["event"] + e0, -1)
    pr["step"] = step
    pr["event"] += e0
    return {"events": ev, "tensors": te, "reshapes": rs, "probes": pr}


def fill_numel(te: np.ndarray) -> None:
    dims = np.where(np.arange(te["shape"].shape[1])[None, :] < te["ndim"][:, None], te["shape"], 1)
    te["numel"] = np.prod(dims, axis=1)


# --------------------------------------------------------------------------- probe values


def encode(value: np.ndarray) -> tuple[int, np.ndarray]:
    """(enc, bytes) of a probe value: packed bits for a bool array, little-endian int64 else."""
    if value.dtype == bool:
        return ENC_BITS, np.packbits(value.ravel())
    return ENC_INT64, np.frombuffer(np.ascontiguousarray(value, dtype="<i8").tobytes(), np.uint8)


class ProbeData:
    """A step's block of ``/probe_data``: each distinct value stored once."""

    def __init__(self, start: int):
        self.start, self.size = start, 0
        self.chunks: list[np.ndarray] = []
        self._at: dict[Any, tuple[int, int, int]] = {}

    def add(self, value: np.ndarray, key: Any = None) -> tuple[int, int, int]:
        """(enc, offset, length) of ``value``, stored unless a value of the same ``key`` (by
        default: the same encoding, shape and bytes) already is."""
        if key is not None and key in self._at:
            return self._at[key]
        enc, raw = encode(value)
        if key is None:
            key = bytes([enc]) + repr(value.shape).encode() + raw.tobytes()
            if key in self._at:
                return self._at[key]
        self._at[key] = loc = (enc, self.start + self.size, len(raw))
        self.chunks.append(raw)
        self.size += len(raw)
        return loc


def attach_probe_data(pr: np.ndarray, refs: list, data: ProbeData, values: dict | None = None) -> None:
    """Store each probe's values and point its row at them (``enc``, ``data_off``, ``data_len``;
    ``ndim`` and ``shape`` follow the data). ``refs`` are the probes' ``data``: arrays, or with
    ``values`` keys into it (one stored copy per key); None is a probe without values."""
    for i, ref in enumerate(refs):
        if ref is None:
            continue
        value = ref if values is None else values[ref]
        pr["enc"][i], pr["data_off"][i], pr["data_len"][i] = data.add(value, None if values is None else ref)
        pr["ndim"][i] = value.ndim
        pr["shape"][i] = pad_shape(value.shape)


# --------------------------------------------------------------------------- writing


def write_modules(w: TraceWriter, table: list[tuple[str, str]]) -> dict[str, int]:
    """Write ``/modules`` from (path, class) pairs in ``named_modules()`` order; returns path -> row."""
    rows = np.zeros(len(table), MODULE_DTYPE)
    index: dict[str, int] = {}
    for i, (path, cls) in enumerate(table):
        index[path] = i
        rows[i]["path"], rows[i]["cls"] = w.intern(path), w.intern(cls)
        rows[i]["depth"] = 0 if path == "" else path.count(".") + 1
        rows[i]["parent"] = -1 if path == "" else index[path.rpartition(".")[0]]
    w.set_modules(rows)
    return index


_BLOCKS = ("events", "tensors", "reshapes", "probes")


class TableSink:
    """Collects whole steps and appends them through the writer every ``every`` steps."""

    def __init__(self, w: TraceWriter, every: int = 256):
        self.w, self.every = w, every
        self.counts = {k: 0 for k in (*_BLOCKS, "steps", "sketches")}
        self.data_bytes = 0
        self.sketch_values = 0      # float16 values in /sketch_data, pending ones included
        self._pending: dict[str, list[np.ndarray]] = {k: [] for k in self.counts}
        self._data: list[np.ndarray] = []
        self._sketch_data: list[np.ndarray] = []

    def probe_data(self) -> ProbeData:
        """The next step's probe-data block."""
        return ProbeData(self.data_bytes)

    def add(self, tables: dict[str, np.ndarray], data: ProbeData, sketches: tuple | None = None,
            **step: Any) -> None:
        """Queue a step: its placed tables, its probe data, its value sketches (``/sketches``
        rows at their global offsets and their ``[T, width]`` float16 values, or None), and its
        ``/steps`` row fields (the ``*_start`` / ``*_count`` fields are filled here)."""
        st = np.zeros(1, STEP_DTYPE)
        for k, v in step.items():
            st[0][k] = v
        for k in _BLOCKS:
            st[0][f"{k[:-1]}_start"], st[0][f"{k[:-1]}_count"] = self.counts[k], len(tables[k])
        for k, a in (*((k, tables[k]) for k in _BLOCKS), ("steps", st)):
            self._pending[k].append(a)
            self.counts[k] += len(a)
        if sketches is not None and len(sketches[0]):
            self._pending["sketches"].append(sketches[0])
            self.counts["sketches"] += len(sketches[0])
            self._sketch_data.append(sketches[1])
            self.sketch_values += sketches[1].size
        self._data += data.chunks
        self.data_bytes += data.size
        if self.counts["steps"] % self.every == 0:
            self.flush()

    def flush(self) -> None:
        for k, blocks in self._pending.items():
            if blocks:
                self.w.append(k, np.concatenate(blocks))
                blocks.clear()
        if self._data:
            self.w.append_probe_data(np.concatenate(self._data))
            self._data.clear()
        if self._sketch_data:
            self.w.append_sketch_data(np.concatenate([d.ravel() for d in self._sketch_data]))
            self._sketch_data.clear()
        self.w.end_step()


def step_fields(pos_ranges: list[tuple[int, int]], mask_shape: tuple, **fields: Any) -> dict[str, Any]:
    """``/steps`` row fields, with ``pos_rows``/``pos_min``/``pos_max`` from the position rows'
    (min, max) and ``mask_ndim``/``mask_shape`` from the mask's shape (both padded with -1)."""
    fields["pos_rows"] = len(pos_ranges)
    fields["pos_min"] = [int(a) for a, _ in pos_ranges] + [-1] * (3 - len(pos_ranges))
    fields["pos_max"] = [int(b) for _, b in pos_ranges] + [-1] * (3 - len(pos_ranges))
    fields["mask_ndim"] = len(mask_shape)
    fields["mask_shape"] = list(mask_shape) + [-1] * (4 - len(mask_shape))
    return fields
