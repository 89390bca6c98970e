"""Kill, terminate or starve real ``vlmscope record`` runs and check what survives.

    python scripts/crash_record.py kill --trials 30        # SIGKILL at random moments of a 64-step run
    python scripts/crash_record.py term --trials 10        # SIGTERM: exit 143, trace marked incomplete
    python scripts/crash_record.py full --trials 11        # small tmpfs (root) and ulimit -f, varied sizes

For each run it opens what is left with ``open_trace``, reads every step, runs ``check``, and
counts: readable with every step the run reported finished (ok), unreadable, steps lost,
tracebacks, segfaults, wrong exit codes. Run it with the venv's python.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "astronaut.png"


def record_cmd(out: Path, n: int) -> list[str]:
    return [sys.executable, "-P", "-m", "vlmscope.cli", "record", "--image", str(IMAGE), "-o", str(out),
            "-n", str(n), "-v"]


def inspect(path: Path, reported: int) -> tuple[str, int]:
    """('ok' | 'unreadable: …' | 'lost steps', steps) for what a run left."""
    from vlmscope.analyze.check import check
    from vlmscope.trace import TraceError, open_trace

    try:
        with open_trace(path) as t:
            n = t.n_steps
            for s in range(n):
                t.events(s), t.tensors(s), t.reshapes(s), t.probes(s)
        check(path)
    except TraceError as e:
        return f"unreadable: {e}", 0
    return ("ok" if n >= reported else "lost steps"), n


def killed(mode: str, trials: int, seed: int, work: Path) -> Counter:
    rng = random.Random(seed)
    sig = signal.SIGKILL if mode == "kill" else signal.SIGTERM
    out = Counter()
    for i in range(trials):
        path = work / f"{mode}{i}.h5"
        proc = subprocess.Popen(record_cmd(path, 64), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "step 0 recorded" in line:
                break
        time.sleep(rng.uniform(0, 1.0))
        proc.send_signal(sig)
        rest = proc.stdout.read()
        rc = proc.wait()
        reported = sum("recorded (" in ln for ln in lines + rest.splitlines())
        left = path if path.exists() else Path(str(path) + ".partial")
        verdict, n = inspect(left, reported) if left.exists() else ("no file", 0)
        want_rc = -9 if sig == signal.SIGKILL else 143
        if n == 64 and rc in (0, -sig):
            verdict = "finished before the signal"
        elif rc != want_rc:
            verdict += f" (exit {rc})"
        if "Traceback" in rest:
            verdict += " (traceback)"
        out[verdict.split(":")[0]] += 1
        print(f"{mode} {i}: exit {rc}, {left.name}, {n} steps, {reported} reported -> {verdict}")
    return out


def full(trials: int, seed: int, work: Path) -> Counter:
    rng = random.Random(seed)
    out = Counter()
    for i in range(trials):
        limit = rng.choice([64, 128, 192, 256, 384, 512]) * 1024
        mount = None
        if i % 2 == 0 and os.geteuid() == 0:
            mount = Path(tempfile.mkdtemp(prefix="vlmscope-full-"))
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(mount)]).returncode:
                mount.rmdir()
                mount = None
        where = mount or work
        path = where / f"full{i}.h5"

        def fsize(limit=limit):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        r = subprocess.run(record_cmd(path, 64), capture_output=True, text=True, timeout=600,
                           preexec_fn=None if mount else fsize)
        reported = sum("recorded (" in ln for ln in r.stderr.splitlines())   # -v lines go to stderr
        how = f"tmpfs {limit // 1024}K" if mount else f"ulimit -f {limit // 1024}K"
        left = path if path.exists() else Path(str(path) + ".partial")
        verdict, n = inspect(left, reported) if left.exists() else ("no file", 0)
        err = [ln for ln in r.stderr.splitlines() if ln.strip() and "recorded (" not in ln]
        if r.returncode not in (0, 4):
            verdict += f" (exit {r.returncode})"
        if "Traceback" in r.stderr or len(err) > 1:
            verdict += " (not one line)"
        out[verdict.split(":")[0]] += 1
        print(f"full {i} [{how}]: exit {r.returncode}, {n} steps kept, {reported} reported; "
              f"{err[-1] if err else ''} -> {verdict}")
        if mount:
            subprocess.run(["umount", str(mount)])
            shutil.rmtree(mount, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("kill", "term", "full"))
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlmscope-crash-"))
    counts = full(args.trials, args.seed, work) if args.mode == "full" else killed(args.mode, args.trials, args.seed,
                                                                                    work)
    print(f"\n{args.mode}: {args.trials} runs: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
