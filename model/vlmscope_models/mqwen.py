"""tiny-mqwen: a small home-made multimodal Qwen-1 ("MQwen"), written to be read and copied.

It reproduces the layout and the *quirks* of the seed multimodal Qwen-1 code found in the wild,
so that vlmscope has something realistic to record:

* language model in the Qwen-1 layout: ``transformer.wte``, ``transformer.h.N.{ln_1, attn.c_attn,
  attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj}``, ``transformer.ln_f``, ``lm_head``; rotary
  positions are the index in the KV sequence (``transformer.rotary_emb(kv_seq_len)``), while
  the ``position_ids`` the model computes are passed down to every block and ignored;
* a legacy tuple KV cache ``((key, value), ...)`` with ``[B, S, heads, head_dim]`` tensors (or
  the Qwen-1 uint8-quantized ``(q [B, heads, S, head_dim], scale, zero)`` triples);
* a tiny random CLIP vision tower (``transformer.visual``) whose 256 patch features replace
  the single image placeholder ``<|extra_0|>`` (id 151646) after a ``transformer.projector``;
* the attention mask is used as given: the tokenizer's mask lives in TOKEN space (one position
  for the placeholder) while the sequence lives in EMBEDDING space (256 positions for it), so a
  batched ``generate`` with the tokenizer's mask fails with a shape error in
  ``transformer.h.0.attn`` -- exactly the kind of bug vlmscope is for.

Entry point: :func:`build` (registered as ``tiny-mqwen``). Bring your own model the same way:
``vlmscope record --model package.module:factory`` where ``factory(**options)`` returns
``(model, processor)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

__all__ = [
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "MQwenConfig",
    "MQwenForCausalLM",
    "MQwenProcessor",
    "build",
    "build_model",
    "build_processor",
    "token_mask_to_embedding_mask",
]

IMAGE_TOKEN = "<|extra_0|>"  # the image placeholder in the prompt ...
IMAGE_TOKEN_ID = 151646  # ... and its single id in the Qwen-1 vocabulary

# ChatML, as Qwen-1 chat models use it; an image item renders as ONE placeholder token.
CHAT_TEMPLATE = r"""
{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}
{{- '<|extra_0|>' -}}
{%- elif item['type'] == 'text' -%}
{{- item['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""".strip()


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class MQwenConfig(PretrainedConfig):
    """Sizes and options of tiny-mqwen (``to_dict()`` / ``to_json_string()`` come for free)."""

    model_type = "mqwen"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 256,  # Qwen-1 convention: w1 / w2 are intermediate_size // 2 wide
        layer_norm_epsilon: float = 1e-6,
        rotary_emb_base: float = 10000.0,
        initializer_range: float = 0.02,
        image_token_id: int = IMAGE_TOKEN_ID,
        image_context_length: int = 256,  # (224 / 14) ** 2 patches, CLS dropped
        use_cache_quantization: bool = False,
        use_cache: bool = True,
        vision_config: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads  # no GQA in Qwen-1
        self.kv_channels = hidden_size // num_attention_heads  # head_dim
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary_emb_base = rotary_emb_base
        self.initializer_range = initializer_range
        self.image_token_id = image_token_id
        self.image_context_length = image_context_length
        self.use_cache_quantization = use_cache_quantization
        self.use_cache = use_cache
        self.vision_config = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=224,
            patch_size=14,
        )
        self.vision_config.update(vision_config or {})


# --------------------------------------------------------------------------------------------
# Building blocks (Qwen-1)
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """Qwen-1 rotary table. Called with the KV sequence length; returns ``(cos, sin)``, each
    ``[1, kv_seq_len, 1, head_dim]`` (row i = position i of the KV sequence). Attention uses
    the LAST ``q_len`` rows: the rotary position of a query is its index in the KV sequence."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, kv_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Recomputed in float32 on the buffer's device (as Qwen-1 does): after model.to(bfloat16)
        # the buffer is bf16, and bf16 cannot even represent position 257.
        device = self.inv_freq.device
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        inv_freq = 1.0 / (self.base**exponents)
        seq = torch.arange(kv_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(seq, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]  # [1, S, 1, dim]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``t``: ``[B, q_len, heads, head_dim]``; ``cos``/``sin``: ``[1, q_len, 1, head_dim]``."""
    tf = t.float()
    return (tf * cos + _rotate_half(tf) * sin).type_as(t)


def quantize_cache_v(fdata: torch.Tensor, qmin: float = 0.0, qmax: float = 255.0):
    """Qwen-1 KV-cache quantization. ``fdata``: ``[B, heads, S, head_dim]`` (already permuted).

    Returns ``(uint8 [B, heads, S, head_dim], scale [B, heads, S, 1], zero [B, heads, S, 1])``;
    one scale/zero per (batch, head) of THIS chunk, repeated along S so chunks concatenate on
    dim 2. (Truncating ``.to(uint8)``, not rounding -- as in the original.)"""
    shape = fdata.shape
    flat = torch.flatten(fdata, 2)  # [B, heads, S * head_dim]
    fmax = torch.amax(flat, dim=-1, keepdim=True)
    fmin = torch.amin(flat, dim=-1, keepdim=True)
    scale = (fmax - fmin) / (qmax - qmin)
    zero = qmin - fmin / scale
    scale = scale.unsqueeze(-1).repeat(1, 1, shape[2], 1).contiguous()
    zero = zero.unsqueeze(-1).repeat(1, 1, shape[2], 1).contiguous()
    qdata = torch.clamp(fdata / scale + zero, qmin, qmax).to(torch.uint8)
    return qdata.contiguous(), scale, zero


def dequantize_cache_torch(qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (qdata - zero)


class MQwenAttention(nn.Module):
    def __init__(self, config: MQwenConfig):
        super().__init__()
        attn_implementation = config._attn_implementation or "eager"
        if attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.use_cache_quantization = config.use_cache_quantization
        self.attn_implementation = attn_implementation
        self.c_attn = nn.Linear(self.hidden_size, 3 * self.hidden_size)  # fused QKV (with bias)
        self.c_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        layer_past: tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,  # accepted and IGNORED, as in Qwen-1
        use_cache: bool = False,
    ):
        B, q_len, _ = hidden_states.shape
        query, key, value = self.c_attn(hidden_states).split(self.hidden_size, dim=2)
        query = query.view(B, q_len, self.num_heads, self.head_dim)  # [B, q, H, D]
        key = key.view(B, q_len, self.num_heads, self.head_dim)
        value = value.view(B, q_len, self.num_heads, self.head_dim)

        # Rotary: the table covers the whole KV sequence; the new tokens are its last q_len rows.
        if rotary_pos_emb is not None:
            cos, sin = (t[:, -q_len:] for t in rotary_pos_emb)
            query = apply_rotary_pos_emb(query, cos, sin)
            key = apply_rotary_pos_emb(key, cos, sin)

        # KV cache: plain [B, S, H, D] concatenated on dim 1, or quantized
        # (uint8 [B, H, S, D], scale, zero) concatenated on dim 2.
        if self.use_cache_quantization:
            key = quantize_cache_v(key.permute(0, 2, 1, 3))
            value = quantize_cache_v(value.permute(0, 2, 1, 3))
        if layer_past is not None:
            past_key, past_value = layer_past
            if self.use_cache_quantization:
                key = tuple(torch.cat((p, k), dim=2) for p, k in zip(past_key, key))
                value = tuple(torch.cat((p, v), dim=2) for p, v in zip(past_value, value))
            else:
                key = torch.cat((past_key, key), dim=1)
                value = torch.cat((past_value, value), dim=1)
        present = (key, value) if use_cache else None

        # A 4-D causal mask exists only when q_len equals the KV length (i.e. on prefill).
        kv_len = key[0].size(2) if self.use_cache_quantization else key.size(1)
        causal_mask = None
        if q_len == kv_len:
            causal_mask = torch.tril(torch.ones((kv_len, kv_len), dtype=torch.bool, device=query.device))
            causal_mask = causal_mask.view(1, 1, kv_len, kv_len)

        query = query.permute(0, 2, 1, 3)  # [B, H, q, D]
        if self.use_cache_quantization:
            key = dequantize_cache_torch(*key).to(query.dtype)  # already [B, H, S, D]
            value = dequantize_cache_torch(*value).to(query.dtype)
        else:
            key = key.permute(0, 2, 1, 3)
            value = value.permute(0, 2, 1, 3)

        if self.attn_implementation == "sdpa":
            attn_output = self._sdpa(query, key, value, causal_mask, attention_mask)
        else:
            attn_output = self._eager(query, key, value, causal_mask, attention_mask)

        # [B, H, q, D] -> [B, q, H * D]
        attn_output = attn_output.transpose(1, 2).contiguous().view(B, q_len, self.hidden_size)
        return self.c_proj(attn_output), present

    def _eager(self, query, key, value, causal_mask, attention_mask):
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)
        mask_value = torch.finfo(attn_weights.dtype).min
        if causal_mask is not None:
            attn_weights = torch.where(causal_mask, attn_weights, mask_value)
        if attention_mask is not None:
            # [B, H, q, S_kv] + [B, 1, 1, len(mask)]: breaks when the mask is in token space.
            attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights.float(), dim=-1).type(query.dtype)
        return torch.matmul(attn_weights, value)

    def _sdpa(self, query, key, value, causal_mask, attention_mask):
        attn_mask = None
        if causal_mask is not None:  # boolean causal -> additive, so it can be summed with the mask
            attn_mask = torch.zeros(causal_mask.shape, dtype=query.dtype, device=query.device)
            attn_mask = attn_mask.masked_fill(~causal_mask, torch.finfo(query.dtype).min)
        if attention_mask is not None:
            # [1, 1, S_kv, S_kv] + [B, 1, 1, len(mask)]: same failure as eager on a token-space mask.
            attn_mask = attention_mask if attn_mask is None else attn_mask + attention_mask
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)


