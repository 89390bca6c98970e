"""Batch-row rules on real recordings of the embedded models: ``mask.causal``, ``mask.padding``,
``cache.position``, ``cache.growth`` (failed steps, calls), ``image.tokens`` per row and
``image.features-row``.

Every trace is a real recording (a :class:`vlmscope.Recorder` around ``model.generate`` or a
hand-written loop, inputs from the model's own processor with ``padding=True``); every fault
patches the real model in a few lines with the mechanism it stands for. A few synthetic
traces (no torch) cover what a real model cannot show cheaply (a flipped bit in a decode
mask among thousands of steps).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import vlmscope
from vlmscope.analyze.check import check
from vlmscope.testing import make_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MINE = ("mask.", "cache.", "image.")
L0 = "model.language_model.layers.0"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def _image(name: str, size: int = 112) -> Image.Image:
    return Image.open(EXAMPLES / f"{name}.png").convert("RGB").resize((size, size))


@pytest.fixture(scope="module")
def models():
    """name -> (model, processor), each built once for the module."""
    import vlmscope_models

    cache: dict = {}

    def get(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = vlmscope_models.load_embedded(name, **options)
        return cache[key]

    return get


@contextlib.contextmanager
def patched(obj, attr: str, new):
    """``obj.attr = new`` for the block (an instance attribute: the class is untouched)."""
    had = attr in vars(obj)
    old = vars(obj).get(attr)
    setattr(obj, attr, new)
    try:
        yield
    finally:
        if had:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)


# Three rows: an image, text only (the longest prompt), an image of the same size as row 0's.
ROWS = [(f"{IMG}Describe this.", ["astronaut"]),
        ("Hello there, how are you today my friend? Tell me a story.", []),
        (f"{IMG}What?", ["chelsea"])]


def qwen_inputs(proc, side: str, rows=ROWS, video=None):
    proc.tokenizer.padding_side = side
    texts = [t for t, _ in rows]
    images = [_image(n) for _, ims in rows for n in ims]
    kw = {"images": images} if images else {}
    if video is not None:
        kw["videos"] = [video]
    return proc(text=texts, padding=True, return_tensors="pt", **kw)


def mqwen_inputs(proc, side: str):
    from vlmscope_models.mqwen import IMAGE_TOKEN, token_mask_to_embedding_mask

    proc.tokenizer.padding_side = side
    texts = [f"{IMAGE_TOKEN}Describe.", f"{IMAGE_TOKEN}What is in this picture, tell me more?", f"{IMAGE_TOKEN}Hi"]
    images = [_image("astronaut"), _image("chelsea"), _image("chelsea").transpose(Image.FLIP_LEFT_RIGHT)]
    inp = proc(text=texts, images=images, padding=True, return_tensors="pt")
    # tiny-mqwen needs its mask in embedding space for a batch (its tokenizer's mask is in token space)
    return {"input_ids": inp["input_ids"], "pixel_values": inp["pixel_values"],
            "attention_mask": token_mask_to_embedding_mask(inp["input_ids"], inp["attention_mask"])}


def frames(n: int = 4, size: int = 56) -> np.ndarray:
    """A short real video: the astronaut panning, ``[T, H, W, 3]`` uint8."""
    im = np.asarray(Image.open(EXAMPLES / "astronaut.png").convert("RGB").resize((size + 8 * n, size)))
    return np.stack([im[:, 8 * i:8 * i + size] for i in range(n)])


def record(tmp_path: Path, name: str, model, inputs, n: int = 3) -> Path:
    out = tmp_path / f"{name}.h5"
    with vlmscope.Recorder(model, out):
        model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out


def mine(path: Path, rules: str | None = None) -> list:
    return [v for v in check(path, rules=rules).violations if v.rule.startswith(MINE)]


def first(path: Path, rule_id: str):
    vs = check(path, rules=rule_id).by_rule(rule_id)
    assert vs, f"no {rule_id} violation"
    return vs[0]


# ------------------------------------------------------------------------------------ clean


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_clean_batches_check_clean(models, tmp_path, name, side):
    """B=3 (an image, text only, an image), then B=2 with two images in one row and a video,
    in one trace (two generate calls): no mask, cache or image violation."""
    model, proc = models(name)
    out = tmp_path / "clean.h5"
    two = [(f"{IMG}{IMG}Compare them.", ["chelsea", "astronaut"]), (f"{VID}What moves?", [])]
    with vlmscope.Recorder(model, out) as rec:
        rec.begin_call(batch_size=3, padding_side=side)
        model.generate(**qwen_inputs(proc, side), max_new_tokens=3, do_sample=False)
        rec.begin_call(batch_size=2, padding_side=side)
        model.generate(**qwen_inputs(proc, side, two, video=frames()), max_new_tokens=3, do_sample=False)
    t = vlmscope.open_trace(out)
    assert t.steps["kind"].tolist() == [0, 1, 1, 0, 1, 1]
    # the judged facts are there: masks at the layers, padded rows, images and a video per row
    assert len(t.probes(step=0, kind="attention_mask")) and len(t.probes(step=3, kind="video_grid_thw"))
    assert mine(out) == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_clean_mqwen_batch_checks_clean_per_row(models, tmp_path, side):
    """The user's report: a correct, padded tiny-mqwen batch (each placeholder grows its row by
    256 features) failed image.tokens, which subtracted every row's placeholders from one row."""
    model, proc = models("tiny-mqwen")
    out = record(tmp_path, f"mqwen_{side}", model, mqwen_inputs(proc, side))
    t = vlmscope.open_trace(out)
    assert int(t.steps["q_len"][0]) == int(t.steps["input_len"][0]) - 1 + 256
    assert mine(out) == []


