"""``positions.oracle``: the positions that reach the rotary module against the independent
M-RoPE oracle (vlmscope.analyze.mrope), on real recordings of the embedded Qwen-VL models.

Clean B=3 batches (image rows and a text-only row, both padding sides) check clean; each fault
mechanism, reproduced by patching the REAL model in a few lines the way the public bug did, is
named at its step, row and module with the mechanism in the hint. (H4's zoo covers the issue's
acceptance list end to end; these tests pin the rule.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlmscope
from vlmscope.analyze import check
from vlmscope.analyze._index import index_of
from vlmscope.analyze.rules.oracle import oracle_result
from vlmscope.trace import open_trace

ROOT = Path(__file__).resolve().parents[2]
LM = "model.language_model"
ORACLE = "positions.oracle"


def _image(name: str, size: int = 112) -> Image.Image:
    path = ROOT / "examples" / name if (ROOT / "examples" / name).exists() else ROOT.parent / "shared" / "images" / name
    return Image.open(path).convert("RGB").resize((size, size))


ASTRONAUT, CHELSEA = _image("astronaut.png"), _image("chelsea.png", 84)


def _prompt(proc, text: str, n_images: int = 0, video: bool = False) -> str:
    content = [{"type": "image"}] * n_images + ([{"type": "video"}] if video else []) + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def _batch(proc, rows, side: str = "left", videos=None, **extra):
    """Processor inputs for rows ``(text, [images], video?)``, padded on ``side``."""
    proc.tokenizer.padding_side = side
    texts = [_prompt(proc, t, len(ims), v) for t, ims, v in rows]
    images = [im for _, ims, _ in rows for im in ims] or None
    return dict(proc(text=texts, images=images, videos=videos, padding=True, return_tensors="pt", **extra))


MIXED = [("Describe this.", [ASTRONAUT], False),
         ("Hi there, how are you doing today? Tell me a story.", [], False),
         ("Compare the two.", [CHELSEA, ASTRONAUT], False)]


def _record(model, out: Path, *calls) -> Path:
    """Record one generate call per inputs dict (3 new tokens each), greedy."""
    with vlmscope.Recorder(model, out=out) as rec:
        for inp in calls:
            rec.begin_call(batch_size=int(inp["input_ids"].shape[0]))
            model.generate(**inp, max_new_tokens=3, do_sample=False)
    return out


def _positions(rep):
    return [v for v in rep.violations if v.rule.startswith("positions.")]


@pytest.fixture(scope="module")
def qwen2():
    import vlmscope_models

    return vlmscope_models.load_embedded("tiny-qwen2-vl")


@pytest.fixture(scope="module")
def qwen25():
    import vlmscope_models

    return vlmscope_models.load_embedded("tiny-qwen2.5-vl")


@pytest.fixture
def restore():
    """Undo attribute patches on a model after the test: ``restore(obj, name, new)``."""
    saved = []

    def patch(obj, name, new):
        saved.append((obj, name, obj.__dict__.get(name, None), name in obj.__dict__))
        setattr(obj, name, new)

    yield patch
    for obj, name, old, had in reversed(saved):
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


# ------------------------------------------------------------------------------ clean batches


@pytest.mark.parametrize("which", ["qwen2", "qwen25"])
def test_clean_left_padded_batch_checks_clean(which, request, tmp_path):
    model, proc = request.getfixturevalue(which)
    path = _record(model, tmp_path / "left.h5", _batch(proc, MIXED, "left"))
    rep = check(path)
    assert _positions(rep) == [], [v.line() for v in _positions(rep)]
    with open_trace(path) as t:
        res = oracle_result(index_of(t))
        assert res.checked == set(range(t.n_steps))        # the oracle judged every step
        assert res.deltas[0].shape == (3,) and len(set(res.deltas[0].tolist())) > 1   # per-row deltas


@pytest.mark.parametrize("which", ["qwen2", "qwen25"])
def test_clean_right_padded_batch_has_no_position_errors(which, request, tmp_path):
    model, proc = request.getfixturevalue(which)
    path = _record(model, tmp_path / "right.h5", _batch(proc, MIXED, "right"))
    rep = check(path)
    pos = _positions(rep)
    assert [v for v in pos if v.severity == "error"] == [], [v.line() for v in pos]
    # the prefill is exact; generate() then continues a right-padded row from its last column, a
    # padding token (transformers warns about right padding): a warning, on the first padded row
    assert [(v.rule, v.severity, v.step, v.row) for v in pos] == [(ORACLE, "warning", 1, 0)]
    assert "right padding" in pos[0].hint and "padding_side='left'" in pos[0].hint
    assert rep.ok


def test_clean_video_batch_checks_clean(qwen25, tmp_path):
    model, proc = qwen25
    frames = np.stack([np.roll(np.asarray(ASTRONAUT), 8 * i, axis=1) for i in range(8)])
    inp = _batch(proc, [("What happens?", [], True), ("Describe this.", [ASTRONAUT], False)], "left", videos=[frames])
    inp["second_per_grid_ts"] = torch.tensor([0.5])          # the processor's value at fps 4 (2 frames / 4 fps)
    path = _record(model, tmp_path / "video.h5", inp)
    rep = check(path)
    assert _positions(rep) == [], [v.line() for v in _positions(rep)]
    with open_trace(path) as t:
        assert oracle_result(index_of(t)).checked == set(range(t.n_steps))


# ------------------------------------------------------------------------------ mechanisms


def test_stale_rope_deltas_across_calls(qwen2, restore, tmp_path):
    """The second generate call reuses the first call's rope_deltas (transformers #36009 /
    PR #43952: position ids computed by get_rope_index only while model.rope_deltas is None)."""
    model, proc = qwen2
    from transformers.generation.utils import GenerationMixin

    orig = model._prepare_position_ids_for_generation

    def stale(inputs_tensor, model_kwargs):
        if model.model.rope_deltas is None:
            return orig(inputs_tensor, model_kwargs)
        text = GenerationMixin._prepare_position_ids_for_generation(model, inputs_tensor, model_kwargs)[None]
        return torch.cat([text, (text + model.model.rope_deltas).expand(3, -1, -1)])

    restore(model, "_prepare_position_ids_for_generation", stale)
    model.model.rope_deltas = None
    first = _batch(proc, [("Describe this.", [ASTRONAUT], False), ("Hello, who are you?", [], False)])
    second = _batch(proc, [("What is in this picture?", [CHELSEA], False), ("And this one?", [ASTRONAUT], False)])
    path = _record(model, tmp_path / "stale.h5", first, second)
    with open_trace(path) as t:
        assert t.steps["kind"].tolist() == [0, 1, 1, 0, 1, 1]
    rep = check(path)
    pos = _positions(rep)
    assert [(v.rule, v.step, v.module) for v in pos] == [(ORACLE, 3, LM)], [v.line() for v in pos]
    v = pos[0]
    assert "stale rope_deltas" in v.hint and "call 0" in v.hint
    assert v.row == 0 and "3 of 3 steps of call 1" in v.actual


