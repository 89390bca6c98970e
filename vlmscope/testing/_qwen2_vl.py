"""The fake Qwen2-VL forward of the generate traces (:func:`vlmscope.testing.make_trace`).

:func:`emit_step` drives an :class:`~vlmscope.testing._writer.Emitter` through one step: the
root and model calls with their probes, the vision tower (prefill only), the text model and its
decoder layers (attention with its reshapes, MLP), the LM head. Probe values are named by keys
(``"input_ids"``, ``"mask4"``, ``"cache_l3"``, ...) and infos by ``{field}`` templates, both
filled per step by :mod:`vlmscope.testing._synth_values`. Shape faults apply here.
"""

from __future__ import annotations

from typing import Any

from vlmscope.testing._writer import Emitter

_MODELING = "transformers/models/qwen2_vl/modeling_qwen2_vl.py"
_SITES = {
    "attn": (_MODELING, "forward"),
    "rope": (_MODELING, "apply_multimodal_rotary_pos_emb"),
    "rot_half": (_MODELING, "rotate_half"),
    "cache": ("transformers/cache_utils.py", "update"),
    "repeat_kv": (_MODELING, "repeat_kv"),
    "mask": ("transformers/masking_utils.py", "sdpa_mask"),
    "model": (_MODELING, "forward"),
    "vision": (_MODELING, "forward"),
}


def _op(E: Emitter, op: str, ins, out, dtypes: str, args: str, site: str, out_dtype: str | None = None,
        n_out: int = 1) -> None:
    """A reshape: ``dtypes`` are the inputs' (the first is the output's unless ``out_dtype``);
    ``site`` a key of _SITES (the line is made up from the op)."""
    f, fn = _SITES[site]
    E.reshape(op, ins, out, args=args, in_dtypes=dtypes, out_dtype=out_dtype or dtypes.split()[0],
              site=(f, None, fn), n_out=n_out)


def emit_step(E: Emitter, c: Any, prefill: bool, q: int, C, K, KM, faults: dict, step: int) -> None:
    """Emit one step. ``q`` is the embedding-space length; C/K/KM the cache length before,
    the key length and the mask's key length (ints, or the sentinels in the decode template)."""
    B, D, dt = c.batch, c.hidden, c.dtype
    mrope, mmtt = c.rope == "mrope", c.rope == "mrope" and not faults.get("fallback_1d")
    root_kw = [("input_ids", (B, q), "int64"), ("attention_mask", (B, K), "int64")]
    if mrope:
        root_kw.append(("position_ids", (4, B, q), "int64"))
    if prefill:
        root_kw += [("pixel_values", (c.n_patches, c.patch_dim), dt, "", "pix"), ("image_grid_thw", (1, 3), "int64")]
        if mmtt:
            root_kw.append(("mm_token_type_ids", (B, q), "int64"))
    E.enter("", kwargs=root_kw)
    E.probe("input_ids", "input_ids", (B, q), "int64", "{input_ids_info}", "input_ids")
    E.probe("attention_mask", "attention_mask", (B, K), "int64", '{"style": "int", "dtype": "int64"}', "mask2d")
    if mrope:
        E.probe("position_ids", "position_ids", (4, B, q), "int64", "{pos4_info}", "pos4")
    if prefill:
        E.probe("image_grid_thw", "image_grid_thw", (1, 3), "int64", "{grid_info}", "grid")
        if mmtt:
            E.probe("mm_token_type_ids", "mm_token_type_ids", (B, q), "int64", '{"min": 0, "max": 1}', "mmtt")
    E.probe("cache", "cache", (c.n_layers,), "int64", "{cache0_info}", "cache0")
    E.enter("model", kwargs=list(root_kw))
    E.probe("input_ids", "input_ids", (B, q), "int64", "{input_ids_info}", "input_ids")
    E.probe("cache", "cache", (c.n_layers,), "int64", "{cache0_info}", "cache0")
    E.leaf("model.language_model.embed_tokens", ((B, q), "int64"), ((B, q, D), dt, "", "emb"))
    if prefill:
        _vision_tower(E, c)
        R = c.merger_rows
        _op(E, "masked_scatter", [(B, q, D), (B, q, D), (R, D)], (B, q, D), f"{dt} bool {dt}", "", "model")
    # the text model's inputs_embeds: embed_tokens' output, or a new tensor once an image is spliced in
    _text_model(E, c, q, C, K, KM, faults, step, embeds="embeds" if prefill else "emb")
    E.exit(outputs=[("out.last_hidden_state", (B, q, D), dt, "end", "final")])
    E.leaf("lm_head", ((B, q, D), dt, "end", "final"), ((B, q, c.vocab), dt, "end", "logits"))
    E.exit(outputs=[("out.logits", (B, q, c.vocab), dt, "end", "logits")])


