"""A deterministic stream of trace steps, written through :class:`vlmscope.trace.TraceWriter`,
for crash tests and benchmarks: kill the writer at any moment and compare what survives with
the same stream written to the end.

``python -m vlmscope.testing.crash PATH N_STEPS [SEED [ROWS]]`` writes the stream and prints
``committed K`` (flushed) after each step is committed, so a harness knows which steps must
survive a kill.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from vlmscope import trace as T

_MODULES = [("", "Root"), ("blocks.0", "Block"), ("blocks.0.attn", "Attention"), ("blocks.0.mlp", "MLP")]


def write_steps(path: str | Path, n_steps: int, *, seed: int = 0, rows: int = 400,
                on_commit: Callable[[int], None] | None = None, fsync: bool = False,
                close: bool = True) -> T.TraceWriter:
    """Write ``n_steps`` steps of made-up rows (``rows`` events and tensors each, new strings,
    probe data, and a saved payload every third step); the content depends only on ``seed``."""
    w = T.TraceWriter(path, meta={"model": "crash-stream", "seed": seed}, config_json=json.dumps({"model_type": "x"}),
                      fsync=fsync)
    mods = np.zeros(len(_MODULES), T.MODULE_DTYPE)
    for i, (p, c) in enumerate(_MODULES):
        mods[i] = (w.intern(p), w.intern(c), p.count(".") + (1 if p else 0), -1 if i == 0 else (0 if i == 1 else 1))
    w.set_modules(mods)
    w.end_step()
    rng = np.random.default_rng(seed)
    f32, cpu = w.intern("float32"), w.intern("cpu")
    for s in range(n_steps):
        ev0, te0, pr0 = w.counts["events"], w.counts["tensors"], w.counts["probes"]
        ev = np.zeros(rows, T.EVENT_DTYPE)
        ev["step"], ev["seq"], ev["end_seq"] = s, np.arange(rows), np.arange(rows) + 1
        ev["module"] = rng.integers(1, len(_MODULES), rows)
        ev["parent"], ev["depth"] = -1, 1
        ev["tensor_start"], ev["tensor_count"] = te0 + np.arange(rows), 1
        ev["dur_us"] = rng.random(rows)
        te = np.zeros(rows, T.TENSOR_DTYPE)
        te["step"], te["event"], te["role"] = s, ev0 + np.arange(rows), T.ROLE_OUTPUT
        te["name"] = [w.intern(f"out.{s}.{i % 17}") for i in range(rows)]
        te["ndim"], te["shape"] = 2, T.pad_shape((1, 64))
        te["dtype"], te["device"], te["numel"] = f32, cpu, 64
        for col in ("min", "max", "mean", "std", "absmax"):
            te[col] = rng.standard_normal(rows)
        te["payload"] = -1
        if s % 3 == 0:
            te[0]["payload"] = w.add_payload(rng.standard_normal((8, 16)).astype(np.float32), step=s, module="blocks.0",
                                             name="out")
        pos = np.arange(s, s + 12, dtype=np.int64)
        off = w.append_probe_data(pos.view(np.uint8))
        pr = np.zeros(1, T.PROBE_DTYPE)
        pr[0] = (s, 0, ev0, 1, w.intern("position_ids"), w.intern("position_ids"), 2, T.pad_shape((1, 12)),
                 w.intern("int64"), T.ENC_INT64, off, pos.nbytes, w.intern(json.dumps({"rows": [[s, s + 11]]})))
        st = np.zeros(1, T.STEP_DTYPE)
        st[0]["step"], st[0]["kind"] = s, T.KIND_PREFILL if s == 0 else T.KIND_DECODE
        st[0]["event_start"], st[0]["event_count"] = ev0, rows
        st[0]["tensor_start"], st[0]["tensor_count"] = te0, rows
        st[0]["probe_start"], st[0]["probe_count"] = pr0, 1
        st[0]["q_len"], st[0]["input_len"], st[0]["cache_before"], st[0]["cache_after"] = 12, 12, -1, -1
        w.append("events", ev)
        w.append("tensors", te)
        w.append("probes", pr)
        w.append("steps", st)
        w.end_step()
        if on_commit is not None:
            on_commit(s + 1)
    if close:
        w.close()
    return w


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path, n = args[0], int(args[1])
    seed = int(args[2]) if len(args) > 2 else 0
    rows = int(args[3]) if len(args) > 3 else 400

    def report(k: int) -> None:
        sys.stdout.write(f"committed {k}\n")
        sys.stdout.flush()

    write_steps(path, n, seed=seed, rows=rows, on_commit=report)


if __name__ == "__main__":
    main()
