"""Turn (prompt, image) into model inputs with the model's own processor, and generate."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from vlmscope.errors import ImageError, UserError
from vlmscope.semantics import image_token_id_of


def load_image(path: str | os.PathLike) -> tuple[Any, dict]:
    """Open an image file fully (so truncation is caught now), as RGB. Returns (image, info)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ImageError(f"image not found: {p}")
    if p.is_dir():
        raise ImageError(f"image path is a directory: {p}")
    data = p.read_bytes()
    if not data:
        raise ImageError(f"image file is empty: {p}")
    try:
        import io

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            img = im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is too large to open safely: {p} ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image file (unrecognised format): {p}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image is truncated or corrupt: {p} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    info = {"path": str(p), "sha256": hashlib.sha256(data).hexdigest(), "size": list(img.size),
            "bytes": len(data)}
    return img, info


def _is_text_only(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    return getattr(cfg, "vision_config", None) is None and image_token_id_of(cfg) is None


def build_inputs(model: Any, processor: Any, *, prompt: str, image: Any = None,
                 image_name: str | None = None) -> tuple[dict, dict]:
    """Chat-template the prompt (with an image item when given) and run the processor.

    ``image_name`` names an image given as an object in error messages (a path names itself).
    An input the processor rejects (an image's aspect ratio, say) raises :class:`ImageError` /
    :class:`UserError`, one line.

    Returns (inputs moved to the model's device, metadata about the image/prompt).
    """
    import torch

    info: dict[str, Any] = {"prompt": prompt}
    img = None
    if image is not None:
        if _is_text_only(model):
            raise UserError("--image was given but this is a text-only model (its config has no vision part)")
        if isinstance(image, (str, os.PathLike)):
            img, info["image"] = load_image(image)
        else:
            img = image.convert("RGB") if hasattr(image, "convert") else image
            info["image"] = {"path": None, "size": list(getattr(img, "size", []))}
    content: list[dict] = ([{"type": "image"}] if img is not None else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    tok = getattr(processor, "tokenizer", processor)
    text = prompt
    template_owner = processor if hasattr(processor, "apply_chat_template") else tok
    if getattr(template_owner, "chat_template", None) or getattr(tok, "chat_template", None):
        if img is None:
            # text-only: plain string content is what every chat template accepts
            messages = [{"role": "user", "content": prompt}]
        text = template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    try:
        inputs = dict(_process(processor, tok, text, img))
    except Exception as e:  # noqa: BLE001 - the model's processor rejects this input: the user's input
        msg = str(e).strip()
        why = f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__
        if img is not None:
            where = (info.get("image") or {}).get("path") or image_name
            size = "x".join(str(d) for d in getattr(img, "size", ()))
            raise ImageError(f"the processor rejected the image{' ' + str(where) if where else ''}"
                             f"{f' ({size})' if size else ''}: {why}") from e
        raise UserError(f"the processor rejected the prompt: {why}") from e
    if img is not None and "image" in info:
        info["image"]["resized"] = _resized_size(model, processor, inputs)
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out, info


def _process(processor: Any, tok: Any, text: str, img: Any) -> Any:
    """Run the model's processor (or its tokenizer, for a text-only model) on the text and image."""
    if img is not None:
        return processor(text=[text], images=[img], return_tensors="pt")
    if processor is not tok and hasattr(processor, "__call__"):
        try:
            return processor(text=[text], return_tensors="pt")
        except TypeError:
            return tok([text], return_tensors="pt")
    return tok([text], return_tensors="pt")


def _resized_size(model: Any, processor: Any, inputs: dict) -> list[int] | None:
    """The image size the model actually sees (after the processor's pixel limits)."""
    grid = inputs.get("image_grid_thw")
    ip = getattr(processor, "image_processor", None)
    if grid is not None:
        patch = getattr(ip, "patch_size", None) or 14
        g = grid[0].tolist()
        return [int(g[2]) * int(patch), int(g[1]) * int(patch)]
    pv = inputs.get("pixel_values")
    if pv is not None and getattr(pv, "dim", lambda: 0)() == 4:
        return [int(pv.shape[-1]), int(pv.shape[-2])]
    return None


def generate_text(model: Any, processor: Any, inputs: dict, *, max_new_tokens: int) -> str:
    """Greedy generation; returns the decoded new text."""
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seqs = out.sequences if hasattr(out, "sequences") else out
    n_in = inputs["input_ids"].shape[-1] if "input_ids" in inputs else 0
    new = seqs[:, n_in:]
    dec = getattr(processor, "batch_decode", None) or getattr(getattr(processor, "tokenizer", None),
                                                               "batch_decode", None)
    if dec is None:
        return ""
    return dec(new, skip_special_tokens=True)[0]