# ------------------------------------------------------------------------------ mask.causal


def _extend_with_zero_for_padded_rows(model):
    """Decode steps append 0, not 1, to the 2-D mask of a row that has padding."""
    update = model._update_model_kwargs_for_generation

    def _update(outputs, model_kwargs, *args, **kwargs):
        out = update(outputs, model_kwargs, *args, **kwargs)
        m = out["attention_mask"]
        m[(m[:, :-1] == 0).any(-1), -1] = 0
        return out

    return patched(model, "_update_model_kwargs_for_generation", _update)


def _keep_prompt_mask(model):
    """Decode steps keep the prompt's 2-D mask: never extended (transformers pads it with 0)."""
    update = model._update_model_kwargs_for_generation

    def _update(outputs, model_kwargs, *args, **kwargs):
        prompt_mask = model_kwargs["attention_mask"]
        out = update(outputs, model_kwargs, *args, **kwargs)
        out["attention_mask"] = prompt_mask
        return out

    return patched(model, "_update_model_kwargs_for_generation", _update)


def test_mask_not_extended_for_a_padded_row(models, tmp_path):
    model, proc = models("tiny-qwen2-vl")
    inputs = qwen_inputs(proc, "left")
    padded = [b for b in range(3) if (inputs["attention_mask"][b] == 0).any()]
    with _extend_with_zero_for_padded_rows(model):
        out = record(tmp_path, "append0", model, inputs)
    vs = check(out, rules="mask").violations
    assert {v.rule for v in vs} == {"mask.causal"}
    v = vs[0]
    L = int(inputs["input_ids"].shape[1])
    assert (v.step, v.row, v.module) == (1, padded[0], L0)
    assert v.tokens == [L] and f"own key {L}" in v.expected and f"key {L} masked" in v.actual
    assert "not extended" in v.hint and f"holds 0 for row {padded[0]}'s new token" in v.hint
    assert f"({len(padded)} rows)" in v.actual and v.count == 2 and v.also == ["model.language_model.layers.1"]
    assert [x.step for x in vs] == [1, 2]


def test_mask_kept_at_prompt_length(models, tmp_path):
    model, proc = models("tiny-qwen2-vl")
    inputs = qwen_inputs(proc, "right")
    with _keep_prompt_mask(model):
        out = record(tmp_path, "kept", model, inputs)
    v = first(out, "mask.causal")
    L = int(inputs["input_ids"].shape[1])
    assert (v.step, v.row) == (1, 0)
    assert "not extended" in v.hint and f"has {L} entries for {L + 1} keys" in v.hint