class MQwenMLP(nn.Module):
    """Qwen-1 SwiGLU: ``c_proj(w1(x) * silu(w2(x)))``."""

    def __init__(self, config: MQwenConfig):
        super().__init__()
        ff = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff, bias=False)
        self.w2 = nn.Linear(config.hidden_size, ff, bias=False)
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class MQwenBlock(nn.Module):
    def __init__(self, config: MQwenConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = MQwenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MQwenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_pos_emb=None,
        layer_past=None,
        attention_mask=None,
        position_ids=None,
        use_cache: bool = False,
    ):
        attn_output, present = self.attn(
            self.ln_1(hidden_states),
            rotary_pos_emb=rotary_pos_emb,
            layer_past=layer_past,
            attention_mask=attention_mask,
            position_ids=position_ids,  # passed down, never used (as in the wild)
            use_cache=use_cache,
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, present


class MQwenProjector(nn.Module):
    """Vision features -> LM width: ``fc2(gelu(fc1(x)))``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------
# The multimodal transformer
# --------------------------------------------------------------------------------------------


class MQwenModel(nn.Module):
    def __init__(self, config: MQwenConfig):
        super().__init__()
        self.config = config
        self.use_cache_quantization = config.use_cache_quantization
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        vcfg = CLIPVisionConfig(
            **config.vision_config, attn_implementation=config._attn_implementation or "eager"
        )
        self.visual = CLIPVisionModel(vcfg)
        self.projector = MQwenProjector(vcfg.hidden_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.kv_channels, base=config.rotary_emb_base)
        self.h = nn.ModuleList(
            [MQwenBlock(config) for _ in range(config.num_hidden_layers)]
        )
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 224, 224]`` -> ``[N, 256, hidden]`` (CLIP patch features, CLS dropped)."""
        pixel_values = pixel_values.to(self.visual.dtype)
        features = self.visual(pixel_values=pixel_values).last_hidden_state[:, 1:]
        return self.projector(features)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        past_key_values: tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> BaseModelOutputWithPast:
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        B = input_ids.size(0)

        # 1-2. First step only (no cache) and only if a placeholder is present: remove it from
        # input_ids (boolean indexing flattens, .view(B, -1) restores the batch -- which assumes
        # exactly one placeholder per row) and grow the sequence by the image context length.
        has_image = past_key_values is None and bool((input_ids == cfg.image_token_id).any())
        if has_image:
            if pixel_values is None:
                raise ValueError(f"input_ids contain {IMAGE_TOKEN} but no pixel_values were given")
            image_pos = (input_ids == cfg.image_token_id).int().argmax(dim=1)  # placeholder column
            input_ids = input_ids[input_ids != cfg.image_token_id].view(B, -1)  # [B, L-1]
            S = input_ids.size(1) + cfg.image_context_length  # L - 1 + 256
        else:
            S = input_ids.size(-1)  # decode steps: the new token(s) only

        # 3. Reshape what the caller gave to the EXTENDED length.
        if token_type_ids is not None:
            token_type_ids = token_type_ids.view(-1, S)
        if position_ids is not None:
            position_ids = position_ids.view(-1, S)

        # 4. past_length. QUIRK (kept on purpose): the plain cache is [B, S, H, D], so
        # size(-2) is the HEAD COUNT, not the cached length. The quantized one is right.
        if past_key_values is None:
            past_length = 0
            past_key_values = (None,) * len(self.h)
        elif self.use_cache_quantization:
            past_length = past_key_values[0][0][0].size(2)
        else:
            past_length = past_key_values[0][0].size(-2)

        # 5. position_ids from past_length -- wrong on plain-cache decode steps, but attention
        # never reads them (rotary uses the KV index, below).
        if position_ids is None:
            position_ids = torch.arange(
                past_length, past_length + S, dtype=torch.long, device=input_ids.device
            )
            position_ids = position_ids.unsqueeze(0).view(-1, S)

        # 6. Additive mask [B, 1, 1, len(mask)], used AS GIVEN: the tokenizer's mask has L
        # entries (token space), the sequence has S (embedding space).
        if attention_mask is not None:
            attention_mask = attention_mask.view(B, -1)[:, None, None, :]
            attention_mask = attention_mask.to(dtype=self.dtype)
            attention_mask = (1.0 - attention_mask) * torch.finfo(self.dtype).min

        # 7. Embed, then splice the projected image features in place of the placeholder.
        inputs_embeds = self.wte(input_ids)
        if has_image:
            image_features = self.encode_images(pixel_values)  # [B, 256, hidden]
            inputs_embeds = torch.stack(
                [
                    torch.cat((inputs_embeds[b, :p], image_features[b], inputs_embeds[b, p:]), dim=0)
                    for b, p in enumerate(image_pos.tolist())
                ]
            )  # [B, S, hidden]
        hidden_states = inputs_embeds

        # Rotary for the whole KV sequence (cached length read correctly here: dim 1 / dim 2).
        kv_seq_len = hidden_states.size(1)
        if past_key_values[0] is not None:
            if self.use_cache_quantization:
                kv_seq_len += past_key_values[0][0][0].size(2)
            else:
                kv_seq_len += past_key_values[0][0].size(1)
        rotary_pos_emb = self.rotary_emb(kv_seq_len)

        # 8. The blocks.
        presents = () if use_cache else None
        for block, layer_past in zip(self.h, past_key_values):
            hidden_states, present = block(
                hidden_states,
                rotary_pos_emb=rotary_pos_emb,
                layer_past=layer_past,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
            )
            if use_cache:
                presents = presents + (present,)

        # 9. Final norm and the seed code's final reshape.
        hidden_states = self.ln_f(hidden_states)
        hidden_states = hidden_states.view(B, S, cfg.hidden_size)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=presents)


