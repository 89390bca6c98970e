"""Turn batch rows (prompts, images, videos, chats) into model inputs with the model's own
processor, and generate.

A *row* is one sequence of a batched ``generate`` call, in one of two forms:

- ``{"prompt": str, "images": [path, ...], "video": path}`` (``images`` and ``video`` optional):
  one user turn, the images first, then the video, then the text;
- ``{"messages": [...]}``: a chat in the processor's message format, whose image and video
  items name their files: ``{"type": "image", "path": ...}`` (or ``"image": ...``),
  ``{"type": "video", "path": ...}`` (or ``"video": ...``), ``{"type": "text", "text": ...}``.

:func:`parse_row` checks one (strictly: unknown keys, wrong types, files that cannot be read are
one-line :class:`UserError` naming where the row came from), :func:`read_rows` reads a JSONL
file of them, :func:`build_batch_inputs` runs the processor once on all rows of a call, and
:func:`generate_texts` generates and decodes every row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmscope.errors import ImageError, UserError
from vlmscope.semantics import image_token_id_of

#: At most this many rows in one generate call (one JSONL file).
MAX_ROWS = 256

#: The keys a row may have; and those of a message and of a content item.
ROW_KEYS = ("prompt", "images", "video", "messages")
MESSAGE_KEYS = ("role", "content")
ROLES = ("system", "user", "assistant")
ITEM_KEYS = {"text": ("type", "text"), "image": ("type", "path", "image"), "video": ("type", "path", "video")}

#: Float inputs that are not activations: timing values keep their float32 (a cast to the
#: model's bfloat16 would round ``second_per_grid_ts``, a fault vlmscope checks for).
_KEEP_DTYPE = frozenset({"second_per_grid_ts"})


class VideoError(UserError):
    exit_code = 2


# ----------------------------------------------------------------------------- media files


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


def check_video(path: str | os.PathLike) -> dict:
    """Check that a video file exists and decodes to the end (PyAV). Returns its info:
    ``path``, ``sha256``, ``bytes``, ``frames`` (decoded), ``fps``, ``size`` [w, h]."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video not found: {p}")
    if p.is_dir():
        raise VideoError(f"video path is a directory: {p}")
    digest, size = hashlib.sha256(), 0
    try:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise VideoError(f"cannot read the video {p}: {e.strerror or e}") from None
    if not size:
        raise VideoError(f"video file is empty: {p}")
    try:
        import av
    except ImportError:
        raise VideoError("reading a video needs PyAV ('pip install av')") from None
    try:
        with av.open(str(p)) as box:
            fmt = box.format.name or ""
            if fmt == "image2" or fmt.endswith("_pipe"):
                raise VideoError(f"not a video (a still image, {fmt.removesuffix('_pipe')}): {p}")
            if not box.streams.video:
                raise VideoError(f"no video stream in {p}")
            stream = box.streams.video[0]
            stated, rate = int(stream.frames or 0), stream.average_rate
            dims = [int(stream.width or 0), int(stream.height or 0)]
            frames = sum(1 for _ in box.decode(video=0))
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VideoError(f"not a readable video: {p} ({why})") from None
    if frames == 0:
        raise VideoError(f"video has no frames that decode: {p}")
    if frames < stated:   # (Matroska and WebM state no count: 0)
        raise VideoError(f"video is truncated or corrupt: {p} (it states {stated} frames, {frames} decode)")
    if not rate or float(rate) <= 0:
        raise VideoError(f"video does not state its frame rate: {p}")
    return {"path": str(p), "sha256": digest.hexdigest(), "bytes": size,
            "frames": frames, "fps": float(rate), "size": dims}


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One checked batch row: its media loaded (images) or checked (videos), in the order the
    chat template places their markers."""

    where: str                                   # "rows.jsonl:3", "rows[2]", "row 2"; "" for one --prompt
    prompt: str | None = None
    messages: list | None = None                 # template messages: media items as bare markers
    images: list = field(default_factory=list)   # PIL images
    image_info: list = field(default_factory=list)
    videos: list = field(default_factory=list)   # paths
    video_info: list = field(default_factory=list)
    image_name: str | None = None                # names an image object (no path) in errors

    def meta(self) -> dict:
        """The row as run metadata (``calls[i].rows``): ``prompt``, ``images`` (paths),
        ``video`` (path), ``messages`` (bool), and ``media``, one entry per file."""
        return {"prompt": self.prompt, "images": [i.get("path") for i in self.image_info],
                "video": self.video_info[0]["path"] if self.video_info else None,
                "messages": self.messages is not None,
                "media": [{"kind": "image", **i} for i in self.image_info]
                + [{"kind": "video", **v} for v in self.video_info]}


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{_at(where)}{what} must be a string, not {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{_at(where)}{what} is not valid UTF-8 text") from None
    return value


def _at(where: str) -> str:
    """The prefix of an error about a row: ``"rows.jsonl:3: "`` (none for a row of the command line)."""
    return f"{where}: " if where else ""


def _key(key: Any) -> str:
    """An unknown key, quoted and cut short for a one-line error."""
    text = repr(str(key))
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _media_path(value: Any, where: str, what: str, base: Path | None) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value) or "\x00" in str(value):
        raise UserError(f"{_at(where)}{what} must be a path to a file")
    _text(str(value), where, what)
    p = Path(value).expanduser()
    return base / p if base is not None and not p.is_absolute() else p


def _add_image(row: Row, value: Any, what: str, base: Path | None, objects: bool) -> None:
    if objects and not isinstance(value, (str, os.PathLike)) and hasattr(value, "convert"):
        img = value.convert("RGB")
        row.images.append(img)
        row.image_info.append({"path": None, "size": list(getattr(img, "size", []))})
        return
    p = _media_path(value, row.where, what, base)
    try:
        img, info = load_image(p)
    except UserError as e:
        raise ImageError(f"{_at(row.where)}{e}") from None
    row.images.append(img)
    row.image_info.append(info)


def _add_video(row: Row, value: Any, what: str, base: Path | None) -> None:
    p = _media_path(value, row.where, what, base)
    try:
        info = check_video(p)
    except UserError as e:
        raise VideoError(f"{_at(row.where)}{e}") from None
    row.videos.append(str(p))
    row.video_info.append(info)


def parse_row(obj: Any, where: str, *, base: Path | None = None, objects: bool = False) -> Row:
    """Check one row and load its media. ``where`` names it in errors (``"rows.jsonl:3"``);
    relative paths are taken from ``base`` (the JSONL file's folder) when given; ``objects``
    allows PIL images in place of image paths (the Python API)."""
    if not isinstance(obj, dict):
        raise UserError(f"{_at(where)}a row must be a JSON object, not {_json_type(obj)}")
    unknown = [k for k in obj if k not in ROW_KEYS]
    if unknown:
        raise UserError(f"{_at(where)}unknown key {_key(unknown[0])} (a row has {', '.join(ROW_KEYS)})")
    row = Row(where=where)
    if "messages" in obj:
        if "prompt" in obj:
            raise UserError(f"{_at(where)}give 'prompt' or 'messages', not both")
        extra = [k for k in ("images", "video") if k in obj]
        if extra:
            raise UserError(f"{_at(where)}{extra[0]!r} goes inside 'messages' (as an item "
                            f"{{\"type\": \"{'image' if extra[0] == 'images' else 'video'}\", \"path\": ...}})")
        row.messages = _parse_messages(obj["messages"], row, base, objects)
        return row
    if "prompt" not in obj:
        raise UserError(f"{_at(where)}a row needs 'prompt' (or 'messages')")
    row.prompt = _text(obj["prompt"], where, "'prompt'")
    images = obj.get("images", [])
    if not isinstance(images, (list, tuple)):
        raise UserError(f"{_at(where)}'images' must be a list of paths")
    for k, value in enumerate(images):
        if not isinstance(value, (str, os.PathLike)) and not (objects and hasattr(value, "convert")):
            raise UserError(f"{_at(where)}'images' must be a list of paths (item {k} is {_json_type(value)})")
        _add_image(row, value, f"'images' item {k}", base, objects)
    video = obj.get("video")
    if video is not None or "video" in obj:
        if not isinstance(video, (str, os.PathLike)):
            raise UserError(f"{_at(where)}'video' must be a path, not {_json_type(video)}")
        _add_video(row, video, "'video'", base)
    return row


def _parse_messages(messages: Any, row: Row, base: Path | None, objects: bool) -> list:
    where = row.where
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{_at(where)}'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for m, msg in enumerate(messages):
        at = f"'messages' item {m}"
        if not isinstance(msg, dict):
            raise UserError(f"{_at(where)}{at} must be an object, not {_json_type(msg)}")
        unknown = [k for k in msg if k not in MESSAGE_KEYS]
        if unknown:
            raise UserError(f"{_at(where)}{at}: unknown key {_key(unknown[0])} (a message has role and content)")
        if msg.get("role") not in ROLES:
            raise UserError(f"{_at(where)}{at}: 'role' must be one of {', '.join(ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": _text(content, where, f"{at} content")})
            continue
        if not isinstance(content, list):
            raise UserError(f"{_at(where)}{at}: 'content' must be a string or a list of items")
        items = []
        for i, item in enumerate(content):
            it = f"{at} content item {i}"
            if not isinstance(item, dict) or item.get("type") not in ITEM_KEYS:
                raise UserError(f"{_at(where)}{it} must be an object with 'type' text, image or video")
            kind = item["type"]
            unknown = [k for k in item if k not in ITEM_KEYS[kind]]
            if unknown:
                raise UserError(f"{_at(where)}{it}: unknown key {_key(unknown[0])} "
                                f"(a {kind} item has {', '.join(ITEM_KEYS[kind][1:])})")
            if kind == "text":
                items.append({"type": "text", "text": _text(item.get("text"), where, f"{it} 'text'")})
                continue
            keys = [k for k in ITEM_KEYS[kind][1:] if k in item]
            if len(keys) != 1:
                raise UserError(f"{_at(where)}{it}: give the file as one of 'path' or {kind!r}")
            if kind == "image":
                _add_image(row, item[keys[0]], f"{it} {keys[0]!r}", base, objects)
            else:
                _add_video(row, item[keys[0]], f"{it} {keys[0]!r}", base)
            items.append({"type": kind})
        out.append({"role": msg["role"], "content": items})
    return out


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Read a JSONL batch file (one row per line; blank lines skipped) and check every row.
    Errors name the file and line. Relative media paths are taken from the file's folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"batch file not found: {p}")
    if p.is_dir():
        raise UserError(f"batch file is a directory: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the batch file {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: not UTF-8 text") from None
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not lines:
        raise UserError(f"{p}: no rows (the file is empty)")
    if len(lines) > MAX_ROWS:
        raise UserError(f"{p}: {len(lines)} rows; at most {MAX_ROWS} rows in one call")
    objs = []
    for n, ln in lines:
        try:
            objs.append((n, json.loads(ln)))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise UserError(f"{p}:{n}: not JSON (nested too deeply)") from None
    base = p.parent
    return [parse_row(obj, f"{p}:{n}", base=base) for n, obj in objs]


def rows_from_args(prompts: list[str], images: list[str], videos: list[str]) -> list[Row]:
    """Rows from repeated ``--prompt``, ``--image`` and ``--video``: N prompts with N images (or
    N videos) give N rows, one each; one prompt with k images gives one row with k images; N
    prompts and no media give N text rows. Anything else is ambiguous: a one-line error."""
    n = len(prompts)
    if images and len(images) != n and n != 1:
        raise UserError(f"{n} prompts and {len(images)} images: give one image per prompt, or one prompt "
                        f"with several images (or a --batch file)")
    if videos and len(videos) != n:
        raise UserError(f"{n} prompt(s) and {len(videos)} videos: give one video per prompt "
                        f"(a row has at most one video; or a --batch file)")
    rows = []
    for i, prompt in enumerate(prompts):
        where = "" if n == 1 else f"row {i + 1}"
        obj: dict[str, Any] = {"prompt": prompt}
        if images:
            obj["images"] = images if n == 1 else [images[i]]
        if videos:
            obj["video"] = videos[i]
        rows.append(parse_row(obj, where))
    return rows


def as_rows(rows: Any, where: str = "rows") -> list[Row]:
    """The Python API's ``rows``: a list of row dicts (or :class:`Row`), checked."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise UserError(f"{where} must be a non-empty list of rows")
    if len(rows) > MAX_ROWS:
        raise UserError(f"{_at(where)}{len(rows)} rows; at most {MAX_ROWS} rows in one call")
    return [r if isinstance(r, Row) else parse_row(r, f"{where}[{i}]", objects=True) for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------- processor


def _is_text_only(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    return getattr(cfg, "vision_config", None) is None and image_token_id_of(cfg) is None


def _takes_video(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    return any(getattr(cfg, k, None) is not None for k in ("video_token_id", "video_token_index"))


def _template_text(processor: Any, tok: Any, row: Row) -> str:
    """The row's text after the chat template (or the bare prompt when there is none)."""
    template_owner = processor if hasattr(processor, "apply_chat_template") else tok
    has_template = getattr(template_owner, "chat_template", None) or getattr(tok, "chat_template", None)
    if row.messages is not None:
        if not has_template:
            raise UserError(f"{_at(row.where)}'messages' need a chat template, and this processor has none")
        return template_owner.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True)
    assert row.prompt is not None
    if not has_template:
        return row.prompt
    if not row.images and not row.videos:
        # text-only: plain string content is what every chat template accepts
        messages = [{"role": "user", "content": row.prompt}]
    else:
        content = ([{"type": "image"}] * len(row.images) + [{"type": "video"}] * len(row.videos)
                   + [{"type": "text", "text": row.prompt}])
        messages = [{"role": "user", "content": content}]
    return template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _load_videos(rows: list[Row]) -> tuple[list, list]:
    """Every video of the call, in row order, decoded by transformers' PyAV loader: (frames, metadata)."""
    import numpy as np
    from transformers.video_utils import load_video

    frames, metas = [], []
    for row in rows:
        for path, info in zip(row.videos, row.video_info):
            n = int(info["frames"])   # decoded by check_video (a container may state none)

            def every_frame(metadata=None, n=n, **_):
                return np.arange(n)

            try:
                v, md = load_video(path, backend="pyav", sample_indices_fn=every_frame)
                if len(v) != n:
                    # transformers' reader seeks to 0 first, which in some WebM (VP9) files skips
                    # frames: read them in order, as check_video did
                    v = _decode_all(path)
                if len(v) != n:
                    raise ValueError(f"{len(v)} frames decode now, {n} did before")
            except Exception as e:  # noqa: BLE001 - a file PyAV cannot read: the user's input
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise VideoError(f"{_at(row.where)}cannot decode the video {path}: {why}") from None
            if md.total_num_frames != n:   # the container stated no count (Matroska): the decoded one
                md.total_num_frames, md.duration = n, n / md.fps
            md.frames_indices = np.arange(n)
            frames.append(v)
            metas.append(md)
    return frames, metas


def _decode_all(path: str) -> Any:
    """Every frame of a video in decoding order, RGB, [T, H, W, 3] (no seek)."""
    import av
    import numpy as np

    with av.open(path) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])


def build_batch_inputs(model: Any, processor: Any, rows: Any, *, padding_side: str = "left",
                       fps: float | None = None) -> tuple[dict, dict]:
    """Chat-template every row and run the model's processor once on all of them, padded on
    ``padding_side``; images and videos in row order; videos decoded with PyAV and sampled by
    the model's own video processor at ``fps`` frames per second (every frame when None).

    ``rows`` are :class:`Row` (from :func:`parse_row` / :func:`read_rows`) or row dicts.
    Returns (inputs on the model's device, info): info holds ``prompt`` (the first row's),
    ``rows`` (each row's metadata, see :meth:`Row.meta`), ``padding_side``, ``batch_size``, and
    ``image`` (the first image's info, as a one-image run has it).
    """
    import torch

    rows = as_rows(rows)
    if padding_side not in ("left", "right"):
        raise UserError(f"padding side must be 'left' or 'right', not {padding_side!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                            or not math.isfinite(fps) or fps <= 0):
        raise UserError(f"fps must be a positive number, not {fps!r}")
    images = [img for r in rows for img in r.images]
    n_videos = sum(len(r.videos) for r in rows)
    if (images or n_videos) and _is_text_only(model):
        what = "an image" if images else "a video"
        raise UserError(f"{what} was given but this is a text-only model (its config has no vision part)")
    if n_videos and not _takes_video(model):
        raise VideoError("a video was given but this model takes no video (its config has no video_token_id)")
    tok = getattr(processor, "tokenizer", processor)
    texts = [_template_text(processor, tok, r) for r in rows]
    videos, video_meta = _load_videos(rows) if n_videos else ([], [])
    kwargs: dict[str, Any] = {}
    if len(rows) > 1:
        kwargs["padding"] = True
    if videos:
        kwargs.update(videos=videos, video_metadata=video_meta)
        if fps is not None:
            kwargs.update(fps=float(fps), do_sample_frames=True)
        vp = getattr(processor, "video_processor", None)
        if vp is not None and hasattr(vp, "cap_pixels_per_frame") and vp.cap_pixels_per_frame is None:
            # unset means uncapped (transformers' current behaviour), with a warning on every
            # run: say so, and the processor does exactly what it does by default
            kwargs["cap_pixels_per_frame"] = False
    old_side = getattr(tok, "padding_side", None)
    try:
        if old_side is not None:
            tok.padding_side = padding_side
        inputs = dict(_process(processor, tok, texts, images, kwargs))
    except Exception as e:  # noqa: BLE001 - the model's processor rejects this input: the user's input
        raise _rejected(e, rows, images, n_videos) from e
    finally:
        if old_side is not None:
            tok.padding_side = old_side
    info = _batch_info(model, processor, rows, inputs, padding_side)
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point() and k not in _KEEP_DTYPE:
                v = v.to(dtype)
        out[k] = v
    return out, info


def _rejected(e: Exception, rows: list[Row], images: list, n_videos: int) -> UserError:
    """The processor's exception as one line naming what it rejected."""
    msg = str(e).strip()
    why = f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__
    if len(rows) == 1 and len(images) == 1 and not n_videos:
        info = rows[0].image_info[0]
        where = info.get("path") or rows[0].image_name
        size = "x".join(str(d) for d in getattr(images[0], "size", ()))
        return ImageError(f"the processor rejected the image{' ' + str(where) if where else ''}"
                          f"{f' ({size})' if size else ''}: {why}")
    if len(rows) == 1 and not images and not n_videos and rows[0].prompt is not None:
        return UserError(f"the processor rejected the prompt: {why}")
    what = "video" if n_videos and not images else "batch"
    head, _, line = rows[0].where.rpartition(":")
    src = head if head and line.isdigit() else ("rows" if rows[0].where.startswith("rows") else "the command line")
    return UserError(f"the processor rejected the {what} ({src}, {len(rows)} row(s)): {why}")


def _process(processor: Any, tok: Any, texts: list[str], images: list, kwargs: dict) -> Any:
    """Run the model's processor (or its tokenizer, for a text-only model) on the texts and media."""
    if images or "videos" in kwargs:
        return processor(text=texts, images=images or None, return_tensors="pt", **kwargs)
    if processor is not tok and hasattr(processor, "__call__"):
        try:
            return processor(text=texts, return_tensors="pt", **kwargs)
        except TypeError:
            return tok(texts, return_tensors="pt", **kwargs)
    return tok(texts, return_tensors="pt", **kwargs)


def _batch_info(model: Any, processor: Any, rows: list[Row], inputs: dict, padding_side: str) -> dict:
    """Each row's metadata, with the size each image was resized to and each video's grid."""
    image_sizes = _resized_sizes(processor, inputs, sum(len(r.images) for r in rows))
    vgrid = inputs.get("video_grid_thw")
    vgrid = vgrid.tolist() if vgrid is not None else []
    spg = inputs.get("second_per_grid_ts")
    spg = [float(x) for x in (spg.tolist() if hasattr(spg, "tolist") else spg)] if spg is not None else []
    k = j = 0
    for r in rows:
        for info in r.image_info:
            if k < len(image_sizes) and image_sizes[k] is not None:
                info["resized"] = image_sizes[k]
            k += 1
        for info in r.video_info:
            if j < len(vgrid):
                info["grid_thw"] = [int(x) for x in vgrid[j]]
            if j < len(spg):
                info["second_per_grid_ts"] = spg[j]
            j += 1
    metas = [r.meta() for r in rows]
    first = rows[0]
    info: dict[str, Any] = {"prompt": first.prompt if first.prompt is not None else _last_user_text(first),
                            "rows": metas, "padding_side": padding_side, "batch_size": len(rows)}
    first_image = next((i for r in rows for i in r.image_info), None)
    if first_image is not None:
        info["image"] = dict(first_image)
    return info


def _last_user_text(row: Row) -> str | None:
    for msg in reversed(row.messages or []):
        if msg["role"] == "user":
            c = msg["content"]
            return c if isinstance(c, str) else " ".join(i["text"] for i in c if i["type"] == "text")
    return None


def _resized_sizes(processor: Any, inputs: dict, n: int) -> list[list[int] | None]:
    """The size [w, h] each image was resized to (after the processor's pixel limits)."""
    grid = inputs.get("image_grid_thw")
    ip = getattr(processor, "image_processor", None)
    if grid is not None:
        patch = getattr(ip, "patch_size", None) or 14
        return [[int(g[2]) * int(patch), int(g[1]) * int(patch)] for g in grid.tolist()]
    pv = inputs.get("pixel_values")
    if pv is not None and getattr(pv, "dim", lambda: 0)() == 4:
        return [[int(pv.shape[-1]), int(pv.shape[-2])]] * n
    return [None] * n


def build_inputs(model: Any, processor: Any, *, prompt: str, image: Any = None,
                 image_name: str | None = None) -> tuple[dict, dict]:
    """One prompt with at most one image (a path or a PIL image): a one-row
    :func:`build_batch_inputs`. ``image_name`` names an image object in error messages.

    Returns (inputs moved to the model's device, ``{"prompt", "image"}``).
    """
    if image is not None and _is_text_only(model):
        raise UserError("--image was given but this is a text-only model (its config has no vision part)")
    row = parse_row({"prompt": prompt, "images": [image] if image is not None else []}, "", objects=True)
    row.image_name = image_name
    inputs, info = build_batch_inputs(model, processor, [row])
    out = {"prompt": prompt}
    if "image" in info:
        out["image"] = info["image"]
    return inputs, out


# ----------------------------------------------------------------------------- generation


def generate_calls(rec: Any, model: Any, processor: Any, prepared: list[tuple[dict, dict]], *,
                   max_new_tokens: int) -> list[list[str]]:
    """Run each prepared call (``(inputs, info)`` from :func:`build_batch_inputs`) as one
    ``generate`` under the recorder ``rec``, each begun with ``rec.begin_call`` (a new prefill;
    its rows in the run metadata). Returns every call's texts, also kept in the metadata as
    ``generated_calls`` (``generated_texts``/``generated_text``: the first call's, first row's)."""
    texts: list[list[str]] = []
    for i, (inputs, info) in enumerate(prepared):
        rec.begin_call(call=i, batch_size=info["batch_size"], padding_side=info["padding_side"],
                       rows=info["rows"])
        texts.append(generate_texts(model, processor, inputs, max_new_tokens=max_new_tokens))
        rec.add_meta(generated_text=texts[0][0] if texts[0] else "", generated_texts=texts[0],
                     generated_calls=texts)
    return texts


def generate_texts(model: Any, processor: Any, inputs: dict, *, max_new_tokens: int) -> list[str]:
    """Greedy generation; returns the decoded new text of every row."""
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seqs = out.sequences if hasattr(out, "sequences") else out
    n_in = inputs["input_ids"].shape[-1] if "input_ids" in inputs else 0
    new = seqs[:, n_in:]
    dec = getattr(processor, "batch_decode", None) or getattr(getattr(processor, "tokenizer", None),
                                                               "batch_decode", None)
    if dec is None:
        return [""] * int(new.shape[0])
    return list(dec(new, skip_special_tokens=True))


def generate_text(model: Any, processor: Any, inputs: dict, *, max_new_tokens: int) -> str:
    """Greedy generation; returns the decoded new text of the first row."""
    texts = generate_texts(model, processor, inputs, max_new_tokens=max_new_tokens)
    return texts[0] if texts else ""
