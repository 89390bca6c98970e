"""Model semantics shared by recording, analysis and the viewer.

What a Qwen-VL module tree means: where the decoder layers are, which subtree is the vision
tower and which module merges its patches, which tokens of ``input_ids`` are image
placeholders, and how a shape is written. The recorder decides these once from the live
model and stores them in the trace's ``/meta`` (``decoder_layers``, ``text_model``,
``vision_model``, ``merger``, ``image_token_id``); readers use the same functions when a
trace lacks them. numpy only: this module sits beside :mod:`vlmscope.trace` at the bottom
of the layers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

#: words that mark a module path as part of the vision side
VISION_WORDS = ("visual", "vision", "vit", "image_encoder", "clip")
#: last path components of the module that turns vision features into LM embeddings
MERGER_NAMES = ("merger", "projector", "mm_projector", "multi_modal_projector", "visual_projection",
                "vision_proj", "img_projection")
_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


@dataclass(frozen=True)
class Structure:
    """The recognised parts of a VLM's module tree (dotted paths, or None when absent)."""

    decoder_layers: str | None = None   # the ModuleList of decoder blocks
    text_model: str | None = None       # its parent: the language model
    vision_model: str | None = None     # the vision tower
    merger: str | None = None           # the patch merger / projector

    def as_dict(self) -> dict:
        return asdict(self)


def is_vision_path(path: str) -> bool:
    """Whether any part of a dotted module path names the vision side."""
    return any(k in path for k in VISION_WORDS)


def find_decoder_layers(paths: Sequence[str], list_sizes: Mapping[str, int] | None = None) -> str | None:
    """The decoder-layer container: the largest module list outside the vision tower.

    ``list_sizes`` maps the paths of the model's ``ModuleList``s to their lengths (the recorder
    knows them); without it the containers are inferred from numbered children
    (``x.0``, ``x.1``, ...). The first of equally large candidates wins.
    """
    if list_sizes is None:
        counts: dict[str, int] = {}
        for p in paths:
            m = _NUMBERED.match(p)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        list_sizes = counts
    best, best_n = None, 0
    for p, n in list_sizes.items():
        if n > best_n and not is_vision_path(p):
            best, best_n = p, n
    return best


def find_vision_model(paths: Iterable[str]) -> str | None:
    """The shallowest module whose own name is vision-like (or that ends in ``visual``)."""
    vision = [p for p in paths if p and is_vision_path(p.rsplit(".", 1)[-1]) or p.endswith("visual")]
    return min(vision, key=lambda p: p.count(".")) if vision else None


def find_merger(paths: Iterable[str]) -> str | None:
    """The shallowest module named like a patch merger or multimodal projector."""
    merger = [p for p in paths if p.rsplit(".", 1)[-1] in MERGER_NAMES]
    return min(merger, key=lambda p: p.count(".")) if merger else None


def find_structure(paths: Sequence[str], list_sizes: Mapping[str, int] | None = None) -> Structure:
    """Decoder layers, text model, vision tower and merger of a module tree."""
    layers = find_decoder_layers(paths, list_sizes)
    return Structure(
        decoder_layers=layers,
        text_model=layers.rpartition(".")[0] if layers else None,
        vision_model=find_vision_model(paths),
        merger=find_merger(paths),
    )


def text_model_of(decoder_layers: str | None) -> str | None:
    """The language model holding a decoder-layer container (its parent), or None."""
    return decoder_layers.rsplit(".", 1)[0] if decoder_layers and "." in decoder_layers else None


def is_under(path: str, prefix: str | None) -> bool:
    """``path`` is ``prefix`` or lies below it (``""`` is the root: everything is under it)."""
    if prefix is None:
        return False
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def layer_index(path: str, decoder_layers: str | None, *, inside: bool = False) -> int:
    """Decoder-layer number of ``path`` (``model.layers.3`` -> 3), else -1. With ``inside``,
    modules below a layer (``model.layers.3.mlp``) count as that layer too."""
    if not decoder_layers or not path.startswith(decoder_layers + "."):
        return -1
    head, _, rest = path[len(decoder_layers) + 1:].partition(".")
    if not head.isdecimal() or (rest and not inside):
        return -1
    return int(head)


# ---------------------------------------------------------------------------- config


def _get(cfg: Any, key: str) -> Any:
    """``cfg.key`` of a transformers config object, or ``cfg[key]`` of its JSON dict."""
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def text_config_of(cfg: Any) -> Any:
    """The language model's config: ``text_config`` of a VLM config, else the config itself."""
    return _get(cfg, "text_config") or cfg