class MQwenForCausalLM(nn.Module):
    """``transformer`` + ``lm_head`` with its own greedy :meth:`generate` (legacy tuple cache)."""

    def __init__(self, config: MQwenConfig):
        super().__init__()
        self.config = config
        self.transformer = MQwenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: tuple | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,  # e.g. image_sizes from a generic caller: ignored
    ) -> CausalLMOutputWithPast:
        out = self.transformer(
            input_ids,
            pixel_values=pixel_values,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            use_cache=use_cache,
        )
        logits = self.lm_head(out.last_hidden_state)  # [B, S, vocab]
        # transformers 5 names the field `cache` (`.past_key_values` still works, with a warning).
        return CausalLMOutputWithPast(logits=logits, cache=out.cache)

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, pixel_values=None
    ):
        """Qwen-1's rules: once a cache exists only the last token is fed (and no image); with a
        single sequence the mask is dropped altogether."""
        if past_key_values:
            input_ids = input_ids[:, -1].unsqueeze(-1)
            pixel_values = None
        if input_ids.size(0) == 1:
            attention_mask = None
        return {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": True,
        }

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        eos_token_id: int | None = None,
        **kwargs: Any,  # other generation options (temperature, pad_token_id, ...): ignored
    ) -> torch.LongTensor:
        """Greedy decoding; one ``self(...)`` call per step (so forward hooks fire). Returns the
        token ids, prompt (with its placeholder) + new tokens. Stops early only when
        ``eos_token_id`` is given and every row has produced it (finished rows repeat it)."""
        if do_sample:
            raise NotImplementedError("tiny-mqwen's generate is greedy only (do_sample=False)")
        past_key_values = None
        finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            model_inputs = self.prepare_inputs_for_generation(
                input_ids, past_key_values, attention_mask=attention_mask, pixel_values=pixel_values
            )
            out = self(**model_inputs)
            past_key_values = out.cache
            next_tokens = out.logits[:, -1, :].argmax(dim=-1)
            if eos_token_id is not None:
                next_tokens = torch.where(finished, eos_token_id, next_tokens)
                finished = finished | (next_tokens == eos_token_id)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            # The wild way: one more 1 per step, in the space of the mask we were given
            # (the tokenizer's: token space).
            if attention_mask is not None:
                ones = attention_mask.new_ones((attention_mask.size(0), 1))
                attention_mask = torch.cat([attention_mask, ones], dim=-1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return input_ids


def token_mask_to_embedding_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int = IMAGE_TOKEN_ID,
    image_context_length: int = 256,
) -> torch.Tensor:
    """The fix the model lacks: expand a tokenizer (token-space, ``[B, L]``) mask to the
    embedding space (``[B, L - 1 + 256]``) by repeating each placeholder's entry 256 times."""
    repeats = torch.where(input_ids == image_token_id, image_context_length, 1)
    return torch.stack([m.repeat_interleave(r) for m, r in zip(attention_mask, repeats)])


