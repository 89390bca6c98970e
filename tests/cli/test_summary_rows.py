"""The summary's step table shows the batch rows and the generate calls (issue 10).

A real recording (``batch_rows_trace`` in tests/conftest.py: tiny-qwen2-vl, call 0 a left-padded
batch of three rows -- one image, text only, two images -- then call 1 with one row). What each
row must show (padding, image tokens, the M-RoPE ranges over its tokens) comes from the
processor's inputs and the model's own ``get_rope_index``, not from the trace. A trace of one
row and one call prints the table it always printed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

import vlmscope
from vlmscope.cli import main
from vlmscope.cli.output import Out
from vlmscope.cli.summary import print_summary

ROOT = Path(__file__).resolve().parents[2]
QWEN25 = ROOT / "traces" / "examples" / "tiny-qwen2.5-vl-astronaut.h5"
MQWEN = ROOT / "traces" / "examples" / "tiny-mqwen-astronaut.h5"


def summary(*args: str) -> str:
    r = CliRunner().invoke(main, ["summary", *map(str, args)], catch_exceptions=False)
    assert r.exit_code in (0, 1), r.output
    return r.stdout


def table(out: str) -> list[str]:
    """The step table's lines: from its header to the line before what follows it (the generated
    text, warnings, violations)."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("step "))
    after = ("generated:", "warning:", "forward raised", "check could not run")
    end = next((i for i, ln in enumerate(lines) if i > start and (ln.startswith(after) or "invariant violation" in ln)),
               len(lines))
    return lines[start:end]


def ranges(rs: list[list[int]]) -> str:
    if len({tuple(r) for r in rs}) == 1:
        return f"{rs[0][0]}..{rs[0][1]} x{len(rs)}"
    return "/".join(f"{a}..{b}" for a, b in rs)


def test_each_row_of_a_batched_step_has_its_line(batch_rows_trace):
    rows = batch_rows_trace["calls"][0]["rows"]
    lines = table(summary(batch_rows_trace["path"], "--format", "plain"))
    assert lines[0].split() == ["step", "call", "kind", "input", "q_len", "cache", "positions", "mask", "image", "tok",
                                "calls", "ms"]
    steps = [ln.split() for ln in lines[1:] if not ln.lstrip().startswith("row ")]
    assert [s[:3] for s in steps] == [["0", "0", "prefill"], ["1", "0", "decode"], ["2", "1", "prefill"],
                                      ["3", "1", "decode"]]
    # the prefill's rows: tokens (padding left out), positions over them, padding, image tokens
    body = lines[1:]
    assert body[0].split()[:3] == ["0", "0", "prefill"]
    for b, want in enumerate(rows):
        got = body[1 + b].split()
        assert got[:2] == ["row", str(b)], body
        assert got[2] == str(want["keys"]), got
        assert " ".join(got[3:5]) == ranges(want["positions"]), got
        assert got[5:7] == ["pad", str(want["pad"])] and got[7] == str(want["image_tokens"]), got
    assert len({w["pad"] for w in rows}) == 3 and rows[2]["pad"] == 0      # the batch really is padded
    # the decode step: each row's new token sits at its prefill maximum + 1, its padding still masked
    assert body[4].split()[:3] == ["1", "0", "decode"]
    for b, want in enumerate(rows):
        nxt = max(hi for _, hi in want["positions"]) + 1
        got = body[5 + b].split()
        assert got[:3] == ["row", str(b), "1"] and " ".join(got[3:5]) == f"{nxt}..{nxt} x3", got
        assert got[5:7] == ["pad", str(want["pad"])], got
    # call 1 has one row: no row lines
    assert body[8].split()[:3] == ["2", "1", "prefill"] and body[9].split()[:3] == ["3", "1", "decode"]
    assert len(body) == 10


def test_json_has_the_rows_as_lists(batch_rows_trace):
    rows = batch_rows_trace["calls"][0]["rows"]
    s = json.loads(summary(batch_rows_trace["path"], "--json"))
    steps = s["steps"]
    assert [(d["call"], d["batch_size"]) for d in steps] == [(0, 3), (0, 3), (1, 1), (1, 1)]
    for b, want in enumerate(rows):
        got = steps[0]["rows"][b]
        assert got == {"row": b, "tokens": want["keys"], "pad": want["pad"], "keys": want["keys"],
                       "positions": want["positions"], "image_tokens": want["image_tokens"], "video_tokens": 0}
        dec = steps[1]["rows"][b]
        nxt = max(hi for _, hi in want["positions"]) + 1
        assert dec["positions"] == [[nxt, nxt]] * 3 and dec["keys"] == want["keys"] + 1 and dec["pad"] == want["pad"]
    (one,) = steps[2]["rows"]
    want1 = batch_rows_trace["calls"][1]["rows"][0]
    assert one["positions"] == want1["positions"] and one["image_tokens"] == want1["image_tokens"]
    # generate passed no token mask [B, K] for the unpadded single row: its padding is unknown, not 0
    assert one["tokens"] == want1["length"] and one["pad"] is None and one["keys"] is None


