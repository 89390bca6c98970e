"""Importing the analysis package, its CLI commands and the pytest plugin stays light:
no torch, no textual (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, sys
import vlmscope.analyze
import vlmscope.analyze.align, vlmscope.analyze.check, vlmscope.analyze.diff
import vlmscope.analyze.expect, vlmscope.analyze.snapshot
import vlmscope.cli_analyze
import vlmscope.pytest_plugin
from vlmscope.cli_analyze import check, diff, snapshot
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "textual", "transformers"))
print(json.dumps(heavy))
"""


def test_analysis_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_check_on_a_trace_imports_nothing_heavy(tmp_path):
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from bench.synth_trace import make_trace
from vlmscope.analyze import check, diff, snapshot, expect
p = make_trace({str(tmp_path / 't.h5')!r}, n_steps=2, n_layers=2, n_vision=1)
check(p); diff(p, p); snapshot(p)
expect(p, "**.q_proj", output="B S 64")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "textual", "transformers"))))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
