"""Strings from a trace are text: markup and terminal escape sequences in module names, class
names, the prompt, the generated text, warnings and the error record are shown literally (and
escaped), never interpreted, by every command that prints them (issue 13).

The hostile traces are the demo trace (:func:`vlmscope.testing.write_demo_trace`, with a NaN in
``HOSTILE_MODULE`` so that ``check`` reports it) with its strings and metadata rewritten. The
viewer's test (``tests/view/test_hostile_text.py``) loads :func:`hostile_trace` from here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from vlmscope.testing import write_demo_trace
from vlmscope.trace import read_strings, write_strings

ROOT = Path(__file__).resolve().parents[2]
MQWEN = ROOT / "traces" / "examples" / "tiny-mqwen-astronaut.h5"

LINK = "[link=https://evil.example]click[/link]"
STYLE = "[bold red]X[/]"
LONE = "[/]"
OSC_TITLE = "\x1b]0;pwned\x07"
CSI = "\x1b[31m"
C1_CSI = "\x9b31m"
#: appended to every string the tests make hostile
EVIL = f"{LINK} {STYLE} {LONE} {OSC_TITLE} {CSI} {C1_CSI}"
#: how printable() shows the escape sequences
SHOWN = ["\\x1b]0;pwned\\x07", "\\x1b[31m", "\\x9b31m"]
LEAF = "model.language_model.layers.1.mlp"
HOSTILE_MODULE = LEAF + EVIL
HOSTILE_CLASS = "Qwen2MLP" + EVIL

#: control characters that must never reach the output (newline and tab are layout)
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: the colour codes Rich itself writes when it believes it writes to a terminal
SGR = re.compile(r"\x1b\[[0-9;]*m")


def hostile_trace(path: Path, variant: str = "a") -> Path:
    """The demo trace with hostile strings: ``LEAF`` (and its children) renamed ``HOSTILE_MODULE``
    (...), its class ``HOSTILE_CLASS``, and the model, prompt, generated text, a warning and an error
    record (type, message, module stack, last reshape, traceback) carrying ``EVIL``. Variant "a"
    has a NaN out of the hostile module (a failing check); "b" differs from "a" (a diff)."""
    write_demo_trace(path, variant=variant, nan_in=LEAF if variant == "a" else None)
    with h5py.File(path, "r+") as f:
        strings = []
        for s in read_strings(f):
            if s == LEAF or s.startswith(LEAF + "."):
                s = HOSTILE_MODULE + s[len(LEAF):]
            elif s == "Qwen2MLP":
                s = HOSTILE_CLASS
            elif s in ("view", "out"):              # an op and the output tensors' name
                s = s + EVIL
            strings.append(s)
        write_strings(f, strings)
        meta = json.loads(f["meta"].attrs["run_json"])
        meta.update(model="tiny" + EVIL, prompt="Describe " + EVIL, generated_text="said " + EVIL,
                    warnings=["careful " + EVIL])
        f["meta"].attrs["run_json"] = json.dumps(meta)
        g = f.require_group("error")
        g.attrs["type"] = "RuntimeError" + EVIL
        g.attrs["message"] = "boom " + EVIL + "\nsecond line " + EVIL
        g.attrs["step"] = 0
        g.attrs["module_stack"] = json.dumps(["", "model", HOSTILE_MODULE])
        g.attrs["last_reshape"] = json.dumps({"op": "view" + EVIL, "in_shapes": "[1, 28, 64]", "args": EVIL,
                                              "site": "x.py:1" + EVIL, "module": HOSTILE_MODULE})
        g.attrs["traceback"] = "Traceback (most recent call last): " + EVIL
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("hostile")
    return hostile_trace(d / "a.h5", "a"), hostile_trace(d / "b.h5", "b")


def vlmscope(*args: str, colour: bool = False) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess (PYTHONPATH inherited); with ``colour``, Rich is made
    to believe it writes to a terminal (where markup would make hyperlinks)."""
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    if colour:
        env["FORCE_COLOR"] = "1"
    r = subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", *args], capture_output=True, env=env,
                       timeout=300)
    r.out = r.stdout.decode("utf-8")          # strict: output is valid UTF-8
    r.err = r.stderr.decode("utf-8")
    return r


def assert_inert(r: subprocess.CompletedProcess, colour: bool) -> str:
    """No control character (no escape sequence, no BEL, no C1 CSI/OSC) from the trace reaches
    stdout or stderr, no hyperlink is made, no traceback; returns stdout, colours dropped and
    whitespace collapsed."""
    both = r.out + r.err
    assert "Traceback (most recent call last):\n" not in both and "MarkupError" not in both, both[-3000:]
    assert "\x1b]" not in both and "\x07" not in both and "\x9b" not in both and "\x9d" not in both
    rest = SGR.sub("", both) if colour else both
    bad = CONTROL.search(rest)
    assert bad is None, (bad.group(), rest[max(0, bad.start() - 80): bad.start() + 80])
    if not colour:
        assert "\x1b" not in both
    return " ".join((SGR.sub("", r.out) if colour else r.out).split())


def assert_literal(text: str, *, escapes: bool = True) -> None:
    """The markup shows as written, the escape sequences as visible escapes."""
    for part in (LINK, STYLE, f"{STYLE} {LONE}"):
        assert part in text, (part, text[:2000])
    if escapes:
        for part in SHOWN:
            assert part in text, (part, text[:2000])


