"""``vlmscope record`` with batches: --batch files (one generate call each), --repeat, repeated
--prompt/--image, --video/--fps, --padding-side; and every bad input as one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vlmscope
from vlmscope.cli import main
from vlmscope.testing.cli import one_line_error

EX = Path(__file__).resolve().parents[2] / "examples"
ASTRONAUT, CHELSEA, VIDEO = EX / "astronaut.png", EX / "chelsea.png", EX / "astronaut-pan.mp4"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def no_model(monkeypatch):
    """Bad input is refused before any model loads: loading one fails the test."""
    import vlmscope.cli.record as rec

    def refuse(*a, **k):
        raise AssertionError("the model was loaded for bad input")

    monkeypatch.setattr(rec, "_load_model_and_inputs", refuse)


def jsonl(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- ambiguous command lines


@pytest.mark.parametrize("args, needle", [
    (["-p", "a", "-p", "b", "-i", ASTRONAUT, "-i", CHELSEA, "-i", ASTRONAUT], "2 prompts and 3 images"),
    (["-p", "a", "-p", "b", "-p", "c", "-i", ASTRONAUT, "-i", CHELSEA], "3 prompts and 2 images"),
    (["-p", "a", "--video", VIDEO, "--video", VIDEO], "one video per prompt"),
    (["-p", "a", "-p", "b", "--video", VIDEO], "one video per prompt"),
    (["-i", ASTRONAUT, "--fps", "2"], "--fps sets the video sampling rate, but no row has a video"),
    (["--video", VIDEO, "--fps", "0"], "must be a positive number"),
    (["--video", VIDEO, "--fps", "nan"], "must be a positive number"),
    (["--padding-side", "middle"], "middle"),
    (["--repeat", "0"], "--repeat"),
])
def test_ambiguous_or_bad_arguments(tmp_path, no_model, args, needle):
    one_line_error(run("record", *args, "-o", tmp_path / "o.h5"), needle)
    assert not list(tmp_path.iterdir())


def test_batch_cannot_be_combined_with_prompt_image_or_video(tmp_path, no_model):
    f = jsonl(tmp_path / "rows.jsonl", {"prompt": "a"})
    for extra in (["-p", "x"], ["--image", str(ASTRONAUT)], ["--video", str(VIDEO)]):
        one_line_error(run("record", "--batch", f, *extra, "-o", tmp_path / "o.h5"),
                       f"--batch and {'--prompt' if extra[0] == '-p' else extra[0]} cannot be combined")


# --------------------------------------------------------------------------- bad batch files


@pytest.mark.parametrize("lines, needle", [
    (['{"prompt": "a"}', "{not json"], "rows.jsonl:2: not JSON"),
    (['["prompt", "a"]'], "rows.jsonl:1: a row must be a JSON object, not a list"),
    ([], "rows.jsonl: no rows (the file is empty)"),
    (['{"prompt": "a"}'] * 257, "rows.jsonl: 257 rows; at most 256 rows in one call"),
    (['{"prompt": "a"}', "", '{"images": ["astronaut.png"]}'], "rows.jsonl:3: a row needs 'prompt'"),
    (['{"prompt": "a", "images": "x.png"}'], "rows.jsonl:1: 'images' must be a list of paths"),
    (['{"prompt": "a", "imgs": []}'], "rows.jsonl:1: unknown key 'imgs'"),
    (['{"prompt": "a", "images": ["missing.png"]}'], "rows.jsonl:1: image not found"),
    (['{"prompt": "a", "video": "missing.mp4"}'], "rows.jsonl:1: video not found"),
])
def test_bad_batch_file_is_one_line_with_file_and_line(tmp_path, no_model, lines, needle):
    f = jsonl(tmp_path / "rows.jsonl", *lines) if lines else tmp_path / "rows.jsonl"
    if not lines:
        f.write_text("")
    one_line_error(run("record", "--batch", f, "-o", tmp_path / "o.h5"), needle)
    assert not (tmp_path / "o.h5").exists()


def test_second_batch_file_is_checked_before_the_model_loads(tmp_path, no_model):
    good = jsonl(tmp_path / "good.jsonl", {"prompt": "a"})
    bad = jsonl(tmp_path / "bad.jsonl", {"prompt": "a"}, {"prompt": "b", "messages": []})
    one_line_error(run("record", "--batch", good, "--batch", bad, "-o", tmp_path / "o.h5"),
                   "bad.jsonl:2: give 'prompt' or 'messages', not both")
    one_line_error(run("record", "--batch", tmp_path / "none.jsonl"), "batch file not found")


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(b""), "video file is empty"),
    (lambda p: p.write_bytes(VIDEO.read_bytes()[:5000]), "not a readable video"),
    (lambda p: p.write_bytes(ASTRONAUT.read_bytes()), "not a video (a still image, png)"),
    (lambda p: p.mkdir(), "video path is a directory"),
])
def test_bad_video_is_one_line(tmp_path, no_model, make, needle):
    v = tmp_path / "clip.mp4"
    make(v)
    one_line_error(run("record", "--video", v, "-o", tmp_path / "o.h5"), needle, "clip.mp4")
    f = jsonl(tmp_path / "rows.jsonl", {"prompt": "a"}, {"prompt": "b", "video": "clip.mp4"})
    one_line_error(run("record", "--batch", f, "-o", tmp_path / "o.h5"), "rows.jsonl:2: ", needle)


def test_subprocess_bad_row_is_one_line_exit_2(tmp_path):
    """The real console path: exit 2, exactly one line on stderr, no traceback."""
    f = jsonl(tmp_path / "rows.jsonl", {"prompt": "a"}, {"prompt": "b", "images": [3]})
    r = subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", "record", "--batch", str(f)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"vlmscope: error: {f}:2: 'images' must be a list of paths (item 0 is a number)"]
    assert not (tmp_path / "traces").exists() or not list((tmp_path / "traces").iterdir())


# --------------------------------------------------------------------------- real recordings


def test_two_batch_files_repeated_make_four_calls_in_one_trace(tmp_path):
    for p in (ASTRONAUT, CHELSEA):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    a = jsonl(tmp_path / "a.jsonl",
              {"prompt": "Describe.", "images": ["astronaut.png"]},
              {"prompt": "A text-only row, longer than the other."})
    b = jsonl(tmp_path / "b.jsonl",
              {"prompt": "Both.", "images": ["chelsea.png", "astronaut.png"]},
              {"messages": [{"role": "user", "content": [{"type": "image", "path": "chelsea.png"},
                                                          {"type": "text", "text": "A cat?"}]},
                            {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Sure?"}]},
              {"prompt": "Hi."})
    out = tmp_path / "t.h5"
    r = run("record", "-m", "tiny-qwen2-vl", "--batch", a, "--batch", b, "--repeat", "2", "-n", "2",
            "-o", out, "--format", "plain")
    assert r.exit_code == 0, r.stderr
    assert "complete" in r.stdout and "generated:" in r.stdout
    with vlmscope.open_trace(out) as t:
        calls = t.meta["calls"]
        assert [c["call"] for c in calls] == [0, 1, 2, 3]
        assert [c["batch_size"] for c in calls] == [2, 3, 2, 3]
        assert all(c["padding_side"] == "left" for c in calls)
        firsts = [c["first_step"] for c in calls]
        kind = t.steps["kind"]
        # each call starts with a prefill, and only there
        np.testing.assert_array_equal(np.flatnonzero(kind == 0), firsts)
        assert firsts == [0, 2, 4, 6] and t.n_steps == 8
        # B per call, as the model saw it
        for c in calls:
            probe = t.probes(c["first_step"], kind="input_ids")[0]
            assert t.probe_value(probe).shape[0] == c["batch_size"]
        assert calls[1]["rows"][0]["images"] == [str(tmp_path / "chelsea.png"), str(tmp_path / "astronaut.png")]
        assert calls[1]["rows"][1]["messages"] is True and calls[1]["rows"][2]["prompt"] == "Hi."
        assert calls[2]["rows"] == calls[0]["rows"]
        assert t.meta["batch"]["rows"] == calls[0]["rows"] and t.meta["batch"]["padding_side"] == "left"
        assert t.meta["prompt"] == "Describe." and t.meta["image"]["path"] == str(tmp_path / "astronaut.png")
        assert [len(x) for x in t.meta["generated_calls"]] == [2, 3, 2, 3]
        assert t.meta["generated_texts"] == t.meta["generated_calls"][0]
        assert t.meta["generated_text"] == t.meta["generated_texts"][0]


def test_repeated_prompts_and_images_one_image_per_row_right_padded(tmp_path):
    out = tmp_path / "p.h5"
    r = run("record", "-m", "tiny-qwen2-vl", "-p", "The astronaut.", "-p", "A cat, described at length.",
            "-i", ASTRONAUT, "-i", CHELSEA, "--padding-side", "right", "-n", "1", "-o", out, "--format", "plain")
    assert r.exit_code == 0, r.stderr
    with vlmscope.open_trace(out) as t:
        (call,) = t.meta["calls"]
        assert call["batch_size"] == 2 and call["padding_side"] == "right"
        assert [row["images"] for row in call["rows"]] == [[str(ASTRONAUT)], [str(CHELSEA)]]
        assert [row["prompt"] for row in call["rows"]] == ["The astronaut.", "A cat, described at length."]
        mask = t.probes(0, kind="attention_mask")[0]
        allowed = t.probe_value(mask).reshape(2, -1)
        # right padding: the shorter row (chelsea has fewer image tokens) ends with masked keys
        assert allowed[0].all() and not allowed[1, -1] and allowed[1, 0]


def test_video_reaches_the_model_with_its_grid_and_timing(tmp_path):
    out = tmp_path / "v.h5"
    r = run("record", "-m", "tiny-qwen2.5-vl", "--video", VIDEO, "--fps", "2", "-p", "What happens?",
            "-n", "2", "-o", out, "--format", "plain")
    assert r.exit_code == 0, r.stderr
    assert "cap_pixels_per_frame" not in r.stderr
    with vlmscope.open_trace(out) as t:
        # the vision tower got the video grid, and the model's forward the float32 timing
        (grid,) = t.probes(0, kind="video_grid_thw")
        np.testing.assert_array_equal(t.probe_value(grid), [[4, 8, 12]])
        (spg,) = [p for p in t.probes(0, kind="second_per_grid_ts")][:1]
        np.testing.assert_array_equal(t.probe_value(spg), [1.0])
        events = t.table("events")
        root = {t.s(x["name"]): x for x in t.tensors(0)
                if x["role"] == 1 and t.module_path(int(events[x["event"]]["module"])) == ""}
        assert t.s(root["second_per_grid_ts"]["dtype"]) == "float32"
        assert root["second_per_grid_ts"]["min"] == root["second_per_grid_ts"]["max"] == 1.0
        (row,) = t.meta["calls"][0]["rows"]
        assert row["video"] == str(VIDEO) and row["media"][0]["grid_thw"] == [4, 8, 12]
        assert row["media"][0]["second_per_grid_ts"] == 1.0
        ids = t.probe_value(t.probes(0, kind="input_ids")[0])
        assert int((ids == 151656).sum()) == 4 * 8 * 12 // 4