def _config_int(cfg: Any, *keys: str) -> int | None:
    """The first of ``keys`` set in the config, else in its ``text_config`` (older layouts)."""
    for c in (cfg, _get(cfg, "text_config")):
        for k in keys:
            v = _get(c, k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def image_token_id_of(cfg: Any) -> int | None:
    """The image placeholder token id (``image_token_id``, or ``image_token_index`` in older configs)."""
    return _config_int(cfg, "image_token_id", "image_token_index")


def video_token_id_of(cfg: Any) -> int | None:
    """The video placeholder token id (``video_token_id``, or ``video_token_index``)."""
    return _config_int(cfg, "video_token_id", "video_token_index")


def vision_start_token_id_of(cfg: Any) -> int | None:
    """The token that opens a vision span (``<|vision_start|>``)."""
    return _config_int(cfg, "vision_start_token_id")


#: ``config.model_type`` (and common spellings) -> the M-RoPE family of the position oracle
#: (``vlmscope.analyze.mrope.FAMILIES``); other model types have no M-RoPE family.
MROPE_FAMILIES = {
    "qwen2_vl": "qwen2_vl", "qwen2vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl", "qwen2.5_vl": "qwen2_5_vl", "qwen25_vl": "qwen2_5_vl", "qwen2_5vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl", "qwen3vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl",
}


def mrope_family(name: Any) -> str | None:
    """``"Qwen2.5-VL"``, ``"qwen2_5_vl"`` ... -> ``"qwen2_5_vl"``; None for a model type without M-RoPE."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return MROPE_FAMILIES.get(key) or MROPE_FAMILIES.get(key.replace(".", "_"))


def spatial_merge_size_of(cfg: Any) -> int | None:
    """``spatial_merge_size`` of the vision config (or the top level), None when the config has none."""
    v = _get(_get(cfg, "vision_config"), "spatial_merge_size")
    if v is None:
        v = _get(cfg, "spatial_merge_size")
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def tokens_per_second_of(cfg: Any) -> float | int | None:
    """Qwen2.5-VL's ``tokens_per_second`` (temporal positions per second of video), from the vision
    config or the top level; None when the config has none."""
    for c in (_get(cfg, "vision_config"), cfg, _get(cfg, "text_config")):
        v = _get(c, "tokens_per_second")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return None


def rope_meta_of(cfg: Any) -> dict:
    """run_json ``rope``: what the M-RoPE position oracle needs from the model's config."""
    return {
        "family": mrope_family(_get(cfg, "model_type")),
        "spatial_merge_size": spatial_merge_size_of(cfg),
        "tokens_per_second": tokens_per_second_of(cfg),
        "image_token_id": image_token_id_of(cfg),
        "video_token_id": video_token_id_of(cfg),
        "vision_start_token_id": vision_start_token_id_of(cfg),
    }


def attention_heads_of(cfg: Any) -> tuple[int | None, int | None]:
    """(key/value heads, attention heads) of the language model; without GQA both are the same."""
    tc = text_config_of(cfg)
    heads = _get(tc, "num_attention_heads")
    return _get(tc, "num_key_value_heads") or heads, heads


def merge_size_of(cfg: Any) -> int:
    """Patches merged per side into one image token (``spatial_merge_size``; Qwen2-VL's 2 when the
    config does not say)."""
    return int(_get(_get(cfg, "vision_config") or {}, "spatial_merge_size") or _get(cfg, "spatial_merge_size") or 2)


def is_rotary_class(class_name: str) -> bool:
    """A rotary-embedding module, by its class name (``Qwen2VLRotaryEmbedding``, ``RotaryEmbedding``...)."""
    return "rotary" in class_name.lower()


# ---------------------------------------------------------------------------- module roles

#: a module's role from its own name (last path component, lower case), for aligning two
#: implementations whose modules are named differently (``vlmscope.analyze.automap``)
_ROLE_NAMES = {
    "qkv": ("qkv", "qkv_proj", "wqkv", "c_attn", "query_key_value", "in_proj", "to_qkv"),
    "q": ("q_proj", "q", "query", "wq", "q_lin", "to_q"),
    "k": ("k_proj", "k", "key", "wk", "k_lin", "to_k"),
    "v": ("v_proj", "v", "value", "wv", "v_lin", "to_v"),
    "gate_up": ("gate_up_proj", "gate_up", "w13", "w1_w3"),
    "gate": ("gate_proj", "gate", "w1", "wi_0"),
    "up": ("up_proj", "up", "w3", "wi_1"),
    "head": ("lm_head", "head", "output", "embed_out", "output_layer"),
}
#: inside an attention block these name its output projection; inside an MLP, its down projection
_ATTN_OUT = ("o_proj", "out_proj", "out", "o", "dense", "c_proj", "wo", "proj", "to_out", "output")
_MLP_DOWN = ("down_proj", "down", "w2", "fc2", "c_proj", "wo", "dense_4h_to_h", "proj", "out")


def module_role(name: str, cls: str, parent_role: str = "") -> str:
    """The role of a module in a VLM, from its own name and class (and its parent's role):
    ``embed``, ``patch_embed``, ``norm``, ``rotary``, ``attn``, ``mlp``, ``merger``, ``head``, the
    projections ``qkv`` (fused), ``q``, ``k``, ``v``, ``o``, ``gate_up`` (fused), ``gate``, ``up``,
    ``down``, ``act``, or ``other``. Roles name what a module computes, so a port's
    ``blocks.0.attn.out`` and the reference's ``layers.0.self_attn.o_proj`` both get ``o``."""
    n, c = name.lower(), cls.lower()
    if is_rotary_class(cls) or "rotary" in n:
        return "rotary"
    if parent_role == "attn":
        for role in ("qkv", "q", "k", "v"):
            if n in _ROLE_NAMES[role]:
                return role
        if n in _ATTN_OUT:
            return "o"
    if parent_role == "mlp":
        for role in ("gate_up", "gate", "up"):
            if n in _ROLE_NAMES[role]:
                return role
        if n in _MLP_DOWN:
            return "down"
    if "act" in n or c.endswith(("activation", "silu", "gelu", "relu", "gelutanh", "quickgelu")):
        return "act"
    if n in MERGER_NAMES:
        return "merger"
    if "patch_embed" in n or "patchembed" in c:
        return "patch_embed"
    if "embed" in n or "embedding" in c:
        return "embed"
    if "norm" in n or "norm" in c or n.startswith("ln"):
        return "norm"
    if "attn" in n or "attention" in n or "attention" in c:
        return "attn"
    if "mlp" in n or "ffn" in n or "feed_forward" in n or "mlp" in c:
        return "mlp"
    if n in _ROLE_NAMES["head"]:
        return "head"
    return "other"


#: roles a fused module stands for (a port's fused qkv is the reference's q, k and v)
FUSED_ROLES = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


# ---------------------------------------------------------------------------- image spans


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of every run of True in a 1-D array."""
    d = np.diff(np.concatenate([[0], np.asarray(flags, dtype=np.int8), [0]]))
    return [(int(a), int(b)) for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]


def image_spans(ids: np.ndarray, image_token_id: int) -> list[list[int]]:
    """Runs of image placeholder tokens, ``[[batch_row, start, end), ...]``, row by row.
    ``ids`` is ``input_ids`` of any rank (the last axis is the sequence)."""
    rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
    return [[b, s, e] for b, row in enumerate(rows) for s, e in runs(row == image_token_id)]


def image_token_count(ids: np.ndarray, image_token_id: int) -> int:
    """Image placeholder tokens in ``input_ids`` (all rows)."""
    return int((ids == image_token_id).sum())


def segments(row: np.ndarray, image_token_id: int) -> list[list]:
    """One sequence split into alternating spans: ``[["text"|"image", start, end), ...]``."""
    img = row == image_token_id
    cuts = np.flatnonzero(np.diff(img.astype(np.int8))) + 1
    bounds = [0, *cuts.tolist(), len(row)]
    return [["image" if img[a] else "text", a, b] for a, b in zip(bounds, bounds[1:]) if b > a]


# ---------------------------------------------------------------------------- position ids


def position_rows(pos: np.ndarray) -> np.ndarray:
    """Position ids as ``[rows, tokens]`` for the first batch row: M-RoPE's ``[R, B, S]`` (3 rows
    t/h/w, 4 with Qwen3-VL's text row), 1-D RoPE's ``[B, S]`` or a bare ``[S]``."""
    p = np.asarray(pos)
    if p.ndim == 3:
        return p[:, 0, :]
    if p.ndim == 2:
        return p[:1, :]
    if p.ndim == 1:
        return p[None, :]
    return p


def position_row_names(n: int) -> list[str]:
    """What each row of ``position_rows`` is: ``pos`` (1-D RoPE), ``t h w`` (M-RoPE),
    ``text t h w`` (Qwen3-VL), else ``r0 r1 ...``."""
    return {1: ["pos"], 3: ["t", "h", "w"], 4: ["text", "t", "h", "w"]}.get(n, [f"r{k}" for k in range(n)])


# ---------------------------------------------------------------------------- shapes


def fmt_shape(shape: Iterable[int], compact: bool = False) -> str:
    """``(1, 3, 4)`` -> ``"[1, 3, 4]"`` (``"[1,3,4]"`` when compact): how every report writes a shape."""
    return "[" + ("," if compact else ", ").join(str(int(d)) for d in shape) + "]"