def test_bidirectional_mask_is_not_causal(models, tmp_path, monkeypatch):
    """The text model builds its mask with the bidirectional builder (an encoder's)."""
    import transformers.models.qwen2_vl.modeling_qwen2_vl as mq
    from transformers.masking_utils import create_bidirectional_mask

    model, proc = models("tiny-qwen2-vl")
    monkeypatch.setattr(mq, "create_causal_mask", create_bidirectional_mask)
    out = record(tmp_path, "bidir", model, qwen_inputs(proc, "left"))
    monkeypatch.undo()
    v = first(out, "mask.causal")
    assert (v.step, v.row, v.module) == (0, 0, L0)
    assert "later key 1 allowed" in v.actual and "not causal" in v.hint
    assert {x.step for x in check(out, rules="mask.causal").violations} == {0}   # decode: nothing later
    assert check(out, rules="mask.padding").violations == []                    # padding still masked


def test_packed_mask_from_mrope_positions(models, tmp_path):
    """Transformers PR #44911: the text row of the positions is the M-RoPE t row, so a forward
    without a 2-D mask reads the image's flat t positions as packed sequences (a restart at
    every image token) and blocks earlier keys."""
    model, proc = models("tiny-qwen2-vl")
    inputs = qwen_inputs(proc, "left", rows=[(f"Look at this: {IMG}Describe it.", ["astronaut"])])
    lm = model.model.language_model
    forward = lm.forward

    @functools.wraps(forward)
    def text_forward(*args, **kwargs):
        pos = kwargs.get("position_ids")
        if pos is not None and pos.ndim == 3 and pos.shape[0] == 3:
            kwargs["position_ids"] = torch.cat([pos[:1], pos])    # the bug: text row := t row
        return forward(*args, **kwargs)

    out = tmp_path / "packed.h5"
    with patched(lm, "forward", text_forward), vlmscope.Recorder(model, out), torch.no_grad():
        model(**{k: v for k, v in inputs.items() if k != "attention_mask"}, use_cache=False)
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(model.config.image_token_id)
    v = first(out, "mask.causal")
    assert (v.step, v.row) == (0, 0)
    assert "packed" in v.hint and "restart" in v.hint
    # the image's second token is where the flat t row first restarts: it cannot see the keys before it
    assert v.tokens == [start + 1, 0] and f"restart at token {start + 1}" in v.hint


# ----------------------------------------------------------------------------- mask.padding


def _drop_text_mask(model):
    """The text model is called without the 2-D mask (a wrapper that forgets to pass it on)."""
    lm = model.model.language_model
    forward = lm.forward

    @functools.wraps(forward)
    def text_forward(*args, **kwargs):
        kwargs["attention_mask"] = None
        return forward(*args, **kwargs)

    return patched(lm, "forward", text_forward)


def test_padding_visible_when_the_mask_is_dropped(models, tmp_path):
    model, proc = models("tiny-qwen2-vl")
    inputs = qwen_inputs(proc, "left")
    n_pad = (inputs["attention_mask"] == 0).sum(-1).tolist()
    with _drop_text_mask(model):
        out = record(tmp_path, "nomask_eager", model, inputs)
    vs = check(out, rules="mask").violations
    assert {v.rule for v in vs} == {"mask.padding"} and [v.step for v in vs] == [0, 1, 2]
    b = next(b for b in range(3) if n_pad[b])
    v = vs[0]
    assert (v.row, v.module) == (b, L0)
    assert f"row {b}'s {n_pad[b]} padding key(s)" in v.expected
    assert f"padding key 0 visible to query {n_pad[b]}" in v.actual and "not masked" in v.hint


def test_sdpa_without_a_mask_ignores_padding(models, tmp_path):
    model, proc = models("tiny-qwen2-vl", attn_implementation="sdpa")
    inputs = qwen_inputs(proc, "right")
    b = next(b for b in range(3) if (inputs["attention_mask"][b] == 0).any())
    clean = record(tmp_path, "sdpa_clean", model, inputs)
    assert mine(clean) == []
    with _drop_text_mask(model):
        out = record(tmp_path, "sdpa_nomask", model, inputs)
    assert vlmscope.open_trace(out).steps["mask_ndim"].tolist() == [0, 0, 0]
    vs = check(out, rules="mask.padding").violations
    assert [v.step for v in vs] == [0, 1, 2]
    assert vs[0].row == b and "no mask reached the decoder layers" in vs[0].actual and "is_causal" in vs[0].hint


