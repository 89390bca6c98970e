"""Batch invariance (``vlmscope.analyze.invariance`` and ``record_invariance``): a real
tiny-qwen2-vl (eager attention, float32), a batch of 3 (two image rows, one text-only),
recorded batched and row by row, compared row by row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import vlmscope
from vlmscope.analyze.invariance import DEFAULT_RTOL, DIFFERS, INVARIANT, Tolerance, compare_rows
from vlmscope.cli.invariance import compare_folder, record_invariance

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"prompt": "Describe this image.", "images": [str(ROOT / "examples" / "astronaut.png")]},
    {"prompt": "What is it?", "images": [str(ROOT / "examples" / "chelsea.png")]},
    {"prompt": "Hello there, how are you today my friend?"},
]
SMALL = 112 * 112   # at most 64 patches (16 image tokens) per image


@pytest.fixture(scope="module")
def model():
    import vlmscope_models

    return vlmscope_models.load_embedded("tiny-qwen2-vl", max_pixels=SMALL, attn_implementation="eager")


@pytest.fixture(scope="module")
def clean(model, tmp_path_factory):
    m, proc = model
    out = tmp_path_factory.mktemp("inv") / "clean"
    manifest = record_invariance(m, proc, ROWS, out, max_new_tokens=2)
    return out, manifest


def _fault(module, fn):
    """A forward hook that replaces ``module``'s output by ``fn(output)`` (the fault)."""
    return module.register_forward_hook(lambda mod, args, out: fn(out))


@pytest.fixture(scope="module")
def vision_fault(model, tmp_path_factory):
    """The vision tower's first MLP adds the mean over every patch of the call: each image then
    depends on the other images of the batch."""
    m, proc = model
    h = _fault(m.model.visual.blocks[0].mlp, lambda out: out + out.mean(0, keepdim=True))
    try:
        out = tmp_path_factory.mktemp("inv") / "vision"
        record_invariance(m, proc, ROWS, out, max_new_tokens=1, sides=("left",))
    finally:
        h.remove()
    return out


def test_clean_batch_records_n_plus_2_normal_traces(clean):
    out, manifest = clean
    names = ["batch-left.h5", "batch-right.h5", "row-0.h5", "row-1.h5", "row-2.h5"]
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(names)
    assert json.loads((out / "invariance.json").read_text())["n_rows"] == 3
    for name in names:
        with vlmscope.open_trace(out / name) as t:
            assert t.status == "complete" and t.n_steps == 2
            assert t.meta["invariance"]["role"] == ("batch" if name.startswith("batch") else "alone")
            assert t.n_payloads > 50          # every module's output is saved
            assert t.meta["generation"]["max_new_tokens"] == 2
    with vlmscope.open_trace(out / "batch-left.h5") as t:
        ids = t.probe_value(t.probes(0, kind="input_ids")[0])
        assert ids.shape[0] == 3
    assert manifest["generated"]["batch-left.h5"][0] == manifest["generated"]["row-0.h5"][0]


def test_clean_left_padded_float32_batch_is_invariant(clean):
    """Measured: float32 left-padded batching is not bit-exact on CPU (a different matmul shape)
    but stays within 1e-5 of the scale; every row, both images and the text row, is invariant,
    every step compared, vision and language outputs alike."""
    out, _ = clean
    rep = compare_folder(out)
    for r in rep.sides["left"]:
        assert r.verdict == INVARIANT, r
        assert r.first is None and r.steps_compared == 2
        assert r.not_compared == [] and r.unmatched == []
        assert r.max_rel < DEFAULT_RTOL["float32"]
    left = {r.row: r for r in rep.sides["left"]}
    # the image rows compare the vision tower too: more outputs than the text row
    assert left[0].n_compared > left[2].n_compared > 0
    assert left[0].n_compared == left[1].n_compared


