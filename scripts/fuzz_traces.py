#!/usr/bin/env python
"""Fuzz the trace reader and the trace commands with hostile trace files (issue 13).

    python scripts/fuzz_traces.py --cases 3000 --seed 1 --jobs 2 --out /tmp/fuzz

Mutates the repository's real recordings (traces/examples) and synthetic traces with saved
payloads, runs ``open_trace`` with every accessor and ``vlmscope summary / check / diff /
snapshot`` on each mutated file in worker processes (memory cap, per-run timeout), and prints the
outcome classes per command and per mutation class. DIR keeps the failing files (``failures/``)
and ``report.json`` (every case, every run, and the failures grouped by message).

Re-run one case in this process, with the traceback printed:

    python scripts/fuzz_traces.py --seed 1 --replay 123 --out /tmp/fuzz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmscope.testing import fuzz  # noqa: E402


def _replay(args: argparse.Namespace, sources: list[Path]) -> int:
    """One case in this process: print the mutation and every run; re-raise the first traceback."""
    out = Path(args.out)
    src_i, dst, mut = fuzz.prepare_case(args.replay, args.seed, sources, out / "work", args.cls)
    print(f"case {args.replay}: {sources[src_i].name}: {mut} [{mut.kind}] -> {dst}")
    cr = fuzz.run_case(args.replay, args.seed, sources, out / "work", cls=args.cls)
    for r in cr.runs:
        print(f"  {r['cmd']:9s} {r['outcome']:20s} {r['detail']}")
    if args.trace:
        import vlmscope

        print("--- accessors, raising:")
        with vlmscope.open_trace(dst) as t:
            for name, thunk in fuzz._api_calls(t):
                try:
                    thunk()
                except vlmscope.TraceError as e:
                    print(f"  {name}: TraceError: {e}")
                except Exception:  # noqa: BLE001
                    print(f"  {name}:")
                    traceback.print_exc()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case number")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="fuzz-out")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per run (one command on one file)")
    ap.add_argument("--mem-gb", type=float, default=3.0, help="address-space cap per worker (RLIMIT_AS)")
    ap.add_argument("--class", dest="cls", choices=[*sorted(fuzz.MUTATION_CLASSES), "cycle"], default=None,
                    help="only this mutation class ('cycle': every class in turn)")
    ap.add_argument("--commands", default=",".join(fuzz.COMMANDS))
    ap.add_argument("--no-real", action="store_true", help="synthetic source traces only")
    ap.add_argument("--replay", type=int, default=None, help="run this one case in this process")
    ap.add_argument("--trace", action="store_true", help="with --replay: print each accessor's traceback")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = fuzz.make_sources(out / "sources", real=not args.no_real,
                                examples=Path(__file__).resolve().parents[1] / "traces" / "examples")
    if args.replay is not None:
        return _replay(args, sources)
    commands = tuple(c for c in args.commands.split(",") if c)
    t0 = time.monotonic()
    done = [0]
    n_fail = [0]

    def on_case(c: dict) -> None:
        done[0] += 1
        bad = [r for r in c["runs"] if r["outcome"] in fuzz.FAILURES]
        n_fail[0] += bool(bad)
        if not args.quiet and (done[0] % 50 == 0 or done[0] == args.cases):
            el = time.monotonic() - t0
            print(f"  {done[0]}/{args.cases} cases, {n_fail[0]} failing, {el:.0f} s", file=sys.stderr, flush=True)

    results = fuzz.supervise(args.cases, args.seed, sources, out / "work", jobs=args.jobs, timeout=args.timeout,
                             mem_bytes=int(args.mem_gb * (1 << 30)), start=args.start, commands=commands,
                             keep_dir=out / "failures", cls=args.cls, on_case=on_case)
    elapsed = time.monotonic() - t0
    groups = fuzz.failure_groups(results)
    unchecked = fuzz.failure_groups(results, ("silent-unchecked",))
    report = {"seed": args.seed, "cases": args.cases, "start": args.start, "jobs": args.jobs, "timeout": args.timeout,
              "mem_gb": args.mem_gb, "seconds": round(elapsed, 1), "sources": [str(s) for s in sources],
              "failure_groups": groups, "unchecked_groups": unchecked, "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    n_runs = sum(len(c["runs"]) for c in results)
    print(f"{len(results)} cases, {n_runs} runs in {elapsed:.0f} s (seed {args.seed}, {args.jobs} jobs); "
          f"report: {out / 'report.json'}\n")
    print(fuzz.tabulate(results))
    if groups:
        print("failures by message (count, outcome, command, example case: mutation -> detail):")
        for g in groups[:40]:
            print(f"  {g['count']:4d}  {g['outcome']:18s} {g['cmd']:8s} case {g['example_case']}: "
                  f"{g['example_mutation'][:90]}\n        -> {g['example_detail'][:220]}")
    return 1 if groups else 0


if __name__ == "__main__":
    sys.exit(main())
