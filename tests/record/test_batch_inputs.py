"""Batch rows (prompts, several images, videos, chats) -> one processor call -> a batched generate,
and the Python API ``vlmscope.record(rows=..., calls=...)``. Real processors, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vlmscope
from vlmscope.errors import UserError
from vlmscope.recorder.inputs import (MAX_ROWS, Row, VideoError, as_rows, build_batch_inputs, build_inputs,
                                      check_video, generate_texts, parse_row, read_rows, rows_from_args)

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
ASTRONAUT, CHELSEA, VIDEO = EX / "astronaut.png", EX / "chelsea.png", EX / "astronaut-pan.mp4"


@pytest.fixture(scope="module")
def q2():
    import vlmscope_models

    return vlmscope_models.load_embedded("tiny-qwen2-vl")


@pytest.fixture(scope="module")
def q25():
    import vlmscope_models

    return vlmscope_models.load_embedded("tiny-qwen2.5-vl")


# --------------------------------------------------------------------------- rows


def test_prompt_row_loads_its_images_and_checks_its_video():
    row = parse_row({"prompt": "Look.", "images": [str(ASTRONAUT), str(CHELSEA)], "video": str(VIDEO)}, "r:1")
    assert row.prompt == "Look." and len(row.images) == 2 and row.videos == [str(VIDEO)]
    assert [i["size"] for i in row.image_info] == [[512, 512], [451, 300]]
    v = row.video_info[0]
    assert (v["frames"], v["fps"], v["size"]) == (16, 4.0, [160, 120]) and len(v["sha256"]) == 64
    meta = row.meta()
    assert meta["images"] == [str(ASTRONAUT), str(CHELSEA)] and meta["video"] == str(VIDEO)
    assert meta["messages"] is False and [m["kind"] for m in meta["media"]] == ["image", "image", "video"]


def test_messages_row_takes_media_from_its_items_in_order():
    row = parse_row({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "path": str(CHELSEA)}, {"type": "text", "text": "And?"},
                                     {"type": "image", "image": str(ASTRONAUT)}]},
        {"role": "assistant", "content": "A cat and an astronaut."},
        {"role": "user", "content": [{"type": "video", "video": str(VIDEO)}, {"type": "text", "text": "Now?"}]},
    ]}, "r:2")
    assert [i["path"] for i in row.image_info] == [str(CHELSEA), str(ASTRONAUT)]
    assert row.videos == [str(VIDEO)] and row.prompt is None
    # the template sees bare markers, never the paths
    assert row.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "And?"}, {"type": "image"}]
    assert row.meta()["messages"] is True


@pytest.mark.parametrize("obj, needle", [
    (["a list"], "a row must be a JSON object, not a list"),
    ({"prompt": "x", "image": "a.png"}, "unknown key 'image'"),
    ({"images": []}, "a row needs 'prompt'"),
    ({"prompt": 3}, "'prompt' must be a string, not a number"),
    ({"prompt": "\ud800"}, "not valid UTF-8"),
    ({"prompt": "x", "images": "a.png"}, "'images' must be a list of paths"),
    ({"prompt": "x", "images": [7]}, "'images' must be a list of paths (item 0 is a number)"),
    ({"prompt": "x", "video": ["v.mp4"]}, "'video' must be a path, not a list"),
    ({"prompt": "x", "video": None}, "'video' must be a path, not null"),
    ({"prompt": "x", "messages": []}, "not both"),
    ({"messages": [], "images": []}, "'images' goes inside 'messages'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "'role' must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "'content' must be a string or a list"),
    ({"messages": [{"role": "user", "content": "x", "name": "y"}]}, "unknown key 'name'"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "'type' text, image or video"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "http://x"}]}]}, "unknown key 'url'"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "one of 'path' or 'image'"),
])
def test_bad_rows_are_one_line_naming_where(obj, needle):
    with pytest.raises(UserError) as e:
        parse_row(obj, "rows.jsonl:3")
    msg = str(e.value)
    assert msg.startswith("rows.jsonl:3: ") and needle in msg and "\n" not in msg


def test_missing_image_names_the_row_and_the_file(tmp_path):
    with pytest.raises(UserError, match=r"^rows.jsonl:4: image not found: .*nope.png$"):
        parse_row({"prompt": "x", "images": [str(tmp_path / "nope.png")]}, "rows.jsonl:4")


def test_read_rows_line_numbers_and_paths_from_the_file_folder(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "cat.png").write_bytes(CHELSEA.read_bytes())
    f = d / "rows.jsonl"
    f.write_text('{"prompt": "a", "images": ["cat.png"]}\n\n{"prompt": "b"}\n{"prompt": "c", "images": [5]}\n')
    with pytest.raises(UserError, match=r"rows.jsonl:4: 'images' must be a list of paths"):
        read_rows(f)
    f.write_text('{"prompt": "a", "images": ["cat.png"]}\n\n{"prompt": "b"}\n')
    rows = read_rows(f)
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:3"]
    assert rows[0].image_info[0]["path"] == str(d / "cat.png")


@pytest.mark.parametrize("text, needle", [
    ("", "no rows (the file is empty)"),
    ("\n  \n", "no rows"),
    ('{"prompt": "a"}\n{"prompt": \n', ":2: not JSON"),
    ('"just a string"\n', ":1: a row must be a JSON object, not a string"),
    ('{"prompt": "a"}\n' * (MAX_ROWS + 1), f"{MAX_ROWS + 1} rows; at most {MAX_ROWS}"),
    ('{"prompt": "a"}\n{"images": []}\n', ":2: a row needs 'prompt'"),
])
def test_bad_jsonl_files(tmp_path, text, needle):
    f = tmp_path / "rows.jsonl"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        read_rows(f)
    assert needle in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_jsonl_file_itself_bad(tmp_path):
    with pytest.raises(UserError, match="batch file not found"):
        read_rows(tmp_path / "none.jsonl")
    with pytest.raises(UserError, match="batch file is a directory"):
        read_rows(tmp_path)
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8"):
        read_rows(f)


def test_rows_from_repeated_prompts_images_and_videos():
    a, c = str(ASTRONAUT), str(CHELSEA)
    rows = rows_from_args(["p1", "p2"], [a, c], [])
    assert [(r.prompt, [i["path"] for i in r.image_info]) for r in rows] == [("p1", [a]), ("p2", [c])]
    (one,) = rows_from_args(["p"], [a, c, a], [])
    assert [i["path"] for i in one.image_info] == [a, c, a]
    rows = rows_from_args(["x", "y", "z"], [], [])
    assert [r.prompt for r in rows] == ["x", "y", "z"] and not any(r.images for r in rows)
    rows = rows_from_args(["x", "y"], [], [str(VIDEO), str(VIDEO)])
    assert [len(r.videos) for r in rows] == [1, 1]
    with pytest.raises(UserError, match="2 prompts and 3 images"):
        rows_from_args(["x", "y"], [a, c, a], [])
    with pytest.raises(UserError, match="one video per prompt"):
        rows_from_args(["x"], [], [str(VIDEO), str(VIDEO)])


# --------------------------------------------------------------------------- videos


def test_example_video_and_its_script_are_deterministic(tmp_path):
    info = check_video(VIDEO)
    assert (info["frames"], info["fps"], info["size"]) == (16, 4.0, [160, 120])
    assert VIDEO.stat().st_size < 300_000
    outs = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for o in outs:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_example_video.py"), "-o", str(o)],
                       check=True, capture_output=True, timeout=120)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert check_video(outs[0])["frames"] == 16


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(b""), "video file is empty"),
    (lambda p: p.write_bytes(VIDEO.read_bytes()[: VIDEO.stat().st_size // 2]), "not a readable video"),
    (lambda p: p.write_bytes(ASTRONAUT.read_bytes()[:2000]), "not a video (a still image, png)"),
    (lambda p: p.write_text("hello, not a video\n"), "not a readable video"),
    (lambda p: p.mkdir(), "video path is a directory"),
    (lambda p: None, "video not found"),
])
def test_bad_videos_are_one_line(tmp_path, make, needle):
    p = tmp_path / "clip.mp4"
    make(p)
    with pytest.raises(VideoError) as e:
        check_video(p)
    assert needle in str(e.value) and "clip.mp4" in str(e.value) and "\n" not in str(e.value)


def test_truncated_faststart_video_is_caught(tmp_path):
    """An MP4 whose index comes first (faststart) still opens when its frames are cut off:
    the frames that decode are counted against the ones it states."""
    import av

    src = tmp_path / "fast.mp4"
    with av.open(str(VIDEO)) as inp, av.open(str(src), "w", format="mp4", options={"movflags": "faststart"}) as out:
        s = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = s
                out.mux(packet)
    assert check_video(src)["frames"] == 16
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    with pytest.raises(VideoError, match="cut.mp4"):
        check_video(cut)


def _remux(dst: Path, fmt: str, codec: str | None = None) -> Path:
    """The example video in another container (same packets), or re-encoded with ``codec``."""
    import av

    with av.open(str(VIDEO)) as inp, av.open(str(dst), "w", format=fmt) as out:
        if codec is None:
            s = out.add_stream_from_template(inp.streams.video[0])
            for packet in inp.demux(inp.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = s
                    out.mux(packet)
        else:
            s = out.add_stream(codec, rate=4)
            s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
            for frame in inp.decode(video=0):
                frame.pts = None
                for packet in s.encode(frame):
                    out.mux(packet)
            for packet in s.encode(None):
                out.mux(packet)
    return dst


def test_matroska_and_webm_videos_that_state_no_frame_count(q25, tmp_path):
    """Matroska/WebM state no frame count (PyAV says 0): every decoded frame is still used."""
    model, proc = q25
    mkv, webm = _remux(tmp_path / "v.mkv", "matroska"), _remux(tmp_path / "v.webm", "webm", "libvpx-vp9")
    ref, _ = build_batch_inputs(model, proc, [{"prompt": "a", "video": str(VIDEO)}])
    for path in (mkv, webm):
        assert check_video(path)["frames"] == 16
        for fps, grid in ((None, [[8, 8, 12]]), (2.0, [[4, 8, 12]])):
            inputs, _ = build_batch_inputs(model, proc, [{"prompt": "a", "video": str(path)}], fps=fps)
            assert inputs["video_grid_thw"].tolist() == grid
    same, _ = build_batch_inputs(model, proc, [{"prompt": "a", "video": str(mkv)}])
    np.testing.assert_array_equal(same["pixel_values_videos"].numpy(), ref["pixel_values_videos"].numpy())


# --------------------------------------------------------------------------- the processor, batched


MIXED = [{"prompt": "One image.", "images": [str(ASTRONAUT)]},
         {"prompt": "No image at all, a longer text-only row."},
         {"prompt": "Two images.", "images": [str(CHELSEA), str(ASTRONAUT)]}]


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_batch_pads_on_the_side_asked_and_keeps_image_order(q2, side):
    model, proc = q2
    old = proc.tokenizer.padding_side
    inputs, info = build_batch_inputs(model, proc, MIXED, padding_side=side)
    assert proc.tokenizer.padding_side == old            # the user's processor is left as it was
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    assert ids.shape[0] == 3 and mask.shape == ids.shape
    lengths = mask.sum(1)
    assert lengths.max() == ids.shape[1] and len(set(lengths.tolist())) == 3
    pad_col = 0 if side == "left" else -1
    assert [bool(mask[b, pad_col] == 0) for b in range(3)] == [bool(n < ids.shape[1]) for n in lengths]
    # images in row order: astronaut (row 0), chelsea then astronaut (row 2)
    np.testing.assert_array_equal(inputs["image_grid_thw"].numpy(), [[1, 32, 32], [1, 22, 32], [1, 32, 32]])
    per_row = (ids == model.config.image_token_id).sum(1)
    np.testing.assert_array_equal(per_row, [256, 0, 176 + 256])
    assert info["batch_size"] == 3 and info["padding_side"] == side and info["prompt"] == "One image."
    assert [r["images"] for r in info["rows"]] == [[str(ASTRONAUT)], [], [str(CHELSEA), str(ASTRONAUT)]]
    assert info["rows"][2]["media"][0]["resized"] == [448, 308]
    assert info["image"]["path"] == str(ASTRONAUT)
    texts = generate_texts(model, proc, inputs, max_new_tokens=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_video_with_fps_reaches_the_processor_and_keeps_float32_timing(q25):
    import torch

    model, proc = q25
    rows = [{"prompt": "What happens?", "video": str(VIDEO)}, {"prompt": "Text only."}]
    grids = {}
    for fps in (None, 2.0, 3.0):
        inputs, info = build_batch_inputs(model.to(torch.bfloat16), proc, rows, fps=fps)
        grids[fps] = (inputs["video_grid_thw"].tolist(), inputs["second_per_grid_ts"].tolist())
        assert inputs["second_per_grid_ts"].dtype == torch.float32
        assert inputs["pixel_values_videos"].dtype == torch.bfloat16
    model.to(torch.float32)
    # 16 frames at 4 fps; temporal patch 2: every frame -> 8 grids of 0.5 s; 2 fps -> 4 of 1 s
    assert grids[None] == ([[8, 8, 12]], [0.5])
    assert grids[2.0] == ([[4, 8, 12]], [1.0])
    assert grids[3.0][0] == [[6, 8, 12]] and grids[3.0][1] == pytest.approx([2 / 3])
    assert info["rows"][0]["media"][0]["grid_thw"] == [6, 8, 12]


def test_messages_row_in_a_batch(q2):
    model, proc = q2
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "path": str(CHELSEA)},
                                                       {"type": "text", "text": "A cat?"}]},
                          {"role": "assistant", "content": "Yes."},
                          {"role": "user", "content": "Sure?"}]},
            {"prompt": "Hello."}]
    inputs, info = build_batch_inputs(model, proc, rows)
    text = proc.batch_decode(inputs["input_ids"][:1])[0]
    assert text.count("<|im_start|>user") == 2 and "Yes.<|im_end|>" in text and text.endswith("assistant\n")
    assert info["prompt"] == "Sure?" and info["rows"][0]["prompt"] is None and info["rows"][0]["messages"] is True


def test_build_inputs_is_a_one_row_batch(q2):
    model, proc = q2
    inputs, info = build_inputs(model, proc, prompt="Describe this image.", image=str(ASTRONAUT))
    assert set(info) == {"prompt", "image"} and info["image"]["resized"] == [448, 448]
    same, _ = build_batch_inputs(model, proc, [{"prompt": "Describe this image.", "images": [str(ASTRONAUT)]}])
    assert set(inputs) == set(same)
    for k in inputs:
        np.testing.assert_array_equal(inputs[k].numpy(), same[k].numpy())


def test_text_model_refuses_media_and_image_model_refuses_video(q2):
    model, proc = q2
    with pytest.raises(UserError, match="fps must be a positive number"):
        build_batch_inputs(model, proc, [{"prompt": "x"}], fps=0)
    with pytest.raises(UserError, match="padding side must be"):
        build_batch_inputs(model, proc, [{"prompt": "x"}], padding_side="middle")
    with pytest.raises(UserError, match=f"at most {MAX_ROWS} rows"):
        as_rows([{"prompt": "x"}] * (MAX_ROWS + 1))


def test_mqwen_batch_one_image_per_row():
    """tiny-mqwen (Qwen-1 layout) takes exactly one image per row: a batch of two such rows is
    built as its processor builds it (one placeholder each, pixel values per image)."""
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-mqwen")
    inputs, info = build_batch_inputs(model, proc, [{"prompt": "a", "images": [str(ASTRONAUT)]},
                                                    {"prompt": "a longer prompt", "images": [str(CHELSEA)]}])
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 224, 224)
    np.testing.assert_array_equal((inputs["input_ids"] == 151646).sum(1).numpy(), [1, 1])
    assert [r["media"][0]["resized"] for r in info["rows"]] == [[224, 224], [224, 224]]


# --------------------------------------------------------------------------- the Python API


def test_record_api_rows_and_calls(q2, tmp_path):
    model, proc = q2
    rows_a = MIXED[:2]
    rows_b = [{"prompt": "Cat.", "images": [str(CHELSEA)]}, {"prompt": "Hi."}, {"prompt": "Bye."}]
    path = vlmscope.record(model, proc, calls=[rows_a, rows_b], out=tmp_path / "c.h5", max_new_tokens=2,
                           padding_side="right")
    with vlmscope.open_trace(path) as t:
        calls = t.meta["calls"]
        assert [c["batch_size"] for c in calls] == [2, 3]
        assert [c["padding_side"] for c in calls] == ["right", "right"]
        firsts = [c["first_step"] for c in calls]
        assert firsts[0] == 0 and firsts[1] > 0
        np.testing.assert_array_equal(np.flatnonzero(t.steps["kind"] == 0), firsts)
        assert [len(x) for x in t.meta["generated_calls"]] == [2, 3] and len(t.meta["generated_texts"]) == 2
        assert t.meta["prompt"] == "One image." and t.meta["image"]["path"] == str(ASTRONAUT)
        assert t.meta["batch"]["rows"][1]["prompt"] == MIXED[1]["prompt"]
    one = vlmscope.record(model, proc, rows=[{"prompt": "Hi."}, {"prompt": "Hello there."}],
                          out=tmp_path / "r.h5", max_new_tokens=1)
    with vlmscope.open_trace(one) as t:
        assert [c["batch_size"] for c in t.meta["calls"]] == [2] and t.n_steps == 1
    with pytest.raises(UserError, match="not both"):
        vlmscope.record(model, proc, prompt="x", rows=[{"prompt": "y"}], out=tmp_path / "x.h5")
    with pytest.raises(UserError, match=r"calls\[1\]\[0\]: a row needs 'prompt'"):
        vlmscope.record(model, proc, calls=[[{"prompt": "y"}], [{"images": []}]], out=tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_single_prompt_api_still_records_one_call(q2, tmp_path):
    model, proc = q2
    path = vlmscope.record(model, proc, image=str(ASTRONAUT), prompt="Describe this image.",
                           out=tmp_path / "s.h5", max_new_tokens=2)
    with vlmscope.open_trace(path) as t:
        assert isinstance(t.meta["generated_text"], str) and t.meta["prompt"] == "Describe this image."
        (call,) = t.meta["calls"]
        assert call["batch_size"] == 1 and call["rows"][0]["images"] == [str(ASTRONAUT)]
        assert json.dumps(t.meta["image"]) and t.meta["image"]["resized"] == [448, 448]


def test_row_objects_pass_through(q2):
    rows = as_rows([{"prompt": "x"}])
    assert isinstance(rows[0], Row) and as_rows(rows)[0] is rows[0]


def test_processor_rejection_is_one_line_naming_the_batch(q2, tmp_path):
    from PIL import Image

    thin = tmp_path / "thin.png"
    Image.new("RGB", (2, 600), (9, 9, 9)).save(thin)
    model, proc = q2
    with pytest.raises(UserError) as e:
        build_batch_inputs(model, proc, [{"prompt": "a"}, {"prompt": "b", "images": [str(thin)]}])
    msg = str(e.value)
    assert msg.startswith("the processor rejected the batch (rows, 2 row(s)): ValueError: ") and "\n" not in msg
    with pytest.raises(UserError, match=r"^the processor rejected the image .*thin.png \(2x600\): ValueError"):
        build_inputs(model, proc, prompt="a", image=str(thin))