@pytest.mark.parametrize("colour", [False, True], ids=["pipe", "terminal"])
def test_summary_shows_trace_strings_as_text(hostile, colour):
    a, _ = hostile
    r = vlmscope("summary", str(a), colour=colour)
    assert r.returncode == 0, r.err
    text = assert_inert(r, colour)
    assert_literal(text)
    for what in ("model tiny" + LINK, "generated: 'said " + LINK, "warning: careful " + LINK,
                 "forward raised RuntimeError" + LINK, "in module " + LEAF + LINK, "last op view" + LINK,
                 "[numbers.nonfinite] step 0 " + LEAF + LINK):
        assert what in text, what
    # the violation line is the summary's verdict: its styles are the summary's, not the trace's
    assert "invariant violation(s)" in text


@pytest.mark.parametrize("colour", [False, True], ids=["pipe", "terminal"])
def test_check_shows_trace_strings_as_text(hostile, colour):
    a, _ = hostile
    r = vlmscope("check", str(a), colour=colour)
    assert r.returncode == 1, r.err                 # violations: exit 1, not a crash
    text = assert_inert(r, colour)
    assert "numbers.nonfinite" in text and LEAF + LINK in text
    assert STYLE in text and "\\x1b]0;pwned" in text


def test_check_json_keeps_the_strings_exactly(hostile):
    a, _ = hostile
    r = vlmscope("check", "--json", str(a))
    assert r.returncode == 1, r.err
    assert_inert(r, False)
    report = json.loads(r.out)
    nonfinite = [v for v in report["violations"] if v["rule"] == "numbers.nonfinite"]
    assert nonfinite and nonfinite[0]["module"] == HOSTILE_MODULE      # JSON escapes, the value is exact
    assert "\\u001b]0;pwned\\u0007" in r.out and "\\u009b31m" in r.out


@pytest.mark.parametrize("colour", [False, True], ids=["pipe", "terminal"])
def test_diff_shows_trace_strings_as_text(hostile, colour):
    a, b = hostile
    r = vlmscope("diff", str(a), str(b), colour=colour)
    assert r.returncode == 1, r.err                 # the traces differ
    text = assert_inert(r, colour)
    assert "first divergence detected: step 0, " + LEAF + LINK in text
    assert_literal(text)
    j = vlmscope("diff", "--json", str(a), str(b))
    assert j.returncode == 1 and json.loads(j.out)["first_divergence"]["module"].startswith(HOSTILE_MODULE)
    assert_inert(j, False)


def test_snapshot_prints_json_with_escapes(hostile, tmp_path):
    a, _ = hostile
    r = vlmscope("snapshot", str(a))
    assert r.returncode == 0, r.err
    assert_inert(r, False)
    snap = json.loads(r.out)                        # still the same JSON values
    assert snap["model"] == "tiny" + EVIL
    assert any(c[0] == HOSTILE_MODULE for s in snap["steps"] for c in s["calls"])
    # written to a file and compared back: the same shapes
    out = tmp_path / "golden.json"
    w = vlmscope("snapshot", str(a), "-o", str(out))
    assert w.returncode == 0, w.err
    assert CONTROL.search(out.read_text(encoding="utf-8")) is None
    c = vlmscope("snapshot", str(a), "--compare", str(out))
    assert c.returncode == 0, c.out + c.err
    assert_inert(c, False)


def test_golden_diff_lines_are_text(hostile, tmp_path):
    """A golden snapshot that differs: the unified diff quotes the trace's strings, as text."""
    a, _ = hostile
    golden = tmp_path / "golden.json"
    snap = json.loads(vlmscope("snapshot", str(a)).out)
    snap["model"] = "other " + EVIL
    snap["steps"][0]["calls"][0][0] = "renamed " + EVIL
    golden.write_text(json.dumps(snap, ensure_ascii=False), encoding="utf-8")
    for args in (("snapshot", str(a), "--compare", str(golden)), ("check", str(a), "--golden", str(golden))):
        for colour in (False, True):
            r = vlmscope(*args, colour=colour)
            assert r.returncode == 1, (args, r.out + r.err)
            text = assert_inert(r, colour)
            assert "renamed " + LINK in text


def test_summary_is_no_verdict_when_check_cannot_run(tmp_path):
    """The MQwen example with a garbled probe chunk: the header and steps read, the rules cannot
    run. summary prints what it can, says why, and exits 3 (never 0, the clean code)."""
    bad = tmp_path / "bad.h5"
    shutil.copy(MQWEN, bad)
    with h5py.File(bad, "r") as f:
        info = f["probes"].id.get_chunk_info(0)
    with open(bad, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    r = vlmscope("summary", str(bad))
    assert r.returncode == 3, (r.returncode, r.out, r.err)
    text = assert_inert(r, False)
    assert "prefill" in text                                    # what could be read is printed
    assert "check could not run: trace is truncated or corrupt" in text
    assert "invariant violation" not in text
    err = " ".join(r.err.split())
    assert err.startswith("vlmscope: error: check could not run") and "Traceback" not in r.err
    # the intact example runs the rules and exits 0: the 3 is about the damage
    ok = vlmscope("summary", str(MQWEN))
    assert ok.returncode == 0, ok.err
