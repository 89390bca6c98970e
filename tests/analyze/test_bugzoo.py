"""A bug zoo: faulty variants of the embedded models, each a few lines of patching.

For each one, ``check`` must flag the right rule at the right step and module, and ``diff``
against the clean model must name the faulty module as the first divergence. Clean runs must
check clean (tiny-mqwen: exactly its known ``past_length`` quirk), and their shapes must match
the golden snapshots in ``traces/golden/`` (``pytest --vlmscope-update`` rewrites them).

The clean traces are the session fixtures of ``conftest.py`` (astronaut.png, 4 new tokens);
the faulty ones are recorded here with the same inputs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from vlmscope.analyze import check, diff, expect
from vlmscope.pytest_plugin import GoldenSnapshot, _Recorder
from vlmscope.trace import open_trace

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples" / "astronaut.png"
PROMPT = "Describe this image."
GOLDEN = ROOT / "traces" / "golden"
LM = "model.language_model"


def _record(model, proc, out: Path, max_new_tokens: int = 4) -> Path:
    """Record; a forward that raises still leaves a (failed) trace to analyse."""
    from vlmscope.recorder import record

    try:
        return Path(record(model, proc, image=str(IMAGE), prompt=PROMPT, out=out, max_new_tokens=max_new_tokens))
    except Exception:  # noqa: BLE001 - the faulty model's own error
        assert out.is_file(), "a failed recording must still write its trace"
        return out


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    import vlmscope_models

    return vlmscope_models.load_embedded("tiny-qwen2-vl")


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@contextlib.contextmanager
def hooked(*handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def first_violation(path):
    rep = check(path)
    assert rep.violations, "check found nothing"
    return rep, rep.violations[0]


# ------------------------------------------------------------------------------ clean runs


def test_clean_qwen2_vl(qwen2_trace_path):
    rep = check(qwen2_trace_path)
    assert rep.violations == [], [v.line() for v in rep.violations]


def test_clean_qwen2_5_vl(qwen25_trace_path):
    rep = check(qwen25_trace_path)
    assert rep.violations == [], [v.line() for v in rep.violations]


def test_clean_mqwen_reports_exactly_its_quirk(mqwen_trace_path):
    rep = check(mqwen_trace_path)
    got = [(v.rule, v.step, v.module) for v in rep.violations]
    assert got == [("positions.kv-index", s, "transformer.h.0") for s in (1, 2, 3)]
    assert "head count" in rep.violations[0].hint


@pytest.mark.parametrize("name,fixture", [("tiny-qwen2-vl", "qwen2_trace_path"),
                                          ("tiny-qwen2.5-vl", "qwen25_trace_path"),
                                          ("tiny-mqwen", "mqwen_trace_path")])
def test_golden_shapes_of_embedded_models(name, fixture, request):
    path = request.getfixturevalue(fixture)
    update = bool(request.config.getoption("vlmscope_update", default=False))
    GoldenSnapshot(Path(__file__), name, update).use(GOLDEN / f"{name}.json").check(path)


def test_expect_on_real_traces(qwen2_trace_path, mqwen_trace_path):
    with open_trace(qwen2_trace_path) as t:
        res = expect(t, f"{LM}.layers.*.self_attn.q_proj", output="B S 64", inputs="B S 64")
        assert res.bindings[0] == {"B": 1, "S": int(t.steps["q_len"][0])} and res.bindings[1]["S"] == 1
        expect(t, f"{LM}.layers.*.self_attn.k_proj", output="B S 32")
        expect(t, "model.visual.merger", output="N 64")
    with open_trace(mqwen_trace_path) as t:
        expect(t, "transformer.h.*.attn.c_attn", output="B S 192")
        expect(t, "transformer.projector", output="B 256 64")


# ------------------------------------------------------------------------------ the zoo (Qwen2-VL)


def test_image_features_differ_from_placeholders(qwen2, qwen2_trace_path, zoo_dir):
    model, proc = qwen2
    with hooked(model.model.visual.merger.register_forward_hook(lambda m, a, out: out[:-1])):
        bad = _record(model, proc, zoo_dir / "image_count.h5")
    rep, v = first_violation(bad)
    assert (v.rule, v.step, v.module) == ("image.tokens", 0, "model.visual.merger")
    assert "256" in v.expected and "255" in v.actual
    f = diff(qwen2_trace_path, bad).first
    assert (f.step, f.module) == (0, "model.visual.merger") and "256 -> 255" in f.detail


def test_decode_positions_shifted_by_image_length(qwen2, qwen2_trace_path, zoo_dir):
    model, proc = qwen2
    n_img = 256

    def shift(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is not None and pos.shape[-1] == 1:   # decode steps only
            pos = pos.clone()
            pos[1:] += n_img
            kwargs["position_ids"] = pos
        return args, kwargs

    with hooked(model.model.language_model.register_forward_pre_hook(shift, with_kwargs=True)):
        bad = _record(model, proc, zoo_dir / "pos_shift.h5")
    rep, v = first_violation(bad)
    # positions.oracle (was positions.continuity): it also names the row, token and axis
    assert (v.rule, v.step, v.module, v.row) == ("positions.oracle", 1, LM, 0)
    assert "+256" in v.actual and "image length" in v.hint
    assert [x.rule for x in rep.violations] == ["positions.oracle"]
    f = diff(qwen2_trace_path, bad).first
    assert (f.step, f.module, f.node, f.what) == (1, LM, "input", "position_ids")


def test_cache_appended_twice_in_one_layer(qwen2, qwen2_trace_path, zoo_dir):
    model, proc = qwen2

    def twice(module, args, kwargs, out):
        layer = kwargs["cache"].layers[0]
        q = (args[0] if args else kwargs["hidden_states"]).shape[1]
        layer.keys = torch.cat([layer.keys, layer.keys[:, :, -q:]], dim=-2)
        layer.values = torch.cat([layer.values, layer.values[:, :, -q:]], dim=-2)
        return out

    attn0 = model.model.language_model.layers[0].self_attn
    with hooked(attn0.register_forward_hook(twice, with_kwargs=True)):
        bad = _record(model, proc, zoo_dir / "cache_twice.h5")
    rep, v = first_violation(bad)
    assert (v.rule, v.step, v.module) == ("cache.growth", 0, f"{LM}.layers.0")
    assert "twice" in v.hint
    f = diff(qwen2_trace_path, bad).first
    assert (f.step, f.module, f.node, f.status) == (0, f"{LM}.layers.0.self_attn", "reshape", "missing_in_a")


def test_nan_injected_in_one_layer(qwen2, qwen2_trace_path, zoo_dir):
    model, proc = qwen2

    def nan(module, args, out):
        out = out.clone()
        out[..., 0] = float("nan")
        return out

    down = model.model.language_model.layers[1].mlp.down_proj
    with hooked(down.register_forward_hook(nan)):
        bad = _record(model, proc, zoo_dir / "nan.h5")
    rep, v = first_violation(bad)
    assert (v.rule, v.step, v.module) == ("numbers.nonfinite", 0, f"{LM}.layers.1.mlp.down_proj")
    f = diff(qwen2_trace_path, bad).first
    assert (f.step, f.module, f.node) == (0, f"{LM}.layers.1.mlp.down_proj", "output")


def test_mask_left_in_fp32_under_bf16(zoo_dir):
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-qwen2-vl", dtype="bfloat16")
    clean = _record(model, proc, zoo_dir / "bf16_clean.h5", max_new_tokens=2)
    assert check(clean).violations == []

    def fp32(module, args, kwargs):
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"].float()
        return args, kwargs

    layers = model.model.language_model.layers
    with hooked(*[layer.register_forward_pre_hook(fp32, with_kwargs=True) for layer in layers]):
        bad = _record(model, proc, zoo_dir / "bf16_mask.h5", max_new_tokens=2)
    rep, v = first_violation(bad)
    assert (v.rule, v.step, v.module) == ("dtype.mask", 0, f"{LM}.layers.0")
    assert "bfloat16" in v.expected and "float32" in v.actual
    f = diff(clean, bad).first
    assert (f.step, f.module, f.what, f.status) == (0, f"{LM}.layers.0", "attention_mask", "shape")
    assert "bfloat16 -> float32" in f.detail


# ------------------------------------------------------------------------------ Qwen2.5-VL 1-D fallback


def test_qwen25_without_mm_token_type_ids_falls_back_to_1d(qwen25_trace_path, zoo_dir):
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-qwen2.5-vl")
    generate = model.generate
    model.generate = lambda **kw: generate(**{k: v for k, v in kw.items() if k != "mm_token_type_ids"})
    bad = _record(model, proc, zoo_dir / "fallback.h5")
    rep, v = first_violation(bad)
    # positions.oracle subsumes positions.fallback-1d where it can judge (the hint is the same)
    assert [(x.rule, x.step, x.module) for x in rep.violations] == [("positions.oracle", 0, LM)]
    assert "Qwen2.5-VL" in v.hint and "mm_token_type_ids" in v.hint and "1-D" in v.hint
    f = diff(qwen25_trace_path, bad).first
    # the positions come wrong from generate(): the first module to see them is the model itself
    assert (f.step, f.module, f.what) == (0, "", "position_ids")


# ------------------------------------------------------------------------------ tiny-mqwen


def test_mqwen_mask_in_token_space(mqwen_trace_path, zoo_dir):
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-mqwen")
    tr = model.transformer
    forward = tr.forward

    def token_space_mask(input_ids, *a, attention_mask=None, **kw):
        if attention_mask is None:                    # the tokenizer's mask: one entry per token
            attention_mask = torch.ones_like(input_ids)
        return forward(input_ids, *a, attention_mask=attention_mask, **kw)

    tr.forward = token_space_mask
    try:
        bad = _record(model, proc, zoo_dir / "mq_mask.h5")
    finally:
        del tr.forward
    rep, v = first_violation(bad)
    assert (v.rule, v.step, v.module) == ("mask.length", 0, "transformer.h.0")
    assert "token sequence, not the embedding sequence" in v.hint
    assert "trace.status" in {x.rule for x in rep.violations}      # eager attention then raises
    f = diff(mqwen_trace_path, bad).first
    assert (f.step, f.module, f.what, f.origin) == (0, "transformer.h.0", "attention_mask", "transformer")


def test_mqwen_past_length_quirk_against_a_fixed_model(mqwen_trace_path, zoo_dir):
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-mqwen")

    def kv_positions(module, args, kwargs):            # the fix: positions = KV index
        past = kwargs.get("layer_past")
        if past is not None and kwargs.get("position_ids") is not None:
            q = (args[0] if args else kwargs["hidden_states"]).shape[1]
            n = past[0].shape[1]
            kwargs["position_ids"] = torch.arange(n, n + q)[None]
        return args, kwargs

    with hooked(*[b.register_forward_pre_hook(kv_positions, with_kwargs=True) for b in model.transformer.h]):
        fixed = _record(model, proc, zoo_dir / "mq_fixed.h5")
    assert check(fixed).violations == []
    rep = check(mqwen_trace_path)
    assert rep.violations[0].rule == "positions.kv-index" and rep.violations[0].step == 1
    f = diff(fixed, mqwen_trace_path).first
    assert (f.step, f.module, f.what, f.origin) == (1, "transformer.h.0", "position_ids", "transformer")
    assert f.tokens and f.tokens[0] == int(open_trace(fixed).steps["cache_before"][1])


# ------------------------------------------------------------------------------ the plugin's recorder


def test_record_fixture_object(qwen2, tmp_path):
    model, proc = qwen2
    rec = _Recorder(tmp_path, "test_record_fixture_object")
    try:
        t = rec(model, proc, image=str(IMAGE), max_new_tokens=1)
        assert t.n_steps == 1 and rec.path.is_file()
        assert check(t).violations == []
        # a batch through the same fixture: rows= as vlmscope.record takes them
        tb = rec(model, proc, rows=[{"prompt": PROMPT, "images": [str(IMAGE)]}, {"prompt": "Hi."}], max_new_tokens=1)
        assert tb.n_steps == 1 and tb.probes(step=0, kind="input_ids")[0]["shape"][0] == 2
        assert check(tb).violations == []
    finally:
        rec.close()
