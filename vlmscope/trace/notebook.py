"""Readable views of a trace for notebooks and the REPL.

The accessors of :class:`~vlmscope.trace.Trace` return numpy structured arrays (other code
depends on that), whose rows print as unlabelled tuples of interned string ids. A
:class:`TableView` (``t.view("events", step=0)``) is the same rows with their strings resolved
(module paths, classes, kinds, dtypes, roles, shapes): its ``repr`` and ``_repr_html_`` show
the first :data:`MAX_ROWS` rows and "… N more rows", every string made safe
(:func:`~vlmscope.trace.text.printable`, and :func:`html.escape` in HTML), and ``to_pandas()``
gives all of them as a DataFrame when pandas is installed (pandas stays optional).

:func:`trace_repr` and :func:`trace_html` are ``Trace``'s own ``repr``: path, format, status,
model and a summary of the step table. No function here raises on a damaged or closed trace:
a repr that fails would hide the trace it describes.

h5py, numpy and the standard library only (pandas is imported inside ``to_pandas``).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .format import ENC_BITS, ENC_FLOAT64, ENC_INT64, ENC_NONE, KIND_DECODE, KIND_PREFILL, ROLE_NAMES
from .text import printable

if TYPE_CHECKING:  # pragma: no cover
    from .reader import StepView, Trace

__all__ = ["MAX_ROWS", "TableView", "trace_repr", "trace_html", "step_repr", "step_html", "require"]

#: rows a view shows in its ``repr`` and ``_repr_html_`` (``view.max_rows`` overrides it per view)
MAX_ROWS = 20
#: characters of one cell in the text ``repr`` (the HTML and the DataFrame hold the whole value)
MAX_CELL = 60
#: steps the trace's own ``repr`` lists
MAX_STEPS = 12

_KINDS = {KIND_PREFILL: "prefill", KIND_DECODE: "decode"}
_ENCODINGS = {ENC_NONE: "none", ENC_INT64: "int64", ENC_BITS: "bits", ENC_FLOAT64: "float64"}
_STATUS = {0: "ok", 1: "raised"}
#: where an optional dependency comes from, for the ImportError that names it
EXTRA = "notebook"


def require(module: str, what: str) -> Any:
    """Import an optional dependency (pandas, matplotlib) or raise an ImportError that says how to
    install it: ``what`` is the feature that needs it, e.g. ``"Trace.view(...).to_pandas()"``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise ImportError(f"{what} needs {top}, which vlmscope does not install by default: "
                          f"pip install 'vlmscope[{EXTRA}]' (or pip install {top})", name=top) from None


# ---------------------------------------------------------------------------- columns

def _strs(t: "Trace", ids: np.ndarray) -> np.ndarray:
    """Interned strings by id (-1, "no string", is ``""``)."""
    s = t.strings
    ids = np.asarray(ids, np.int64)
    if not len(s):
        return np.full(len(ids), "", dtype=object)
    out = s[np.clip(ids, 0, len(s) - 1)].astype(object)
    out[(ids < 0) | (ids >= len(s))] = ""
    return out


def _paths(t: "Trace", modules: np.ndarray) -> np.ndarray:
    """Module paths by module row (-1 is ``""``); the root module is ``"<root>"``."""
    mp = t.module_paths
    m = np.asarray(modules, np.int64)
    if not len(mp):
        return np.full(len(m), "", dtype=object)
    out = mp[np.clip(m, 0, len(mp) - 1)].astype(object)
    out[out == ""] = "<root>"
    out[(m < 0) | (m >= len(mp))] = ""
    return out


