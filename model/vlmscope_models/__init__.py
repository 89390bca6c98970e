"""Embedded tiny default models for vlmscope (installed as ``vlmscope_models``).

Importing this package is cheap: torch / transformers are only imported by
:func:`load_embedded` when a model is actually built.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EMBEDDED_MODELS", "DEFAULT_MODEL", "load_embedded", "resolve_factory"]

#: name -> "module:function"; each factory is ``build(**options) -> (model, processor)``.
EMBEDDED_MODELS: dict[str, str] = {
    "tiny-qwen2-vl": "vlmscope_models.qwen_vl:build_qwen2_vl",
    "tiny-qwen2.5-vl": "vlmscope_models.qwen_vl:build_qwen2_5_vl",
    "tiny-mqwen": "vlmscope_models.mqwen:build",
}

DEFAULT_MODEL = "tiny-qwen2.5-vl"


def resolve_factory(name: str):
    """Return the factory callable registered under ``name`` (imports its module)."""
    try:
        target = EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise KeyError(
            f"unknown embedded model {name!r}; known embedded models: {known} "
            f"(default: {DEFAULT_MODEL}). For your own model pass a factory path "
            f"'package.module:function'."
        ) from None
    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def load_embedded(name: str = DEFAULT_MODEL, **options: Any):
    """Build the embedded model ``name`` and return ``(model, processor)``.

    ``options`` are passed to the factory (for the Qwen-VL ones: ``device``, ``dtype``,
    ``attn_implementation``, ``seed``, ``max_pixels``, ``min_pixels``).
    Raises :class:`KeyError` listing the known names if ``name`` is not registered.
    """
    return resolve_factory(name)(**options)
