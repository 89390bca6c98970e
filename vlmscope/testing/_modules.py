"""Module trees of the synthetic traces, in ``named_modules()`` order (transformers naming)."""

from __future__ import annotations

#: class names per family: Qwen2-VL (the generate traces) and Qwen2.5-VL (the demo traces)
_CLASSES = {
    "qwen2_vl": {
        "": "Qwen2VLForConditionalGeneration", "model": "Qwen2VLModel",
        "visual": "Qwen2VisionTransformerPretrainedModel", "patch_embed": "PatchEmbed",
        "vision_rotary": "VisionRotaryEmbedding", "block": "Qwen2VLVisionBlock", "block_norm": "LayerNorm",
        "block_attn": "VisionAttention", "block_mlp": "VisionMlp",
        "block_mlp_children": [("fc1", "Linear"), ("act", "QuickGELUActivation"), ("fc2", "Linear")],
        "merger": "PatchMerger", "ln_q": "LayerNorm", "text": "Qwen2VLTextModel", "layer": "Qwen2VLDecoderLayer",
        "attn": "Qwen2VLAttention", "norm": "Qwen2VLRMSNorm", "rotary": "Qwen2VLRotaryEmbedding",
    },
    "qwen2_5_vl": {
        "": "Qwen2_5_VLForConditionalGeneration", "model": "Qwen2_5_VLModel",
        "visual": "Qwen2_5_VisionTransformerPretrainedModel", "patch_embed": "Qwen2_5_VisionPatchEmbed",
        "vision_rotary": "Qwen2_5_VLVisionRotaryEmbedding", "block": "Qwen2_5_VLVisionBlock",
        "block_norm": "Qwen2_5_VLRMSNorm", "block_attn": "Qwen2_5_VLVisionAttention", "block_mlp": "Qwen2_5_VLMLP",
        "block_mlp_children": [("gate_proj", "Linear"), ("up_proj", "Linear"), ("down_proj", "Linear"),
                               ("act_fn", "SiLUActivation")],
        "merger": "Qwen2_5_VLPatchMerger", "ln_q": "Qwen2_5_VLRMSNorm", "text": "Qwen2_5_VLTextModel",
        "layer": "Qwen2_5_VLDecoderLayer", "attn": "Qwen2_5_VLAttention", "norm": "Qwen2_5_VLRMSNorm",
        "rotary": "Qwen2_5_VLRotaryEmbedding",
    },
}


def module_table(family: str, n_layers: int, n_vision: int) -> list[tuple[str, str]]:
    """(path, class) of every module of a ``family`` model with ``n_vision`` vision blocks and
    ``n_layers`` decoder layers: ``model.visual.blocks.N``, ``model.language_model.layers.N``, ..."""
    c = _CLASSES[family]
    mods = [("", c[""]), ("model", c["model"]), ("model.visual", c["visual"]),
            ("model.visual.patch_embed", c["patch_embed"]), ("model.visual.patch_embed.proj", "Conv3d"),
            ("model.visual.rotary_pos_emb", c["vision_rotary"]), ("model.visual.blocks", "ModuleList")]
    for i in range(n_vision):
        b = f"model.visual.blocks.{i}"
        mods += [(b, c["block"]), (f"{b}.norm1", c["block_norm"]), (f"{b}.norm2", c["block_norm"]),
                 (f"{b}.attn", c["block_attn"]), (f"{b}.attn.qkv", "Linear"), (f"{b}.attn.proj", "Linear"),
                 (f"{b}.mlp", c["block_mlp"])]
        mods += [(f"{b}.mlp.{name}", cls) for name, cls in c["block_mlp_children"]]
    mods += [("model.visual.merger", c["merger"]), ("model.visual.merger.ln_q", c["ln_q"]),
             ("model.visual.merger.mlp", "Sequential"), ("model.visual.merger.mlp.0", "Linear"),
             ("model.visual.merger.mlp.1", "GELU"), ("model.visual.merger.mlp.2", "Linear"),
             ("model.language_model", c["text"]), ("model.language_model.embed_tokens", "Embedding"),
             ("model.language_model.layers", "ModuleList")]
    for i in range(n_layers):
        L = f"model.language_model.layers.{i}"
        mods += [(L, c["layer"]), (f"{L}.self_attn", c["attn"]),
                 (f"{L}.self_attn.q_proj", "Linear"), (f"{L}.self_attn.k_proj", "Linear"),
                 (f"{L}.self_attn.v_proj", "Linear"), (f"{L}.self_attn.o_proj", "Linear"),
                 (f"{L}.mlp", "Qwen2MLP"), (f"{L}.mlp.gate_proj", "Linear"), (f"{L}.mlp.up_proj", "Linear"),
                 (f"{L}.mlp.down_proj", "Linear"), (f"{L}.mlp.act_fn", "SiLUActivation"),
                 (f"{L}.input_layernorm", c["norm"]), (f"{L}.post_attention_layernorm", c["norm"])]
    mods += [("model.language_model.norm", c["norm"]), ("model.language_model.rotary_emb", c["rotary"]),
             ("lm_head", "Linear")]
    return mods
