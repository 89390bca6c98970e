"""Resolve ``--model``: an embedded name, a local checkpoint directory, or ``module:factory``.

The factory protocol (for users' own models)::

    def build(*, device="cpu", dtype=None, attn_implementation=None, **options):
        ...
        return model, processor

``model`` is a ``torch.nn.Module`` with ``generate(**inputs, max_new_tokens=, do_sample=)``
that calls the module itself once per step (so every step is one top-level forward),
and a ``config`` (``num_attention_heads``, ``num_key_value_heads``, ``image_token_id``
help vlmscope read caches and image spans). ``processor`` follows the Hugging Face
processor interface: ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)``, ``__call__(text=[...], images=[...] or None,
return_tensors="pt")`` and ``batch_decode``. Options the factory does not accept are
not passed.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from vlmscope.errors import ModelLoadError

DTYPES = ("float32", "float16", "bfloat16", "float64")


def torch_dtype(name: str | None):
    import torch

    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ModelLoadError(f"unknown --dtype {name!r} (choose from {', '.join(DTYPES)})")
    return getattr(torch, name)


def _call_factory(factory, options: dict) -> tuple[Any, Any]:
    try:
        sig = inspect.signature(factory)
        accepts_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        if not accepts_var_kw:
            options = {k: v for k, v in options.items() if k in sig.parameters}
    except (TypeError, ValueError):
        pass
    try:
        result = factory(**options)
    except Exception as e:  # noqa: BLE001 - the factory refused its options (--option, --device, --attn-implementation)
        name = getattr(factory, "__qualname__", None) or type(factory).__name__
        given = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None)
        raise ModelLoadError(f"cannot build the model ({name} with {given or 'no options'}): "
                             f"{_first_line(e)}") from e
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ModelLoadError(f"factory {getattr(factory, '__qualname__', factory)} must return (model, processor), "
                             f"got {type(result).__name__}")
    return result


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__


def family_of(model: Any) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def load_model(spec: str, *, device: str = "cpu", dtype: str | None = None,
               attn_implementation: str | None = None, options: dict | None = None) -> tuple[Any, Any, dict]:
    """Returns (model, processor, info) where info names the model id, kind and family."""
    import vlmscope_models

    opts: dict[str, Any] = {"device": device, "dtype": torch_dtype(dtype)}
    if attn_implementation:
        opts["attn_implementation"] = attn_implementation
    opts.update(options or {})
    if spec in vlmscope_models.EMBEDDED_MODELS:
        model, proc = _load_factory(vlmscope_models.EMBEDDED_MODELS[spec], opts)
        kind = "embedded"
    elif Path(spec).expanduser().exists():
        model, proc = _load_checkpoint(Path(spec).expanduser(), opts)
        kind = "checkpoint"
    elif ":" in spec and not spec.startswith(("/", ".")) and "/" not in spec.split(":")[0]:
        model, proc = _load_factory(spec, opts)
        kind = "factory"
    elif "/" in spec or spec.startswith("."):
        raise ModelLoadError(f"model path does not exist: {spec}")
    else:
        names = ", ".join(sorted(vlmscope_models.EMBEDDED_MODELS))
        raise ModelLoadError(f"unknown model {spec!r}: not an embedded model ({names}), "
                             f"a local directory, or package.module:factory")
    return model, proc, {"model": spec, "model_kind": kind, "family": family_of(model)}


def _load_factory(spec: str, opts: dict) -> tuple[Any, Any]:
    mod_name, _, fn_name = spec.partition(":")
    import os
    import sys

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: a user's module in the current directory
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise ModelLoadError(f"cannot import {mod_name!r} for --model {spec}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    factory = getattr(mod, fn_name, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"{mod_name!r} has no callable {fn_name!r} (for --model {spec})")
    return _call_factory(factory, opts)


def _load_checkpoint(path: Path, opts: dict) -> tuple[Any, Any]:
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a directory: {path}")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"not a model directory (no config.json): {path}")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"config.json is unreadable in {path}: {e}") from None
    import transformers

    kw: dict[str, Any] = {"local_files_only": True}
    if opts.get("dtype") is not None:
        kw["dtype"] = opts["dtype"]
    if opts.get("attn_implementation"):
        kw["attn_implementation"] = opts["attn_implementation"]
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the user's checkpoint: transformers rejects its config
        raise ModelLoadError(f"not a supported model ({cfg.get('model_type', '?')}): {path}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    multimodal = getattr(config, "vision_config", None) is not None
    try:
        if multimodal:
            auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
            model = auto.from_pretrained(path, **kw)
            proc = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
            proc = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the user's checkpoint: its weights or processor files fail to load
        raise ModelLoadError(f"cannot load model from {path}: {_first_line(e)}") from e
    try:
        model.to(opts.get("device") or "cpu")
    except (RuntimeError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot move the model to {opts.get('device')!r}: {_first_line(e)}") from e
    model.eval()
    return model, proc
