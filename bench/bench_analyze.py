"""Benchmark ``check`` and ``diff`` on large synthetic traces (1M module calls each).

    PYTHONPATH=. python bench/bench_analyze.py [--events 1000000] [--runs 5] [--dir /tmp/vlmscope-bench]

Writes two traces with :func:`bench.synth_trace.make_trace` (cached in ``--dir``): A clean,
B with a numeric drift injected half-way (``layers.10.mlp.down_proj`` from the middle step on)
and a shape change in one decode step. Each timed run is a fresh Python process that opens
the traces (cold reader caches and heap, warm OS page cache) and times ``open + check`` or
``open + diff`` in-process; check and diff runs alternate. It prints the median of ``--runs``
runs, and the median wall time of the CLI (``vlmscope diff --json``: interpreter start and
imports included). Targets: check <= 2 s, diff <= 2 s.
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synth_trace import make_trace  # noqa: E402
from vlmscope.analyze.check import check  # noqa: E402
from vlmscope.analyze.diff import diff  # noqa: E402
from vlmscope.trace import FORMAT_VERSION, open_trace  # noqa: E402

N_LAYERS = 28


def traces(n_events: int, folder: Path) -> tuple[Path, Path, int]:
    folder.mkdir(parents=True, exist_ok=True)
    a = folder / f"bench_a_{n_events}.h5"
    b = folder / f"bench_b_{n_events}.h5"
    per_step = 13 * N_LAYERS + 7            # decode module calls per step (see synth_trace)
    mid = max(1, n_events // per_step // 2)
    for p in (a, b):   # a cached trace of an older format is written again
        if p.exists():
            try:
                with open_trace(p) as t:
                    stale = t.format_version != FORMAT_VERSION
            except Exception:  # noqa: BLE001
                stale = True
            if stale:
                p.unlink()
    if not a.exists():
        t = time.perf_counter()
        make_trace(a, n_events, n_layers=N_LAYERS)
        print(f"wrote {a} in {time.perf_counter() - t:.1f}s")
    if not b.exists():
        t = time.perf_counter()
        make_trace(b, n_events, n_layers=N_LAYERS, faults={"drift": (mid, 10), "shape": (mid + 3, 5)})
        print(f"wrote {b} in {time.perf_counter() - t:.1f}s")
    return a, b, mid


def child(what: str, a: Path, b: Path) -> None:
    """One timed run, in this (fresh) process: print JSON with the time and a summary."""
    t = time.perf_counter()
    if what == "check":
        rep = check(b)
        out = {"s": time.perf_counter() - t, "violations": len(rep.violations)}
    else:
        rep = diff(a, b)
        out = {"s": time.perf_counter() - t, "divergent": rep.n_divergent,
               "first": rep.first.headline()[:140] if rep.first else "-"}
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
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    a, b, mid = traces(args.events, args.dir)
    with open_trace(a) as t:
        n = {k: t.n_rows(k) for k in ("events", "tensors", "reshapes", "probes")}
        print(f"trace A: {t.n_steps} steps, " + ", ".join(f"{v:,} {k}" for k, v in n.items())
              + f", {a.stat().st_size / 1e6:.0f} MB")
    run_child("diff", a, b)            # warm the OS page cache
    ck, df, cli = [], [], []
    for _ in range(args.runs):
        ck.append(run_child("check", a, b))
        df.append(run_child("diff", a, b))
        cli.append(run_cli(a, b))

    def line(rows):
        t = [r["s"] for r in rows]
        return f"median {statistics.median(t):.2f}s  runs {', '.join(f'{x:.2f}' for x in t)}"

    print(f"check B: {line(ck)}  ({ck[-1]['violations']} violations)")
    print(f"diff A B: {line(df)}  ({df[-1]['divergent']:,} divergent nodes; first: {df[-1]['first']})")
    print(f"vlmscope diff A B --json (CLI wall, interpreter and imports included): median "
          f"{statistics.median(cli):.2f}s  runs {', '.join(f'{x:.2f}' for x in cli)}")
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