def _vision_tower(E: Emitter, c: Any) -> None:
    N, VD, dt = c.n_patches, c.vision_hidden, c.dtype
    E.enter("model.visual", inputs=[("hidden_states", (N, c.patch_dim), dt, "", "pix")],
            kwargs=[("grid_thw", (1, 3), "int64")])
    E.probe("image_grid_thw", "grid_thw", (1, 3), "int64", "{grid_info}", "grid")
    E.enter("model.visual.patch_embed", inputs=[("hidden_states", (N, c.patch_dim), dt, "", "pix")])
    _op(E, "view", [(N, c.patch_dim)], (N, 3, 2, 14, 14), dt, "(-1, 3, 2, 14, 14)", "vision")
    E.leaf("model.visual.patch_embed.proj", ((N, 3, 2, 14, 14), dt), ((N, VD, 1, 1, 1), dt))
    _op(E, "view", [(N, VD, 1, 1, 1)], (N, VD), dt, f"(-1, {VD})", "vision")
    E.exit(outputs=[("out", (N, VD), dt, "", "v0")])
    E.leaf("model.visual.rotary_pos_emb", ((N,), "int64"), ((N, VD // c.vision_heads // 2), "float32"),
           in_name="seqlen")
    for i in range(c.n_vision):
        _vision_block(E, c, f"model.visual.blocks.{i}")
    _merger(E, c)
    E.exit(outputs=[("out", (c.merger_rows, c.hidden), dt, "", "img")])


def _vision_block(E: Emitter, c: Any, b: str) -> None:
    """A vision block; ``same`` names (shared sketches): ``v<i>`` its input, ``v<i+1>`` its output."""
    N, VD, vh, dt = c.n_patches, c.vision_hidden, c.vision_heads, c.dtype
    i = int(b.rsplit(".", 1)[1])
    x, n1, n2, f1, ac = f"v{i}", f"{b}.n1", f"{b}.n2", f"{b}.fc1", f"{b}.act"
    E.enter(b, inputs=[("hidden_states", (N, VD), dt, "", x)], kwargs=[("cu_seqlens", (2,), "int32")])
    E.leaf(f"{b}.norm1", ((N, VD), dt, "", x), ((N, VD), dt, "", n1))
    E.enter(f"{b}.attn", inputs=[("hidden_states", (N, VD), dt, "", n1)], kwargs=[("cu_seqlens", (2,), "int32")])
    E.leaf(f"{b}.attn.qkv", ((N, VD), dt, "", n1), ((N, 3 * VD), dt))
    _op(E, "reshape", [(N, 3 * VD)], (N, 3, vh, VD // vh), dt, f"({N}, 3, {vh}, -1)", "vision")
    _op(E, "permute", [(N, 3, vh, VD // vh)], (3, N, vh, VD // vh), dt, "(1, 0, 2, 3)", "vision")
    _op(E, "reshape", [(N, VD)], (N, VD), dt, f"({N}, -1)", "vision")
    E.leaf(f"{b}.attn.proj", ((N, VD), dt), ((N, VD), dt, "", f"{b}.attn"))
    E.exit(outputs=[("out", (N, VD), dt, "", f"{b}.attn")])
    E.leaf(f"{b}.norm2", ((N, VD), dt), ((N, VD), dt, "", n2))
    E.enter(f"{b}.mlp", inputs=[("x", (N, VD), dt, "", n2)])
    E.leaf(f"{b}.mlp.fc1", ((N, VD), dt, "", n2), ((N, 4 * VD), dt, "", f1))
    E.leaf(f"{b}.mlp.act", ((N, 4 * VD), dt, "", f1), ((N, 4 * VD), dt, "", ac))
    E.leaf(f"{b}.mlp.fc2", ((N, 4 * VD), dt, "", ac), ((N, VD), dt, "", f"{b}.mlp"))
    E.exit(outputs=[("out", (N, VD), dt, "", f"{b}.mlp")])
    E.exit(outputs=[("out", (N, VD), dt, "", f"v{i + 1}")])


def _merger(E: Emitter, c: Any) -> None:
    N, VD, R, D, dt = c.n_patches, c.vision_hidden, c.merger_rows, c.hidden, c.dtype
    x = f"v{c.n_vision}"
    E.enter("model.visual.merger", inputs=[("x", (N, VD), dt, "", x)])
    E.leaf("model.visual.merger.ln_q", ((N, VD), dt, "", x), ((N, VD), dt, "", "lnq"))
    _op(E, "view", [(N, VD)], (R, 4 * VD), dt, f"(-1, {4 * VD})", "vision")
    E.enter("model.visual.merger.mlp", inputs=[("input", (R, 4 * VD), dt, "", "m_in")])
    E.leaf("model.visual.merger.mlp.0", ((R, 4 * VD), dt, "", "m_in"), ((R, 4 * VD), dt, "", "m0"))
    E.leaf("model.visual.merger.mlp.1", ((R, 4 * VD), dt, "", "m0"), ((R, 4 * VD), dt, "", "m1"))
    E.leaf("model.visual.merger.mlp.2", ((R, 4 * VD), dt, "", "m1"), ((R, D), dt, "", "img"))
    E.exit(outputs=[("out", (R, D), dt, "", "img")])
    E.probe("merger_rows", "out", (R, D), dt, f'{{"rows": {R}}}')
    E.exit(outputs=[("out", (R, D), dt, "", "img")])


def _text_model(E: Emitter, c: Any, q: int, C, K, KM, faults: dict, step: int, embeds: str = "emb") -> None:
    """The text model; ``embeds`` is the ``same`` name of its ``inputs_embeds`` (shared sketches)."""
    B, D, hd, dt = c.batch, c.hidden, c.head_dim, c.dtype
    mrope = c.rope == "mrope"
    pos_shape = (4, B, q) if mrope else (B, q)
    E.enter("model.language_model", kwargs=[("attention_mask", (B, K), "int64"),
                                            ("position_ids", pos_shape, "int64"),
                                            ("inputs_embeds", (B, q, D), dt, "", embeds)])
    E.probe("attention_mask", "attention_mask", (B, K), "int64", '{"style": "int", "dtype": "int64"}', "mask2d")
    E.probe("position_ids", "position_ids", pos_shape, "int64", *(("{pos4_info}", "pos4") if mrope
                                                                  else ("{pos1_info}", "pos1")))
    E.probe("cache", "cache", (c.n_layers,), "int64", "{cache0_info}", "cache0")
    _op(E, "expand", [(B, K)], (B, 1, q, KM), "int64", f"({B}, 1, {{q}}, {{KM}})", "mask")   # mask construction
    rot_pos = (3, B, q) if mrope else (B, q)
    E.enter("model.language_model.rotary_emb", inputs=[("x", (B, q, D), dt, "", embeds),
                                                       ("position_ids", rot_pos, "int64")])
    rot = ("{pos3_info}", "pos3") if mrope else ("{rope1_info}", "rope1")
    E.probe("position_ids", "position_ids", rot_pos, "int64", *rot)
    E.probe("rope_positions", "position_ids", rot_pos, "int64", *rot)
    cs = (3, B, q, hd) if mrope else (B, q, hd)
    E.exit(outputs=[("out[0]", cs, "float32", "", "cos"), ("out[1]", cs, "float32", "", "sin")])
    for li in range(c.n_layers):
        _decoder_layer(E, c, li, q, C, K, KM, faults, step, embeds)
    x = f"x{c.n_layers}"
    E.leaf("model.language_model.norm", ((B, q, D), dt, "end", x), ((B, q, D), dt, "end", "final"),
           in_name="hidden_states")
    E.exit(outputs=[("out.last_hidden_state", (B, q, D), dt, "end", "final")])


def _decoder_layer(E: Emitter, c: Any, li: int, q: int, C, K, KM, faults: dict, step: int,
                   embeds: str = "emb") -> None:
    """Layer ``li``. Tensor tags: ``h<li>`` the layer's hidden states, ``d<li>`` what depends on
    its ``mlp.down_proj`` output (the drift and nan faults follow them), ``ha<li>`` the hidden
    states that depend on its attention output (the cache fault's sketches follow them). ``same`` names (shared
    sketches): ``x<li>`` its input (``embeds`` for layer 0), ``x<li+1>`` its output, the rotary
    ``cos``/``sin`` every layer gets, and each output passed on to the next call."""
    B, D, I, hd, dt = c.batch, c.hidden, c.intermediate, c.head_dim, c.dtype
    mdt = faults.get("mask_dtype", dt)
    Lp, h, d = f"model.language_model.layers.{li}", f"h{li}", f"d{li}"
    x, ln1, ln2, gate = embeds if li == 0 else f"x{li}", f"{Lp}.ln1", f"{Lp}.ln2", f"{Lp}.gate"
    ha = f"ha{li}"
    qin = q + 1 if faults.get("seq_len") == (step, li) else q
    mask_kw = ("attention_mask", (B, 1, q, KM), mdt)
    lkw = [mask_kw]
    if c.rope == "mrope":
        lkw.append(("position_ids", (B, q), "int64"))
    lkw += [("position_embeddings[0]", (B, q, hd), "float32", "", "cos"),
            ("position_embeddings[1]", (B, q, hd), "float32", "", "sin")]
    E.enter(Lp, inputs=[("hidden_states", (B, qin, D), dt, h, x)], kwargs=lkw)
    E.probe("attention_mask", "attention_mask", (B, 1, q, KM), mdt, "{mask4_info}", "mask4")
    if c.rope == "mrope":
        E.probe("position_ids", "position_ids", (B, q), "int64", "{text_pos_info}", "text_pos")
    E.probe("cache", "cache", (c.n_layers,), "int64", f"{{cache_l{li}_info}}", f"cache_l{li}")
    E.leaf(f"{Lp}.input_layernorm", ((B, q, D), dt, "", x), ((B, q, D), dt, h, ln1), in_name="hidden_states")
    E.enter(f"{Lp}.self_attn", inputs=[("hidden_states", (B, q, D), dt, h, ln1)], kwargs=[mask_kw])
    E.probe("attention_mask", "attention_mask", (B, 1, q, KM), mdt, "{mask4_info}", "mask4")
    E.probe("cache", "cache", (c.n_layers,), "int64", f"{{cache_l{li}_info}}", f"cache_l{li}")
    _attention(E, c, li, q, C, K, faults, step)
    E.leaf(f"{Lp}.post_attention_layernorm", ((B, q, D), dt, ha), ((B, q, D), dt, ha, ln2), in_name="hidden_states")
    E.enter(f"{Lp}.mlp", inputs=[("x", (B, q, D), dt, ha, ln2)])
    E.leaf(f"{Lp}.mlp.gate_proj", ((B, q, D), dt, ha, ln2), ((B, q, I), dt, ha, gate))
    E.leaf(f"{Lp}.mlp.act_fn", ((B, q, I), dt, ha, gate), ((B, q, I), dt, ha))
    E.leaf(f"{Lp}.mlp.up_proj", ((B, q, D), dt, ha, ln2), ((B, q, I), dt, ha))
    E.leaf(f"{Lp}.mlp.down_proj", ((B, q, I), dt, ha), ((B, q, D), dt, d, f"{Lp}.mlp"))
    E.exit(outputs=[("out", (B, q, D), dt, d, f"{Lp}.mlp")])
    E.exit(outputs=[("out", (B, q, D), dt, d, f"x{li + 1}")])


def _attention(E: Emitter, c: Any, li: int, q: int, C, K, faults: dict, step: int) -> None:
    """The body of layer ``li``'s ``self_attn`` (entered by the caller) and its return."""
    B, D, H, KVH, hd, dt = c.batch, c.hidden, c.heads, c.kv_heads, c.head_dim, c.dtype
    Lp, h = f"model.language_model.layers.{li}", f"h{li}"
    x = f"{Lp}.ln1"     # q, k and v project the same tensor: self_attn's input
    E.leaf(f"{Lp}.self_attn.q_proj", ((B, q, D), dt, "", x), ((B, q, H * hd), dt, h))
    E.leaf(f"{Lp}.self_attn.k_proj", ((B, q, D), dt, "", x), ((B, q, KVH * hd), dt, h))
    E.leaf(f"{Lp}.self_attn.v_proj", ((B, q, D), dt, "", x), ((B, q, KVH * hd), dt, h))
    for heads in (H, KVH, KVH):
        _op(E, "view", [(B, q, heads * hd)], (B, q, heads, hd), dt, "({B}, {q}, -1, %d)" % hd, "attn")
        _op(E, "transpose", [(B, q, heads, hd)], (B, heads, q, hd), dt, "(1, 2)", "attn")
    if c.rope == "mrope":
        _op(E, "split", [(3, B, q, hd)], (3, B, q, 2), "float32", "([2, 3, 3, 2, 3, 3], dim=-1)", "rope", n_out=6)
        _op(E, "cat", [(B, q, 2), (B, q, 3), (B, q, 3)], (B, q, hd), "float32 float32 float32", "dim=-1", "rope")
        _op(E, "unsqueeze", [(B, q, hd)], (B, 1, q, hd), "float32", "(1,)", "rope")
    for heads in (H, KVH):
        _op(E, "cat", [(B, heads, q, hd // 2)] * 2, (B, heads, q, hd), f"{dt} {dt}", "dim=-1", "rot_half")
    if faults.get("cat_promotion") and li == 0:
        _op(E, "cat", [(B, KVH, q, hd), (B, KVH, q, hd)], (B, KVH, 2 * q, hd), "bfloat16 float16", "dim=-2",
            "attn", out_dtype="float32")
    for _ in range(4 if faults.get("cache_twice") == (step, li) else 2):   # K and V (twice: the fault)
        _op(E, "cat", [(B, KVH, C, hd), (B, KVH, q, hd)], (B, KVH, K, hd), f"{dt} {dt}", "dim=-2", "cache")
    for _ in range(2):
        _op(E, "expand", [(B, KVH, 1, K, hd)], (B, KVH, H // KVH, K, hd), dt,
            "(%d, %d, %d, {K}, %d)" % (B, KVH, H // KVH, hd), "repeat_kv")
        _op(E, "reshape", [(B, KVH, H // KVH, K, hd)], (B, H, K, hd), dt, "(%d, %d, {K}, %d)" % (B, H, hd),
            "repeat_kv")
    _op(E, "transpose", [(B, H, q, hd)], (B, q, H, hd), dt, "(1, 2)", "attn")
    _op(E, "reshape", [(B, q, H, hd)], (B, q, H * hd), dt, "({B}, {q}, -1)", "attn")
    oo = D + 1 if faults.get("shape") == (step, li) else D
    ha = f"ha{li}"      # what depends on the attention (and so on the cache)
    E.leaf(f"{Lp}.self_attn.o_proj", ((B, q, H * hd), dt), ((B, q, oo), dt, ha, f"{Lp}.attn"))
    E.exit(outputs=[("out[0]", (B, q, oo), dt, ha, f"{Lp}.attn"), ("out[1]", (B, H, q, K), dt, ha)])