def _shapes(ndim: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """``[1, 88, 64]`` per row (the padded shape columns cut at ``ndim``)."""
    return np.array(["[" + ", ".join(str(int(d)) for d in sh[:max(0, min(int(n), len(sh)))]) + "]"
                     for n, sh in zip(ndim, shape)], dtype=object)


def _names(table: dict, codes: np.ndarray) -> np.ndarray:
    return np.array([table.get(int(c), str(int(c))) for c in codes], dtype=object)


def _steps_cols(t: "Trace", r: np.ndarray, base: int) -> dict[str, np.ndarray]:
    def pos(row: np.void) -> str:
        n = int(row["pos_rows"])
        if n <= 0:
            return ""
        rng = [f"{int(row['pos_min'][k])}..{int(row['pos_max'][k])}" for k in range(min(n, 3))]
        if n == 3 and len(set(rng)) > 1:
            return " ".join(f"{a} {b}" for a, b in zip("thw", rng))
        return rng[0] if len(set(rng)) == 1 else " ".join(rng)

    return {
        "step": r["step"], "kind": _names(_KINDS, r["kind"]), "status": _names(_STATUS, r["status"]),
        "input_len": r["input_len"], "q_len": r["q_len"],
        "cache_before": r["cache_before"], "cache_after": r["cache_after"],
        "positions": np.array([pos(x) for x in r], dtype=object),
        "mask": np.array([_shapes([x["mask_ndim"]], [x["mask_shape"]])[0] if x["mask_ndim"] > 0 else ""
                          for x in r], dtype=object),
        "image_tokens": r["image_tokens"],
        "events": r["event_count"], "tensors": r["tensor_count"], "reshapes": r["reshape_count"],
        "probes": r["probe_count"], "wall_ms": r["wall_ms"],
    }


def _events_cols(t: "Trace", r: np.ndarray, base: int) -> dict[str, np.ndarray]:
    mods = t.modules
    m = np.asarray(r["module"], np.int64)
    cls = _strs(t, mods["cls"][np.clip(m, 0, max(len(mods) - 1, 0))]) if len(mods) else np.full(len(r), "", object)
    return {
        "row": base + np.arange(len(r)), "step": r["step"], "seq": r["seq"], "end_seq": r["end_seq"],
        "module": _paths(t, r["module"]), "class": cls, "nth": r["nth"], "depth": r["depth"],
        "parent": r["parent"], "tensors": r["tensor_count"], "status": _names(_STATUS, r["status"]),
        "dur_us": r["dur_us"],
    }


def _tensors_cols(t: "Trace", r: np.ndarray, base: int) -> dict[str, np.ndarray]:
    ev_mod = _event_modules(t, r["event"])
    return {
        "row": base + np.arange(len(r)), "step": r["step"], "event": r["event"], "module": _paths(t, ev_mod),
        "role": _names(ROLE_NAMES, r["role"]), "name": _strs(t, r["name"]), "shape": _shapes(r["ndim"], r["shape"]),
        "dtype": _strs(t, r["dtype"]), "device": _strs(t, r["device"]), "numel": r["numel"],
        "min": r["min"], "max": r["max"], "mean": r["mean"], "std": r["std"], "absmax": r["absmax"],
        "nan": r["nan"], "inf": r["inf"], "payload": r["payload"],
    }


def _event_modules(t: "Trace", events: np.ndarray) -> np.ndarray:
    """The module row of each event row (-1 where the event row is out of range)."""
    ev = np.asarray(events, np.int64)
    if not len(ev):
        return np.zeros(0, np.int64)
    n = t.n_rows("events")
    ok = (ev >= 0) & (ev < n)
    out = np.full(len(ev), -1, np.int64)
    if ok.any():
        if t.is_loaded("events"):
            out[ok] = t.events()["module"][ev[ok]]
        else:       # a step's tensors name a contiguous block of its events: read that block only
            lo, hi = int(ev[ok].min()), int(ev[ok].max()) + 1
            out[ok] = t.read_rows("events", lo, hi)["module"][ev[ok] - lo]
    return out


def _reshapes_cols(t: "Trace", r: np.ndarray, base: int) -> dict[str, np.ndarray]:
    files, funcs = _strs(t, r["site_file"]), _strs(t, r["site_func"])
    site = np.array([f"{f}:{int(n)} in {fn}" if f else "" for f, n, fn in zip(files, r["site_line"], funcs)],
                    dtype=object)
    return {
        "row": base + np.arange(len(r)), "step": r["step"], "seq": r["seq"], "module": _paths(t, r["module"]),
        "op": _strs(t, r["op"]), "nth": r["nth"], "in_shapes": _strs(t, r["in_shapes"]),
        "in_dtypes": _strs(t, r["in_dtypes"]), "args": _strs(t, r["args"]),
        "out_shape": _shapes(r["out_ndim"], r["out_shape"]), "out_dtype": _strs(t, r["out_dtype"]),
        "n_out": r["n_out"], "site": site, "status": _names(_STATUS, r["status"]),
    }


def _probes_cols(t: "Trace", r: np.ndarray, base: int) -> dict[str, np.ndarray]:
    return {
        "row": base + np.arange(len(r)), "step": r["step"], "seq": r["seq"], "module": _paths(t, r["module"]),
        "kind": _strs(t, r["kind"]), "name": _strs(t, r["name"]), "shape": _shapes(r["ndim"], r["shape"]),
        "dtype": _strs(t, r["dtype"]), "encoding": _names(_ENCODINGS, r["enc"]), "bytes": r["data_len"],
        "info": _strs(t, r["info"]),
    }


def _modules_cols(t: "Trace", r: np.ndarray, base: int) -> dict[str, np.ndarray]:
    paths = _strs(t, r["path"])
    paths[paths == ""] = "<root>"
    return {"module": base + np.arange(len(r)), "path": paths, "class": _strs(t, r["cls"]),
            "depth": r["depth"], "parent": r["parent"]}


_COLUMNS: dict[str, Callable[["Trace", np.ndarray, int], dict[str, np.ndarray]]] = {
    "steps": _steps_cols, "events": _events_cols, "tensors": _tensors_cols, "reshapes": _reshapes_cols,
    "probes": _probes_cols, "modules": _modules_cols,
}
#: the columns the text repr shows (HTML and ``to_pandas`` have them all)
_BRIEF = {
    "steps": ["step", "kind", "status", "input_len", "q_len", "cache_before", "cache_after", "positions", "mask",
              "image_tokens", "events", "tensors"],
    "events": ["row", "step", "seq", "module", "class", "nth", "depth", "tensors", "status", "dur_us"],
    "tensors": ["row", "step", "module", "role", "name", "shape", "dtype", "min", "max", "nan", "inf"],
    "reshapes": ["row", "step", "module", "op", "in_shapes", "args", "out_shape", "out_dtype", "site"],
    "probes": ["row", "step", "module", "kind", "name", "shape", "dtype", "info"],
    "modules": ["module", "path", "class", "depth", "parent"],
}


def _cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return printable(v)


def _clip(s: str, n: int = MAX_CELL, left: bool = False) -> str:
    """``s`` cut to ``n`` characters with an ellipsis (at the start when ``left``: file paths)."""
    if len(s) <= n:
        return s
    return "…" + s[len(s) - n + 1:] if left else s[: n - 1] + "…"


def _text_table(cols: dict[str, np.ndarray], names: list[str]) -> list[str]:
    """Left-aligned text, numbers right-aligned, one line per row plus the header."""
    cells = {k: [_clip(_cell(v), left=k == "site") for v in cols[k]] for k in names}
    numeric = {k: cols[k].dtype.kind in "iuf" for k in names}
    width = {k: max([len(k), *map(len, cells[k])]) for k in names}
    n = len(next(iter(cols.values()))) if cols else 0

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(width[k]) if numeric[k] else v.ljust(width[k]) for k, v in zip(names, vals)).rstrip()

    return [line(names)] + [line([cells[k][i] for k in names]) for i in range(n)]