def test_right_padded_mm_token_type_ids(qwen2, tmp_path):
    """Prompts left-padded, mm_token_type_ids right-padded (TRL #5785): the shorter row's image
    markers shift by its padding."""
    model, proc = qwen2
    inp = _batch(proc, [("Describe this picture.", [ASTRONAUT], False),
                        ("Describe this picture in some detail.", [ASTRONAUT], False)], "left")
    mm, pad = inp["mm_token_type_ids"].clone(), (inp["attention_mask"] == 0).sum(1)
    assert pad.tolist()[0] > 0 and pad.tolist()[1] == 0
    for b, n in enumerate(pad.tolist()):
        if n:
            mm[b] = torch.cat([inp["mm_token_type_ids"][b, n:], mm.new_zeros(n)])
    inp["mm_token_type_ids"] = mm
    rep = check(_record(model, tmp_path / "mmtt.h5", inp))
    pos = _positions(rep)
    assert [(v.rule, v.step, v.row) for v in pos] == [(ORACLE, 0, 0)], [v.line() for v in pos]
    assert "mm_token_type_ids" in pos[0].hint and "padded on the other side" in pos[0].hint
    assert pos[0].module == LM


def test_shared_rope_delta(qwen2, tmp_path):
    """One rope delta for the whole batch after the prefill (mlx-vlm #1143): decode positions
    are the text positions plus row 0's delta for every row."""
    model, proc = qwen2

    def shared(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:      # decode steps
            mask, q = kwargs["attention_mask"], kwargs["input_ids"].shape[1]
            text = (mask.long().cumsum(-1) - 1)[:, -q:]           # each row's text position
            delta = module.rope_deltas[:1].repeat_interleave(mask.shape[0], dim=0)   # row 0's, for all
            kwargs["position_ids"] = (text + delta)[None].expand(3, -1, -1)
        return args, kwargs

    h = model.model.register_forward_pre_hook(shared, with_kwargs=True)
    try:
        rep = check(_record(model, tmp_path / "shared.h5", _batch(proc, MIXED, "left")))
    finally:
        h.remove()
    pos = _positions(rep)
    assert [(v.rule, v.step) for v in pos] == [(ORACLE, 1)], [v.line() for v in pos]
    v = pos[0]
    assert "shared rope delta" in v.hint and "row 0" in v.hint
    assert v.row == 1 and v.module == LM and "new token" in v.expected


def test_padding_counted_at_prefill(qwen2, restore, tmp_path):
    """get_rope_index called without the attention mask: a left-padded row's padding is counted."""
    model, proc = qwen2
    orig = model.model.get_rope_index
    restore(model.model, "get_rope_index", lambda *a, **kw: orig(*a, **{**kw, "attention_mask": None}))
    rep = check(_record(model, tmp_path / "padcount.h5", _batch(proc, MIXED, "left")))
    pos = _positions(rep)
    assert [(v.rule, v.step) for v in pos] == [(ORACLE, 0)], [v.line() for v in pos]
    v = pos[0]
    assert "padding counted" in v.hint and v.row == 0
    assert f"{v.row}'s positions count its" in v.hint


def test_padding_counted_at_decode(qwen2, tmp_path):
    """Decode positions from the cache index plus the delta (no mask): a padded row is off by its
    padding."""
    model, proc = qwen2

    def cache_index(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            q = kwargs["inputs_embeds"].shape[1] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"].shape[1]
            pos = torch.arange(cache.get_seq_length(), cache.get_seq_length() + q).view(1, 1, -1)
            kwargs["position_ids"] = pos.expand(3, module.rope_deltas.shape[0], -1) + module.rope_deltas
        return args, kwargs

    h = model.model.register_forward_pre_hook(cache_index, with_kwargs=True)
    try:
        rep = check(_record(model, tmp_path / "padcount_dec.h5", _batch(proc, MIXED, "left")))
    finally:
        h.remove()
    pos = _positions(rep)
    assert [(v.rule, v.step) for v in pos] == [(ORACLE, 1)], [v.line() for v in pos]
    assert "padding counted" in pos[0].hint and pos[0].row == 0


@pytest.mark.parametrize("how,words", [("int", "truncated to an integer"), ("drop", "not passed")])
def test_second_per_grid_ts(qwen25, restore, tmp_path, how, words):
    """Qwen2.5-VL video timing: second_per_grid_ts cast to int (lmms-eval #1393) or not passed
    to get_rope_index (transformers #41152): only the t axis of the video tokens is off."""
    model, proc = qwen25
    orig = model.model.get_rope_index

    def faulty(*a, **kw):
        spg = kw.get("second_per_grid_ts")
        kw["second_per_grid_ts"] = spg.int() if how == "int" and spg is not None else None
        return orig(*a, **kw)

    restore(model.model, "get_rope_index", faulty)
    frames = np.stack([np.roll(np.asarray(ASTRONAUT), 8 * i, axis=1) for i in range(8)])
    inp = _batch(proc, [("What happens?", [], True)], "left", videos=[frames])
    inp["second_per_grid_ts"] = torch.tensor([0.5])
    rep = check(_record(model, tmp_path / f"spgt_{how}.h5", inp))
    pos = _positions(rep)
    assert [(v.rule, v.step, v.row) for v in pos] == [(ORACLE, 0, 0)], [v.line() for v in pos]
    v = pos[0]
    assert "second_per_grid_ts" in v.hint and words in v.hint
    assert v.expected.startswith("t = ") and "video token" in v.expected


def test_positions_restarting_inside_a_row_read_as_packed(qwen2, restore, tmp_path):
    """Position ids that restart at 0 inside a row: the row is read as packed sequences."""
    model, proc = qwen2
    orig = model._prepare_position_ids_for_generation

    def packed(inputs_tensor, model_kwargs):
        pos = orig(inputs_tensor, model_kwargs).clone()
        half = pos.shape[-1] // 2
        pos[:, 1, half:] -= pos[:, 1, half:half + 1].clone()      # row 1 starts over half-way
        return pos

    restore(model, "_prepare_position_ids_for_generation", packed)
    rep = check(_record(model, tmp_path / "packed.h5", _batch(proc, MIXED[:2], "left")))
    pos = _positions(rep)
    assert [(v.rule, v.step, v.row) for v in pos] == [(ORACLE, 0, 1)], [v.line() for v in pos]
    assert "packed" in pos[0].hint


def test_oracle_skips_what_it_cannot_judge(tmp_path):
    """1-D RoPE (no M-RoPE family in the config) is not the oracle's: it judges nothing there,
    and the other positions rules judge alone."""
    from vlmscope.testing import make_trace

    p = make_trace(tmp_path / "d.h5", n_steps=3, n_layers=2, n_vision=1, rope="1d", faults={"pos_shift": 5})
    with open_trace(p) as t:
        res = oracle_result(index_of(t))
        assert (res.checked, res.violations) == (set(), [])
    assert [v.rule for v in check(p, rules="positions").violations][:1] == ["positions.continuity"]
