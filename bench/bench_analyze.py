"""Benchmark ``check`` and ``diff`` on large synthetic traces (1M module calls each).

    PYTHONPATH=. python bench/bench_analyze.py [--events 1000000] [--runs 5] [--dir /tmp/vlmscope-bench] [--no-sketches]

Writes three traces with :func:`vlmscope.testing.make_trace` (cached in ``--dir``): A clean;
B with a numeric drift injected half-way (``layers.10.mlp.down_proj`` from the middle step
on) and a shape change in one decode step; C, whose cache grows twice in one layer at step 1
(every later shape shifts, so the traces stop lining up row for row: diff's slower path).
The traces carry value sketches unless ``--no-sketches`` (then other files, without them).
Each timed run is a fresh Python process that opens the traces (cold reader caches and heap,
warm OS page cache) and times ``open + check`` or ``open + diff`` in-process; check and diff
runs alternate. It prints the median of ``--runs`` runs, and the median wall time of the CLI
(``vlmscope diff --json``: interpreter start and imports included). Targets: check <= 2 s, diff <= 2 s.

``--v1`` also runs everything on copies of the two traces converted to trace format 1 (lzf
tables in 64 KiB chunks, HDF5 variable-length strings: what vlmscope wrote before format 2),
alternating with the format-2 runs, and prints the ratios side by side. Each run's peak
resident memory is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlmscope.analyze.check import check
from vlmscope.analyze.diff import diff
from vlmscope.testing import cached_trace
from vlmscope.trace import open_trace

ROOT = Path(__file__).resolve().parents[1]

N_LAYERS = 28


def traces(n_events: int, folder: Path, sketches: bool = True) -> tuple[Path, Path, Path, int]:
    """A clean; B drifts from the middle step on and has a shape change three steps later;
    C appends one layer's cache twice in step 1, so every later step's shapes shift (the
    traces stop lining up row for row early: diff's slower path). With value sketches (the
    default) or without (``sketches=False``: other files, ``*_nosk.h5``)."""
    folder.mkdir(parents=True, exist_ok=True)
    per_step = 13 * N_LAYERS + 7            # decode module calls per step (see vlmscope.testing)
    mid = max(1, n_events // per_step // 2)
    specs = {"a": {}, "b": {"drift": (mid, 10), "shape": (mid + 3, 5)}, "c": {"cache_twice": (1, 5)}}
    out = []
    for name, faults in specs.items():
        t0 = time.perf_counter()
        p, written = cached_trace(folder / f"bench_{name}_{n_events}{'' if sketches else '_nosk'}.h5", n_events,
                                  n_layers=N_LAYERS, faults=faults, sketches=sketches)
        if written:
            print(f"wrote {p} in {time.perf_counter() - t0:.1f}s")
        out.append(p)
    return out[0], out[1], out[2], mid


def to_format1(src: Path, dst: Path) -> Path:
    """A copy of a trace in format 1: the same rows, lzf in 64 KiB chunks, vlen strings."""
    import h5py
    import numpy as np

    from vlmscope.trace import TABLES, read_strings

    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst          # (a copy older than its source, rewritten since, is made again)
    tmp = dst.with_name(dst.name + ".tmp")
    with h5py.File(src, "r") as f, h5py.File(tmp, "w", libver="latest") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        g.attrs["format_version"] = 1
        for name in f:
            if name in (*TABLES, "probe_data"):
                ds = f[name]
                arr = ds[:]
                g.create_dataset(name, data=arr, maxshape=(None,), compression="lzf",
                                 chunks=(max(256, (64 << 10) // ds.dtype.itemsize),) if len(arr) else None)
            elif name == "strings":
                g.create_dataset("strings", data=np.array(read_strings(f).tolist(), dtype=object),
                                 dtype=h5py.string_dtype("utf-8"), maxshape=(None,), chunks=(1024,),
                                 compression="lzf")
            elif name != "string_ends":
                f.copy(f[name], g, name)
    tmp.rename(dst)
    return dst


def child(what: str, a: Path, b: Path) -> None:
    """One timed run, in this (fresh) process: print JSON with the time, the peak resident
    memory and a summary."""
    import resource

    t = time.perf_counter()
    if what == "check":
        rep = check(b)
        out = {"s": time.perf_counter() - t, "violations": len(rep.violations)}
    else:
        rep = diff(a, b)
        out = {"s": time.perf_counter() - t, "divergent": rep.n_divergent,
               "first": rep.first.headline()[:140] if rep.first else "-"}
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run_child(what: str, a: Path, b: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, __file__, "--child", what, str(a), str(b)], capture_output=True,
                       text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cli(a: Path, b: Path) -> float:
    exe = shutil.which("vlmscope", path=str(Path(sys.executable).parent)) or "vlmscope"
    t = time.perf_counter()
    subprocess.run([exe, "diff", str(a), str(b), "--json"], stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/vlmscope-bench"))
    ap.add_argument("--phases", action="store_true", help="also break diff's time into read / align / report")
    ap.add_argument("--v1", action="store_true", help="also run on format-1 copies, side by side")
    ap.add_argument("--no-sketches", action="store_true",
                    help="use traces written without value sketches (as before sketches existed)")
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    a, b, c, mid = traces(args.events, args.dir, sketches=not args.no_sketches)
    with open_trace(a) as t:
        n = {k: t.n_rows(k) for k in ("events", "tensors", "reshapes", "probes")}
        n["sketches"] = len(t.sketch_table())
        print(f"trace A: {t.n_steps} steps, " + ", ".join(f"{v:,} {k}" for k, v in n.items())
              + f" ({t.n_rows('sketch_data') if n['sketches'] else 0:,} sketch values)"
              + f", {a.stat().st_size / 1e6:.0f} MB")
    sets = {"format 2": (a, b)}
    if args.v1:
        sets["format 1"] = (to_format1(a, args.dir / f"{a.stem}.v1.h5"), to_format1(b, args.dir / f"{b.stem}.v1.h5"))
    res = {k: {"check": [], "diff": [], "cli": []} for k in sets}
    for x, y in sets.values():
        run_child("diff", x, y)        # warm the OS page cache
    for _ in range(args.runs):
        for k, (x, y) in sets.items():   # alternating: the machine's noise hits both alike
            res[k]["check"].append(run_child("check", x, y))
            res[k]["diff"].append(run_child("diff", x, y))
            res[k]["cli"].append(run_cli(x, y))

    def med(rows, key="s"):
        return statistics.median(r[key] if isinstance(r, dict) else r for r in rows)

    def line(rows):
        t = [r["s"] for r in rows]
        return (f"median {statistics.median(t):.2f}s  runs {', '.join(f'{x:.2f}' for x in t)}  "
                f"peak RSS {med(rows, 'rss_mb'):.0f} MB")

    for k, r in res.items():
        if len(sets) > 1:
            print(f"-- {k}:")
        print(f"check B: {line(r['check'])}  ({r['check'][-1]['violations']} violations)")
        print(f"diff A B: {line(r['diff'])}  ({r['diff'][-1]['divergent']:,} divergent nodes; "
              f"first: {r['diff'][-1]['first']})")
        print(f"vlmscope diff A B --json (CLI wall, interpreter and imports included): median "
              f"{med(r['cli']):.2f}s  runs {', '.join(f'{x:.2f}' for x in r['cli'])}")
    shifted = [run_child("diff", a, c) for _ in range(args.runs)]
    print(f"diff A C (rows stop lining up at step 1): {line(shifted)}  ({shifted[-1]['divergent']:,} divergent "
          f"nodes; first: {shifted[-1]['first']})")
    if args.v1:
        f1, f2 = res["format 1"], res["format 2"]
        print(f"format 2 / format 1 (medians, same run): check {med(f2['check']) / med(f1['check']):.2f}x, "
              f"diff {med(f2['diff']) / med(f1['diff']):.2f}x, CLI diff {med(f2['cli']) / med(f1['cli']):.2f}x, "
              f"diff peak RSS {med(f2['diff'], 'rss_mb') / med(f1['diff'], 'rss_mb'):.2f}x; file size "
              f"{a.stat().st_size / sets['format 1'][0].stat().st_size:.2f}x")
    if args.phases:
        phases(a, b, args.runs)


def phases(a: Path, b: Path, runs: int) -> None:
    """Where diff's time goes: reading (decompressing) the tables vs the analysis itself."""
    import gc
    import importlib

    from vlmscope.analyze._index import index_of
    from vlmscope.analyze.diff import _report

    align = importlib.import_module("vlmscope.analyze.align").align
    rows = []
    for _ in range(runs):
        t0 = time.perf_counter()
        ta, tb = open_trace(a), open_trace(b)
        A, B = index_of(ta), index_of(tb)
        for ix in (A, B):
            for n in ("events", "tensors", "reshapes", "probes", "probe_data"):
                ix.trace.table(n)
        A.strings, B.strings
        t1 = time.perf_counter()
        al = align(ta, tb)
        t2 = time.perf_counter()
        _report(al, 50, None, None, None)
        t3 = time.perf_counter()
        ta.close(), tb.close()
        del al, A, B, ta, tb
        gc.collect()
        rows.append((t1 - t0, t2 - t1, t3 - t2))
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    print(f"diff phases (median): read {med[0]:.2f}s, align {med[1]:.2f}s, report {med[2]:.2f}s")


if __name__ == "__main__":
    main()
