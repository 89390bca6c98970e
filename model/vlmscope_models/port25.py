"""A from-scratch PyTorch port of the tiny Qwen2.5-VL language model, with seedable bugs.

:func:`build_port` takes the real embedded ``tiny-qwen2.5-vl``
(``vlmscope_models.load_embedded("tiny-qwen2.5-vl")[0]``), copies its language-model weights
into an independent implementation written from the architecture, and returns a
:class:`PortModel`. It is the "other implementation" of issue 11's port pairs: diffing its trace
against the reference's must find the module each seeded bug lives in.

What is the port's own code, and what is reused:

- **own**: the module tree and its names (below), RMSNorm, M-RoPE (``mrope_section`` from the
  config), the fused qkv projection (one ``Linear`` whose weight and bias are the reference's
  q, k and v concatenated), GQA, eager attention, the SiLU-gated MLP (one fused ``gate_up``
  ``Linear``), the KV cache (a plain list, one ``[k, v]`` list per block, ``[B, kv_heads, S, D]``
  tensors, grown by ``torch.cat``), the causal + padding mask, the 3-D position ids
  (:func:`rope_positions`, the port's own ``get_rope_index``), the image splice and the greedy
  ``generate`` loop;
- **reused**: the reference vision tower ``reference.model.visual`` (the port is of the language
  model), held as ``visual.tower`` behind the port's own wrapper ``visual``.

Module tree (paths as the recorder sees them)::

    visual                 PortVision   wraps the reference tower; returns the merged features
    visual.tower           the reference Qwen2_5_VisionTransformerPretrainedModel (as-is)
    lm                     PortLM
    lm.embed               nn.Embedding
    lm.rotary              PortRotary   M-RoPE cos/sin from 3-D position ids
    lm.blocks.N            PortBlock
    lm.blocks.N.norm1      PortRMSNorm  (reference: input_layernorm)
    lm.blocks.N.attn       PortAttention
    lm.blocks.N.attn.qkv   nn.Linear    fused q|k|v (reference: q_proj, k_proj, v_proj)
    lm.blocks.N.attn.out   nn.Linear    (reference: o_proj)
    lm.blocks.N.norm2      PortRMSNorm  (reference: post_attention_layernorm)
    lm.blocks.N.mlp        PortMLP
    lm.blocks.N.mlp.gate_up nn.Linear   fused gate|up (reference: gate_proj, up_proj)
    lm.blocks.N.mlp.down   nn.Linear    (reference: down_proj)
    lm.norm                PortRMSNorm  (reference: model.language_model.norm)
    head                   nn.Linear    (reference: lm_head)

One forward call of :class:`PortModel` is one step (prefill or one decode token), so the
recorder's hooks see ``generate`` as the usual prefill + decode steps.

Seedable bugs (``build_port(reference, bugs=(...))``); each is seeded in exactly one module, and
that module's forward is where the wrong code runs:

=================== ============================ ==============================================
bug                 seeded in (module path)      what is wrong
=================== ============================ ==============================================
``rotate_half_sign`` ``lm.blocks.0.attn``         ``rotate_half`` returns ``cat(x2, -x1)``
                                                  instead of ``cat(-x2, x1)`` (rotation by
                                                  minus the angle), in block 0's attention only
``rmsnorm_eps``     ``lm.blocks.1.norm2``         eps 1e-2 instead of the config's 1e-6
``gqa_repeat``      ``lm.blocks.0.attn``          KV heads tiled (``repeat``: 0,1,0,1) instead of
                                                  interleaved (``repeat_interleave``: 0,0,1,1)
``softmax_scale``   ``lm.blocks.1.attn``          scores scaled by 1/d instead of 1/sqrt(d)
``gate_up_swapped`` ``lm.blocks.0.mlp``           ``silu(up) * gate`` instead of
                                                  ``silu(gate) * up``
``splice_late``     ``(root)`` PortModel.forward  image feature k written at placeholder
                                                  position p_k + 1 (the first placeholder keeps
                                                  its token embedding, ``<|vision_end|>`` gets
                                                  the last feature)
``window_reverse``  ``visual``                    the wrapper re-applies the window order to the
                                                  tower's (correct, raster-order) merged rows:
                                                  they reach the splice as ``raster[w]``, the
                                                  merger's window order, as if the tower's
                                                  reverse index ``argsort(w)`` were the identity
                                                  (a skipped / wrong reverse). Not ``w`` itself
                                                  in place of ``argsort(w)``: for a square grid
                                                  of whole windows (astronaut.png: 16x16 merged,
                                                  4x4 windows) ``w`` swaps two base-4 digits and
                                                  is its own inverse, so that mistake is a no-op
                                                  there. The tower itself is untouched; the
                                                  fault shows at ``visual``'s output, before the
                                                  splice.
=================== ============================ ==============================================

The recorder and ``vlmscope check`` read the port like any model: the root gets ``input_ids``,
``attention_mask`` (2-D) and ``cache``; each block and attention gets ``position_ids``
(``[3, B, q]``), the additive 4-D ``attention_mask`` and ``cache``; ``rope_deltas`` is kept on
the root between steps as in transformers. ``config`` is the reference's config.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["BUGS", "BUG_SITES", "PortModel", "build_port", "rope_positions"]

#: bug name -> the module path whose forward runs the wrong code ("" is the root)
BUG_SITES: dict[str, str] = {
    "rotate_half_sign": "lm.blocks.0.attn",
    "rmsnorm_eps": "lm.blocks.1.norm2",
    "gqa_repeat": "lm.blocks.0.attn",
    "softmax_scale": "lm.blocks.1.attn",
    "gate_up_swapped": "lm.blocks.0.mlp",
    "splice_late": "",
    "window_reverse": "visual",
}
BUGS = tuple(BUG_SITES)
WRONG_EPS = 1e-2


# ------------------------------------------------------------------------------------ blocks


class PortRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


class PortRotary(nn.Module):
    """M-RoPE: each frequency band takes its angle from the t, h or w position row, the bands
    sized by ``mrope_section`` (t first), then repeated for the two halves of the head."""

    def __init__(self, head_dim: int, theta: float, section: Sequence[int]):
        super().__init__()
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(section)} does not sum to head_dim/2 = {head_dim // 2}")
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        # which position row (0 t, 1 h, 2 w) drives each of the head_dim/2 frequencies
        owner = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(section)])
        self.register_buffer("row_of_freq", owner, persistent=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        # position_ids [3, B, q] -> angles [3, B, q, D/2]; pick each frequency's row
        ang = position_ids.float()[..., None] * self.inv_freq
        idx = self.row_of_freq.view(1, 1, 1, -1).expand(1, *ang.shape[1:])
        ang = ang.gather(0, idx)[0]                      # [B, q, D/2]
        ang = torch.cat([ang, ang], dim=-1)              # [B, q, D]
        return ang.cos().to(x.dtype), ang.sin().to(x.dtype)


def _rotate_half(x: Tensor, wrong_sign: bool = False) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    if wrong_sign:  # BUG rotate_half_sign
        return torch.cat([b, -a], dim=-1)
    return torch.cat([-b, a], dim=-1)


class PortAttention(nn.Module):
    def __init__(self, idx: int, hidden: int, heads: int, kv_heads: int, bugs: frozenset[str]):
        super().__init__()
        self.idx = idx
        self.heads, self.kv_heads = heads, kv_heads
        self.d = hidden // heads
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.d, bias=True)
        self.out = nn.Linear(heads * self.d, hidden, bias=False)
        self.bug_sign = "rotate_half_sign" in bugs and BUG_SITES["rotate_half_sign"] == f"lm.blocks.{idx}.attn"
        self.bug_tile = "gqa_repeat" in bugs and BUG_SITES["gqa_repeat"] == f"lm.blocks.{idx}.attn"
        self.bug_scale = "softmax_scale" in bugs and BUG_SITES["softmax_scale"] == f"lm.blocks.{idx}.attn"

    def forward(self, x: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: list,
                cos: Tensor, sin: Tensor) -> Tensor:
        B, q, _ = x.shape
        d, H, KV = self.d, self.heads, self.kv_heads
        qs, ks, vs = self.qkv(x).split([H * d, KV * d, KV * d], dim=-1)
        qs = qs.view(B, q, H, d).transpose(1, 2)
        ks = ks.view(B, q, KV, d).transpose(1, 2)
        vs = vs.view(B, q, KV, d).transpose(1, 2)
        c, s = cos[:, None], sin[:, None]
        qs = qs * c + _rotate_half(qs, self.bug_sign) * s
        ks = ks * c + _rotate_half(ks, self.bug_sign) * s
        layer = cache[self.idx]
        if layer:
            ks = torch.cat([layer[0], ks], dim=2)
            vs = torch.cat([layer[1], vs], dim=2)
        cache[self.idx] = [ks, vs]
        rep = H // KV
        if self.bug_tile:  # BUG gqa_repeat: head h reads kv head h % KV
            ks, vs = ks.repeat(1, rep, 1, 1), vs.repeat(1, rep, 1, 1)
        else:              # head h reads kv head h // rep
            ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        scale = 1.0 / d if self.bug_scale else d ** -0.5  # BUG softmax_scale
        scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale + attention_mask
        probs = torch.softmax(scores.float(), dim=-1).to(qs.dtype)
        o = torch.matmul(probs, vs).transpose(1, 2).reshape(B, q, H * d)
        return self.out(o)


class PortMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, swapped: bool):
        super().__init__()
        self.inter = inter
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.swapped = swapped

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        if self.swapped:  # BUG gate_up_swapped
            gate, up = up, gate
        return self.down(F.silu(gate) * up)


class PortBlock(nn.Module):
    def __init__(self, idx: int, cfg: Any, bugs: frozenset[str]):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.norm1 = PortRMSNorm(cfg.hidden_size, eps)
        self.attn = PortAttention(idx, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, bugs)
        eps2 = WRONG_EPS if "rmsnorm_eps" in bugs and BUG_SITES["rmsnorm_eps"] == f"lm.blocks.{idx}.norm2" else eps
        self.norm2 = PortRMSNorm(cfg.hidden_size, eps2)
        swapped = "gate_up_swapped" in bugs and BUG_SITES["gate_up_swapped"] == f"lm.blocks.{idx}.mlp"
        self.mlp = PortMLP(cfg.hidden_size, cfg.intermediate_size, swapped)

    def forward(self, x: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: list,
                cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), position_ids, attention_mask, cache, cos, sin)
        return x + self.mlp(self.norm2(x))


class PortLM(nn.Module):
    def __init__(self, cfg: Any, bugs: frozenset[str]):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        rope = cfg.rope_parameters
        self.rotary = PortRotary(head_dim, float(rope["rope_theta"]), list(rope["mrope_section"]))
        self.blocks = nn.ModuleList([PortBlock(i, cfg, bugs) for i in range(cfg.num_hidden_layers)])
        self.norm = PortRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, attention_mask: Tensor, cache: list) -> Tensor:
        x = inputs_embeds
        cos, sin = self.rotary(x, position_ids)
        for blk in self.blocks:
            x = blk(x, position_ids, attention_mask, cache, cos, sin)
        return self.norm(x)


# ------------------------------------------------------------------------------------ vision


def window_index(grid_thw: Tensor, merge: int, window: int, patch: int) -> Tensor:
    """The order in which Qwen2.5-VL's vision tower visits the merged tokens (window by window,
    raster inside a window): ``window_order[i]`` is the raster index of the i-th visited token."""
    side = window // merge // patch  # merged tokens per window side
    out, base = [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = int(h) // merge, int(w) // merge
        idx = torch.arange(int(t) * gh * gw).view(int(t), gh, gw)
        for ti in range(int(t)):
            for wy in range(0, gh, side):
                for wx in range(0, gw, side):
                    out.append(idx[ti, wy:wy + side, wx:wx + side].reshape(-1) + base)
        base += int(t) * gh * gw
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class PortVision(nn.Module):
    """The reference vision tower behind the port's own interface: pixels + grids -> merged
    features, one row per image token, in raster order."""

    def __init__(self, tower: nn.Module, vcfg: Any, wrong_reverse: bool):
        super().__init__()
        self.tower = tower
        self.merge, self.window, self.patch = vcfg.spatial_merge_size, vcfg.window_size, vcfg.patch_size
        self.wrong_reverse = wrong_reverse

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        out = self.tower(pixel_values, grid_thw=grid_thw)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if self.wrong_reverse:  # BUG window_reverse: rows come out in window order, raster[w]
            w = window_index(grid_thw, self.merge, self.window, self.patch).to(feats.device)
            feats = feats[w]
        return feats


# ------------------------------------------------------------------------------------ positions


def rope_positions(input_ids: Tensor, attention_mask: Tensor | None, image_grid_thw: Tensor | None,
                   image_token_id: int, merge: int) -> tuple[Tensor, Tensor]:
    """The port's own Qwen2.5-VL 3-D positions for a prefill: ``([3, B, S] positions, [B, 1]
    deltas)``. Per row, over its real (unpadded) tokens: text advances t = h = w by one per
    token; an image of merged grid ``gh x gw`` starting at position p gets t = p, h = p + row,
    w = p + col, and the text after it starts at ``p + max(gh, gw)``. Padding gets 0. The delta
    is ``max position + 1 - real tokens``: decode step positions are ``real tokens so far + delta``."""
    B, S = input_ids.shape
    pos = torch.zeros(3, B, S, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    for b in range(B):
        real = mask[b].nonzero().flatten()
        ids = input_ids[b, real].tolist()
        rows: list[list[int]] = [[], [], []]
        p, i = 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                for r in rows:
                    r.append(p)
                p += 1
                i += 1
                continue
            t, h, w = (int(v) for v in next(grids))
            gh, gw = h // merge, w // merge
            for ti in range(t):
                for y in range(gh):
                    for x in range(gw):
                        rows[0].append(p + ti)
                        rows[1].append(p + y)
                        rows[2].append(p + x)
            i += t * gh * gw
            p += max(gh, gw)
        vals = torch.tensor(rows, dtype=torch.long, device=input_ids.device)
        pos[:, b, real] = vals
        deltas[b, 0] = (int(vals.max()) + 1 - len(ids)) if len(ids) else 0
    return pos, deltas


# ------------------------------------------------------------------------------------ the model


class PortModel(nn.Module):
    """One forward = one step. ``cache`` is the port's KV cache: a list with one ``[k, v]`` list
    per block (empty before the prefill), updated in place and returned."""

    def __init__(self, config: Any, tower: nn.Module, bugs: Iterable[str] = ()):
        super().__init__()
        bugs = frozenset(bugs)
        unknown = bugs - set(BUG_SITES)
        if unknown:
            raise ValueError(f"unknown bugs {sorted(unknown)}; known: {', '.join(BUGS)}")
        self.bugs = bugs
        self.config = config
        tc = config.text_config
        self.visual = PortVision(tower, config.vision_config, "window_reverse" in bugs)
        self.lm = PortLM(tc, bugs)
        self.head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.image_token_id = int(config.image_token_id)
        self.merge = int(config.vision_config.spatial_merge_size)
        self.rope_deltas: Tensor | None = None

    def new_cache(self) -> list:
        return [[] for _ in self.lm.blocks]

    def splice(self, embeds: Tensor, input_ids: Tensor, feats: Tensor) -> Tensor:
        """Write the image features over the image placeholders, in reading order."""
        b, s = (input_ids == self.image_token_id).nonzero(as_tuple=True)
        if b.numel() != feats.shape[0]:
            raise ValueError(f"{b.numel()} image tokens but {feats.shape[0]} image features")
        if "splice_late" in self.bugs:  # BUG splice_late: one position late
            s = (s + 1).clamp(max=input_ids.shape[1] - 1)
        embeds = embeds.clone()
        embeds[b, s] = feats.to(embeds.dtype)
        return embeds

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: list | None = None,
                pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                mm_token_type_ids: Tensor | None = None) -> dict:
        B, q = input_ids.shape
        if cache is None:
            cache = self.new_cache()
        past = cache[0][0].shape[2] if cache[0] else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + q, dtype=torch.long, device=input_ids.device)
        x = self.lm.embed(input_ids)
        if pixel_values is not None and past == 0:
            x = self.splice(x, input_ids, self.visual(pixel_values, image_grid_thw))
        if past == 0:
            position_ids, self.rope_deltas = rope_positions(input_ids, attention_mask, image_grid_thw,
                                                            self.image_token_id, self.merge)
        else:
            text = attention_mask.long().cumsum(-1)[:, -q:] - 1
            deltas = self.rope_deltas if self.rope_deltas is not None else torch.zeros_like(text[:, :1])
            position_ids = (text + deltas).unsqueeze(0).expand(3, B, q)
        mask = self.additive_mask(attention_mask, q, x.dtype)
        h = self.lm(x, position_ids=position_ids, attention_mask=mask, cache=cache)
        return {"logits": self.head(h), "cache": cache}

    @staticmethod
    def additive_mask(attention_mask: Tensor, q: int, dtype: torch.dtype) -> Tensor:
        """[B, 1, q, kv]: 0 where query i (the last q of kv tokens) may see key j (j <= i and j
        not padding), the dtype's minimum elsewhere."""
        kv = attention_mask.shape[-1]
        qi = torch.arange(kv - q, kv, device=attention_mask.device)[:, None]
        kj = torch.arange(kv, device=attention_mask.device)[None, :]
        allowed = (kj <= qi)[None] & attention_mask.bool()[:, None, :]
        m = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
        return m.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                 image_grid_thw: Tensor | None = None, mm_token_type_ids: Tensor | None = None,
                 max_new_tokens: int = 8, **ignored: Any) -> Tensor:
        """Greedy decoding, one ``self(...)`` call per step; returns prompt + new tokens
        (``[B, S + max_new_tokens]``). Other keywords (``do_sample=False`` ...) are ignored."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = self.new_cache()
        seq, mask = input_ids, attention_mask
        out = self(input_ids, attention_mask=mask, cache=cache, pixel_values=pixel_values,
                   image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids)
        for i in range(max_new_tokens):
            nxt = out["logits"][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt, dtype=mask.dtype)], dim=1)
            if i + 1 < max_new_tokens:
                out = self(nxt, attention_mask=mask, cache=cache)
        return seq


# ------------------------------------------------------------------------------------ loading


@torch.no_grad()
def build_port(reference: nn.Module, bugs: Iterable[str] = ()) -> PortModel:
    """A :class:`PortModel` with ``reference``'s weights (a ``Qwen2_5_VLForConditionalGeneration``),
    on its device and dtype, in eval mode. ``bugs``: names from :data:`BUGS`."""
    cfg = reference.config
    ref_lm = reference.model.language_model
    p0 = next(reference.parameters())
    port = PortModel(cfg, reference.model.visual, bugs)
    # the port's own parameters only (the tower is the reference's object, shared)
    for name, mod in port.named_children():
        if name != "visual":
            mod.to(device=p0.device, dtype=p0.dtype)
    port.lm.embed.weight.copy_(ref_lm.embed_tokens.weight)
    port.head.weight.copy_(reference.lm_head.weight)
    port.lm.norm.weight.copy_(ref_lm.norm.weight)
    for blk, ref in zip(port.lm.blocks, ref_lm.layers):
        a = ref.self_attn
        blk.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0))
        blk.attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0))
        blk.attn.out.weight.copy_(a.o_proj.weight)
        m = ref.mlp
        blk.mlp.gate_up.weight.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight], 0))
        blk.mlp.down.weight.copy_(m.down_proj.weight)
        blk.norm1.weight.copy_(ref.input_layernorm.weight)
        blk.norm2.weight.copy_(ref.post_attention_layernorm.weight)
    port.lm.rotary.to(device=p0.device)  # float32 tables (buffers) stay float32
    port.lm.rotary.inv_freq = port.lm.rotary.inv_freq.float()
    return port.eval()
