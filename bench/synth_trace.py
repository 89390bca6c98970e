"""Synthetic vlmscope traces: large, realistic and fast to write.

``make_trace(path, n_events=1_000_000)`` writes a trace shaped like a recording of a
Qwen2-VL-style generate (transformers naming: ``model.visual.blocks.N``,
``model.language_model.layers.N.self_attn.q_proj``, ...): a prefill with a vision tower and
an image spliced into the prompt, then decode steps until ``n_events`` module calls are
written. Every table is filled: events, tensors (with stats), reshapes (with call sites) and
semantic probes (input ids, M-RoPE / 1-D position ids, 4-D additive masks, cache lengths,
image grid, merger rows, rope positions).

It is used by the benchmarks (``bench/bench_analyze.py``), by the viewer benchmark and by
unit tests, which inject faults (``faults=``) to get traces that break one invariant.

Only numpy and the trace writer are used: no torch. Decode steps are built from a template
and patched with numpy, so a 1M-event trace takes a few seconds to write.

Faults (``faults={name: value}``), all optional:

- ``drift=(step, layer)``: from that step on, the output of ``layers.<layer>.mlp.down_proj``
  and everything downstream has different values (stats change, shapes do not).
- ``shape=(step, layer)``: in that step, ``layers.<layer>.self_attn.o_proj`` outputs one extra
  feature column (a shape divergence).
- ``nan=(step, layer)``: ``layers.<layer>.mlp.down_proj`` produces NaN in that step; every
  later hidden state of the step (and every later step) carries it.
- ``mask_len=k``: the 4-D mask's key length is off by ``k`` in every step.
- ``mask_dtype="float32"``: the additive mask keeps that dtype (the model runs in ``dtype``).
- ``cache_twice=(step, layer)``: that layer appends its K/V twice in that step.
- ``pos_shift=k``: decode position ids are shifted by ``k`` (e.g. the image length).
- ``fallback_1d=True``: no ``mm_token_type_ids``: M-RoPE positions degrade to three equal
  1-D rows although an image is present.
- ``kv_quirk=v``: the model's computed 1-D ``position_ids`` start at ``v`` on decode steps
  while rotary uses the real KV index (the mqwen ``past_length`` quirk). Needs ``rope="1d"``.
- ``image_rows=k``: the merger outputs ``k`` more rows than there are placeholders.
- ``cat_promotion=True``: a ``cat`` in layer 0 mixes bfloat16 and float16 (gives float32).
- ``seq_len=(step, layer)``: the hidden states entering that layer have one token too many.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:  # runnable as a script from the repo root
    from vlmscope.trace import (
        ENC_BITS, ENC_INT64, ENC_NONE, EVENT_DTYPE, MODULE_DTYPE, PROBE_DTYPE, RESHAPE_DTYPE,
        FORMAT_VERSION, STEP_DTYPE, TENSOR_DTYPE, TraceWriter, open_trace, pad_shape,
    )
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vlmscope.trace import (  # noqa: E402
        ENC_BITS, ENC_INT64, ENC_NONE, EVENT_DTYPE, MODULE_DTYPE, PROBE_DTYPE, RESHAPE_DTYPE,
        FORMAT_VERSION, STEP_DTYPE, TENSOR_DTYPE, TraceWriter, open_trace, pad_shape,
    )

__all__ = ["make_trace", "cached_trace"]

# Shape sentinels of the decode template (replaced per step).
_K = -100   # real key length: cache_before + q_len
_C = -101   # cache length before the step
_KM = -102  # key length of the 4-D mask (differs from _K with the mask_len fault)
_SENT = {_K: "{K}", _C: "{C}", _KM: "{KM}"}
_TPL = re.compile(r"\{[A-Za-z_]")

_FINFO_MIN = {"float32": -3.4028234663852886e38, "bfloat16": -3.3895313892515355e38,
              "float16": -65504.0, "float64": -1.7976931348623157e308}

_SITES = {
    "attn": ("transformers/models/qwen2_vl/modeling_qwen2_vl.py", "forward"),
    "rope": ("transformers/models/qwen2_vl/modeling_qwen2_vl.py", "apply_multimodal_rotary_pos_emb"),
    "rot_half": ("transformers/models/qwen2_vl/modeling_qwen2_vl.py", "rotate_half"),
    "cache": ("transformers/cache_utils.py", "update"),
    "repeat_kv": ("transformers/models/qwen2_vl/modeling_qwen2_vl.py", "repeat_kv"),
    "mask": ("transformers/masking_utils.py", "sdpa_mask"),
    "model": ("transformers/models/qwen2_vl/modeling_qwen2_vl.py", "forward"),
    "vision": ("transformers/models/qwen2_vl/modeling_qwen2_vl.py", "forward"),
}


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(_SENT.get(int(d), str(int(d))) for d in shape) + "]"


class _Emitter:
    """Builds one step's rows procedurally (shapes may hold the _K / _C sentinels)."""

    def __init__(self, mods: dict[str, int], strings: "_Strings"):
        self.mods = mods
        self.S = strings
        self.seq = 0
        self.events: list[list] = []
        self.tensors: list[list] = []
        self.reshapes: list[list] = []
        self.probes: list[list] = []   # [seq, event, module, kind, name, shape, dtype, blob, info_tpl]
        self.stack: list[int] = []
        self.pending: dict[int, list] = {}
        self.nth: dict[int, int] = {}
        self.opnth: dict[tuple[int, str], int] = {}

    def _tensor(self, ev: int, role: int, name: str, shape, dtype: str, tag: str = "") -> None:
        # a call's tensors are buffered and written contiguously when it returns (as the recorder does)
        self.pending[ev].append([ev, role, self.S(name), len(shape), pad_shape(shape), self.S(dtype), tag])

    def enter(self, path: str, inputs=(), kwargs=()) -> int:
        m = self.mods[path]
        nth = self.nth.get(m, 0)
        self.nth[m] = nth + 1
        ev = len(self.events)
        parent = self.stack[-1] if self.stack else -1
        self.events.append([self.seq, 0, m, nth, len(self.stack), parent, 0, 0])
        self.pending[ev] = []
        self.seq += 1
        for spec in inputs:
            self._tensor(ev, 0, *spec)
        for spec in kwargs:
            self._tensor(ev, 1, *spec)
        self.stack.append(ev)
        return ev

    def exit(self, outputs=()) -> None:
        ev = self.stack.pop()
        for spec in outputs:
            self._tensor(ev, 2, *spec)
        row = self.events[ev]
        row[1] = self.seq
        own = self.pending.pop(ev)
        row[6] = len(self.tensors)
        row[7] = len(own)
        self.tensors.extend(own)

    def leaf(self, path: str, inp, out, in_name: str = "input") -> None:
        self.enter(path, inputs=[(in_name, *inp)])
        self.exit(outputs=[("out", *out)])

    def reshape(self, op: str, in_shapes, out_shape, dtypes: str, args: str, site: str,
                out_dtype: str | None = None, n_out: int = 1) -> None:
        ev = self.stack[-1] if self.stack else -1
        m = self.events[ev][2] if ev >= 0 else -1
        key = (ev, op)
        nth = self.opnth.get(key, 0)
        self.opnth[key] = nth + 1
        f, fn = _SITES[site]
        first = in_shapes[0]
        dts = dtypes.split()
        self.reshapes.append([
            self.seq, ev, m, self.S(op), nth, len(in_shapes), len(first), pad_shape(first),
            self.S.tpl(" ".join(_fmt_shape(s) for s in in_shapes)), self.S(dtypes), self.S.tpl(args),
            n_out, len(out_shape), pad_shape(out_shape), self.S(out_dtype or dts[0]),
            self.S(f), 100 + 7 * (self.S(op) % 50) + nth, self.S(fn),
        ])
        self.seq += 1

    def probe(self, kind: str, name: str, shape, dtype: str, blob: str | None, info: str) -> None:
        ev = self.stack[-1]
        self.probes.append([self.seq, ev, self.events[ev][2], self.S(kind), self.S(name),
                            len(shape), pad_shape(shape), self.S(dtype), blob, self.S.tpl(info)])
        self.seq += 1


