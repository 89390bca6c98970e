"""The example traces committed in traces/examples/ still open and still say what the README says."""

from __future__ import annotations

from conftest import ROOT

import vlmscope
from vlmscope.analyze.check import check

EXAMPLES = ROOT / "traces" / "examples"


def test_example_traces_open_and_are_complete():
    paths = sorted(EXAMPLES.glob("*.h5"))
    assert [p.name for p in paths] == ["tiny-mqwen-astronaut.h5", "tiny-qwen2.5-vl-astronaut.h5"]
    for p in paths:
        with vlmscope.open_trace(p) as t:
            assert t.complete and t.n_steps == 4 and t.format_version == 1


def test_example_checks():
    clean = check(EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5")
    assert clean.ok and not clean.violations
    quirk = check(EXAMPLES / "tiny-mqwen-astronaut.h5")
    assert {v.rule for v in quirk.violations} == {"positions.kv-index"}