# --------------------------------------------------------------------------------------------
# Processor: Qwen-1 tokenizer + CLIP image processor
# --------------------------------------------------------------------------------------------


class MQwenProcessor:
    """Enough of a transformers processor for vlmscope: ``apply_chat_template``, ``__call__``,
    ``batch_decode``/``decode``, ``tokenizer``, ``image_processor``."""

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer, image_processor, chat_template: str = CHAT_TEMPLATE):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(
        self, conversation, tokenize: bool = False, add_generation_prompt: bool = False, **kwargs
    ):
        return self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            tokenize=tokenize,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    def __call__(
        self, text=None, images=None, return_tensors: str | None = "pt", padding=True, **kwargs
    ) -> BatchFeature:
        if isinstance(text, str):
            text = [text]
        data = dict(self.tokenizer(text, padding=padding, **kwargs))
        if images is not None:
            if not isinstance(images, (list, tuple)):
                images = [images]
            n_placeholders = sum(t.count(self.image_token) for t in text)
            if n_placeholders != len(images):
                raise ValueError(
                    f"{n_placeholders} {self.image_token} placeholders in the text but {len(images)} images"
                )
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def build_processor() -> MQwenProcessor:
    from .tokenizer import QWEN1_SPECIAL_TOKENS, qwen_fast_tokenizer

    tokenizer = qwen_fast_tokenizer(
        QWEN1_SPECIAL_TOKENS,
        name="qwen1",
        eos_token="<|endoftext|>",  # Qwen-1: eod = pad = 151643
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=8192,
    )
    image_processor = CLIPImageProcessor(  # the OpenAI CLIP recipe, spelled out (no hub)
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    return MQwenProcessor(tokenizer, image_processor)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "auto": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return _DTYPES[key]


def _init_weights(model: MQwenForCausalLM, config: MQwenConfig) -> None:
    """Qwen-1's init for the LM and projector (CLIP keeps its own): N(0, 0.02), zero biases,
    c_proj scaled by 1/sqrt(2 * layers)."""
    std = config.initializer_range
    for name, module in model.named_modules():
        if name.startswith("transformer.visual"):
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)):
            s = std / math.sqrt(2 * config.num_hidden_layers) if name.endswith("c_proj") else std
            nn.init.normal_(module.weight, mean=0.0, std=s)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def build_model(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = "eager",
    use_cache_quantization: bool = False,
    seed: int = 0,
) -> MQwenForCausalLM:
    """The model alone (random weights, bit-identical for a given seed), in eval mode."""
    attn_implementation = attn_implementation or "eager"
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
    torch_dtype = _resolve_dtype(dtype)
    config = MQwenConfig(
        use_cache_quantization=use_cache_quantization,
        attn_implementation=attn_implementation,  # -> config._attn_implementation, as in transformers
        dtype=torch_dtype,
    )
    # Weights from `seed` without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MQwenForCausalLM(config)
        _init_weights(model, config)
    return model.to(device=device, dtype=torch_dtype).eval()


def build(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = "eager",
    use_cache_quantization: bool = False,
    seed: int = 0,
) -> tuple[MQwenForCausalLM, MQwenProcessor]:
    """The ``tiny-mqwen`` factory: ``(model, processor)``."""
    model = build_model(
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
        use_cache_quantization=use_cache_quantization,
        seed=seed,
    )
    return model, build_processor()