def test_right_padding_differs_where_generate_reads_a_padding_position(clean):
    """Right padding leaves the prompt's real tokens where they are (the prefill's real tokens
    match the row alone), but generate takes a shorter row's next token from the last position,
    a padding one: the logits of rows 1 and 2 differ at lm_head, step 0; row 0 (the longest)
    has no padding and is invariant."""
    out, _ = clean
    rep = compare_folder(out)
    right = {r.row: r for r in rep.sides["right"]}
    assert right[0].verdict == INVARIANT
    for row in (1, 2):
        r = right[row]
        assert r.verdict == DIFFERS
        assert (r.first.step, r.first.module, r.first.name) == (0, "lm_head", "out")
        assert "padding in the batch" in r.first.where and r.first.max_abs > r.first.tol
        assert r.divergent_modules == ["lm_head", "(root)"]     # lm_head, then the model's logits
        assert r.steps_compared == 1                             # comparison stops at that step
        assert r.max_rel == 0.0                                  # everything before it is bit-exact


def test_vision_fault_names_the_vision_mlp_for_the_image_rows(vision_fault):
    rep = compare_folder(vision_fault)
    left = {r.row: r for r in rep.sides["left"]}
    for row in (0, 1):
        f = left[row].first
        assert left[row].verdict == DIFFERS
        assert (f.step, f.module) == (0, "model.visual.blocks.0.mlp")
        assert f.where.startswith("image 0 patch ")     # the row's own (first) image
        # everything downstream in the tower and the language model differs too, and is counted
        assert left[row].n_divergent > 10
        assert left[row].divergent_modules.index("model.visual.merger") > 0
    assert left[2].verdict == INVARIANT                 # the text row sees no image


def test_tolerance_overrides(vision_fault):
    """--atol/--rtol replace the dtype defaults: a tolerance as large as the fault hides it."""
    wide = compare_folder(vision_fault, atol=1e9)
    assert all(r.verdict == INVARIANT for r in wide.sides["left"])
    assert wide.tolerance["atol"] == 1e9
    tight = compare_folder(vision_fault, rtol=1e-3, atol=1e-9)
    assert [r.verdict for r in tight.sides["left"]] == [DIFFERS, DIFFERS, INVARIANT]
    f = tight.sides["left"][0].first
    assert f.tol == pytest.approx(1e-9 + 1e-3 * f.scale) and f.max_abs > f.tol
    assert Tolerance().of("bfloat16") == (DEFAULT_RTOL["bfloat16"], 0.0)
    assert Tolerance().of("int64") == (0.0, 0.0)
    assert Tolerance(rtol=1e-3, atol=1e-6).of("float32") == (1e-3, 1e-6)


def test_rows_matched_to_the_wrong_alone_run_are_not_compared(clean):
    out, _ = clean
    with vlmscope.open_trace(out / "batch-left.h5") as b, vlmscope.open_trace(out / "row-1.h5") as a1:
        [r] = compare_rows(b, [a1], rows=[0], side="left")
    assert r.verdict == "not compared" and "different inputs" in r.note


def test_payload_cap_names_the_modules_not_compared(model, tmp_path):
    m, proc = model
    record_invariance(m, proc, ROWS[:2], tmp_path, max_new_tokens=1, sides=("left",), max_tensor_bytes=2_000_000)
    manifest = json.loads((tmp_path / "invariance.json").read_text())
    assert manifest["warnings"]["batch-left.h5"]
    rep = compare_folder(tmp_path)
    for r in rep.sides["left"]:
        assert r.verdict == INVARIANT and r.n_compared > 0
        assert "lm_head" in r.not_compared          # the last (largest) outputs were not saved
        assert not any(p.startswith("model.visual") for p in r.not_compared)   # the first ones were


def test_report_is_json(clean):
    out, _ = clean
    rep = compare_folder(out)
    d = rep.to_dict()
    json.dumps(d)     # serialisable as is
    f = d["sides"]["right"][1]["first"]
    assert isinstance(f["max_abs"], float) and isinstance(f["step"], int)
    assert np.isfinite(f["scale"])
