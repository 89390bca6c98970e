"""What the recorder needs to know about the model before the first hook: its module table,
the recognised structure (:mod:`vlmscope.semantics`), the module ids the hooks test against,
and the run metadata written into ``/meta``.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vlmscope import trace as T
from vlmscope.recorder.stats import dtype_name
from vlmscope.semantics import (Structure, attention_heads_of, find_structure, image_token_id_of, is_rotary_class,
                                rope_meta_of, video_token_id_of)


@dataclass(frozen=True)
class ModelInfo:
    """The model's module tree as the hooks see it (module id = row in ``/modules``)."""

    modules: list[tuple[str, torch.nn.Module]]  # named_modules(), duplicates removed
    paths: list[str]
    structure: Structure
    image_token_id: int | None
    kv_heads: int | None
    n_heads: int | None
    layer0_id: int           # first decoder layer (its input length is the step's q_len), or -1
    merger_id: int           # vision merger / projector, or -1
    text_model_id: int       # the language model holding the decoder layers, or -1
    decoder_prefix: str | None  # "model.language_model.layers."
    rotary_ids: frozenset[int]
    save_ids: frozenset[int]  # modules whose outputs --save-tensors keeps
    video_token_id: int | None = None
    vision_model_id: int = -1  # the vision tower, or -1
    rope_owner_id: int = -1    # the module keeping the model's ``rope_deltas`` attribute, or -1
    #: convolutions: their tensors are channel-first ``[N, C, *spatial]``, so a value sketch's token
    #: is one of the N samples (a row of the last dimension is a line of pixels, not a token)
    channel_first_ids: frozenset[int] = frozenset()

    def meta(self) -> dict:
        """The structure fields of ``/meta``."""
        return {**self.structure.as_dict(), "image_token_id": self.image_token_id,
                "num_key_value_heads": self.kv_heads, "num_attention_heads": self.n_heads}


def analyse(model: torch.nn.Module, image_token_id: int | None, save_globs: Sequence[str]) -> ModelInfo:
    modules = list(model.named_modules(remove_duplicate=True))
    paths = [p for p, _ in modules]
    cfg = getattr(model, "config", None)
    if image_token_id is None:
        image_token_id = image_token_id_of(cfg)
    kv_heads, n_heads = attention_heads_of(cfg)
    list_sizes = {p: len(m) for p, m in modules if isinstance(m, torch.nn.ModuleList) and len(m) > 0}
    s = find_structure(paths, list_sizes)
    index = {p: i for i, p in enumerate(paths)}
    layer0 = s.decoder_layers + ".0" if s.decoder_layers else None
    return ModelInfo(
        modules=modules, paths=paths, structure=s, image_token_id=image_token_id,
        kv_heads=kv_heads, n_heads=n_heads,
        layer0_id=index.get(layer0, -1) if layer0 else -1,
        merger_id=index.get(s.merger, -1) if s.merger else -1,
        text_model_id=index.get(s.text_model, -1) if s.text_model is not None else -1,
        decoder_prefix=(s.decoder_layers + ".") if s.decoder_layers else None,
        rotary_ids=frozenset(i for i, (_, m) in enumerate(modules) if is_rotary_class(type(m).__name__)),
        save_ids=frozenset(i for i, p in enumerate(paths) if any(fnmatch.fnmatchcase(p, g) for g in save_globs)),
        video_token_id=video_token_id_of(cfg),
        vision_model_id=index.get(s.vision_model, -1) if s.vision_model is not None else -1,
        rope_owner_id=next((i for i, (_, m) in enumerate(modules) if _has_rope_deltas(m)), -1),
        channel_first_ids=frozenset(i for i, (_, m) in enumerate(modules)
                                    if isinstance(m, torch.nn.modules.conv._ConvNd)),
    )


def _has_rope_deltas(m: torch.nn.Module) -> bool:
    """The module keeps M-RoPE's per-row position offsets between steps (``model.model.rope_deltas``
    in transformers' Qwen2-VL family: set by the prefill, read by every decode step)."""
    try:
        return "rope_deltas" in vars(m) or isinstance(getattr(type(m), "rope_deltas", None), property)
    except Exception:  # noqa: BLE001 - a custom module's odd attributes
        return False


def module_rows(w: T.TraceWriter, info: ModelInfo) -> np.ndarray:
    """The ``/modules`` table."""
    path_ids, cls_ids = [], []
    for p, m in info.modules:  # interned in this order: path, then class, module by module
        path_ids.append(w.intern(p))
        cls_ids.append(w.intern(type(m).__name__))
    row_of = {p: i for i, p in enumerate(info.paths)}
    rows = np.zeros(len(info.modules), T.MODULE_DTYPE)
    rows["path"] = path_ids
    rows["cls"] = cls_ids
    rows["depth"] = [p.count(".") + 1 if p else 0 for p in info.paths]
    rows["parent"] = [row_of.get(p.rpartition(".")[0], -1) if p else -1 for p in info.paths]
    return rows


def _version() -> str:
    from vlmscope._version import __version__
    return __version__


def run_meta(model: torch.nn.Module, meta: dict, info: ModelInfo) -> dict:
    """``/meta`` run_json: the caller's fields, the structure, versions and the model's defaults."""
    meta = dict(meta)
    meta.update(info.meta())
    meta.setdefault("vlmscope", _version())
    meta.setdefault("torch", torch.__version__)
    try:
        import transformers
        meta.setdefault("transformers", transformers.__version__)
    except Exception:  # noqa: BLE001 - a broken transformers install must not stop a custom model's run
        meta.setdefault("transformers", None)
    meta.setdefault("model_class", type(model).__name__)
    cfg = getattr(model, "config", None)
    if meta.get("family") is None:
        meta["family"] = getattr(cfg, "model_type", None)
    if meta.get("model") is None:
        meta["model"] = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) \
            or type(model).__name__
    p = next(iter(model.parameters()), None)
    if p is not None:
        meta.setdefault("device", str(p.device))
        meta.setdefault("dtype", dtype_name(p.dtype))
    meta.setdefault("attn_implementation", getattr(cfg, "_attn_implementation", None))
    if meta.get("rope") is None:
        rope = rope_meta_of(cfg)
        if rope["image_token_id"] is None:
            rope["image_token_id"] = info.image_token_id  # given to the Recorder
        meta["rope"] = rope
    meta.setdefault("argv", list(sys.argv))
    return meta


def config_json(model: torch.nn.Module) -> str:
    """``/meta`` config_json: the model's config as JSON, or its repr when it does not serialise."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "{}"
    try:
        return cfg.to_json_string() if hasattr(cfg, "to_json_string") else json.dumps(
            cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg), default=str)
    except Exception:  # noqa: BLE001 - the user's config object failed to serialise itself
        return json.dumps({"repr": repr(cfg)})
