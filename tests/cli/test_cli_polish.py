"""The command line's rough edges (issue 12, points 8-13): the README's golden workflow, piped
output, ``--json`` on every command that reads a trace, the diff step table's real values, bad
input as one ``vlmscope: error:`` line with exit 2, one error prefix, folded violations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlmscope.cli import main

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples" / "astronaut.png"
GOLDEN = ROOT / "traces" / "golden" / "tiny-qwen2.5-vl.json"
QWEN25 = ROOT / "traces" / "examples" / "tiny-qwen2.5-vl-astronaut.h5"
MQWEN = ROOT / "traces" / "examples" / "tiny-mqwen-astronaut.h5"
PREFIX = "vlmscope: error: "
BOX = set("┏┓┗┛┃━│─┡┩╇╈┼└┘┌┐…")


def cli(*args: str | bytes, cwd: Path | None = None, timeout: int = 300, threads: int | None = None
        ) -> subprocess.CompletedProcess:
    """The real command line in a subprocess, its stdout a pipe (not a terminal), no colour forced
    (``threads``: torch's intra-op threads, for runs side by side)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", *args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, cwd=cwd, timeout=timeout)
    r.out = r.stdout.decode("utf-8")
    r.err = r.stderr.decode("utf-8")
    return r


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_one_line(code: int, exit_code: int, err: str, *needles: str) -> str:
    """Exit ``code``, exactly one line on stderr with the one prefix, no traceback."""
    assert exit_code == code, (exit_code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Fresh CLI recordings of the default model, stdout piped: with -n 4 and with the default."""
    d = tmp_path_factory.mktemp("polish")
    todo = (("n4", ["-n", "4"]), ("default", []))
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:        # two processes, two files: at once
        done = list(pool.map(lambda job: cli("record", "--image", str(IMAGE), "-o", str(d / f"{job[0]}.h5"),
                                             *job[1], threads=1), todo))
    runs = {}
    for (name, _), r in zip(todo, done):
        assert r.returncode == 0, r.err
        runs[name] = (d / f"{name}.h5", r)
    return runs


# --------------------------------------------------------------------------- 8: the golden workflow


def test_golden_workflow_with_4_steps_is_clean(recorded):
    out, _ = recorded["n4"]
    r = cli("check", str(out), "--golden", str(GOLDEN))
    assert r.returncode == 0, r.out + r.err
    assert "clean" in r.out and r.err == ""
    s = cli("snapshot", str(out), "--compare", str(GOLDEN))
    assert s.returncode == 0 and s.out.startswith("same shapes as"), s.out + s.err
    snap = json.loads(cli("snapshot", str(out)).out)
    assert snap["model"] == "tiny-qwen2.5-vl" == json.loads(GOLDEN.read_text())["model"]


def test_golden_workflow_with_the_default_steps_is_one_line(recorded):
    out, _ = recorded["default"]
    r = cli("check", str(out), "--golden", str(GOLDEN))
    assert r.returncode == 1, r.out + r.err
    assert "golden has 4 steps, trace has 8" in r.out
    assert "@@" not in r.out and '"n_steps"' not in r.out and len(r.out.splitlines()) <= 4, r.out
    s = cli("snapshot", str(out), "--compare", str(GOLDEN))
    assert s.returncode == 1 and s.out.splitlines() == ["golden has 4 steps, trace has 8"], s.out
    j = cli("check", str(out), "--golden", str(GOLDEN), "--json")
    rep = json.loads(j.out)
    assert [v["actual"] for v in rep["violations"]] == ["golden has 4 steps, trace has 8"]


def test_golden_does_not_depend_on_how_the_model_was_named(tmp_path):
    from vlmscope.analyze.snapshot import compare_snapshots, golden_summary, model_name

    assert model_name({"model": "vlmscope_models/tiny-qwen2.5-vl"}) == "tiny-qwen2.5-vl"
    assert model_name({"model": "/ckpt/Qwen2.5-VL-3B-Instruct/", "model_kind": "checkpoint"}) == "Qwen2.5-VL-3B-Instruct"
    assert model_name({"model": "./Qwen2-VL-2B"}) == "Qwen2-VL-2B"
    assert model_name({"model": "MQwenForCausalLM", "model_class": "MQwenForCausalLM", "family": "mqwen"}) == "mqwen"
    assert model_name({"model": "tiny-mqwen"}) == "tiny-mqwen"
    golden = json.loads(GOLDEN.read_text())
    renamed = {**golden, "model": "vlmscope_models/tiny-qwen2.5-vl"}
    assert compare_snapshots(golden, renamed) == "" and golden_summary(golden, renamed) == ""
    # a real difference still shows, with a one-line summary before the diff
    changed = json.loads(json.dumps(golden))
    changed["steps"][1]["calls"][0][4] = [1, 2]
    assert golden_summary(golden, changed).startswith("2 differing lines, first at step 1: ")
    assert compare_snapshots(golden, changed).startswith("---")


# --------------------------------------------------------------------------- 9: piped output


def _step_rows(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.split()[1:2] in (["prefill"], ["decode"])]


def test_record_and_summary_piped_print_full_plain_rows(recorded):
    out, rec = recorded["n4"]
    summ = cli("summary", str(out))
    assert summ.returncode == 0, summ.err
    for r in (rec.out, summ.out):
        assert not (set(r) & BOX), r                      # no box drawing, no ellipsis
        assert "\x1b" not in r
        rows = _step_rows(r)
        assert len(rows) == 4, r
        assert "1x1x281x281" in rows[0] and "0..40 x3" in rows[0] and "0->281" in rows[0], rows[0]
        for i, row in enumerate(rows[1:], 1):
            assert f"1x1x1x{281 + i}" in row and f"{40 + i}..{40 + i} x3" in row, row
    # the mqwen example: a violation repeated over steps is one folded line, as check shows it
    m = cli("summary", str(MQWEN))
    kv = [ln for ln in m.out.splitlines() if "[positions.kv-index]" in ln]
    assert len(kv) == 1 and "steps 1-3 (3x)" in kv[0] and "more" not in m.out, m.out


def test_format_option_chooses_the_rendering():
    plain = cli("summary", str(QWEN25), "--format", "plain")
    rich = cli("summary", str(QWEN25), "--format", "rich")
    assert plain.returncode == rich.returncode == 0
    assert _step_rows(plain.out)[0].split()[:2] == ["0", "prefill"]
    assert _step_rows(rich.out)               # rich keeps its (box-free) step table
    bad = cli("summary", str(QWEN25), "--format", "html")
    assert_one_line(2, bad.returncode, bad.err, "--format")
    clash = cli("summary", str(QWEN25), "--format", "plain", "--json")
    assert_one_line(2, clash.returncode, clash.err, "--json")


# --------------------------------------------------------------------------- 10: --json everywhere


def test_summary_json():
    r = cli("summary", str(MQWEN), "--json")
    assert r.returncode == 0, r.err
    s = json.loads(r.out)
    assert (s["status"], s["n_steps"], s["model"], s["family"]) == ("complete", 4, "tiny-mqwen", "mqwen")
    st0 = s["steps"][0]
    assert st0["kind"] == "prefill" and st0["positions"] == [[0, 278]] and st0["mask_shape"] is None
    assert [v["rule"] for v in s["violations"]] == ["positions.kv-index"] * 3
    assert s["check_error"] is None and isinstance(s["generated_text"], str)
    q = json.loads(cli("summary", str(QWEN25), "--format", "json").out)
    assert q["steps"][0]["mask_shape"] == [1, 1, 281, 281] and q["steps"][0]["positions"] == [[0, 40]] * 3


def test_every_command_that_reads_a_trace_has_json(tmp_path):
    for args in (("summary", str(QWEN25)), ("check", str(QWEN25)), ("diff", str(QWEN25), str(MQWEN)),
                 ("snapshot", str(QWEN25), "--compare", str(GOLDEN))):
        r = invoke(*args, "--json")
        assert r.exit_code in (0, 1), (args, r.output)
        assert isinstance(json.loads(r.stdout), dict), args


# --------------------------------------------------------------------------- 11: the diff step table


def test_diff_step_table_shows_real_values_only():
    r = cli("diff", str(QWEN25), str(MQWEN))
    assert r.returncode == 1, r.err
    table = r.out[r.out.index("step table:"):]
    assert "-1" not in table and "None" not in table and "[278, 0, 0]" not in table, table
    rows = {tuple(ln.split()[:2]): ln.split()[2:] for ln in table.splitlines()[2:]}
    assert rows[("0", "pos_max")] == ["[40,", "40,", "40]", "[278]"]
    assert rows[("0", "mask_shape")] == ["[1,", "1,", "281,", "281]", "-"]
    assert ("0", "pos_rows") not in rows and ("0", "mask_ndim") not in rows
    j = json.loads(cli("diff", str(QWEN25), str(MQWEN), "--json").out)
    by = {(s["step"], s["field"]): (s["a"], s["b"]) for s in j["steps"]}
    assert by[(0, "mask_shape")] == ([1, 1, 281, 281], None) and by[(1, "pos_min")] == ([41, 41, 41], [4])


def test_probe_info_differences_show_real_values():
    from vlmscope.analyze.diff_render import _info_detail

    assert _info_detail({"fill": None, "style": "bool"}, {"fill": -3.4e38, "style": "bool"}) == "fill - -> -3.4e+38"


# --------------------------------------------------------------------------- 12: bad input


@pytest.mark.parametrize("args,needles", [
    (["--option", "nonsense=3"], ["nonsense"]),
    (["--option", "max_pixels=-1"], ["max_pixels"]),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--attn-implementation", "bogus"], ["bogus"]),
    (["--seed", str(2**64)], ["--seed"]),
    (["--seed", str(-(2**63) - 1)], ["--seed"]),
    (["-n", "0"], ["at least 1", "-n 1 records only the prefill"]),
    (["--option", "noequals"], ["KEY=VALUE"]),
], ids=["option-unknown", "option-bad-value", "device", "attn", "seed-2^64", "seed-below-2^63", "n-0", "option-form"])
def test_bad_record_input_is_one_line_with_exit_2(args, needles, tmp_path):
    out = tmp_path / "x.h5"
    r = CliRunner().invoke(main, ["record", "--image", str(IMAGE), "-o", str(out), "-n", "1", *args])
    # -n given twice: the last wins (click), so "-n 0" is the value checked
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert_one_line(2, r.exit_code, r.stderr, *needles)
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_extreme_aspect_ratio_image_is_one_line(tmp_path):
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.new("RGB", (1000, 4), (200, 10, 10)).save(wide)
    r = CliRunner().invoke(main, ["record", "--image", str(wide), "-o", str(tmp_path / "x.h5"), "-n", "1"])
    assert_one_line(2, r.exit_code, r.stderr, "aspect ratio", "wide.png", "1000x4")


def test_prompt_that_is_not_utf8_is_one_line(tmp_path):
    r = cli("record", "--image", str(IMAGE), "-o", str(tmp_path / "x.h5"), "--prompt", b"caf\xe9 \xff\xfe", timeout=120)
    assert_one_line(2, r.returncode, r.err, "--prompt", "UTF-8")


# --------------------------------------------------------------------------- 13: consistency


def test_one_error_prefix_everywhere(tmp_path):
    missing = str(tmp_path / "missing.h5")
    cases = [
        (("record", "--image", str(tmp_path / "nope.png")), 2),
        (("summary", missing), 3), (("check", missing), 3), (("diff", missing, missing), 3),
        (("snapshot", missing), 3), (("view", missing), 3),
        (("check", str(QWEN25), "--rules", "nosuchrule"), 2),
        (("diff", str(QWEN25), str(QWEN25), "--map", "oops"), 2),
        (("snapshot", str(QWEN25), "--compare", missing), 2),
        (("summary",), 2), (("check", str(QWEN25), "--bogus"), 2), (("nosuchcommand",), 2),
        (("view", str(QWEN25), "--map", "oops"), 2),
    ]
    for args, code in cases:
        r = CliRunner().invoke(main, list(args))
        assert_one_line(code, r.exit_code, r.stderr)
    r = cli("check", "--bogus")                     # the real console path, usage errors included
    assert_one_line(2, r.returncode, r.err, "--bogus", "-h")


def test_loading_bar_never_shows_none():
    from rich.progress import Progress

    from vlmscope.cli.record import _steps_column

    col = _steps_column()
    with Progress(col, disable=True) as p:
        t = p.add_task("loading", total=None)
        assert col.render(p.tasks[0]).plain == ""
        p.update(t, total=8, completed=3)
        assert col.render(p.tasks[0]).plain == "3/8"