def test_the_batched_table_fits_100_columns(batch_rows_trace):
    out = Out("rich")
    buf = io.StringIO()
    out._console = Console(file=buf, width=100, color_system=None, highlight=False, soft_wrap=False)
    with vlmscope.open_trace(batch_rows_trace["path"]) as t:
        print_summary(t, out)
    lines = buf.getvalue().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("step "))
    tbl = lines[start:start + 11]
    assert all(len(ln) <= 100 for ln in tbl), tbl
    rows = [ln for ln in tbl if ln.split()[:1] == ["row"]]
    assert len(rows) == 6 and all("x3" in ln and "pad" in ln for ln in rows), tbl      # one line each, unwrapped


def test_a_video_row_counts_its_video_tokens(batch_video_trace):
    (a, e), = batch_video_trace["video_span"]
    lines = table(summary(batch_video_trace["path"], "--format", "plain"))
    assert lines[0].split()[-6:] == ["image", "tok", "video", "tok", "calls", "ms"], lines[0]
    assert lines[0].index("video tok") < lines[0].index("calls")
    row0, row1 = lines[2].split(), lines[3].split()
    assert row0[:2] == ["row", "0"] and row0[-2:] == ["0", str(e - a)], lines      # image tok, video tok
    assert row1[:2] == ["row", "1"] and row1[-1] == "0" and int(row1[-2]) > 0, lines
    assert lines[1].split()[-3] == str(e - a), lines[1]                          # the step's video tokens
    rows = json.loads(summary(batch_video_trace["path"], "--json"))["steps"][0]["rows"]
    assert [r["video_tokens"] for r in rows] == [e - a, 0]


def test_rows_come_from_the_probe_values(tmp_path):
    """A trace without the per-row probe info (the synthetic writer stores none, as recorders
    before issue 10 did) shows its rows too: they are read from the values."""
    from vlmscope.testing import make_trace

    path = make_trace(tmp_path / "b3.h5", n_steps=3, batch=3, n_layers=2, n_vision=1)
    with vlmscope.open_trace(path) as t:
        info = t.probe_info(t.probes(0, kind="input_ids")[0])
        ids = t.probe_value(t.probes(0, kind="input_ids")[0])
    assert "row_image_tokens" not in info and ids.shape[0] == 3
    lines = table(summary(path, "--format", "plain"))
    rows = [ln.split() for ln in lines if ln.lstrip().startswith("row ")]
    assert [r[:2] for r in rows] == [["row", str(b)] for b in range(3)] * 3, lines
    per_row = int((ids[0] == info["image_token_id"]).sum())
    assert [r[-1] for r in rows[:3]] == [str(per_row)] * 3 and per_row > 0, lines


#: the step table of the B=1 example, as it has always been printed (recorded values: stable)
QWEN25_TABLE = """\
step  kind     input  q_len     cache  positions  mask         image tok  calls    ms
   0  prefill    281    281    0->281  0..40 x3   1x1x281x281        256     65  1774
   1  decode       1      1  281->282  41..41 x3  1x1x1x282            0     33   113
   2  decode       1      1  282->283  42..42 x3  1x1x1x283            0     33    73
   3  decode       1      1  283->284  43..43 x3  1x1x1x284            0     33    70"""
MQWEN_TABLE = """\
step  kind     input  q_len     cache  positions  mask  image tok  calls    ms
   0  prefill     24    279    0->279  0..278     -             1     49  1350
   1  decode       1      1  279->280  4..4       -             0     26    85
   2  decode       1      1  280->281  4..4       -             0     26    29
   3  decode       1      1  281->282  4..4       -             0     26    86"""


def test_one_row_and_one_call_print_the_table_as_before():
    assert "\n".join(table(summary(QWEN25, "--format", "plain"))) == QWEN25_TABLE
    assert "\n".join(table(summary(MQWEN, "--format", "plain"))) == MQWEN_TABLE
    s = json.loads(summary(QWEN25, "--json"))
    assert [(d["call"], d["batch_size"]) for d in s["steps"]] == [(0, 1)] * 4
    assert s["steps"][0]["rows"] == [{"row": 0, "tokens": 281, "pad": None, "keys": None,
                                      "positions": [[0, 40]] * 3, "image_tokens": 256, "video_tokens": 0}]


def test_the_model_line_names_the_calls_and_the_batch(batch_rows_trace, batch_video_trace):
    out = summary(batch_rows_trace["path"], "--format", "plain").splitlines()
    assert out[1].endswith("; 2 generate calls; batch of 3/1 rows, padding left"), out[1]
    assert "; image " not in out[1]            # the first row's image is not the run's image
    # one call of two rows (a video row and an image row): the batch, not one row's video
    out = summary(batch_video_trace["path"], "--format", "plain").splitlines()
    assert out[1].endswith("; batch of 2 rows, padding left"), out[1]


def test_a_one_row_video_run_names_its_video(tmp_path):
    from click.testing import CliRunner as Runner

    video = ROOT / "examples" / "astronaut-pan.mp4"
    out = tmp_path / "v.h5"
    r = Runner().invoke(main, ["record", "--model", "tiny-qwen2-vl", "--video", str(video), "-p", "What happens?",
                               "-n", "1", "-o", str(out), "--format", "plain"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = summary(out, "--format", "plain").splitlines()[1]
    assert f"; video {video} [160, 120], 16 frames at 4 fps -> grid " in line, line
