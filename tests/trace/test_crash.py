"""A recording killed at any moment keeps every step it finished: the journal (``.partial``)
is replayed by ``open_trace``. Real processes, real signals, real files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from vlmscope import trace as T
from vlmscope.testing.crash import write_steps

N_STEPS = 2000
ROWS = 100


def _child(path: Path, n: int, seed: int, rows: int = ROWS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-P", "-m", "vlmscope.testing.crash", str(path), str(n), str(seed),
                             str(rows)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _same_steps(got: T.Trace, ref: T.Trace, n: int) -> None:
    """The first ``n`` steps of ``got`` are exactly those of ``ref``: rows, strings, probes, payloads."""
    assert np.array_equal(got.steps[:n], ref.steps[:n])
    if n or len(got.modules):
        assert np.array_equal(got.modules, ref.modules)
    if n == 0:
        return
    last = ref.steps[n - 1]
    for table in ("events", "tensors", "probes"):
        end = int(last[f"{table[:-1]}_start"]) + int(last[f"{table[:-1]}_count"])
        assert np.array_equal(got.table(table)[:end], ref.table(table)[:end]), table
        assert len(got.table(table)) == end, (table, "rows of a step that was not committed")
    assert list(got.strings) == list(ref.strings[:len(got.strings)])
    used = got.table("tensors")["name"]
    assert used.max() < len(got.strings), "a committed row names a string that was lost"
    raw = got.table("probe_data")
    assert np.array_equal(raw, ref.table("probe_data")[:len(raw)])
    p = got.probes(n - 1)[0]
    assert got.probe_value(p).tolist() == ref.probe_value(p).tolist()
    pay = got.table("tensors")["payload"]
    assert got.n_payloads == int((pay >= 0).sum())
    for i in pay[pay >= 0][-3:]:
        assert np.array_equal(got.payload(int(i)), ref.payload(int(i)))
        assert got.payload_attrs(int(i)) == ref.payload_attrs(int(i))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The stream written to the end, per seed."""
    d = tmp_path_factory.mktemp("ref")
    cache: dict[int, T.Trace] = {}

    def get(seed: int) -> T.Trace:
        if seed not in cache:
            cache[seed] = T.open_trace(write_steps(d / f"ref{seed}.h5", N_STEPS, seed=seed, rows=ROWS).path)
        return cache[seed]
    yield get
    for t in cache.values():
        t.close()


def _kill_trial(path: Path, seed: int, delay: float, sig: int) -> tuple[str, subprocess.Popen]:
    """Start a writer, wait for its first committed step, kill it ``delay`` s later; its report."""
    proc = _child(path, N_STEPS, seed)
    first = proc.stdout.readline()              # the first step is committed: the writer runs
    if not first.startswith("committed"):
        proc.wait()
        return first + proc.stderr.read(), proc
    time.sleep(delay)
    proc.send_signal(sig)
    rest = proc.stdout.read()
    proc.wait()
    return first + rest, proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_writer_keeps_every_committed_step(tmp_path, reference, sig):
    """Killed at random moments (mid-record too: the steps are written back to back), the
    journal opens with every step the writer reported committed, each identical to the same
    step written to the end; the trace says it is incomplete. (The trials run a few at a time:
    each is its own process, file and kill.)"""
    rng = random.Random(1234 + sig)
    trials = 12 if sig == signal.SIGKILL else 4
    delays = [rng.uniform(0.0, 0.5) for _ in range(trials)]
    for seed in range(min(trials, 3)):
        reference(seed)                         # written once, before the trials compete for the CPU
    with ThreadPoolExecutor(max_workers=4) as pool:
        reports = list(pool.map(lambda k: _kill_trial(tmp_path / f"k{k}.h5", k % 3, delays[k], sig), range(trials)))
    survived = []
    for trial, (out, proc) in enumerate(reports):
        seed = trial % 3
        path = tmp_path / f"k{trial}.h5"
        assert out.startswith("committed"), out
        reported = max(int(line.split()[1]) for line in out.splitlines())
        if proc.returncode == 0:                    # this machine was quicker than the kill
            with T.open_trace(path) as t:
                assert t.complete and t.n_steps == N_STEPS
            continue
        assert proc.returncode == -sig
        partial = Path(str(path) + ".partial")
        assert partial.exists() and not path.exists(), "killed before it finished: only the journal"
        with T.open_trace(partial) as t:
            if t.complete:          # killed while converting the closed journal: nothing is lost
                assert t.n_steps == N_STEPS
            else:
                assert t.status == T.STATUS_INCOMPLETE and reported <= t.n_steps < N_STEPS
            _same_steps(t, reference(seed), t.n_steps)
            survived.append(t.n_steps)
    assert len(survived) >= trials // 2, "most runs finished before the kill: the test saw little"
    assert len(set(survived)) > 1 or trials < 5, "the kills all landed at the same step"