def test_mask_rows_out_of_order(models, tmp_path):
    """The mask's rows come from another batch order: row b gets row b+1's 2-D mask."""
    model, proc = models("tiny-qwen2-vl")
    lm = model.model.language_model
    forward = lm.forward

    @functools.wraps(forward)
    def text_forward(*args, **kwargs):
        kwargs["attention_mask"] = kwargs["attention_mask"].roll(-1, dims=0)
        return forward(*args, **kwargs)

    rows = [("Hi", []), ("Hello there, my friend", []), ("Hello there, my good friend, how are you today?", [])]
    inputs = qwen_inputs(proc, "left", rows=rows)
    pads = (inputs["attention_mask"] == 0).sum(-1).tolist()
    assert pads[0] > pads[1] > pads[2] == 0
    with patched(lm, "forward", text_forward):
        out = record(tmp_path, "rolled", model, inputs)
    v = first(out, "mask.padding")
    assert (v.step, v.row) == (0, 0) and f"padding key {pads[1]} visible" in v.actual
    assert "another row's padding (row 1's)" in v.hint


# ---------------------------------------------------------------------------- cache.position


def _loop(model, inputs, steps: int, cache_position):
    """A user's greedy loop that passes ``cache_position`` itself."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model.model.rope_deltas = None          # no state left by an earlier generate
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    past = 0
    with torch.no_grad():
        for i in range(steps):
            q = ids.shape[1]
            out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True,
                        cache_position=cache_position(past, q), **(extra if i == 0 else {}))
            past += q
            ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)


def test_cache_position_checked_against_the_cache(models, tmp_path):
    model, proc = models("tiny-qwen2-vl")
    inputs = qwen_inputs(proc, "left", rows=[("Hello there, how are you?", [])])
    good, bad = tmp_path / "cp_good.h5", tmp_path / "cp_bad.h5"
    with vlmscope.Recorder(model, good):
        _loop(model, inputs, 3, lambda past, q: torch.arange(past, past + q))
    with vlmscope.Recorder(model, bad):
        _loop(model, inputs, 3, lambda past, q: torch.arange(q))     # the bug: the past length forgotten
    t = vlmscope.open_trace(good)
    assert len(t.probes(step=1, kind="cache_position")) and t.steps["cache_before"].tolist()[1] > 0
    assert check(good, rules="cache").violations == []
    vs = check(bad, rules="cache.position").violations
    L = int(inputs["input_ids"].shape[1])
    assert [v.step for v in vs] == [1, 2] and vs[0].module == ""
    assert vs[0].expected == f"cache_position {L} (cache {L} + q_len 1)" and vs[0].actual.startswith("0 (1 values)")
    assert "restarts at 0" in vs[0].hint


# ------------------------------------------------------------------------------ cache.growth


class _Boom(RuntimeError):
    pass


def _fail_layer_on_step(model, layer: int, at_call: int):
    """Decoder layer ``layer`` raises on its ``at_call``-th call (a model bug in that step)."""
    attn = model.model.language_model.layers[layer].self_attn
    forward = attn.forward
    calls = {"n": 0}

    @functools.wraps(forward)
    def f(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise _Boom("injected")
        return forward(*args, **kwargs)

    return patched(attn, "forward", f)


def _layer_forgets_its_keys(model, layer: int, at_call: int):
    """Layer ``layer``'s attention uses the new keys but does not keep them in the cache, on its
    ``at_call``-th call."""
    attn = model.model.language_model.layers[layer].self_attn
    forward = attn.forward
    calls = {"n": 0}

    @functools.wraps(forward)
    def f(*args, **kwargs):
        calls["n"] += 1
        cache = kwargs.get("cache")
        if calls["n"] != at_call or cache is None:
            return forward(*args, **kwargs)
        lay = cache.layers[layer]
        k, v = lay.keys, lay.values
        try:
            return forward(*args, **kwargs)
        finally:
            lay.keys, lay.values = k, v

    return patched(attn, "forward", f)


def test_cache_growth_on_the_step_that_raised(models, tmp_path):
    model, proc = models("tiny-qwen2-vl")
    inputs = qwen_inputs(proc, "left")
    clean, bad = tmp_path / "fail_clean.h5", tmp_path / "fail_bad.h5"
    with _fail_layer_on_step(model, 1, 3), pytest.raises(_Boom), vlmscope.Recorder(model, clean):
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with _fail_layer_on_step(model, 1, 3), _layer_forgets_its_keys(model, 0, 3), pytest.raises(_Boom), \
            vlmscope.Recorder(model, bad):
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    t = vlmscope.open_trace(bad)
    assert t.status == "failed" and t.steps["status"].tolist() == [0, 0, 1]
    assert check(clean, rules="cache").violations == []
    (v,) = check(bad, rules="cache").violations
    assert (v.rule, v.step, v.module) == ("cache.growth", 2, L0)
    assert v.expected == "+1 (q_len) in layer 0" and v.actual.startswith("+0")
    assert "not updated" in v.hint and "in the step that raised" in v.hint


def test_a_call_reusing_the_previous_cache(models, tmp_path):
    """A user's loop starts its second call with the first call's cache object."""
    from transformers import DynamicCache

    model, proc = models("tiny-qwen2-vl")
    inputs = qwen_inputs(proc, "left", rows=[("Hello there, how are you?", [])])
    out = tmp_path / "reuse.h5"

    def call(cache):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            for _ in range(2):
                if cache.get_seq_length():
                    mask = torch.cat([mask.new_ones(1, cache.get_seq_length()), mask], -1)[:, -(
                        cache.get_seq_length() + ids.shape[1]):]
                o = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
                ids = o.logits[:, -1:].argmax(-1)
                mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long)

    model.model.rope_deltas = None          # no state left by an earlier generate
    with vlmscope.Recorder(model, out) as rec:
        cache = DynamicCache(config=model.config)
        rec.begin_call(batch_size=1)
        call(cache)
        rec.begin_call(batch_size=1)
        call(cache)                                     # the bug: not a fresh cache
    t = vlmscope.open_trace(out)
    assert t.steps["kind"].tolist() == [0, 1, 0, 1]
    (v,) = check(out, rules="cache.growth").violations
    L = int(inputs["input_ids"].shape[1])
    assert v.step == 2 and v.expected == "an empty cache at the prefill of call 1"
    assert v.actual.startswith(f"{L + 1} cached tokens in layer 0") and "not reset between calls" in v.hint


# ------------------------------------------------------------------------------ image.tokens


def test_one_placeholder_too_many_in_one_row(models, tmp_path):
    """verl #3469: one row's image has one more placeholder than its features. A training-style
    forward (positions given) runs the vision tower, then the splice refuses the count."""
    model, proc = models("tiny-qwen2-vl")
    inputs = qwen_inputs(proc, "left")
    pos, _ = model.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"],
                                        mm_token_type_ids=inputs["mm_token_type_ids"])
    ids = inputs["input_ids"]
    img = model.config.image_token_id
    end = int((ids[2] == img).nonzero().max()) + 1           # row 2's <|vision_end|> becomes a placeholder
    ids[2, end] = img
    inputs["mm_token_type_ids"][2, end] = 1
    out = tmp_path / "extra_token.h5"
    with pytest.raises(ValueError, match="do not match"), vlmscope.Recorder(model, out), torch.no_grad():
        model(**inputs, position_ids=pos)
    v = first(out, "image.tokens")
    assert (v.step, v.row, v.module) == (0, 2, "model.visual.merger")
    assert "row 2 image 0 (image 1 of the batch): 16 placeholder tokens" in v.expected
    assert v.actual.startswith("17 placeholders") and "1 placeholder token(s) more" in v.hint


def test_one_video_placeholder_too_many(models, tmp_path):
    """The same for a video: its placeholders are counted per row against video_grid_thw."""
    model, proc = models("tiny-qwen2.5-vl")
    rows = [(f"{IMG}Describe this.", ["astronaut"]), (f"{VID}What moves?", [])]
    inputs = qwen_inputs(proc, "left", rows, video=frames())
    kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "attention_mask", "mm_token_type_ids")}
    pos, _ = model.model.get_rope_index(inputs["input_ids"], second_per_grid_ts=inputs.get("second_per_grid_ts"),
                                        **kw)
    ids = inputs["input_ids"]
    vid = model.config.video_token_id
    n = int((ids[1] == vid).sum())
    end = int((ids[1] == vid).nonzero().max()) + 1
    ids[1, end] = vid
    inputs["mm_token_type_ids"][1, end] = 2
    out = tmp_path / "extra_video_token.h5"
    with pytest.raises(ValueError, match="do not match"), vlmscope.Recorder(model, out), torch.no_grad():
        model(**inputs, position_ids=pos)
    v = first(out, "image.tokens")
    assert (v.step, v.row) == (0, 1)
    assert f"row 1 video 0 (video 0 of the batch): {n} placeholder tokens" in v.expected
    assert v.actual.startswith(f"{n + 1} placeholders")


def test_merger_with_one_row_extra(models, tmp_path):
    model, proc = models("tiny-qwen2-vl")
    h = model.model.visual.merger.register_forward_hook(lambda m, a, out: torch.cat([out, out[:1]]))
    out = tmp_path / "extra_row.h5"
    try:
        with pytest.raises(RuntimeError), vlmscope.Recorder(model, out):
            model.generate(**qwen_inputs(proc, "right"), max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    v = first(out, "image.tokens")
    assert (v.step, v.module) == (0, "model.visual.merger")
    assert "33 merger output rows" in v.actual and "[[1, 8, 8], [1, 8, 8]]" in v.expected


# ------------------------------------------------------------------------ image.features-row


def _swap_first_two_images(model):
    """lmms-eval #971: the per-image features reach the splice in another order."""
    base = model.model
    inner = base.get_image_features

    @functools.wraps(inner)
    def get_image_features(*args, **kwargs):
        o = inner(*args, **kwargs)
        f = list(o.pooler_output)
        f[0], f[1] = f[1], f[0]
        o.pooler_output = tuple(f)
        return o

    return patched(base, "get_image_features", get_image_features)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_features_of_another_row(models, tmp_path, name):
    model, proc = models(name)
    with _swap_first_two_images(model):
        out = record(tmp_path, "swap", model, qwen_inputs(proc, "left"))
    vs = check(out, rules="image").violations
    assert [v.rule for v in vs] == ["image.features-row"]
    v = vs[0]
    assert (v.step, v.row, v.module) == (0, 0, "model")
    assert "features of another row (row 2's image 0)" in v.hint and "2 of 2 images wrong" in v.actual