def _html_table(cols: dict[str, np.ndarray], names: list[str], more: int, caption: str) -> str:
    esc = html.escape
    out = ["<table class=\"vlmscope\">", f"<caption style=\"text-align:left\">{esc(printable(caption))}</caption>",
           "<thead><tr>" + "".join(f"<th>{esc(k)}</th>" for k in names) + "</tr></thead>", "<tbody>"]
    n = len(next(iter(cols.values()))) if cols else 0
    for i in range(n):
        tds = []
        for k in names:
            right = " style=\"text-align:right\"" if cols[k].dtype.kind in "iuf" else ""
            tds.append(f"<td{right}>{esc(_cell(cols[k][i]))}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    if more > 0:
        out.append(f"<tr><td colspan=\"{len(names)}\">… {more:,} more row{'s' if more != 1 else ''}</td></tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


# ---------------------------------------------------------------------------- the view

class TableView:
    """One table of a trace (or one step's rows of it), readable: ``t.view("events", step=0)``.

    ``rows`` is the numpy array the accessor returns; ``columns()`` the rows with their strings
    resolved (all of them, or ``[start:stop]``); ``to_pandas()`` a DataFrame of those columns.
    ``repr`` and ``_repr_html_`` show the first ``max_rows`` rows.
    """

    def __init__(self, trace: "Trace", table: str, step: int | None = None, kind: str | None = None,
                 max_rows: int = MAX_ROWS):
        if table not in _COLUMNS:
            raise KeyError(f"no table {table!r} to view: one of {', '.join(_COLUMNS)}")
        if kind is not None and table != "probes":
            raise ValueError("kind= filters probes only")
        if step is not None and table in ("steps", "modules"):
            raise ValueError(f"step= selects rows of events, tensors, reshapes and probes, not of {table}")
        self.trace, self.table, self.step, self.kind, self.max_rows = trace, table, step, kind, max_rows
        self._rows: np.ndarray | None = None
        self._base = 0

    @property
    def rows(self) -> np.ndarray:
        """The rows as the trace's accessor returns them (a numpy structured array)."""
        if self._rows is None:
            t = self.trace
            if self.table == "steps":
                self._rows = t.steps
            elif self.table == "modules":
                self._rows = t.modules
            elif self.table == "probes":
                self._rows = t.probes(self.step, kind=self.kind)
            else:
                self._rows = getattr(t, self.table)(self.step)
            if self.step is not None:
                self._base = int(t._step_row(self.step)[f"{self.table[:-1]}_start"])
        return self._rows

    def _row_numbers_ok(self) -> bool:
        return self.kind is None        # a kind filter keeps some rows only: no contiguous row numbers

    def _streamable(self) -> bool:
        """Whether the first rows can be read without loading the whole table (a big one)."""
        return self._rows is None and self.step is None and self.kind is None and self.table not in ("steps", "modules")

    def _shown(self) -> tuple[int, dict[str, np.ndarray]]:
        """(rows in the view, the first ``max_rows`` of them as columns): what the reprs show. The
        rows of a whole table are read from the file, not loaded (a repr of a 1M-row table is quick)."""
        if self._streamable():
            t = self.trace
            n = t.n_rows(self.table)
            head = t.read_rows(self.table, 0, min(n, max(0, self.max_rows)))
            return n, _COLUMNS[self.table](t, head, 0)
        n = len(self.rows)
        return n, self.columns(0, min(n, max(0, self.max_rows)))

    def columns(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows ``[start:stop]`` as columns, strings resolved (a dict of numpy arrays)."""
        r = self.rows[start:stop]
        cols = _COLUMNS[self.table](self.trace, r, self._base + start)
        if not self._row_numbers_ok() and "row" in cols:
            sid = self.trace.string_id(self.kind or "")
            allr = self.trace.probes(self.step)
            cols["row"] = (self._base + np.nonzero(allr["kind"] == sid)[0])[start:stop]
        return cols

    def __len__(self) -> int:
        return self.trace.n_rows(self.table) if self._streamable() else len(self.rows)

    def to_pandas(self) -> Any:
        """All rows as a ``pandas.DataFrame`` (strings resolved). Needs pandas (optional)."""
        pd = require("pandas", "Trace.view(...).to_pandas()")
        cols = self.columns()
        df = pd.DataFrame({k: v for k, v in cols.items()})
        key = "row" if "row" in cols else "module" if self.table == "modules" else "step"
        return df.set_index(key, drop=True)

    def _title(self, n: int) -> str:
        what = self.table + (f" of kind {self.kind}" if self.kind else "")
        where = f"step {self.step}" if self.step is not None else ""
        return f"{what}{' of ' + where if where else ''}: {n:,} row{'s' if n != 1 else ''} ({self.trace.path.name})"

    def __repr__(self) -> str:
        try:
            n, cols = self._shown()
            shown = len(next(iter(cols.values())))
            names = _BRIEF[self.table]
            lines = [self._title(n)] + (_text_table(cols, names) if shown else [])
            if n > shown:
                lines.append(f"… {n - shown:,} more row{'s' if n - shown != 1 else ''}")
            hidden = [k for k in cols if k not in names]
            if hidden:
                lines.append(f"(not shown: {', '.join(hidden)}; .to_pandas() has every column)")
            return "\n".join(lines)
        except Exception as e:  # noqa: BLE001 - a repr never raises: it says what is wrong
            return f"<TableView {self.table} of {self.trace.path}: unreadable ({_why(e)})>"

    def _repr_html_(self) -> str:
        try:
            n, cols = self._shown()
            shown = len(next(iter(cols.values())))
            return _html_table(cols, list(cols), n - shown, self._title(n))
        except Exception as e:  # noqa: BLE001 - a repr never raises: it says what is wrong
            return f"<pre>{html.escape(printable(f'{self.table} of {self.trace.path}: unreadable ({_why(e)})'))}</pre>"


def _why(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# ---------------------------------------------------------------------------- the trace and a step

def _head(t: "Trace") -> tuple[str, list[str]]:
    """The first line of a trace's repr and the lines under it (model, counts, error)."""
    status = t.status
    first = f"<vlmscope.Trace {printable(t.path)}: format {t.format_version}, {status}, {t.n_steps} steps>"
    lines = []
    m = t.meta
    model = m.get("model") or "?"
    bits = [x for x in (m.get("model_class"), m.get("dtype"), m.get("device"), m.get("attn_implementation")) if x]
    lines.append(f"model {printable(model)}" + (f" ({printable(', '.join(bits))})" if bits else ""))
    counts = ", ".join(f"{t.n_rows(k):,} {k}" for k in ("modules", "events", "tensors", "reshapes", "probes"))
    lines.append(f"{counts}; {t.file_size / 1e6:.1f} MB")
    if status == "failed":
        err = t.error or {}
        lines.append(f"failed in step {err.get('step', '?')}: {printable(err.get('type') or '')}: "
                     f"{_clip(printable(err.get('message') or ''), 200)}")
    if t.recovered:
        lines.append(f"recovered: {_clip(printable(t.recovered), 200)}")
    bad = t.damaged_steps
    if bad:
        lines.append(f"{len(bad)} damaged step row(s), first: step {min(bad)}: {printable(bad[min(bad)])}")
    return first, lines


def _steps_view(t: "Trace") -> TableView | None:
    if t.damaged_steps or not t.n_steps:
        return None
    return TableView(t, "steps", max_rows=MAX_STEPS)


def trace_repr(t: "Trace") -> str:
    """``repr(trace)``: path, format, status, model, table sizes and the first steps."""
    try:
        first, lines = _head(t)
        v = _steps_view(t)
        if v is not None:
            # the view's title repeats what the head says; its note on hidden columns is for views
            lines += [x for x in repr(v).splitlines()[1:] if not x.startswith("(not shown")]
        return "\n".join([first] + lines)
    except Exception as e:  # noqa: BLE001 - a closed or damaged trace still has a repr
        return f"<vlmscope.Trace {printable(t.path)}: {'closed' if _closed(t) else 'unreadable (' + _why(e) + ')'}>"


def trace_html(t: "Trace") -> str:
    """``_repr_html_`` of a trace: the same as :func:`trace_repr`, the steps as an HTML table."""
    esc = html.escape
    try:
        first, lines = _head(t)
        v = _steps_view(t)
        parts = [f"<div><strong>{esc(first)}</strong><br>" + "<br>".join(esc(x) for x in lines) + "</div>"]
        if v is not None:
            parts.append(v._repr_html_())
        return "\n".join(parts)
    except Exception:  # noqa: BLE001 - a closed or damaged trace still has a repr
        return f"<pre>{esc(trace_repr(t))}</pre>"


def _closed(t: "Trace") -> bool:
    try:
        return not bool(t._f)
    except Exception:  # noqa: BLE001
        return True


def step_repr(sv: "StepView") -> str:
    """``repr(trace.step(i))``: the step's row and its table sizes (and how to see them)."""
    try:
        r = np.asarray(sv.step).reshape(1)
        t = sv.trace
        cols = _steps_cols(t, r, 0) if t is not None else None
        s = int(r["step"][0])
        head = (f"<vlmscope step {s}: {_KINDS.get(int(r['kind'][0]), '?')}, q_len {int(r['q_len'][0])}, "
                f"cache {int(r['cache_before'][0])} -> {int(r['cache_after'][0])}")
        if cols is not None and cols["positions"][0]:
            head += f", positions {cols['positions'][0]}"
        if cols is not None and cols["mask"][0]:
            head += f", mask {cols['mask'][0]}"
        head += f"; {len(sv.events):,} events, {len(sv.tensors):,} tensors, {len(sv.reshapes):,} reshapes, " \
                f"{len(sv.probes):,} probes>"
        if t is not None:
            head += f"\n(trace.view(\"events\", step={s}) and the like show its rows)"
        return head
    except Exception as e:  # noqa: BLE001 - a repr never raises
        return f"<vlmscope step: unreadable ({_why(e)})>"


def step_html(sv: "StepView") -> str:
    esc = html.escape
    text = step_repr(sv).splitlines()
    parts = [f"<div><strong>{esc(text[0])}</strong></div>"]
    if sv.trace is not None:
        try:
            s = int(sv.step["step"])
            parts.append(TableView(sv.trace, "events", step=s)._repr_html_())
        except Exception:  # noqa: BLE001
            pass
    return "\n".join(parts)
