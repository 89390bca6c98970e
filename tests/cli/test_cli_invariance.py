"""``vlmscope invariance`` from the command line: a clean batch, a batch-dependent fault, the
output formats, ``--from``, and bad input (one line, exit 2; an unreadable trace, exit 3)."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import vlmscope
from vlmscope.cli import main
from vlmscope.testing.cli import one_line_error

ROOT = Path(__file__).resolve().parents[2]
SMALL = "max_pixels=12544"      # 112*112: at most 64 patches per image


def run(*args: str, cwd: Path | None = None):
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"prompt": "Describe this image.", "images": [str(ROOT / "examples" / "astronaut.png")]},
    {"prompt": "What is it?", "images": [str(ROOT / "examples" / "chelsea.png")]},
    {"prompt": "Hello there, how are you today my friend?"},
]

# Row 1 of a batch gets the batch mean of the first decoder layer's MLP output on decode steps
# (a cross-row leak that only batching can cause, as a shared buffer or a wrong reduction axis).
FAULTY = '''
import vlmscope_models

def build(**opts):
    model, proc = vlmscope_models.load_embedded("tiny-qwen2-vl", **opts)

    def leak(module, args, out):
        if out.shape[0] > 1 and out.shape[1] == 1:
            out = out.clone()
            out[1] = out[1] + out.mean(0)
            return out
        return None

    model.model.language_model.layers[0].mlp.register_forward_hook(leak)
    return model, proc
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("invcli")
    write_rows(d / "rows.jsonl", ROWS)
    return d


@pytest.fixture(scope="module")
def clean(workdir):
    """The clean batch, left padding only, recorded through the command."""
    r = run("invariance", "--batch", str(workdir / "rows.jsonl"), "-m", "tiny-qwen2-vl", "-n", "2",
            "--padding-side", "left", "--option", SMALL, "-o", str(workdir / "clean"), "--format", "plain")
    return r, workdir / "clean"


@pytest.fixture(scope="module")
def faulty(workdir):
    (workdir / "faulty_inv_model.py").write_text(textwrap.dedent(FAULTY))
    r = run("invariance", "--batch", "rows.jsonl", "-m", "faulty_inv_model:build", "-n", "2",
            "--option", SMALL, "-o", "faulty", "--format", "plain", cwd=workdir)
    return r, workdir / "faulty"


def test_clean_left_padded_batch_is_invariant_exit_0(clean):
    r, folder = clean
    assert r.exit_code == 0, (r.output, r.stderr)
    lines = r.stdout.splitlines()
    rows = [ln.split() for ln in lines if ln.strip()[:1].isdigit()]
    assert [(x[0], x[1], x[2]) for x in rows] == [("0", "left", "invariant"), ("1", "left", "invariant"),
                                                  ("2", "left", "invariant")]
    assert "every row is batch invariant (left padding)" in r.stdout
    assert sorted(p.name for p in folder.glob("*.h5")) == ["batch-left.h5", "row-0.h5", "row-1.h5", "row-2.h5"]
    with vlmscope.open_trace(folder / "row-1.h5") as t:   # each run is a normal trace
        assert t.status == "complete" and t.meta["argv"][:2] == ["vlmscope", "invariance"]


def test_fault_in_one_row_is_named_at_its_module_and_step(faulty):
    r, folder = faulty
    assert r.exit_code == 1, (r.output, r.stderr)
    table = {(x[0], x[1]): x for x in (ln.split() for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit())}
    # left padding: only row 1 depends on the batch, from the first decode step, at the MLP
    assert table[("0", "left")][2] == "invariant" and table[("2", "left")][2] == "invariant"
    row1 = table[("1", "left")]
    assert row1[2:6] == ["differs", "1", "model.language_model.layers.0.mlp", "out"]
    assert "new token" in " ".join(row1)
    # right padding: the shorter rows read their first token at a padding position (step 0,
    # lm_head), before the fault's step; the longest row has no padding
    assert table[("0", "right")][2] == "invariant"
    assert table[("1", "right")][2:5] == ["differs", "0", "lm_head"]
    assert table[("2", "right")][2:5] == ["differs", "0", "lm_head"]
    assert "row run(s) differ from the row alone" in r.stdout


def test_json_report_and_compare_again_from_the_folder(faulty):
    _, folder = faulty
    r = run("invariance", "--from", str(folder), "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["invariant"] is False and d["rows"] == 3 and set(d["sides"]) == {"left", "right"}
    left = {x["row"]: x for x in d["sides"]["left"]}
    f = left[1]["first"]
    assert (f["step"], f["module"], f["name"], f["where"]) == (1, "model.language_model.layers.0.mlp", "out",
                                                              "new token")
    assert f["max_abs"] > f["tol"] > 0 and f["scale"] > 0
    assert left[1]["n_divergent"] > 1 and left[1]["divergent_modules"][0] == "model.language_model.layers.0.mlp"
    assert left[1]["steps_compared"] == 2 and left[0]["verdict"] == "invariant"
    only_left = run("invariance", "--from", str(folder), "--padding-side", "left", "--format", "plain")
    assert only_left.exit_code == 1 and " right " not in only_left.stdout


def test_from_a_folder_with_a_damaged_trace_exits_3(clean, tmp_path):
    _, folder = clean
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "row-0.h5").read_bytes())
    data[: 4096] = b"\0" * 4096
    (bad / "row-0.h5").write_bytes(bytes(data))
    one_line_error(run("invariance", "--from", str(bad)), "row-0.h5", code=3)


def test_existing_traces_are_not_replaced_without_force(clean, workdir):
    _, folder = clean
    r = run("invariance", "--batch", str(workdir / "rows.jsonl"), "-m", "tiny-qwen2-vl", "-n", "1",
            "--padding-side", "left", "--option", SMALL, "-o", str(folder))
    one_line_error(r, "exists", "--force")


@pytest.mark.parametrize("args, needles", [
    ([], ["--batch", "--from"]),
    (["--batch", "missing.jsonl"], ["batch file not found"]),
    (["--batch", "one.jsonl"], ["at least 2 rows"]),
    (["--batch", "broken.jsonl"], ["broken.jsonl:2", "not JSON"]),
    (["--from", "rows.jsonl"], ["not a folder"]),
    (["--from", "."], ["invariance.json"]),
    (["--from", "fake"], ["not an invariance manifest"]),
    (["--batch", "rows.jsonl", "--rtol", "-1"], ["--rtol"]),
    (["--batch", "rows.jsonl", "-n", "0"], ["-n"]),
    (["--batch", "rows.jsonl", "--from", "."], ["--batch", "--from"]),
    (["--batch", "rows.jsonl", "--device", "nonsense"], ["--device"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needles):
    write_rows(tmp_path / "rows.jsonl", ROWS)
    write_rows(tmp_path / "one.jsonl", ROWS[:1])
    (tmp_path / "broken.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "invariance.json").write_text('{"batch": {"../x": "y.h5"}, "rows": [], "n_rows": 0}')
    one_line_error(run("invariance", *args, cwd=tmp_path), *needles)
