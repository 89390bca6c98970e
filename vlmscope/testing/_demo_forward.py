"""The fake tiny-qwen2.5-vl forward of the demo traces (:func:`vlmscope.testing.write_demo_trace`).

:func:`emit_step` drives the step's :class:`~vlmscope.testing._writer.Emitter` (``d.E``)
through the root call, the model, the vision tower (prefill only), the text model and its
two decoder layers, and the LM head. ``d`` holds the step's numbers (see ``demo.py``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

IMAGE_TOKEN_ID = 151655
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 256, 152064
MODELING = "/site-packages/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py"
F32 = "float32"


def _probe(d: Any, kind: str, name: str, value: np.ndarray | None, info: dict, shape: tuple | None = None,
           dtype: str = "int64") -> None:
    d.E.probe(kind, name, value.shape if value is not None else shape or (), dtype,
              json.dumps(info, sort_keys=True), value)


def _op(d: Any, op: str, ins: list[tuple], out: tuple, args: str, line: int, func: str, dtype: str = F32,
        n_out: int = 1) -> None:
    d.E.reshape(op, ins, out, args=args, in_dtypes=" ".join(dtype for _ in ins), out_dtype=dtype,
                site=(MODELING, line, func), n_out=n_out)


def _x(name: str, *shape: int, dtype: str = F32) -> tuple:
    return (name, shape, dtype)


def emit_step(d: Any) -> None:
    L = d.L
    d.E.call("", [_x("input_ids", 1, L, dtype="int64"), _x("attention_mask", 1, d.total, dtype="int64")],
             [_x("out.logits", 1, L, VOCAB)], lambda: _root(d))


def _input_ids(d: Any) -> None:
    _probe(d, "input_ids", "input_ids", d.step_ids,
           {"image_token_id": IMAGE_TOKEN_ID, "spans": [[0, d.img_start, d.img_start + d.n_img]] if d.prefill
            else [], "image_tokens": d.n_img if d.prefill else 0})


def _root(d: Any) -> None:
    L = d.L
    _input_ids(d)
    _probe(d, "attention_mask", "attention_mask", np.ones((1, d.total), dtype=np.int64).astype(bool),
           {"style": "int", "dtype": "int64", "fill": 0})
    d.E.call("model", [_x("input_ids", 1, L, dtype="int64"), _x("attention_mask", 1, d.total, dtype="int64")],
             [_x("out.last_hidden_state", 1, L, HIDDEN)], lambda: _model(d))
    d.E.call("lm_head", [_x("args[0]", 1, L, HIDDEN)], [_x("out", 1, L, VOCAB)])


def _model(d: Any) -> None:
    L, n_img = d.L, d.n_img
    _input_ids(d)
    d.E.call("model.language_model.embed_tokens", [_x("args[0]", 1, L, dtype="int64")], [_x("out", 1, L, HIDDEN)])
    if d.prefill:
        d.E.call("model.visual", [_x("hidden_states", n_img * 4, 1176), _x("grid_thw", 1, 3, dtype="int64")],
                 [_x("out", n_img, HIDDEN)], lambda: _visual(d))
        _op(d, "masked_scatter", [(1, L, HIDDEN), (1, L, HIDDEN), (n_img, HIDDEN)], (1, L, HIDDEN), "", 1234,
            "forward")
    delta = int(d.pos_prefill.max()) + 1 - d.seq_len
    _probe(d, "rope_deltas", "rope_deltas", np.array([[delta]]), {"min": delta, "max": delta})
    d.E.call("model.language_model", [_x("inputs_embeds", 1, L, HIDDEN), ("position_ids", d.pos.shape, "int64")],
             [_x("out.last_hidden_state", 1, L, HIDDEN)], lambda: _language_model(d))


def _visual(d: Any) -> None:
    n_img, n_patch, E = d.n_img, d.n_img * 4, d.E

    def patch_embed() -> None:
        _op(d, "view", [(n_patch, 1176)], (n_patch, 3, 2, 14, 14), "(-1, 3, 2, 14, 14)", 95, "forward")
        E.call("model.visual.patch_embed.proj", [_x("args[0]", n_patch, 3, 2, 14, 14)],
               [_x("out", n_patch, HIDDEN, 1, 1, 1)])
        _op(d, "view", [(n_patch, HIDDEN, 1, 1, 1)], (n_patch, HIDDEN), "(-1, 64)", 97, "forward")

    _probe(d, "image_grid_thw", "grid_thw", np.array([[1, d.grid[0] * 2, d.grid[1] * 2]]), {"min": 1, "max": 8})
    E.call("model.visual.patch_embed", [_x("args[0]", n_patch, 1176)], [_x("out", n_patch, HIDDEN)], patch_embed)
    E.call("model.visual.rotary_pos_emb", [_x("args[0]", dtype="int64")], [_x("out", 8, 4)])
    for b in range(2):
        bp = f"model.visual.blocks.{b}"
        E.call(bp, [_x("hidden_states", n_patch, HIDDEN)], [_x("out", n_patch, HIDDEN)],
               lambda bp=bp: _vision_block(d, bp, n_patch))
    E.call("model.visual.merger", [_x("args[0]", n_patch, HIDDEN)], [_x("out", n_img, HIDDEN)],
           lambda: _merger(d, n_patch))


def _vision_block(d: Any, bp: str, n_patch: int) -> None:
    E = d.E

    def attn() -> None:
        E.call(f"{bp}.attn.qkv", [_x("args[0]", n_patch, HIDDEN)], [_x("out", n_patch, 3 * HIDDEN)])
        _op(d, "reshape", [(n_patch, 3 * HIDDEN)], (n_patch, 3, HEADS, HEAD_DIM), f"({n_patch}, 3, 4, -1)", 180,
            "forward")
        _op(d, "permute", [(n_patch, 3, HEADS, HEAD_DIM)], (3, n_patch, HEADS, HEAD_DIM), "(1, 0, 2, 3)", 180,
            "forward")
        _op(d, "unbind", [(3, n_patch, HEADS, HEAD_DIM)], (n_patch, HEADS, HEAD_DIM), "(0)", 180, "forward",
            n_out=3)
        E.call(f"{bp}.attn.proj", [_x("args[0]", n_patch, HIDDEN)], [_x("out", n_patch, HIDDEN)])

    E.call(f"{bp}.norm1", [_x("args[0]", n_patch, HIDDEN)], [_x("out", n_patch, HIDDEN)])
    E.call(f"{bp}.attn", [_x("hidden_states", n_patch, HIDDEN)], [_x("out", n_patch, HIDDEN)], attn)
    E.call(f"{bp}.norm2", [_x("args[0]", n_patch, HIDDEN)], [_x("out", n_patch, HIDDEN)])
    E.call(f"{bp}.mlp", [_x("args[0]", n_patch, HIDDEN)], [_x("out", n_patch, HIDDEN)])


def _merger(d: Any, n_patch: int) -> None:
    n_img, E, m = d.n_img, d.E, "model.visual.merger"

    def mlp() -> None:
        E.call(f"{m}.mlp.0", [_x("args[0]", n_img, 4 * HIDDEN)], [_x("out", n_img, 4 * HIDDEN)])
        E.call(f"{m}.mlp.1", [_x("args[0]", n_img, 4 * HIDDEN)], [_x("out", n_img, 4 * HIDDEN)])
        E.call(f"{m}.mlp.2", [_x("args[0]", n_img, 4 * HIDDEN)], [_x("out", n_img, HIDDEN)])

    _probe(d, "merger_rows", "out", None, {"rows": n_img}, shape=(n_img, HIDDEN), dtype=F32)
    E.call(f"{m}.ln_q", [_x("args[0]", n_patch, HIDDEN)], [_x("out", n_patch, HIDDEN)])
    _op(d, "view", [(n_patch, HIDDEN)], (n_img, 4 * HIDDEN), "(-1, 256)", 146, "forward")
    E.call(f"{m}.mlp", [_x("args[0]", n_img, 4 * HIDDEN)], [_x("out", n_img, HIDDEN)], mlp)


def _position_ids(d: Any) -> None:
    pos = d.pos
    _probe(d, "position_ids", "position_ids", pos, {"rows": [[int(pos[k].min()), int(pos[k].max())]
                                                            for k in range(3)]})


def _language_model(d: Any) -> None:
    L, pos, cache = d.L, d.pos, d.cache
    _position_ids(d)
    _probe(d, "cache_position", "cache_position", np.arange(cache, cache + L), {"min": cache, "max": cache + L - 1})
    d.E.call("model.language_model.rotary_emb", [_x("args[0]", 1, L, HIDDEN), ("position_ids", pos.shape, "int64")],
             [_x("out[0]", 3, 1, L, HEAD_DIM), _x("out[1]", 3, 1, L, HEAD_DIM)],
             lambda: _probe(d, "rope_positions", "position_ids", pos[0, 0],
                            {"min": int(pos.min()), "max": int(pos.max())}))
    for layer in range(d.n_layers):
        _decoder_layer(d, layer)
    d.E.call("model.language_model.norm", [_x("args[0]", 1, L, HIDDEN)], [_x("out", 1, L, HIDDEN)])


def _decoder_layer(d: Any, layer: int) -> None:
    L, E, p = d.L, d.E, f"model.language_model.layers.{layer}"
    h = _x("hidden_states", 1, L, HIDDEN)

    def body() -> None:
        E.call(f"{p}.input_layernorm", [h], [_x("out", 1, L, HIDDEN)])
        E.call(f"{p}.self_attn", [h], [_x("out[0]", 1, L, HIDDEN), _x("out[1]", 1, HEADS, L, d.total)],
               lambda: _attention(d, layer))
        E.call(f"{p}.post_attention_layernorm", [h], [_x("out", 1, L, HIDDEN)])
        E.call(f"{p}.mlp", [_x("args[0]", 1, L, HIDDEN)], [_x("out", 1, L, HIDDEN)], lambda: _mlp(d, layer))

    E.call(p, [h, ("position_ids", d.pos.shape, "int64")], [_x("out", 1, L, HIDDEN)], body)


def _attention(d: Any, layer: int) -> None:
    L, E, cache, p = d.L, d.E, d.cache, f"model.language_model.layers.{layer}"
    _position_ids(d)
    _probe(d, "attention_mask", "attention_mask", d.mask4,
           {"style": "additive", "dtype": F32, "fill": -3.4028234663852886e38})
    lengths = [cache + (L if i < layer else 0) for i in range(d.n_layers)]
    _probe(d, "cache", "past_key_values", np.array(lengths, dtype=np.int64),
           {"type": "DynamicCache", "layout": "BHSD", "lengths": lengths,
            "key_shape": [1, KV_HEADS, lengths[0], HEAD_DIM], "dtype": F32, "n_layers": d.n_layers})
    E.call(f"{p}.self_attn.q_proj", [_x("args[0]", 1, L, HIDDEN)], [_x("out", 1, L, HIDDEN)])
    _op(d, "view", [(1, L, HIDDEN)], (1, L, HEADS, HEAD_DIM), f"(1, {L}, -1, {HEAD_DIM})", 702, "forward")
    _op(d, "transpose", [(1, L, HEADS, HEAD_DIM)], (1, HEADS, L, HEAD_DIM), "(1, 2)", 702, "forward")
    for proj, line in (("k_proj", 703), ("v_proj", 704)):
        E.call(f"{p}.self_attn.{proj}", [_x("args[0]", 1, L, HIDDEN)], [_x("out", 1, L, KV_HEADS * HEAD_DIM)])
        _op(d, "view", [(1, L, KV_HEADS * HEAD_DIM)], (1, L, KV_HEADS, HEAD_DIM), f"(1, {L}, -1, {HEAD_DIM})",
            line, "forward")
    _op(d, "cat", [(1, HEADS, L, HEAD_DIM // 2)] * 2, (1, HEADS, L, HEAD_DIM), "dim=-1", 230, "rotate_half")
    _op(d, "cat", [(1, KV_HEADS, cache, HEAD_DIM), (1, KV_HEADS, L, HEAD_DIM)], (1, KV_HEADS, cache + L, HEAD_DIM),
        "dim=-2", 612, "update")
    _op(d, "reshape", [(1, L, HEADS, HEAD_DIM)], (1, L, HIDDEN), f"(1, {L}, -1)", 741, "forward")
    E.call(f"{p}.self_attn.o_proj", [_x("args[0]", 1, L, HIDDEN)], [_x("out", 1, L, HIDDEN)])


def _mlp(d: Any, layer: int) -> None:
    L, E, p = d.L, d.E, f"model.language_model.layers.{layer}"
    down_out = (1, L, HIDDEN + 8) if d.variant == "b" and layer == 1 and d.prefill else (1, L, HIDDEN)
    E.call(f"{p}.mlp.gate_proj", [_x("args[0]", 1, L, HIDDEN)], [_x("out", 1, L, INTER)])
    E.call(f"{p}.mlp.act_fn", [_x("args[0]", 1, L, INTER)], [_x("out", 1, L, INTER)])
    E.call(f"{p}.mlp.up_proj", [_x("args[0]", 1, L, HIDDEN)], [_x("out", 1, L, INTER)])
    E.call(f"{p}.mlp.down_proj", [_x("args[0]", 1, L, INTER)], [("out", down_out, F32)])