def test_features_spliced_one_position_late(models, tmp_path):
    model, proc = models("tiny-qwen2-vl")
    base = model.model
    inner = base.get_placeholder_mask

    @functools.wraps(inner)
    def get_placeholder_mask(*args, **kwargs):
        image_mask, video_mask = inner(*args, **kwargs)
        return image_mask.roll(1, dims=1), video_mask        # every image one position later

    with patched(base, "get_placeholder_mask", get_placeholder_mask):
        out = record(tmp_path, "late", model, qwen_inputs(proc, "right"))
    v = first(out, "image.features-row")
    assert (v.step, v.row) == (0, 0) and "spliced 1 position(s) late" in v.hint


def test_mqwen_features_of_another_row(models, tmp_path):
    model, proc = models("tiny-mqwen")
    inner = model.transformer.encode_images

    @functools.wraps(inner)
    def encode_images(pixel_values):
        return inner(pixel_values).flip(0)          # the batch's features in reverse row order

    with patched(model.transformer, "encode_images", encode_images):
        out = record(tmp_path, "mq_swap", model, mqwen_inputs(proc, "left"))
    vs = check(out, rules="image").violations
    assert [v.rule for v in vs] == ["image.features-row"]
    assert (vs[0].row, vs[0].module) == (0, "transformer")
    assert "features of another row (row 2's image 0)" in vs[0].hint


# ------------------------------------------------------------------------------- synthetic


def test_one_wrong_bit_in_a_long_run_of_decode_masks(tmp_path):
    """Decode masks of an unpadded call are judged from their bit counts: one masked key among
    thousands of steps is still found (with its row, query and key)."""
    p = make_trace(tmp_path / "s.h5", n_steps=40, n_layers=2, n_vision=1)
    assert mine(p) == []
    t = vlmscope.open_trace(p)
    (r,) = [x for x in t.probes(step=30, kind="attention_mask") if x["ndim"] == 4][:1]
    off = int(r["data_off"])
    t.close()
    with h5py.File(p, "r+") as f:
        data = f["probe_data"][off:off + 1]
        f["probe_data"][off:off + 1] = data & np.uint8(0x7F)      # key 0 masked for the new token
    vs = check(p, rules="mask").violations
    assert [(v.rule, v.step, v.row) for v in vs] == [("mask.causal", 30, 0)]
    assert "earlier key 0 masked" in vs[0].actual and vs[0].count == 2
