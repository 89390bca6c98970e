"""``vlmscope record`` / ``summary`` from the command line: models, outputs and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import vlmscope
from vlmscope.cli import main
from vlmscope.testing.cli import one_line_error

IMAGE = Path(__file__).resolve().parents[2] / "examples" / "astronaut.png"


def run(*args: str, cwd: Path | None = None):
    runner = CliRunner()
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        return runner.invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


# --------------------------------------------------------------------------- happy paths


def test_record_default_model_and_summary(tmp_path):
    out = tmp_path / "a.h5"
    r = run("record", "--image", str(IMAGE), "--prompt", "Describe this image.", "-o", str(out), "-n", "3")
    assert r.exit_code == 0, r.stderr
    assert out.exists() and not Path(str(out) + ".partial").exists()
    assert "complete" in r.stdout and "3 steps" in r.stdout and "generated:" in r.stdout
    assert "tiny-qwen2.5-vl" in r.stdout and "prefill" in r.stdout
    with vlmscope.open_trace(out) as t:
        assert t.meta["model"] == "tiny-qwen2.5-vl" and t.meta["family"] == "qwen2_5_vl"
        assert t.meta["argv"][:2] == ["vlmscope", "record"]
        assert t.meta["seed"] == 0 and t.meta["generation"]["max_new_tokens"] == 3
    s = run("summary", str(out))
    assert s.exit_code == 0
    assert "3 steps" in s.stdout and "complete" in s.stdout and "generated:" in s.stdout


def test_default_output_name_is_readable_and_unique(tmp_path):
    r1 = run("record", "--model", "tiny-qwen2-vl", "--image", str(IMAGE), "-n", "1", cwd=tmp_path)
    r2 = run("record", "--model", "tiny-qwen2-vl", "--image", str(IMAGE), "-n", "1", cwd=tmp_path)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.stderr + r2.stderr
    files = sorted(p.name for p in (tmp_path / "traces").glob("*.h5"))
    assert len(files) == 2
    assert all(f.startswith("tiny-qwen2-vl-astronaut-") for f in files)


def test_module_factory_and_options(tmp_path):
    out = tmp_path / "f.h5"
    r = run("record", "--model", "vlmscope_models.qwen_vl:build_qwen2_vl", "--image", str(IMAGE), "-o", str(out),
            "-n", "2", "--attn-implementation", "sdpa", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.stderr
    with vlmscope.open_trace(out) as t:
        assert t.meta["model_kind"] == "factory" and t.meta["family"] == "qwen2_vl"
        assert t.meta["dtype"] == "bfloat16" and t.meta["attn_implementation"] == "sdpa"
        ts = t.tensors(0)
        dts = {t.s(d) for d in ts["dtype"]}
        assert "bfloat16" in dts
        # SDPA without padding: no mask reaches the decoder layers (is_causal)
        assert t.steps["mask_ndim"][0] == 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A multimodal and a text-only Qwen checkpoint saved with save_pretrained."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import vlmscope_models
    from vlmscope_models.tokenizer import QWEN2_VL_SPECIAL_TOKENS, qwen_fast_tokenizer

    root = tmp_path_factory.mktemp("ckpt")
    mm = root / "tiny-qwen2-vl-ckpt"
    model, proc = vlmscope_models.load_embedded("tiny-qwen2-vl")
    model.save_pretrained(mm)
    proc.save_pretrained(mm)
    txt = root / "tiny-qwen2-text"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(txt)
    qwen_fast_tokenizer(QWEN2_VL_SPECIAL_TOKENS, name="qwen2-vl").save_pretrained(txt)
    return mm, txt


def test_local_multimodal_checkpoint(checkpoints, tmp_path):
    mm, _ = checkpoints
    out = tmp_path / "ck.h5"
    r = run("record", "--model", str(mm), "--image", str(IMAGE), "-o", str(out), "-n", "2")
    assert r.exit_code == 0, r.stderr
    with vlmscope.open_trace(out) as t:
        assert t.meta["model_kind"] == "checkpoint" and t.meta["family"] == "qwen2_vl"
        assert t.steps["image_tokens"][0] == 256


def test_local_text_only_checkpoint(checkpoints, tmp_path):
    _, txt = checkpoints
    out = tmp_path / "txt.h5"
    r = run("record", "--model", str(txt), "--prompt", "Hello there", "-o", str(out), "-n", "3")
    assert r.exit_code == 0, r.stderr
    with vlmscope.open_trace(out) as t:
        assert t.meta["family"] == "qwen2" and "image" not in t.meta
        st = t.steps
        assert st["pos_rows"][0] == 1  # plain 1-D RoPE
        np.testing.assert_array_equal(st["cache_after"] - st["cache_before"], st["q_len"])
        np.testing.assert_array_equal(st["pos_min"][1:, 0], st["cache_before"][1:])
    # --image for a text-only model is refused
    r = run("record", "--model", str(txt), "--image", str(IMAGE), "-o", str(tmp_path / "x.h5"))
    one_line_error(r, "text-only")
    assert not (tmp_path / "x.h5").exists()


# --------------------------------------------------------------------------- bad input


def test_missing_image(tmp_path):
    r = run("record", "--image", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o.h5"))
    one_line_error(r, "image not found", "nope.png")


def test_empty_image(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    one_line_error(run("record", "--image", str(p), "-o", str(tmp_path / "o.h5")), "empty")


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n")
    one_line_error(run("record", "--image", str(p), "-o", str(tmp_path / "o.h5")), "not an image")


def test_truncated_image(tmp_path):
    data = IMAGE.read_bytes()
    p = tmp_path / "half.png"
    p.write_bytes(data[: len(data) // 2])
    one_line_error(run("record", "--image", str(p), "-o", str(tmp_path / "o.h5")), "truncated or corrupt")


def test_huge_image_is_resized_by_the_processor(tmp_path):
    from PIL import Image

    p = tmp_path / "huge.png"
    Image.new("RGB", (4000, 3000), (120, 30, 200)).save(p)
    out = tmp_path / "huge.h5"
    r = run("record", "--image", str(p), "-o", str(out), "-n", "1")
    assert r.exit_code == 0, r.stderr
    assert "[4000, 3000] -> [" in " ".join(r.stdout.split())
    with vlmscope.open_trace(out) as t:
        w, h = t.meta["image"]["resized"]
        assert w * h <= 448 * 448 and w > h
        assert t.steps["image_tokens"][0] == (w // 28) * (h // 28)


def test_model_path_does_not_exist(tmp_path):
    r = run("record", "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "o.h5"))
    one_line_error(r, "does not exist")


def test_model_dir_without_config(tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir()
    one_line_error(run("record", "--model", str(d), "-o", str(tmp_path / "o.h5")), "no config.json")


def test_unsupported_model_dir(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "definitely-not-a-model"}')
    one_line_error(run("record", "--model", str(d), "-o", str(tmp_path / "o.h5")), "not a supported model")


def test_unknown_model_name(tmp_path):
    one_line_error(run("record", "--model", "tiny-nothing", "-o", str(tmp_path / "o.h5")),
                   "unknown model", "tiny-qwen2.5-vl")


def test_factory_import_failure(tmp_path):
    r = run("record", "--model", "no_such_pkg.models:build", "-o", str(tmp_path / "o.h5"))
    one_line_error(r, "cannot import", "no_such_pkg.models")
    mod = tmp_path / "brokenmodel.py"
    mod.write_text("raise RuntimeError('boom at import')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        one_line_error(run("record", "--model", "brokenmodel:build", "-o", str(tmp_path / "o.h5")), "boom at import")
        one_line_error(run("record", "--model", "json:no_factory", "-o", str(tmp_path / "o.h5")), "no callable")
    finally:
        sys.path.remove(str(tmp_path))


def test_output_directory_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("record", "--image", str(IMAGE), "-o", str(blocker / "sub" / "o.h5"))
    one_line_error(r, "cannot create output directory")


def test_debug_shows_the_traceback(tmp_path):
    r = CliRunner().invoke(main, ["record", "--debug", "--image", str(tmp_path / "nope.png")])
    assert r.exit_code != 0
    assert r.exception is not None and "image not found" in str(r.exception)


def test_cli_subprocess_bad_image_is_one_line(tmp_path):
    """The real console script path: exit code 2, one line on stderr, no traceback."""
    r = subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", "record", "--image", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"vlmscope: error: image not found: {tmp_path / 'x.png'}"]


def test_failed_forward_exits_1_and_prints_the_failure(tmp_path):
    """A factory whose model raises inside a submodule: record prints the failure and exits 1."""
    mod = tmp_path / "faultymodel.py"
    mod.write_text(
        "import vlmscope_models, torch\n"
        "def build(**opts):\n"
        "    model, proc = vlmscope_models.load_embedded('tiny-qwen2-vl', **opts)\n"
        "    attn = model.model.language_model.layers[1].self_attn\n"
        "    orig = attn.forward\n"
        "    def forward(hidden_states, *a, **k):\n"
        "        return orig(hidden_states.reshape(hidden_states.shape[0], -1, 32), *a, **k)\n"
        "    attn.forward = forward\n"
        "    return model, proc\n")
    sys.path.insert(0, str(tmp_path))
    try:
        out = tmp_path / "faulty.h5"
        r = run("record", "--model", "faultymodel:build", "--image", str(IMAGE), "-o", str(out))
    finally:
        sys.path.remove(str(tmp_path))
    assert r.exit_code == 1
    text = " ".join(r.stdout.split())
    assert "failed" in text and "forward raised RuntimeError" in text
    assert "model.language_model.layers.1.self_attn" in text
    assert "last op" in text
    with vlmscope.open_trace(out) as t:
        assert t.status == "failed"
        assert t.error["module_stack"][-1].startswith("model.language_model.layers.1.self_attn")
        assert t.error["last_reshape"]["in_shapes"]


# --------------------------------------------------------------------------- unreadable traces


def test_summary_of_bad_trace_files(tmp_path, qwen2_trace_path):
    cases = {}
    cases["trace not found"] = tmp_path / "missing.h5"
    notf = tmp_path / "text.h5"
    notf.write_text("hello")
    cases["not an HDF5 file"] = notf
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    cases["without the vlmscope header"] = foreign
    data = qwen2_trace_path.read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 3])
    cases["truncated or corrupt"] = trunc
    newer = tmp_path / "newer.h5"
    newer.write_bytes(data)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    cases["newer than this vlmscope reads"] = newer
    for needle, path in cases.items():
        r = run("summary", str(path))
        assert r.exit_code == 3, (needle, r.output)
        assert "Traceback" not in r.output + r.stderr
        assert needle in " ".join(r.stderr.split())
        assert len(r.stderr.strip().splitlines()) == 1


def test_summary_says_when_check_could_not_run(tmp_path):
    """A trace whose header and step table read fine but whose probe table is damaged: summary
    prints what it can and says that check could not run, instead of reporting no violations,
    and exits 3."""
    import shutil

    src = Path(__file__).resolve().parents[2] / "traces" / "examples" / "tiny-mqwen-astronaut.h5"
    bad = tmp_path / "bad.h5"
    shutil.copy(src, bad)
    with h5py.File(bad, "r") as f:
        info = f["probes"].id.get_chunk_info(0)
    with open(bad, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    r = run("summary", str(bad))
    assert "Traceback" not in r.output + r.stderr
    assert "check could not run: trace is truncated or corrupt" in " ".join(r.output.split())
    assert "invariant violation" not in r.output
    assert r.exit_code == 3, r.output           # no verdict: never the clean exit code
    assert "check could not run" in r.stderr