def test_a_torn_or_garbled_tail_loses_only_what_was_not_committed(tmp_path, reference):
    """Cut the journal at every kind of place (inside a record header, inside a payload,
    right after a commit) or flip a byte in its last record: the replay keeps every step
    before the damage and says where it stopped."""
    full = tmp_path / "full.h5"
    w = write_steps(full, 6, seed=0, rows=ROWS, close=False)
    data = Path(w.partial_path).read_bytes()
    w.close()
    ref = reference(0)
    cuts = sorted({len(data) - 1, len(data) - 7, len(data) - 40, len(data) // 2, len(data) // 3, 200})
    for k, cut in enumerate(cuts):
        p = tmp_path / f"cut{k}.h5.partial"
        p.write_bytes(data[:cut])
        with T.open_trace(p) as t:
            assert t.status == T.STATUS_INCOMPLETE and 0 <= t.n_steps < 6
            _same_steps(t, ref, t.n_steps)
            assert t.recovered and "byte" in t.recovered
    flipped = bytearray(data)
    flipped[-2000] ^= 0x10     # inside the last step's rows
    p = tmp_path / "flip.h5.partial"
    p.write_bytes(bytes(flipped))
    with T.open_trace(p) as t:
        assert t.n_steps == 5 and "checksum" in t.recovered
        _same_steps(t, ref, 5)


def test_a_failed_conversion_keeps_the_journal(tmp_path):
    """When the final HDF5 file cannot be written, close raises one TraceWriteError that names
    the journal, leaves no temporary file, and the journal still opens with every step."""
    path = tmp_path / "t.h5"
    w = write_steps(path, 3, close=False)
    (tmp_path / f"t.h5.{os.getpid()}.tmp").mkdir()       # the conversion's target cannot be created
    with pytest.raises(T.TraceWriteError) as e:
        w.close()
    msg = str(e.value)
    assert "all 3 steps kept in" in msg and str(w.partial_path) in msg and "\n" not in msg
    assert not path.exists()
    with T.open_trace(w.partial_path) as t:
        assert t.n_steps == 3 and t.status == T.STATUS_COMPLETE   # it was closed: only the conversion failed


def test_a_write_error_stops_the_writer_with_one_error(tmp_path):
    """A file-size limit (EFBIG) in the middle of a step: one TraceWriteError, later writes are
    ignored, close repeats the error, and the journal opens with the committed steps."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))\n"
        "from vlmscope.testing.crash import write_steps\n"
        "from vlmscope.trace import TraceWriteError\n"
        "done = []\n"
        "try:\n"
        f"    write_steps({str(tmp_path / 'w.h5')!r}, 100, on_commit=done.append)\n"
        "except TraceWriteError as e:\n"
        "    print('ERR', e.steps, e)\n"
        "print('DONE', done[-1] if done else 0)\n")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    err = next(line for line in r.stdout.splitlines() if line.startswith("ERR"))
    done = int(r.stdout.split("DONE")[1])
    assert "File too large" in err and "finished steps kept in" in err
    assert int(err.split()[1]) == done > 0
    with T.open_trace(tmp_path / "w.h5.partial") as t:
        assert t.n_steps == done and t.status == T.STATUS_INCOMPLETE


def test_the_writer_never_replaces_a_file_it_was_not_allowed_to(tmp_path):
    p = tmp_path / "x.h5"
    p.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        T.TraceWriter(p, overwrite=False)
    assert p.read_bytes() == b"precious"
    q = tmp_path / "y.h5"
    Path(str(q) + ".partial").write_bytes(b"a killed run's only copy")
    with pytest.raises(FileExistsError):
        T.TraceWriter(q, overwrite=False)
    assert Path(str(q) + ".partial").read_bytes() == b"a killed run's only copy"
    # a file that appears at the target while recording is not clobbered either
    r = tmp_path / "z.h5"
    w = T.TraceWriter(r, overwrite=False)
    w.end_step()
    r.write_bytes(b"appeared meanwhile")
    with pytest.raises(T.TraceWriteError):
        w.close()
    assert r.read_bytes() == b"appeared meanwhile" and w.partial_path.exists()


def test_a_flipped_bit_in_any_stored_chunk_is_an_error_never_a_value(tmp_path):
    """Format 3 checksums every chunk: flip one bit inside each stored chunk of each dataset in
    turn; reading that dataset through the reader raises TraceError instead of returning values."""
    import h5py

    src = write_steps(tmp_path / "src.h5", 40, seed=5, rows=ROWS).path
    with h5py.File(src) as f:
        chunks = []
        for name in ("steps", "events", "tensors", "probes", "modules", "strings", "string_ends", "probe_data",
                     "payloads/0"):
            ds = f[name]
            assert ds.fletcher32, name
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                chunks.append((name, info.byte_offset, info.size))
    assert len(chunks) >= 9
    data = src.read_bytes()
    read = {
        "strings": lambda t: t.strings, "string_ends": lambda t: t.strings,
        "probe_data": lambda t: t.table("probe_data"), "payloads/0": lambda t: t.payload(0),
    }
    for k, (name, off, size) in enumerate(chunks):
        bad = bytearray(data)
        bad[off + size // 2] ^= 0x04
        p = tmp_path / f"flip{k}.h5"
        p.write_bytes(bytes(bad))
        with pytest.raises(T.TraceError):
            with T.open_trace(p) as t:
                read.get(name, lambda t: t.table(name))(t)
