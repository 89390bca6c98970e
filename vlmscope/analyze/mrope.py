"""An independent M-RoPE position oracle for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (numpy only).

:func:`rope_index` computes the 3-row ``(t, h, w)`` position ids and the per-row rope deltas
that the models' ``get_rope_index`` computes for a prefill, from the documented rules rather
than from the model code; :func:`decode_positions` the positions of later (decode) tokens.
``tests/analyze/test_mrope_oracle.py`` checks it exactly against transformers 5.x on random
layouts.

The rules (transformers 5.x, ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw,
video_grid_thw, [second_per_grid_ts,] attention_mask)``):

* Padding (``attention_mask == 0``) is dropped first; the attended tokens of a row are cut
  into runs of one token type (text 0, image 1, video 2). Padding keeps position 0 on all three
  axes.
* A text run of ``n`` tokens takes ``start .. start+n-1`` on all three axes; ``start += n``.
* A vision run takes the next grid ``(t, h, w)`` of its kind (the grids are consumed in order
  across the whole batch). With ``m`` the spatial merge size it holds ``t * (h//m) * (w//m)``
  tokens in ``t, h//m, w//m`` order; their positions are ``start + floor(i_t * interval)``,
  ``start + i_h`` and ``start + i_w``. Afterwards ``start += max(h//m, w//m)`` -- the temporal
  extent is *not* counted (in transformers 4.x the next start was the span's maximum + 1, which
  differs for videos whose temporal positions outrun the spatial ones).
* ``interval`` is 1, except for Qwen2.5-VL videos: ``tokens_per_second * second_per_grid_ts``
  (of that video; 1 when ``second_per_grid_ts`` is absent), computed in the floating type of
  ``second_per_grid_ts`` (float32 as the processor makes it) and truncated to an integer.
* Qwen3-VL puts timestamps between video frames, so every video grid ``(t, h, w)`` stands for
  ``t`` separate runs of grid ``(1, h, w)``.
* The rope delta of a row is ``max position + 1 - number of attended tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["FAMILIES", "normalize_family", "rope_index", "decode_positions", "token_types"]

#: The model families the oracle knows (``config.model_type`` spelling).
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

_ALIASES = {
    "qwen2_vl": "qwen2_vl", "qwen2vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl", "qwen2.5_vl": "qwen2_5_vl", "qwen25_vl": "qwen2_5_vl", "qwen2_5vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl", "qwen3vl": "qwen3_vl",
}

TEXT, IMAGE, VIDEO = 0, 1, 2


def normalize_family(family: str) -> str:
    """``"Qwen2.5-VL"``, ``"qwen2_5_vl"`` ... -> one of :data:`FAMILIES` (``ValueError`` otherwise)."""
    key = str(family).strip().lower().replace("-", "_").replace(" ", "_")
    fam = _ALIASES.get(key) or _ALIASES.get(key.replace(".", "_"))
    if fam is None:
        raise ValueError(f"unknown M-RoPE family {family!r}; expected one of {', '.join(FAMILIES)}")
    return fam


def token_types(input_ids: Any, *, image_token_id: int, video_token_id: int) -> np.ndarray:
    """``mm_token_type_ids`` as the processors make them: 1 for image tokens, 2 for video, else 0."""
    ids = np.asarray(input_ids)
    types = np.zeros(ids.shape, dtype=np.int64)
    types[ids == image_token_id] = IMAGE
    types[ids == video_token_id] = VIDEO
    return types


def _grids(grid_thw: Any, name: str) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    arr = np.asarray(grid_thw)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer, got {arr.dtype}")
    if (arr < 1).any():
        raise ValueError(f"{name} has a non-positive size: {arr.tolist()}")
    return arr.astype(np.int64)


def _temporal(n_t: int, interval: Any) -> np.ndarray:
    """``floor(arange(n_t) * interval)`` in the arithmetic torch uses for that interval."""
    steps = np.arange(n_t, dtype=np.int64)
    if isinstance(interval, (int, np.integer)):
        return steps * int(interval)
    dtype = interval.dtype if isinstance(interval, np.floating) else np.dtype(np.float32)
    return (steps.astype(dtype) * dtype.type(interval)).astype(np.int64)  # truncation, values >= 0


def _interval(tokens_per_second: Any, second: Any) -> Any:
    """``tokens_per_second * second`` typed as torch would: an int, or a numpy float scalar."""
    if isinstance(second, np.floating):
        return second.dtype.type(tokens_per_second) * second
    if isinstance(tokens_per_second, (float, np.floating)) or isinstance(second, float):
        return np.float32(float(tokens_per_second) * float(second))
    return int(tokens_per_second) * int(second)


def _vision(start: int, grid: np.ndarray, merge: int, interval: Any) -> np.ndarray:
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    tt = np.broadcast_to(_temporal(t, interval)[:, None, None], (t, h, w))
    hh = np.broadcast_to(np.arange(h, dtype=np.int64)[None, :, None], (t, h, w))
    ww = np.broadcast_to(np.arange(w, dtype=np.int64)[None, None, :], (t, h, w))
    return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start


def _runs(types: np.ndarray) -> list[tuple[int, int]]:
    """(type, length) of each run of equal token types."""
    if types.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [types.size]])
    return [(int(types[s]), int(e - s)) for s, e in zip(starts, ends)]


def rope_index(
    family: str,
    input_ids: Any,
    *,
    mm_token_type_ids: Any = None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    image_grid_thw: Any = None,
    video_grid_thw: Any = None,
    attention_mask: Any = None,
    spatial_merge_size: int = 2,
    tokens_per_second: int | float | None = None,
    second_per_grid_ts: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Expected prefill M-RoPE positions: ``(positions [3, B, S] int64, deltas [B] int64)``.

    ``input_ids`` is ``[B, S]`` (or ``[S]``). The token types come from ``mm_token_type_ids``
    when given, else from ``image_token_id`` / ``video_token_id``. ``image_grid_thw`` /
    ``video_grid_thw`` are the ``(n, 3)`` patch grids in order over the batch;
    ``spatial_merge_size`` is ``config.vision_config.spatial_merge_size``. For Qwen2.5-VL
    videos ``tokens_per_second`` (``config.vision_config.tokens_per_second``) is required and
    ``second_per_grid_ts`` (one per video) optional. Raises ``ValueError`` when a vision run
    does not hold its grid's token count, when grids run out or are left over, or when a row
    has no attended token.
    """
    fam = normalize_family(family)
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
        if mm_token_type_ids is not None:
            mm_token_type_ids = np.asarray(mm_token_type_ids)[None, :]
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)[None, :]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    batch, seq = ids.shape
    if mm_token_type_ids is not None:
        types = np.asarray(mm_token_type_ids).astype(np.int64)
    elif image_token_id is not None or video_token_id is not None:
        types = token_types(ids, image_token_id=-1 if image_token_id is None else image_token_id,
                            video_token_id=-1 if video_token_id is None else video_token_id)
    else:
        raise ValueError("give mm_token_type_ids, or image_token_id / video_token_id")
    if types.shape != ids.shape:
        raise ValueError(f"mm_token_type_ids shape {types.shape} != input_ids shape {ids.shape}")
    unknown = np.setdiff1d(np.unique(types), [TEXT, IMAGE, VIDEO])
    if unknown.size:
        raise ValueError(f"unknown token types {unknown.tolist()} (text 0, image 1, video 2)")
    if attention_mask is None:
        keep = np.ones((batch, seq), dtype=bool)
    else:
        keep = np.asarray(attention_mask).astype(bool)
        if keep.shape != ids.shape:
            raise ValueError(f"attention_mask shape {keep.shape} != input_ids shape {ids.shape}")
    merge = int(spatial_merge_size)
    if merge < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")

    images = _grids(image_grid_thw, "image_grid_thw")
    videos = _grids(video_grid_thw, "video_grid_thw")
    seconds: list[Any] | None = None
    if fam == "qwen3_vl":  # timestamps split a video into one run per frame
        videos = np.repeat(videos, videos[:, 0], axis=0)
        videos[:, 0] = 1
    elif fam == "qwen2_5_vl" and second_per_grid_ts is not None:
        arr = np.asarray(second_per_grid_ts).reshape(-1)
        seconds = list(arr)  # numpy scalars: the arithmetic keeps their dtype
    queues: dict[int, Iterator[np.ndarray]] = {IMAGE: iter(images), VIDEO: iter(videos)}
    second_iter = iter(seconds) if seconds is not None else None
    used = {IMAGE: 0, VIDEO: 0}

    positions = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros(batch, dtype=np.int64)
    for b in range(batch):
        row_types = types[b][keep[b]]
        if row_types.size == 0:
            raise ValueError(f"row {b} has no attended token")
        pieces = []
        start = 0
        for kind, length in _runs(row_types):
            if kind == TEXT:
                pieces.append(np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (3, length)))
                start += length
                continue
            name = "image" if kind == IMAGE else "video"
            grid = next(queues[kind], None)
            if grid is None:
                raise ValueError(f"row {b}: more {name} runs than {name}_grid_thw entries ({used[kind]})")
            used[kind] += 1
            interval: Any = 1
            if fam == "qwen2_5_vl" and kind == VIDEO:
                if tokens_per_second is None:
                    raise ValueError("qwen2_5_vl videos need tokens_per_second "
                                     "(config.vision_config.tokens_per_second)")
                second = 1 if second_iter is None else next(second_iter, None)
                if second is None:
                    raise ValueError("fewer second_per_grid_ts entries than videos")
                interval = _interval(tokens_per_second, second)
            pos = _vision(start, grid, merge, interval)
            if pos.shape[1] != length:
                raise ValueError(f"row {b}: a run of {length} {name} tokens, but its grid {grid.tolist()} "
                                 f"with merge size {merge} makes {pos.shape[1]}")
            pieces.append(pos)
            start += max(int(grid[1]), int(grid[2])) // merge
        row = np.concatenate(pieces, axis=1)
        positions[:, b, keep[b]] = row
        deltas[b] = int(row.max()) + 1 - row.shape[1]
    for kind, grids in ((IMAGE, images), (VIDEO, videos)):
        if used[kind] != len(grids):
            name = "image" if kind == IMAGE else "video"
            raise ValueError(f"{len(grids) - used[kind]} {name} grid(s) left over: "
                             f"{used[kind]} {name} runs for {len(grids)} grids")
    return positions, deltas


def decode_positions(deltas: Any, cache_position: Any, *, attention_mask: Any = None) -> np.ndarray:
    """Positions ``[3, B, n]`` of tokens after the prefill (all three axes equal).

    Without ``attention_mask``: ``cache_position + delta`` (the models' rule for a cached
    forward without a mask). With the full ``[B, L]`` mask (prompt and new tokens): the token
    in column ``c`` has ``(attended tokens up to c) - 1 + delta``, and padding ``delta`` --
    which is also where ``generate()`` puts the k-th new token of a left-padded prompt that ends
    in text: the prompt's last position + k.
    """
    d = np.asarray(deltas, dtype=np.int64).reshape(-1)
    cache = np.asarray(cache_position, dtype=np.int64).reshape(-1)
    if attention_mask is None:
        pos = np.broadcast_to(cache[None, :], (d.size, cache.size))
    else:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.ndim != 2 or mask.shape[0] != d.size:
            raise ValueError(f"attention_mask must be [{d.size}, L], got {mask.shape}")
        counted = np.cumsum(mask, axis=1, dtype=np.int64) - 1
        counted[~mask] = 0
        pos = counted[:, cache]
    out = pos + d[:, None]
    return np.broadcast_to(out[None], (3,) + out.shape).copy()
