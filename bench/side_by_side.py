"""Every benchmark, this checkout against an older one, side by side in one run.

    git worktree add /tmp/vlmscope-old <older commit>
    python bench/side_by_side.py --old /tmp/vlmscope-old [--rounds 3] [--only overhead,analyze,view]

Each round runs every benchmark once for each checkout, in a fresh process, alternating which
goes first, so that the machine's noise hits both alike. It prints the median over rounds of
each figure, and the ratio new / old (below 1: the new code is faster).

- ``overhead``: recording overhead (vlmscope / untraced, prefill and generate) of this
  checkout's ``bench/overhead.py``, run against each checkout's ``vlmscope`` (its API is the
  same), on the default compute-heavy shape and on a small one where per-op cost dominates
  (hidden 128, eager attention).
- ``analyze``: each checkout's own ``bench/bench_analyze.py`` (check and diff of two 1M-event
  traces, shared through ``--dir``).
- ``view``: each checkout's own ``bench/bench_view.py`` (viewer latency on a 1M-event trace).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

NEW = Path(__file__).resolve().parents[1]
OVERHEAD_SHAPES = {"hidden 1024, sdpa, 448px": ["--image-size", "448"],
                   "hidden 128, eager, 224px": ["--hidden", "128", "--attn", "eager", "--image-size", "224"]}


def _run(cmd: list[str], checkout: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {checkout}:\n{out.stderr[-2000:]}")
    return out.stdout


def overhead(checkout: Path, args) -> dict[str, float]:
    res = {}
    for name, extra in OVERHEAD_SHAPES.items():
        text = _run([sys.executable, str(NEW / "bench" / "overhead.py"), "--rounds", str(args.overhead_rounds),
                     *extra], checkout)
        for kind in ("prefill", "generate"):
            m = re.search(rf"^{kind}: vlmscope ([\d.]+)x untraced", text, re.M)
            res[f"record {kind} / untraced ({name})"] = float(m.group(1))
    return res


def analyze(checkout: Path, args) -> dict[str, float]:
    text = _run([sys.executable, "bench/bench_analyze.py", "--runs", str(args.analyze_runs), "--dir", args.dir],
                checkout)
    res = {}
    for label, pat in [("check B, s", r"^check B: median ([\d.]+)s"), ("diff A B, s", r"^diff A B: median ([\d.]+)s"),
                       ("diff A B CLI wall, s", r"^vlmscope diff A B --json.*?median ([\d.]+)s"),
                       ("diff A C, s", r"^diff A C.*?median ([\d.]+)s")]:
        res[label] = float(re.search(pat, text, re.M).group(1))
    for label, pat in [("check B peak RSS, MB", r"^check B: .*?peak RSS (\d+) MB"),
                       ("diff A B peak RSS, MB", r"^diff A B: .*?peak RSS (\d+) MB")]:
        res[label] = float(re.search(pat, text, re.M).group(1))
    return res


def view(checkout: Path, args) -> dict[str, float]:
    text = _run([sys.executable, "bench/bench_view.py", "--runs", "3", "--trace", args.view_trace], checkout)
    rep = json.loads(text[text.index("{"):])
    return {f"view {k.replace('_ms', '')}, ms": rep[k]["median"] for k in ("first_screen_ms", "cursor_ms",
                                                                            "layer_ms", "step_ms")}


BENCHES = {"overhead": overhead, "analyze": analyze, "view": view}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="checkout of the older commit (a git worktree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="overhead,analyze,view")
    ap.add_argument("--overhead-rounds", type=int, default=3)
    ap.add_argument("--analyze-runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/vlmscope-bench", help="bench_analyze's trace cache")
    ap.add_argument("--view-trace", default="/tmp/vlmscope-bench/bench_a_1000000.h5")
    args = ap.parse_args()
    sides = {"old": args.old.resolve(), "new": NEW}
    res: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    t0 = time.time()
    for r in range(args.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for bench in args.only.split(","):
            for side in order:
                for k, v in BENCHES[bench](sides[side], args).items():
                    res[side].setdefault(k, []).append(v)
        print(f"round {r + 1}/{args.rounds} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    print(f"{'figure (median of ' + str(args.rounds) + ' rounds)':52s} {'old':>9s} {'new':>9s} {'new/old':>8s}")
    for k in res["new"]:
        o, n = statistics.median(res["old"][k]), statistics.median(res["new"][k])
        print(f"{k:52s} {o:9.3f} {n:9.3f} {n / o:7.2f}x")
    print(f"old: {sides['old']}  new: {sides['new']}")


if __name__ == "__main__":
    main()
