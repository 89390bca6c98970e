"""Hostile trace files (issue 13): a seeded run of mutated traces through the reader and the
trace commands, in worker processes with a memory cap and a per-run timeout.

Every mutation class of :mod:`vlmscope.testing.fuzz` is drawn in turn (truncations, bit flips in
headers and data chunks, zeroed ranges, non-HDF5 files, deleted / renamed / retyped objects and
attributes, newer versions, string offsets past the end, out-of-range references, huge declared
dimensions, parent cycles, soft / external links, external storage), on real recordings
(``traces/examples``) and synthetic traces with saved payloads. Each mutated file goes through
``open_trace`` with every accessor and ``vlmscope summary / check / diff / snapshot``.

Every run must end in exit 3 with one line (``TraceError`` for the API), or a documented result:
the original's, or a different one with a warning saying so. Never a traceback, a hang, a memory
blow-up, a crash, another exit code, or a result that differs from the original's without a word
on a file whose damage is detectable. (``silent-unchecked``: a changed value in bytes no checksum
covers -- a format-2 recording's data chunk -- cannot be detected by any reader; it is reported
in the failure message, not failed on.)

The long run is ``scripts/fuzz_traces.py`` (thousands of cases, a table per command and class).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vlmscope.testing import fuzz

EXAMPLES = Path(__file__).resolve().parents[2] / "traces" / "examples"
SEED = 13
N_CASES = int(os.environ.get("VLMSCOPE_FUZZ_CASES", "240"))   # 12 of each of the 20 classes
TIMEOUT_S = 10.0          # per run: one command (or the API's accessors) on one file
MEM_BYTES = 2 << 30       # address space of a worker (RLIMIT_AS)


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    sources = fuzz.make_sources(d / "sources", examples=EXAMPLES)
    assert len(sources) >= 3, sources                  # the real recordings and the synthetic traces
    t0 = time.monotonic()
    results = fuzz.supervise(N_CASES, SEED, sources, d / "work", jobs=min(2, os.cpu_count() or 1),
                             timeout=TIMEOUT_S, mem_bytes=MEM_BYTES, cls="cycle", keep_dir=d / "failures")
    return results, time.monotonic() - t0, d


def _report(results: list[dict], groups: list[dict], d) -> str:
    lines = [f"{sum(g['count'] for g in groups)} failing runs in {len(groups)} groups "
             f"(seed {SEED}; files kept in {d / 'failures'}; replay one with "
             f"`python scripts/fuzz_traces.py --seed {SEED} --class cycle --replay CASE --trace`):"]
    for g in groups[:30]:
        lines.append(f"  {g['count']:3d} {g['outcome']} in {g['cmd']}: case {g['example_case']} "
                     f"({g['example_mutation'][:100]}) -> {g['example_detail'][:200]}")
    unchecked = fuzz.failure_groups(results, ("silent-unchecked",))
    if unchecked:
        lines.append(f"  (and {sum(g['count'] for g in unchecked)} silent-unchecked runs, not failed on)")
    lines.append(fuzz.tabulate(results))
    return "\n".join(lines)


def test_every_case_ran_every_command(fuzz_results):
    results, _, _ = fuzz_results
    assert len(results) == N_CASES
    for c in results:
        assert [r["cmd"] for r in c["runs"]] == list(fuzz.COMMANDS), c
    seen = {c["mutation"].get("cls") for c in results}
    assert seen == set(fuzz.MUTATION_CLASSES)


def test_the_mutations_damage_files(fuzz_results):
    """The harness is not vacuous: most damaged files are refused, and some are read as before."""
    results, _, _ = fuzz_results
    outcomes = [r["outcome"] for c in results for r in c["runs"]]
    assert outcomes.count("error-exit-3") > len(outcomes) // 4
    assert outcomes.count("ok") > 0


def test_hostile_traces_are_refused_with_one_line_or_read_as_documented(fuzz_results):
    results, _, d = fuzz_results
    groups = fuzz.failure_groups(results, (*fuzz.FAILURES, "harness-error"))
    assert not groups, _report(results, groups, d)


def test_the_run_is_quick(fuzz_results):
    _, seconds, _ = fuzz_results
    assert seconds < 120, f"{N_CASES} cases took {seconds:.0f} s"


def test_the_supervisor_survives_hangs_crashes_and_blowups(tmp_path, monkeypatch):
    """The harness itself: a run that hangs, segfaults, exhausts the memory cap or is killed is
    classified, its worker replaced, and the case goes on with its next command."""
    monkeypatch.setenv("VLMSCOPE_FUZZ_INJECT", "hang@1:check,crash@2:api,blowup@3:summary,killed@3:snapshot")
    sources = fuzz.make_sources(tmp_path / "sources", real=False)
    results = fuzz.supervise(4, SEED, sources, tmp_path / "work", jobs=2, timeout=3.0, mem_bytes=MEM_BYTES,
                             cls="valid-edit")
    got = {(c["case"], r["cmd"]): r["outcome"] for c in results for r in c["runs"]}
    assert len(got) == 4 * len(fuzz.COMMANDS)
    assert got[1, "check"] == "hang" and got[2, "api"] == "crash"
    assert got[3, "summary"] == "blowup" and got[3, "snapshot"] == "blowup"
    injected = {(1, "check"), (2, "api"), (3, "summary"), (3, "snapshot")}
    assert all(o in ("ok", "partial") for k, o in got.items() if k not in injected), got
