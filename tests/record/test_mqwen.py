"""tiny-mqwen (model/mqwen.py): shapes, cache layouts, generation and its deliberate quirks."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmscope_models.mqwen import (
    IMAGE_TOKEN_ID,
    MQwenProcessor,
    build,
    build_model,
    build_processor,
    token_mask_to_embedding_mask,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CTX = 256  # image context length
HEADS, HEAD_DIM, LAYERS, VOCAB = 4, 16, 2, 151936


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def images():
    return [Image.open(EXAMPLES / "astronaut.png"), Image.open(EXAMPLES / "chelsea.png")]


def _prompt(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def single(processor, images):
    text = _prompt(processor, "What is in this image?")
    return processor(text=[text], images=images[:1], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def batch(processor, images):
    texts = [_prompt(processor, "What is in this image?"), _prompt(processor, "Cat?")]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


@functools.cache
def _model(impl: str = "eager", quant: bool = False):
    """Models are built once per (attention implementation, cache quantization) and shared."""
    return build_model(attn_implementation=impl, use_cache_quantization=quant)


@pytest.fixture(scope="module")
def models():
    return {impl: _model(impl) for impl in ("eager", "sdpa")}


def test_placeholder_is_one_token(processor, single):
    tok = processor.tokenizer
    assert tok.encode("<|extra_0|>", add_special_tokens=False) == [IMAGE_TOKEN_ID] == [151646]
    text = _prompt(processor, "hi")
    assert text.count("<|extra_0|>") == 1 and text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert (single["input_ids"] == IMAGE_TOKEN_ID).sum().item() == 1
    assert single["pixel_values"].shape == (1, 3, 224, 224)
    assert processor.batch_decode(single["input_ids"], skip_special_tokens=True)[0].startswith("system\n")


def test_config(models):
    cfg = models["eager"].config
    assert cfg.model_type == "mqwen" and cfg.image_token_id == 151646 and cfg.image_context_length == 256
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (HEADS, HEADS, LAYERS)
    assert '"model_type": "mqwen"' in cfg.to_json_string() and cfg.to_dict()["hidden_size"] == 64


def test_prefill_shapes(models, single):
    L = single["input_ids"].shape[1]
    S = L - 1 + CTX
    with torch.no_grad():
        out = models["eager"](input_ids=single["input_ids"], pixel_values=single["pixel_values"])
    assert out.logits.shape == (1, S, VOCAB)
    assert len(out.cache) == LAYERS
    key, value = out.cache[0]
    assert key.shape == value.shape == (1, S, HEADS, HEAD_DIM)  # [B, S, heads, head_dim]


def test_eager_and_sdpa_agree_on_prefill(models, single):
    kw = dict(input_ids=single["input_ids"], pixel_values=single["pixel_values"])
    with torch.no_grad():
        eager = models["eager"](**kw).logits
        sdpa = models["sdpa"](**kw).logits
    # (comparing all 281 x 151936 logits with assert_close is slow: max difference instead)
    assert (eager - sdpa).abs().max().item() < 1e-5


@pytest.mark.parametrize("quant", [False, True], ids=["plain", "quantized"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_generate_8_tokens(impl, quant, single):
    model = _model(impl, quant)
    ids = model.generate(**single, max_new_tokens=8, do_sample=False)
    L = single["input_ids"].shape[1]
    assert ids.shape == (1, L + 8)
    assert torch.equal(ids[:, :L], single["input_ids"])


def test_plain_cache_concatenates_on_dim1(models, single):
    model = models["eager"]
    S = single["input_ids"].shape[1] - 1 + CTX
    with torch.no_grad():
        out = model(input_ids=single["input_ids"], pixel_values=single["pixel_values"])
        step = model(input_ids=torch.tensor([[42]]), past_key_values=out.cache)
    assert step.logits.shape == (1, 1, VOCAB)
    for key, value in step.cache:
        assert key.shape == value.shape == (1, S + 1, HEADS, HEAD_DIM)
    torch.testing.assert_close(step.cache[0][0][:, :S], out.cache[0][0])


def test_quantized_cache_layout(single):
    model = _model("eager", True)
    S = single["input_ids"].shape[1] - 1 + CTX
    with torch.no_grad():
        out = model(input_ids=single["input_ids"], pixel_values=single["pixel_values"])
        step = model(input_ids=torch.tensor([[42]]), past_key_values=out.cache)
    for layer in step.cache:
        for q, scale, zero in layer:  # key and value: (uint8 [B, H, S, D], scale, zero)
            assert q.dtype == torch.uint8 and q.shape == (1, HEADS, S + 1, HEAD_DIM)
            assert scale.shape == zero.shape == (1, HEADS, S + 1, 1)
            assert scale.dtype == zero.dtype == torch.float32


@pytest.mark.parametrize("quant", [False, True], ids=["plain", "quantized"])
def test_position_ids_vs_rotary_on_decode(quant, single):
    """position_ids (passed down, ignored) come from the quirky past_length; rotary uses the KV
    index. With the plain [B, S, H, D] cache, past_length is size(-2) == heads."""
    model = build_model(use_cache_quantization=quant)  # a fresh one: hooks are added
    seen = {"pos": [], "rot": []}
    model.transformer.h[0].attn.register_forward_pre_hook(
        lambda m, a, kw: seen["pos"].append(kw["position_ids"].tolist()), with_kwargs=True
    )
    model.transformer.rotary_emb.register_forward_pre_hook(lambda m, a: seen["rot"].append(a[0]))
    model.generate(**single, max_new_tokens=3)
    S = single["input_ids"].shape[1] - 1 + CTX
    assert seen["rot"] == [S, S + 1, S + 2]
    assert seen["pos"][0] == [list(range(S))]
    if quant:
        assert seen["pos"][1:] == [[[S]], [[S + 1]]]
    else:
        assert seen["pos"][1:] == [[[HEADS]], [[HEADS]]]


def test_batched_forward_with_embedding_space_mask(models, batch, single):
    model = models["eager"]
    mask = token_mask_to_embedding_mask(batch["input_ids"], batch["attention_mask"])
    L = batch["input_ids"].shape[1]
    assert mask.shape == (2, L - 1 + CTX)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=mask)
        alone = model(input_ids=single["input_ids"], pixel_values=single["pixel_values"])
    assert out.logits.shape == (2, L - 1 + CTX, VOCAB)
    assert torch.isfinite(out.logits[:, -1]).all()
    # Row 0 is the longer prompt (no padding): identical to running it alone.
    assert torch.equal(batch["input_ids"][:1], single["input_ids"])
    assert (out.logits[0, -1] - alone.logits[0, -1]).abs().max().item() < 1e-5
    # ... and generation works with the mask in embedding space.
    ids = model.generate(
        input_ids=batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"], max_new_tokens=2
    )
    assert ids.shape == (2, L + 2)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_batched_generate_with_token_space_mask_fails_in_attention(models, batch, impl):
    model = models[impl]
    stack: list[str] = []  # modules entered and not yet left, as a recorder would track them
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def enter(module, args):
        stack.append(names[module])

    def leave(module, args, output):
        stack.pop()

    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    L = batch["input_ids"].shape[1]
    S = L - 1 + CTX
    try:
        with pytest.raises(RuntimeError) as info:
            model.generate(**batch, max_new_tokens=8)
    finally:
        for h in handles:
            h.remove()
    msg = str(info.value)
    expected = rf"size of tensor a \({S}\) must match the size of tensor b \({L}\) at non-singleton dimension 3"
    assert re.search(expected, msg), msg
    assert stack[-1] == "transformer.h.0.attn"
    assert stack[:3] == ["", "transformer", "transformer.h.0"]


def test_same_seed_same_logits(single):
    kw = dict(input_ids=single["input_ids"], pixel_values=single["pixel_values"])
    model_a, model_b = build_model(seed=0), build_model(seed=0)
    with torch.no_grad():
        a = model_a(**kw).logits[:, -1]
        b = model_b(**kw).logits[:, -1]
    assert torch.equal(a, b)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    state_c = build_model(seed=1).state_dict()
    assert not torch.equal(state_a["lm_head.weight"], state_c["lm_head.weight"])


def test_build_factory_and_options():
    model, processor = build(dtype="bfloat16")
    assert isinstance(processor, MQwenProcessor)
    assert model.dtype == torch.bfloat16 and not model.training
    text_only = processor(text=["Hello"], images=None, return_tensors="pt")  # keep bf16 cheap
    assert "pixel_values" not in text_only
    ids = model.generate(**text_only, max_new_tokens=2)
    assert ids.shape == (1, text_only["input_ids"].shape[1] + 2)
    with pytest.raises(ValueError):
        build_model(attn_implementation="flash_attention_2")