class _Strings:
    """Interning with two namespaces: fixed strings (ids) and per-step templates."""

    def __init__(self, writer: TraceWriter):
        self.w = writer
        self.templates: list[str] = []
        self._tpl_ids: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        return self.w.intern(s)

    def tpl(self, s: str) -> int:
        """Templates are encoded as negative ids: -(index + 1)."""
        if not _TPL.search(s):
            return self.w.intern(s)
        i = self._tpl_ids.get(s)
        if i is None:
            i = len(self.templates)
            self.templates.append(s)
            self._tpl_ids[s] = i
        return -(i + 1)


def _module_table(n_layers: int, n_vision: int) -> list[tuple[str, str]]:
    mods = [("", "Qwen2VLForConditionalGeneration"), ("model", "Qwen2VLModel"),
            ("model.visual", "Qwen2VisionTransformerPretrainedModel"),
            ("model.visual.patch_embed", "PatchEmbed"), ("model.visual.patch_embed.proj", "Conv3d"),
            ("model.visual.rotary_pos_emb", "VisionRotaryEmbedding"), ("model.visual.blocks", "ModuleList")]
    for i in range(n_vision):
        b = f"model.visual.blocks.{i}"
        mods += [(b, "Qwen2VLVisionBlock"), (f"{b}.norm1", "LayerNorm"), (f"{b}.norm2", "LayerNorm"),
                 (f"{b}.attn", "VisionAttention"), (f"{b}.attn.qkv", "Linear"), (f"{b}.attn.proj", "Linear"),
                 (f"{b}.mlp", "VisionMlp"), (f"{b}.mlp.fc1", "Linear"), (f"{b}.mlp.act", "QuickGELUActivation"),
                 (f"{b}.mlp.fc2", "Linear")]
    mods += [("model.visual.merger", "PatchMerger"), ("model.visual.merger.ln_q", "LayerNorm"),
             ("model.visual.merger.mlp", "Sequential"), ("model.visual.merger.mlp.0", "Linear"),
             ("model.visual.merger.mlp.1", "GELU"), ("model.visual.merger.mlp.2", "Linear"),
             ("model.language_model", "Qwen2VLTextModel"), ("model.language_model.embed_tokens", "Embedding"),
             ("model.language_model.layers", "ModuleList")]
    for i in range(n_layers):
        L = f"model.language_model.layers.{i}"
        mods += [(L, "Qwen2VLDecoderLayer"), (f"{L}.self_attn", "Qwen2VLAttention"),
                 (f"{L}.self_attn.q_proj", "Linear"), (f"{L}.self_attn.k_proj", "Linear"),
                 (f"{L}.self_attn.v_proj", "Linear"), (f"{L}.self_attn.o_proj", "Linear"),
                 (f"{L}.mlp", "Qwen2MLP"), (f"{L}.mlp.gate_proj", "Linear"), (f"{L}.mlp.up_proj", "Linear"),
                 (f"{L}.mlp.down_proj", "Linear"), (f"{L}.mlp.act_fn", "SiLUActivation"),
                 (f"{L}.input_layernorm", "Qwen2VLRMSNorm"), (f"{L}.post_attention_layernorm", "Qwen2VLRMSNorm")]
    mods += [("model.language_model.norm", "Qwen2VLRMSNorm"),
             ("model.language_model.rotary_emb", "Qwen2VLRotaryEmbedding"), ("lm_head", "Linear")]
    return mods


class _Cfg:
    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


