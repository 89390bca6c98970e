"""``vlmscope record`` killed, terminated, out of disk, or pointed at a file that exists:
finished steps are kept, nothing is overwritten, every failure is one line."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import vlmscope

IMAGE = Path(__file__).resolve().parents[2] / "examples" / "astronaut.png"


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "vlmscope.cli", "record", "--image", str(IMAGE), *args]


def _start(args: list[str], cwd: Path | None = None, preexec=None, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            preexec_fn=preexec, env=env)


def _until_step(proc: subprocess.Popen, step: int) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"step {step} recorded" in line:
            return lines
    raise AssertionError("".join(lines))


def test_kill_9_keeps_every_reported_step_and_the_journal_opens_everywhere(tmp_path):
    out = tmp_path / "k.h5"
    proc = _start(_cmd("-o", str(out), "-n", "64", "-v"))
    lines = _until_step(proc, 3)
    proc.kill()
    proc.wait()
    partial = Path(str(out) + ".partial")
    assert proc.returncode == -signal.SIGKILL and partial.exists() and not out.exists()
    reported = sum("recorded (" in ln for ln in lines)
    with vlmscope.open_trace(partial) as t:
        assert t.status == "incomplete" and t.n_steps >= reported
        assert t.meta["model"].endswith("tiny-qwen2.5-vl")
    # the readers only read: run at once
    cmds = [["summary", str(partial)], ["check", str(partial)],
            ["snapshot", "-o", str(tmp_path / "s.json"), str(partial)], ["summary", str(out)]]
    with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
        runs = list(pool.map(lambda cmd, limit: subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", *cmd],
                                                               capture_output=True, text=True, timeout=limit),
                             cmds, (120, 120, 120, 60)))
    for cmd, r in zip(cmds[:3], runs):
        assert "Traceback" not in r.stderr and r.returncode in (0, 1), (cmd, r.returncode, r.stderr)
    r = runs[3]
    assert r.returncode == 3 and "did not finish" in r.stderr and str(partial) in r.stderr
    # the journal is the only copy: a new run with the same -o refuses to replace it
    r = subprocess.run(_cmd("-o", str(out), "-n", "1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr and "partial" in r.stderr
    assert partial.exists()


def test_sigterm_is_handled_as_ctrl_c_with_exit_143(tmp_path):
    out = tmp_path / "t.h5"
    proc = _start(_cmd("-o", str(out), "-n", "64", "-v"))
    lines = _until_step(proc, 2)
    proc.terminate()
    rest = proc.stdout.read()
    proc.wait()
    assert proc.returncode == 143, rest
    assert "Traceback" not in rest and "terminated" in rest
    with vlmscope.open_trace(out) as t:       # closed cleanly: converted, marked incomplete
        assert t.status == "incomplete" and t.n_steps >= sum("recorded (" in ln for ln in lines)


def _small_tmpfs() -> Path | None:
    """A 2 MiB tmpfs, when this machine lets us mount one (root); else None. The prefill of the
    default run takes ~1 MB of journal (its value sketches most of it), each decode step ~33 KB:
    the disk fills in the middle of the run."""
    d = Path(tempfile.mkdtemp(prefix="vlmscope-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        d.rmdir()
        return None
    return d


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)      # the CLI must ignore it itself
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


@pytest.mark.parametrize("how", ["full-disk", "file-size-limit"])
def test_a_write_error_is_one_line_with_exit_4_and_the_finished_steps_stay(tmp_path, how):
    """A full disk (a small tmpfs, where it can be mounted) or a file-size limit (ulimit -f; also the
    fallback): one line naming what failed, the steps kept and the path; exit 4; no traceback,
    no segfault; the journal opens with those steps."""
    mount = _small_tmpfs() if how == "full-disk" else None
    where = mount or tmp_path
    try:
        out = where / "x.h5"
        r = subprocess.run(_cmd("-o", str(out), "-n", "64"), capture_output=True, text=True, timeout=300,
                           preexec_fn=None if mount else _limit_file_size)
        assert r.returncode == 4, (r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr + r.stdout
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(err) == 1, err
        assert ("No space left on device" if mount else "File too large") in err[0]
        kept = int(err[0].split("; ")[1].split()[0])
        assert kept >= 1 and f"kept in {out}.partial" in err[0]
        with vlmscope.open_trace(Path(str(out) + ".partial")) as t:
            assert t.n_steps == kept and t.status == "incomplete"
    finally:
        if mount:
            subprocess.run(["umount", str(mount)], check=False)
            shutil.rmtree(mount, ignore_errors=True)


def test_existing_files_are_never_replaced_without_force(tmp_path):
    victim = tmp_path / "victim.png"
    shutil.copy(IMAGE, victim)
    before = victim.read_bytes()
    r = subprocess.run(_cmd("-o", str(victim), "-n", "1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exists" in r.stderr and "--force" in r.stderr and "Traceback" not in r.stderr
    assert victim.read_bytes() == before
    r = subprocess.run(_cmd("-o", str(victim), "-n", "1", "--force"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with vlmscope.open_trace(victim) as t:
        assert t.complete


def test_default_names_are_unique_for_runs_started_in_the_same_second(tmp_path):
    """Three runs without -o, started together: three distinct traces, each complete and intact."""
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")     # three torch processes on few cores: no spinning pools
    procs = [_start(_cmd("-n", "1"), cwd=tmp_path, env=one_thread) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, outs
    traces = sorted((tmp_path / "traces").glob("*.h5"))
    assert len(traces) == 3, (traces, outs)
    assert not list((tmp_path / "traces").glob("*.partial")) and not list((tmp_path / "traces").glob("*.tmp"))
    for p in traces:
        with vlmscope.open_trace(p) as t:
            assert t.complete and t.n_steps >= 1


def test_snapshot_replaces_a_snapshot_but_nothing_else_without_force(tmp_path):
    trace = Path(__file__).resolve().parents[2] / "traces" / "examples" / "tiny-qwen2.5-vl-astronaut.h5"
    snap = [sys.executable, "-P", "-m", "vlmscope.cli", "snapshot", str(trace), "-o"]
    victim = tmp_path / "notes.json"
    victim.write_text('{"my": "notes"}')
    r = subprocess.run([*snap, str(victim)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a vlmscope snapshot" in r.stderr and r.stderr.count("\n") == 1
    assert victim.read_text() == '{"my": "notes"}'
    good = tmp_path / "shapes.json"
    for _ in range(2):          # writing, then regenerating, a snapshot needs no --force
        r = subprocess.run([*snap, str(good)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([*snap, str(victim), "--force"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and victim.read_text() == good.read_text()
