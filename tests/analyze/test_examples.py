"""The example traces committed in traces/examples/ still open and still say what the README says."""

from __future__ import annotations

from pathlib import Path

import h5py

import vlmscope
from vlmscope.analyze.check import check
from vlmscope.analyze.diff import diff
from vlmscope.trace import FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "traces" / "examples"
V1 = ROOT / "tests" / "data" / "tiny-qwen2.5-vl-astronaut.format-v1.h5"
V2 = ROOT / "tests" / "data" / "tiny-qwen2.5-vl-astronaut.format-v2.h5"


def test_example_traces_open_and_are_complete():
    paths = sorted(EXAMPLES.glob("*.h5"))
    assert [p.name for p in paths] == ["tiny-mqwen-astronaut.h5", "tiny-qwen2.5-vl-astronaut.h5"]
    for p in paths:
        with vlmscope.open_trace(p) as t:
            assert t.complete and t.n_steps == 4 and t.format_version == FORMAT_VERSION == 3


def test_example_checks():
    clean = check(EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5")
    assert clean.ok and not clean.violations
    quirk = check(EXAMPLES / "tiny-mqwen-astronaut.h5")
    assert {v.rule for v in quirk.violations} == {"positions.kv-index"}


def test_format_v2_traces_still_read():
    """A trace written by format 2 (no checksums) opens, checks clean and diffs as identical to
    the same recording in the current format (every chunk checksummed)."""
    with h5py.File(V2) as f:
        assert f.attrs["format_version"] == 2 and not f["tensors"].fletcher32
    with h5py.File(EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5") as f:
        assert all(f[n].fletcher32 for n in ("steps", "events", "tensors", "reshapes", "probes", "modules",
                                            "strings", "string_ends", "probe_data"))
    with vlmscope.open_trace(V2) as t:
        assert t.format_version == 2 and t.complete and t.n_steps == 4
    assert check(V2).ok
    rep = diff(V2, EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5")
    assert rep.same and rep.first is None and rep.counts["tensors"]["same"] > 400


def test_format_v1_traces_still_read():
    """A trace written by format 1 (lzf tables) opens, checks clean and diffs as identical to
    the same recording in the current format (Blosc2 tables)."""
    with h5py.File(V1) as f:
        assert f.attrs["format_version"] == 1 and f["tensors"].compression == "lzf"
    with h5py.File(EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5") as f:
        assert f["tensors"].id.get_create_plist().get_filter(0)[0] == 32026   # Blosc2
    with vlmscope.open_trace(V1) as t:
        assert t.format_version == 1 and t.complete and t.n_steps == 4
    assert check(V1).ok
    rep = diff(V1, EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5")
    assert rep.same and rep.first is None and rep.counts["tensors"]["same"] > 400