def _emit_step(E: _Emitter, c: _Cfg, prefill: bool, q: int, C, K, KM, faults: dict, step: int) -> None:
    """Emit one step. ``q`` is the embedding-space length; C/K/KM the cache length before,
    the key length and the mask's key length (ints, or the sentinels in the decode template)."""
    B, D, H, KVH, hd, dt = c.batch, c.hidden, c.heads, c.kv_heads, c.head_dim, c.dtype
    I = c.intermediate
    mdt = faults.get("mask_dtype", dt)
    L_tok = q  # token-space length (placeholders are 1:1 with features)
    pos_rows = 4 if c.rope == "mrope" else 0
    root_kw = [("input_ids", (B, L_tok), "int64"), ("attention_mask", (B, K), "int64")]
    if c.rope == "mrope":
        root_kw.append(("position_ids", (4, B, q), "int64"))
    if prefill:
        root_kw += [("pixel_values", (c.n_patches, c.patch_dim), dt), ("image_grid_thw", (1, 3), "int64")]
        if c.rope == "mrope" and not faults.get("fallback_1d"):
            root_kw.append(("mm_token_type_ids", (B, L_tok), "int64"))
    E.enter("", kwargs=root_kw)
    E.probe("input_ids", "input_ids", (B, L_tok), "int64", "input_ids", "{input_ids_info}")
    E.probe("attention_mask", "attention_mask", (B, K), "int64", "mask2d", '{"style": "int", "dtype": "int64"}')
    if c.rope == "mrope":
        E.probe("position_ids", "position_ids", (4, B, q), "int64", "pos4", "{pos4_info}")
    if prefill:
        E.probe("image_grid_thw", "image_grid_thw", (1, 3), "int64", "grid", "{grid_info}")
        if c.rope == "mrope" and not faults.get("fallback_1d"):
            E.probe("mm_token_type_ids", "mm_token_type_ids", (B, L_tok), "int64", "mmtt",
                    '{"min": 0, "max": 1}')
    E.probe("cache", "cache", (c.n_layers,), "int64", "cache0", "{cache0_info}")
    model_kw = list(root_kw)
    E.enter("model", kwargs=model_kw)
    E.probe("input_ids", "input_ids", (B, L_tok), "int64", "input_ids", "{input_ids_info}")
    E.probe("cache", "cache", (c.n_layers,), "int64", "cache0", "{cache0_info}")
    E.leaf("model.language_model.embed_tokens", ((B, L_tok), "int64"), ((B, L_tok, D), dt))
    if prefill:
        # ---- vision tower ----
        N, VD = c.n_patches, c.vision_hidden
        E.enter("model.visual", inputs=[("hidden_states", (N, c.patch_dim), dt)],
                kwargs=[("grid_thw", (1, 3), "int64")])
        E.probe("image_grid_thw", "grid_thw", (1, 3), "int64", "grid", "{grid_info}")
        E.enter("model.visual.patch_embed", inputs=[("hidden_states", (N, c.patch_dim), dt)])
        E.reshape("view", [(N, c.patch_dim)], (N, 3, 2, 14, 14), dt, "(-1, 3, 2, 14, 14)", "vision")
        E.leaf("model.visual.patch_embed.proj", ((N, 3, 2, 14, 14), dt), ((N, VD, 1, 1, 1), dt))
        E.reshape("view", [(N, VD, 1, 1, 1)], (N, VD), dt, f"(-1, {VD})", "vision")
        E.exit(outputs=[("out", (N, VD), dt)])
        E.leaf("model.visual.rotary_pos_emb", ((N,), "int64"), ((N, VD // c.vision_heads // 2), "float32"),
               in_name="seqlen")
        for i in range(c.n_vision):
            b = f"model.visual.blocks.{i}"
            E.enter(b, inputs=[("hidden_states", (N, VD), dt)], kwargs=[("cu_seqlens", (2,), "int32")])
            E.leaf(f"{b}.norm1", ((N, VD), dt), ((N, VD), dt))
            E.enter(f"{b}.attn", inputs=[("hidden_states", (N, VD), dt)], kwargs=[("cu_seqlens", (2,), "int32")])
            E.leaf(f"{b}.attn.qkv", ((N, VD), dt), ((N, 3 * VD), dt))
            E.reshape("reshape", [(N, 3 * VD)], (N, 3, c.vision_heads, VD // c.vision_heads), dt,
                      f"({N}, 3, {c.vision_heads}, -1)", "vision")
            E.reshape("permute", [(N, 3, c.vision_heads, VD // c.vision_heads)],
                      (3, N, c.vision_heads, VD // c.vision_heads), dt, "(1, 0, 2, 3)", "vision")
            E.reshape("reshape", [(N, VD)], (N, VD), dt, f"({N}, -1)", "vision")
            E.leaf(f"{b}.attn.proj", ((N, VD), dt), ((N, VD), dt))
            E.exit(outputs=[("out", (N, VD), dt)])
            E.leaf(f"{b}.norm2", ((N, VD), dt), ((N, VD), dt))
            E.enter(f"{b}.mlp", inputs=[("x", (N, VD), dt)])
            E.leaf(f"{b}.mlp.fc1", ((N, VD), dt), ((N, 4 * VD), dt))
            E.leaf(f"{b}.mlp.act", ((N, 4 * VD), dt), ((N, 4 * VD), dt))
            E.leaf(f"{b}.mlp.fc2", ((N, 4 * VD), dt), ((N, VD), dt))
            E.exit(outputs=[("out", (N, VD), dt)])
            E.exit(outputs=[("out", (N, VD), dt)])
        R = c.merger_rows
        E.enter("model.visual.merger", inputs=[("x", (N, VD), dt)])
        E.leaf("model.visual.merger.ln_q", ((N, VD), dt), ((N, VD), dt))
        E.reshape("view", [(N, VD)], (R, 4 * VD), dt, f"(-1, {4 * VD})", "vision")
        E.enter("model.visual.merger.mlp", inputs=[("input", (R, 4 * VD), dt)])
        E.leaf("model.visual.merger.mlp.0", ((R, 4 * VD), dt), ((R, 4 * VD), dt))
        E.leaf("model.visual.merger.mlp.1", ((R, 4 * VD), dt), ((R, 4 * VD), dt))
        E.leaf("model.visual.merger.mlp.2", ((R, 4 * VD), dt), ((R, D), dt))
        E.exit(outputs=[("out", (R, D), dt)])
        E.probe("merger_rows", "out", (R, D), dt, None, f'{{"rows": {R}}}')
        E.exit(outputs=[("out", (R, D), dt)])
        E.exit(outputs=[("out", (R, D), dt)])
        E.reshape("masked_scatter", [(B, L_tok, D), (B, L_tok, D), (R, D)], (B, L_tok, D),
                  f"{dt} bool {dt}", "", "model")
    # ---- text model ----
    pos_shape = (4, B, q) if c.rope == "mrope" else (B, q)
    lm_kw = [("attention_mask", (B, K), "int64"), ("position_ids", pos_shape, "int64"),
             ("inputs_embeds", (B, q, D), dt)]
    E.enter("model.language_model", kwargs=lm_kw)
    E.probe("attention_mask", "attention_mask", (B, K), "int64", "mask2d", '{"style": "int", "dtype": "int64"}')
    E.probe("position_ids", "position_ids", pos_shape, "int64", "pos4" if c.rope == "mrope" else "pos1",
            "{pos4_info}" if c.rope == "mrope" else "{pos1_info}")
    E.probe("cache", "cache", (c.n_layers,), "int64", "cache0", "{cache0_info}")
    # mask construction
    E.reshape("expand", [(B, K)], (B, 1, q, KM), "int64", f"({B}, 1, {{q}}, {{KM}})", "mask")
    rot_pos = (3, B, q) if c.rope == "mrope" else (B, q)
    E.enter("model.language_model.rotary_emb", inputs=[("x", (B, q, D), dt), ("position_ids", rot_pos, "int64")])
    E.probe("position_ids", "position_ids", rot_pos, "int64", "pos3" if c.rope == "mrope" else "rope1",
            "{pos3_info}" if c.rope == "mrope" else "{rope1_info}")
    E.probe("rope_positions", "position_ids", rot_pos, "int64", "pos3" if c.rope == "mrope" else "rope1",
            "{pos3_info}" if c.rope == "mrope" else "{rope1_info}")
    cs = (3, B, q, hd) if c.rope == "mrope" else (B, q, hd)
    E.exit(outputs=[("out[0]", cs, "float32"), ("out[1]", cs, "float32")])
    mask_kw = ("attention_mask", (B, 1, q, KM), mdt)
    for li in range(c.n_layers):
        Lp = f"model.language_model.layers.{li}"
        qin = q + 1 if faults.get("seq_len") == (step, li) else q
        lkw = [mask_kw]
        if c.rope == "mrope":
            lkw.append(("position_ids", (B, q), "int64"))
        lkw += [("position_embeddings[0]", (B, q, hd), "float32"), ("position_embeddings[1]", (B, q, hd), "float32")]
        E.enter(Lp, inputs=[("hidden_states", (B, qin, D), dt, f"h{li}")], kwargs=lkw)
        E.probe("attention_mask", "attention_mask", (B, 1, q, KM), mdt, "mask4", "{mask4_info}")
        if c.rope == "mrope":
            E.probe("position_ids", "position_ids", (B, q), "int64", "text_pos", "{text_pos_info}")
        E.probe("cache", "cache", (c.n_layers,), "int64", f"cache_l{li}", f"{{cache_l{li}_info}}")
        E.leaf(f"{Lp}.input_layernorm", ((B, q, D), dt), ((B, q, D), dt, f"h{li}"), in_name="hidden_states")
        E.enter(f"{Lp}.self_attn", inputs=[("hidden_states", (B, q, D), dt, f"h{li}")], kwargs=[mask_kw])
        E.probe("attention_mask", "attention_mask", (B, 1, q, KM), mdt, "mask4", "{mask4_info}")
        E.probe("cache", "cache", (c.n_layers,), "int64", f"cache_l{li}", f"{{cache_l{li}_info}}")
        E.leaf(f"{Lp}.self_attn.q_proj", ((B, q, D), dt), ((B, q, H * hd), dt, f"h{li}"))
        E.leaf(f"{Lp}.self_attn.k_proj", ((B, q, D), dt), ((B, q, KVH * hd), dt, f"h{li}"))
        E.leaf(f"{Lp}.self_attn.v_proj", ((B, q, D), dt), ((B, q, KVH * hd), dt, f"h{li}"))
        E.reshape("view", [(B, q, H * hd)], (B, q, H, hd), dt, "({B}, {q}, -1, %d)" % hd, "attn")
        E.reshape("transpose", [(B, q, H, hd)], (B, H, q, hd), dt, "(1, 2)", "attn")
        E.reshape("view", [(B, q, KVH * hd)], (B, q, KVH, hd), dt, "({B}, {q}, -1, %d)" % hd, "attn")
        E.reshape("transpose", [(B, q, KVH, hd)], (B, KVH, q, hd), dt, "(1, 2)", "attn")
        E.reshape("view", [(B, q, KVH * hd)], (B, q, KVH, hd), dt, "({B}, {q}, -1, %d)" % hd, "attn")
        E.reshape("transpose", [(B, q, KVH, hd)], (B, KVH, q, hd), dt, "(1, 2)", "attn")
        if c.rope == "mrope":
            E.reshape("split", [(3, B, q, hd)], (3, B, q, 2), "float32", "([2, 3, 3, 2, 3, 3], dim=-1)", "rope",
                      n_out=6)
            E.reshape("cat", [(B, q, 2), (B, q, 3), (B, q, 3)], (B, q, hd), "float32 float32 float32",
                      "dim=-1", "rope")
            E.reshape("unsqueeze", [(B, q, hd)], (B, 1, q, hd), "float32", "(1,)", "rope")
        E.reshape("cat", [(B, H, q, hd // 2), (B, H, q, hd // 2)], (B, H, q, hd), f"{dt} {dt}", "dim=-1",
                  "rot_half")
        E.reshape("cat", [(B, KVH, q, hd // 2), (B, KVH, q, hd // 2)], (B, KVH, q, hd), f"{dt} {dt}", "dim=-1",
                  "rot_half")
        if faults.get("cat_promotion") and li == 0:
            E.reshape("cat", [(B, KVH, q, hd), (B, KVH, q, hd)], (B, KVH, 2 * q, hd), "bfloat16 float16",
                      "dim=-2", "attn", out_dtype="float32")
        twice = faults.get("cache_twice") == (step, li)
        for _ in range(2 if twice else 1):
            E.reshape("cat", [(B, KVH, C, hd), (B, KVH, q, hd)], (B, KVH, K, hd), f"{dt} {dt}", "dim=-2", "cache")
            E.reshape("cat", [(B, KVH, C, hd), (B, KVH, q, hd)], (B, KVH, K, hd), f"{dt} {dt}", "dim=-2", "cache")
        for _ in range(2):
            E.reshape("expand", [(B, KVH, 1, K, hd)], (B, KVH, H // KVH, K, hd), dt,
                      "(%d, %d, %d, {K}, %d)" % (B, KVH, H // KVH, hd), "repeat_kv")
            E.reshape("reshape", [(B, KVH, H // KVH, K, hd)], (B, H, K, hd), dt,
                      "(%d, %d, {K}, %d)" % (B, H, hd), "repeat_kv")
        E.reshape("transpose", [(B, H, q, hd)], (B, q, H, hd), dt, "(1, 2)", "attn")
        E.reshape("reshape", [(B, q, H, hd)], (B, q, H * hd), dt, "({B}, {q}, -1)", "attn")
        oo = D + 1 if faults.get("shape") == (step, li) else D
        E.leaf(f"{Lp}.self_attn.o_proj", ((B, q, H * hd), dt), ((B, q, oo), dt, f"h{li}"))
        E.exit(outputs=[("out[0]", (B, q, oo), dt, f"h{li}"), ("out[1]", (B, H, q, K), dt, f"h{li}")])
        E.leaf(f"{Lp}.post_attention_layernorm", ((B, q, D), dt, f"h{li}"), ((B, q, D), dt, f"h{li}"),
               in_name="hidden_states")
        E.enter(f"{Lp}.mlp", inputs=[("x", (B, q, D), dt, f"h{li}")])
        E.leaf(f"{Lp}.mlp.gate_proj", ((B, q, D), dt, f"h{li}"), ((B, q, I), dt, f"h{li}"))
        E.leaf(f"{Lp}.mlp.act_fn", ((B, q, I), dt, f"h{li}"), ((B, q, I), dt, f"h{li}"))
        E.leaf(f"{Lp}.mlp.up_proj", ((B, q, D), dt, f"h{li}"), ((B, q, I), dt, f"h{li}"))
        E.leaf(f"{Lp}.mlp.down_proj", ((B, q, I), dt, f"h{li}"), ((B, q, D), dt, f"d{li}"))
        E.exit(outputs=[("out", (B, q, D), dt, f"d{li}")])
        E.exit(outputs=[("out", (B, q, D), dt, f"d{li}")])
    E.leaf("model.language_model.norm", ((B, q, D), dt, "end"), ((B, q, D), dt, "end"), in_name="hidden_states")
    E.exit(outputs=[("out.last_hidden_state", (B, q, D), dt, "end")])
    E.exit(outputs=[("out.last_hidden_state", (B, q, D), dt, "end")])
    E.leaf("lm_head", ((B, q, D), dt, "end"), ((B, q, c.vocab), dt, "end"))
    E.exit(outputs=[("out.logits", (B, q, c.vocab), dt, "end")])
    del pos_rows


def _positions(c: _Cfg, faults: dict, step: int, q: int, C: int) -> dict[str, np.ndarray]:
    """Text (KV-index) and rope positions of a step: {"text": [B,q], "rope": [3,B,q] or [B,q]}."""
    B = c.batch
    text = np.broadcast_to(np.arange(C, C + q, dtype=np.int64), (B, q)).copy()
    if c.rope == "mrope":
        if step == 0:
            a, gt, gh, gw = c.img_start, 1, c.grid[1] // c.merge, c.grid[2] // c.merge
            n_img = gt * gh * gw
            pos = np.zeros((3, q), np.int64)
            pos[:, :a] = np.arange(a)
            if faults.get("fallback_1d"):
                pos[:, :] = np.arange(q)
            else:
                hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
                pos[0, a:a + n_img] = a
                pos[1, a:a + n_img] = a + hh.ravel()
                pos[2, a:a + n_img] = a + ww.ravel()
                m = pos[:, :a + n_img].max() + 1
                pos[:, a + n_img:] = m + np.arange(q - a - n_img)
            rope = np.broadcast_to(pos[:, None, :], (3, B, q)).copy()
        else:
            delta = c.rope_delta
            rope = np.broadcast_to(text + delta, (3, B, q)).copy()
            if faults.get("pos_shift"):
                rope += faults["pos_shift"]
        return {"text": text, "rope": rope}
    rope = text.copy()
    comp = text.copy()
    if faults.get("kv_quirk") is not None and step > 0:
        comp = np.broadcast_to(np.arange(q, dtype=np.int64) + faults["kv_quirk"], (B, q)).copy()
    if faults.get("pos_shift") and step > 0:
        rope = rope + faults["pos_shift"]
        comp = comp + faults["pos_shift"]
    return {"text": comp, "rope": rope}


def _rows_info(a: np.ndarray) -> str:
    if a.ndim == 3:
        return json.dumps({"rows": [[int(r.min()), int(r.max())] for r in a]})
    return json.dumps({"rows": [[int(a.min()), int(a.max())]]})


def cached_trace(path, *args: Any, **kwargs: Any) -> tuple[Path, bool]:
    """``make_trace(path, ...)`` unless ``path`` already holds a trace of the current format
    (benchmarks cache their big traces across runs). Returns (path, written)."""
    path = Path(path)
    if path.exists():
        try:
            with open_trace(path) as t:
                if t.format_version == FORMAT_VERSION:
                    return path, False
        except Exception:  # noqa: BLE001 - unreadable: write it again
            pass
        path.unlink()
    return make_trace(path, *args, **kwargs), True


def make_trace(path, n_events: int = 1_000_000, *, n_steps: int | None = None, n_layers: int = 28,
               n_vision: int = 4, batch: int = 1, prompt_tokens: int = 24, image_grid: tuple = (1, 16, 16),
               merge: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 256,
               vocab: int = 1024, dtype: str = "bfloat16", rope: str = "mrope", family: str | None = None,
               seed: int = 0, faults: dict | None = None, payloads: bool = False,
               status: str = "complete") -> Path:
    """Write a synthetic trace to ``path`` and return it.

    ``n_events`` module calls are written (whole steps: the count is reached or passed by less
    than one step), unless ``n_steps`` is given. ``rope`` is ``"mrope"`` (Qwen2-VL-style
    ``[4,B,S]`` positions reaching the text model) or ``"1d"``. See the module docstring for
    ``faults``. With ``payloads=True`` the ``lm_head`` logits are saved as payloads.
    """
    faults = dict(faults or {})
    path = Path(path)
    if family is None:
        family = "qwen2_vl" if rope == "mrope" else "mqwen"
    gt, gh, gw = image_grid
    n_patches = gt * gh * gw
    n_img = n_patches // (merge * merge)
    img_start = 3
    c = _Cfg(batch=batch, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=hidden // heads,
             intermediate=intermediate, vocab=vocab, dtype=dtype, n_layers=n_layers, n_vision=n_vision,
             rope=rope, grid=image_grid, merge=merge, n_patches=n_patches, patch_dim=1176,
             vision_hidden=64, vision_heads=4, merger_rows=n_img + int(faults.get("image_rows", 0)),
             img_start=img_start)
    L0 = prompt_tokens + n_img
    # Rope delta: prefill max position + 1 - L0
    if rope == "mrope" and not faults.get("fallback_1d"):
        c.rope_delta = (img_start + max(gh, gw) // merge) - img_start - n_img
        c.rope_delta = int(img_start + max(gh // merge, gw // merge) - (img_start + n_img))
    else:
        c.rope_delta = 0
    image_token_id = 151655
    meta = {
        "vlmscope": "0.1.0", "torch": "synthetic", "transformers": "synthetic", "device": "cpu",
        "dtype": dtype, "attn_implementation": "eager", "model": f"synthetic-{family}", "family": family,
        "model_class": "Qwen2VLForConditionalGeneration", "prompt": "synthetic", "seed": seed,
        "generation": {"max_new_tokens": None, "do_sample": False},
        "decoder_layers": "model.language_model.layers", "text_model": "model.language_model",
        "vision_model": "model.visual", "merger": "model.visual.merger", "image_token_id": image_token_id,
        "num_key_value_heads": kv_heads, "num_attention_heads": heads, "warnings": [], "synthetic": True,
    }
    config = {"model_type": family, "image_token_id": image_token_id,
              "vision_config": {"spatial_merge_size": merge},
              "text_config": {"num_hidden_layers": n_layers, "num_attention_heads": heads,
                              "num_key_value_heads": kv_heads, "hidden_size": hidden,
                              "rope_parameters": {"mrope_section": [2, 3, 3]} if rope == "mrope" else {}}}
    w = TraceWriter(path, meta=meta, config_json=json.dumps(config))
    S = _Strings(w)
    mod_list = _module_table(n_layers, n_vision)
    mods = {p: i for i, (p, _) in enumerate(mod_list)}
    mrows = np.zeros(len(mod_list), MODULE_DTYPE)
    for i, (p, cls) in enumerate(mod_list):
        mrows[i]["path"] = w.intern(p)
        mrows[i]["cls"] = w.intern(cls)
        mrows[i]["depth"] = 0 if p == "" else p.count(".") + 1
        parent = "" if "." not in p else p.rsplit(".", 1)[0]
        mrows[i]["parent"] = -1 if p == "" else mods[parent]
    w.set_modules(mrows)

    # Templates: the prefill (real numbers) and one decode step (sentinels).
    def build(prefill: bool, step: int, q, C, K, KM) -> dict:
        E = _Emitter(mods, S)
        _emit_step(E, c, prefill, q, C, K, KM, faults, step)
        return _arrays(E)

    decode_tpl = None
    rng_base = np.random.default_rng(seed)
    module_scale = rng_base.uniform(0.5, 2.0, size=len(mod_list))

    # pending blocks, flushed in batches
    pend: dict[str, list[np.ndarray]] = {k: [] for k in ("steps", "events", "tensors", "reshapes", "probes")}
    pend_data: list[np.ndarray] = []
    counts = {k: 0 for k in pend}
    data_off = 0
    ev_total = 0
    step = 0
    nan_from: tuple[int, int] | None = faults.get("nan")
    drift_from: tuple[int, int] | None = faults.get("drift")
    cache_len = np.zeros(n_layers, np.int64)  # per-layer real cache length

    def flush() -> None:
        for k in ("events", "tensors", "reshapes", "probes", "steps"):
            if pend[k]:
                w.append(k, np.concatenate(pend[k]))
                pend[k] = []
        if pend_data:
            w.append_probe_data(np.concatenate(pend_data))
            pend_data.clear()
        w.end_step()

    while True:
        if n_steps is not None and step >= n_steps:
            break
        if n_steps is None and ev_total >= n_events:
            break
        prefill = step == 0
        q = L0 if prefill else 1
        C = int(cache_len[0])
        K = C + q
        KM = K + int(faults.get("mask_len", 0))
        special = prefill or any(
            isinstance(v, tuple) and v[0] == step for v in faults.values()
        )
        if special:
            arr = build(prefill, step, q, C, K, KM)
        else:
            if decode_tpl is None:
                decode_tpl = build(False, 1, 1, _C, _K, _KM)
            arr = decode_tpl
        ev = arr["events"].copy()
        te = arr["tensors"].copy()
        rs = arr["reshapes"].copy()
        pr = arr["probes"].copy()
        e0, t0, r0, p0 = counts["events"], counts["tensors"], counts["reshapes"], counts["probes"]
        # ---- events
        ev["step"] = step
        ev["parent"] = np.where(ev["parent"] >= 0, ev["parent"] + e0, -1)
        ev["tensor_start"] += t0
        rng = np.random.default_rng([seed, step])
        ev["dur_us"] = rng.uniform(5, 50, len(ev)).astype(np.float32)
        # ---- tensors
        tags = arr["tensor_tags"]
        te["step"] = step
        te["event"] += e0
        for col in ("shape",):
            sh = te[col]
            sh[sh == _K] = K
            sh[sh == _C] = C
            sh[sh == _KM] = KM
        nd = te["ndim"]
        dims = np.where(np.arange(8)[None, :] < nd[:, None], te["shape"], 1)
        te["numel"] = np.prod(dims, axis=1)
        n = len(te)
        scale = module_scale[ev["module"][te["event"] - e0]]
        # deterministic stats: same for the same (seed, step) except where faults apply
        mean = rng.normal(0, 0.05, n) * scale
        std = np.abs(rng.normal(1.0, 0.1, n)) * scale
        te["mean"], te["std"] = mean, std
        te["min"] = mean - 4 * std
        te["max"] = mean + 4 * std
        te["absmax"] = np.maximum(np.abs(te["min"]), np.abs(te["max"]))
        te["nan"] = 0
        te["inf"] = 0
        te["payload"] = -1
        is_int = np.isin(te["dtype"], [w.intern("int64"), w.intern("int32")])
        te["mean"][is_int] = np.round(te["mean"][is_int])
        if drift_from is not None and step >= drift_from[0]:
            hit = _downstream(tags, drift_from[1], n_layers, include_end=True,
                              whole=step > drift_from[0])
            te["mean"][hit] += 0.5 * te["std"][hit]
            te["std"][hit] *= 1.3
            te["max"][hit] *= 1.3
            te["absmax"][hit] *= 1.3
        if nan_from is not None and step >= nan_from[0]:
            hit = _downstream(tags, nan_from[1], n_layers, include_end=True, whole=step > nan_from[0])
            te["nan"][hit] = te["numel"][hit]
            for f in ("min", "max", "mean", "std", "absmax"):
                te[f][hit] = np.nan
        # ---- reshapes
        rs["step"] = step
        valid = rs["event"] >= 0
        rs["event"] = np.where(valid, rs["event"] + e0, -1)
        for col in ("in_shape", "out_shape"):
            sh = rs[col]
            sh[sh == _K] = K
            sh[sh == _C] = C
            sh[sh == _KM] = KM
        # ---- probes and their data
        pos = _positions(c, faults, step, q, C)
        blobs: dict[str, np.ndarray] = {}
        B = batch
        if prefill:
            ids = rng.integers(0, 150000, size=(B, q)).astype(np.int64)
            ids[ids == image_token_id] = 1
            ids[:, img_start:img_start + n_img] = image_token_id
        else:
            ids = rng.integers(0, 150000, size=(B, q)).astype(np.int64)
            ids[ids == image_token_id] = 1
        blobs["input_ids"] = ids
        blobs["mask2d"] = np.ones((B, C + q), np.int64)
        if rope == "mrope":
            pos4 = np.concatenate([pos["text"][None], pos["rope"]], axis=0)
            blobs["pos4"] = pos4
            blobs["pos3"] = pos["rope"]
            blobs["text_pos"] = pos["text"]
        else:
            blobs["pos1"] = pos["text"]
            blobs["rope1"] = pos["rope"]
        if prefill:
            blobs["grid"] = np.array([[gt, gh, gw]], np.int64)
            blobs["mmtt"] = (ids == image_token_id).astype(np.int64)
        # mask bits: allowed = causal over keys [0, C+q)
        Kd = KM
        qi = np.arange(q)[:, None]
        kj = np.arange(Kd)[None, :]
        allowed = np.broadcast_to(kj <= (C + qi), (B, 1, q, Kd))
        blobs["mask4_bits"] = np.packbits(allowed.ravel())
        # cache lengths as each layer sees them (layers < li already updated)
        lens_before = cache_len.copy()
        blobs["cache0"] = lens_before.copy()
        grow = np.full(n_layers, q, np.int64)
        if isinstance(faults.get("cache_twice"), tuple) and faults["cache_twice"][0] == step:
            grow[faults["cache_twice"][1]] = 2 * q
        for li in range(n_layers):
            cur = lens_before.copy()
            cur[:li] += grow[:li]
            blobs[f"cache_l{li}"] = cur
        cache_len = lens_before + grow
        # infos
        infos = {
            "input_ids_info": json.dumps({"image_token_id": image_token_id,
                                          "spans": [[b, img_start, img_start + n_img] for b in range(B)]
                                          if prefill else [],
                                          "image_tokens": B * n_img if prefill else 0}),
            "grid_info": json.dumps({"min": 1, "max": int(max(image_grid))}),
            "mask4_info": json.dumps({"style": "additive", "dtype": faults.get("mask_dtype", dtype),
                                      "fill": _FINFO_MIN.get(faults.get("mask_dtype", dtype), -1e38)}),
            "pos4_info": _rows_info(blobs["pos4"]) if rope == "mrope" else "",
            "pos3_info": _rows_info(blobs["pos3"]) if rope == "mrope" else "",
            "text_pos_info": _rows_info(pos["text"]),
            "pos1_info": _rows_info(pos["text"]),
            "rope1_info": json.dumps({"min": int(pos["rope"].min()), "max": int(pos["rope"].max())}),
            "cache0_info": _cache_info(blobs["cache0"], B, kv_heads, c.head_dim, dtype),
        }
        for li in range(n_layers):
            infos[f"cache_l{li}_info"] = _cache_info(blobs[f"cache_l{li}"], B, kv_heads, c.head_dim, dtype)
        infos.update({"B": B, "q": q, "K": K, "C": C, "KM": KM})
        # per-step template strings
        tpl_ids = np.array([w.intern(t.format(**infos)) for t in S.templates] or [0], np.int64)
        for tbl, cols in ((rs, ("in_shapes", "args")), (pr, ("info",))):
            for col in cols:
                v = tbl[col]
                neg = v < 0
                v[neg] = tpl_ids[-v[neg] - 1]
        # probe data layout
        keys = arr["probe_blobs"]
        uniq = sorted({k for k in keys if k is not None})
        offs, lens, chunks = {}, {}, []
        o = data_off
        for k in uniq:
            if k == "mask4":
                b = blobs["mask4_bits"].view(np.uint8)
            elif k == "mask2d":
                b = np.packbits(blobs["mask2d"].astype(bool).ravel())
            else:
                b = np.ascontiguousarray(blobs[k], dtype=np.int64).view(np.uint8).ravel()
            offs[k], lens[k] = o, len(b)
            chunks.append(b)
            o += len(b)
        data_off = o
        pend_data.extend(chunks)
        pr["step"] = step
        pr["event"] += e0
        pr["data_off"] = [offs.get(k, 0) if k is not None else 0 for k in keys]
        pr["data_len"] = [lens.get(k, 0) if k is not None else 0 for k in keys]
        pr["enc"] = [ENC_NONE if k is None else (ENC_BITS if k in ("mask4", "mask2d") else ENC_INT64)
                     for k in keys]
        for i, k in enumerate(keys):   # shapes of value probes follow the data
            if k in blobs and k not in ("mask4", "mask2d"):
                shp = blobs[k].shape
                pr["ndim"][i] = len(shp)
                pr["shape"][i] = pad_shape(shp)
        pm = pr["shape"]
        pm[pm == _K] = K
        pm[pm == _C] = C
        pm[pm == _KM] = KM
        # payloads
        if payloads:
            lm = np.nonzero(ev["module"] == mods["lm_head"])[0]
            for j in lm:
                rows = np.arange(ev["tensor_start"][j], ev["tensor_start"][j] + ev["tensor_count"][j]) - t0
                out = rows[te["role"][rows] == 2]
                for r in out:
                    shp = tuple(te["shape"][r][: te["ndim"][r]])
                    prng = np.random.default_rng([seed, step, 7])
                    val = prng.normal(0, 1, size=shp).astype(np.float32)
                    if drift_from is not None and step >= drift_from[0]:
                        val = val + 0.5
                    te["payload"][r] = w.add_payload(val, module="lm_head", step=step, name="out.logits",
                                                     dtype=dtype)
        # ---- step row
        st = np.zeros(1, STEP_DTYPE)
        s0 = st[0]
        s0["step"], s0["kind"], s0["status"] = step, 0 if prefill else 1, 0
        s0["input_len"], s0["q_len"] = q, q
        s0["cache_before"], s0["cache_after"] = C, int(cache_len[0])
        rp = pos["rope"]
        if rope == "mrope":
            s0["pos_rows"] = 3
            s0["pos_min"] = rp.reshape(3, -1).min(1)
            s0["pos_max"] = rp.reshape(3, -1).max(1)
        else:
            s0["pos_rows"] = 1
            s0["pos_min"] = [rp.min(), -1, -1]
            s0["pos_max"] = [rp.max(), -1, -1]
        s0["mask_ndim"] = 4
        s0["mask_shape"] = [B, 1, q, KM]
        s0["image_tokens"] = B * n_img if prefill else 0
        s0["event_start"], s0["event_count"] = e0, len(ev)
        s0["tensor_start"], s0["tensor_count"] = t0, len(te)
        s0["reshape_start"], s0["reshape_count"] = r0, len(rs)
        s0["probe_start"], s0["probe_count"] = p0, len(pr)
        s0["wall_ms"] = float(ev["dur_us"][0]) / 10
        for k, a in (("events", ev), ("tensors", te), ("reshapes", rs), ("probes", pr), ("steps", st)):
            pend[k].append(a)
            counts[k] += len(a)
        ev_total += len(ev)
        step += 1
        if step % 256 == 0:
            flush()
    flush()
    return w.close(status)


def _cache_info(lens: np.ndarray, B: int, kvh: int, hd: int, dtype: str) -> str:
    return json.dumps({"type": "DynamicCache", "layout": "BHSD", "lengths": [int(x) for x in lens],
                       "key_shape": [B, kvh, int(lens[0]), hd], "dtype": dtype, "n_layers": len(lens)})


def _downstream(tags: np.ndarray, layer: int, n_layers: int, include_end: bool, whole: bool) -> np.ndarray:
    """Tensors whose values depend on layer ``layer``'s down_proj output (tags from the emitter)."""
    hit = np.zeros(len(tags), bool)
    if whole:
        # later steps: every hidden state of every layer is affected (through the cache)
        hit |= np.char.startswith(tags.astype(str), "h") | np.char.startswith(tags.astype(str), "d")
    want = {f"d{layer}"} | {f"h{i}" for i in range(layer + 1, n_layers)} | {f"d{i}" for i in range(layer + 1, n_layers)}
    if include_end:
        want.add("end")
    hit |= np.isin(tags, list(want))
    return hit


def _arrays(E: _Emitter) -> dict:
    ev = np.zeros(len(E.events), EVENT_DTYPE)
    if E.events:
        a = np.array([tuple(r) for r in E.events], dtype=[("seq", "i8"), ("end_seq", "i8"), ("module", "i8"),
                                                         ("nth", "i8"), ("depth", "i8"), ("parent", "i8"),
                                                         ("tensor_start", "i8"), ("tensor_count", "i8")])
        for f in a.dtype.names:
            ev[f] = a[f]
    te = np.zeros(len(E.tensors), TENSOR_DTYPE)
    tags = np.array([r[6] for r in E.tensors], dtype=object) if E.tensors else np.zeros(0, object)
    for i, r in enumerate(E.tensors):
        te[i]["event"], te[i]["role"], te[i]["name"], te[i]["ndim"] = r[0], r[1], r[2], r[3]
        te[i]["shape"] = r[4]
        te[i]["dtype"] = r[5]
        te[i]["device"] = E.S("cpu")
    rs = np.zeros(len(E.reshapes), RESHAPE_DTYPE)
    names = ["seq", "event", "module", "op", "nth", "n_in", "in_ndim", "in_shape", "in_shapes", "in_dtypes",
             "args", "n_out", "out_ndim", "out_shape", "out_dtype", "site_file", "site_line", "site_func"]
    for i, r in enumerate(E.reshapes):
        for f, v in zip(names, r):
            rs[i][f] = v
    pr = np.zeros(len(E.probes), PROBE_DTYPE)
    blobs = []
    for i, r in enumerate(E.probes):
        seq, ev_i, m, kind, name, nd, shp, dt, blob, info = r
        pr[i]["seq"], pr[i]["event"], pr[i]["module"], pr[i]["kind"], pr[i]["name"] = seq, ev_i, m, kind, name
        pr[i]["ndim"], pr[i]["shape"], pr[i]["dtype"], pr[i]["info"] = nd, shp, dt, info
        blobs.append(blob)
    return {"events": ev, "tensors": te, "reshapes": rs, "probes": pr, "tensor_tags": tags.astype(str),
            "probe_blobs": blobs}


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import time

    ap = argparse.ArgumentParser(description="write a synthetic vlmscope trace")
    ap.add_argument("out")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rope", default="mrope")
    a = ap.parse_args()
    t = time.perf_counter()
    p = make_trace(a.out, a.events, n_layers=a.layers, rope=a.rope)
    print(f"{p} written in {time.perf_counter() - t:.1f}s, {p.stat().st_size / 1e6:.0f} MB")
