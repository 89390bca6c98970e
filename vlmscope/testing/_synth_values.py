"""Per-step values of the generate traces: tensor stats (and the value faults), probe values
(input ids, positions, masks, cache lengths) and the probe infos that fill the templates."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

_FINFO_MIN = {"float32": -3.4028234663852886e38, "bfloat16": -3.3895313892515355e38,
              "float16": -65504.0, "float64": -1.7976931348623157e308}


def tensor_stats(te: np.ndarray, scale: np.ndarray, rng: np.random.Generator, int_ids: list[int]) -> None:
    """Deterministic stats: the same for the same (seed, step) except where faults apply.
    ``scale``: each row's module scale; ``int_ids``: string ids of the integer dtypes."""
    n = len(te)
    mean = rng.normal(0, 0.05, n) * scale
    std = np.abs(rng.normal(1.0, 0.1, n)) * scale
    te["mean"], te["std"] = mean, std
    te["min"] = mean - 4 * std
    te["max"] = mean + 4 * std
    te["absmax"] = np.maximum(np.abs(te["min"]), np.abs(te["max"]))
    te["nan"] = 0
    te["inf"] = 0
    te["payload"] = -1
    is_int = np.isin(te["dtype"], int_ids)
    te["mean"][is_int] = np.round(te["mean"][is_int])


def value_faults(te: np.ndarray, tags: np.ndarray, faults: dict, step: int, n_layers: int) -> None:
    """The ``drift`` and ``nan`` faults: from (step, layer) on, what depends on that layer's
    ``mlp.down_proj`` output drifts / is NaN."""
    drift_from, nan_from = faults.get("drift"), faults.get("nan")
    if drift_from is not None and step >= drift_from[0]:
        hit = downstream(tags, drift_from[1], n_layers, include_end=True, whole=step > drift_from[0])
        te["mean"][hit] += 0.5 * te["std"][hit]
        te["std"][hit] *= 1.3
        te["max"][hit] *= 1.3
        te["absmax"][hit] *= 1.3
    if nan_from is not None and step >= nan_from[0]:
        hit = downstream(tags, nan_from[1], n_layers, include_end=True, whole=step > nan_from[0])
        te["nan"][hit] = te["numel"][hit]
        for f in ("min", "max", "mean", "std", "absmax"):
            te[f][hit] = np.nan


def downstream(tags: np.ndarray, layer: int, n_layers: int, include_end: bool, whole: bool) -> np.ndarray:
    """Tensors whose values depend on layer ``layer``'s down_proj output (tags from the emitter)."""
    hit = np.zeros(len(tags), bool)
    if whole:
        # later steps: every hidden state of every layer is affected (through the cache)
        hit |= np.char.startswith(tags.astype(str), "h") | np.char.startswith(tags.astype(str), "d")
    want = {f"d{layer}"} | {f"{t}{i}" for i in range(layer + 1, n_layers) for t in ("h", "ha", "d")}
    if include_end:
        want.add("end")
    hit |= np.isin(tags, list(want))
    return hit


def positions(c: Any, faults: dict, step: int, q: int, C: int) -> dict[str, np.ndarray]:
    """Text (KV-index) and rope positions of a step: {"text": [B,q], "rope": [3,B,q] or [B,q]}."""
    B = c.batch
    text = np.broadcast_to(np.arange(C, C + q, dtype=np.int64), (B, q)).copy()
    if c.rope == "mrope":
        if step == 0:
            a, gh, gw = c.img_start, c.grid[1] // c.merge, c.grid[2] // c.merge
            n_img = gh * gw
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
            rope = np.broadcast_to(text + c.rope_delta, (3, B, q)).copy()
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


def probe_values(c: Any, faults: dict, step: int, q: int, C: int, KM: int, cache_len: np.ndarray,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The step's probe values by key (the emitter's probe ``data``) and its positions."""
    B, prefill = c.batch, step == 0
    pos = positions(c, faults, step, q, C)
    ids = rng.integers(0, 150000, size=(B, q)).astype(np.int64)
    ids[ids == c.image_token_id] = 1
    if prefill:
        ids[:, c.img_start:c.img_start + c.n_img] = c.image_token_id
    v = {"input_ids": ids, "mask2d": np.ones((B, C + q), bool)}
    if c.rope == "mrope":
        v.update(pos4=np.concatenate([pos["text"][None], pos["rope"]], axis=0), pos3=pos["rope"],
                 text_pos=pos["text"])
    else:
        v.update(pos1=pos["text"], rope1=pos["rope"])
    if prefill:
        v["grid"] = np.array([c.grid], np.int64)
        v["mmtt"] = (ids == c.image_token_id).astype(np.int64)
    # mask bits: allowed = causal over keys [0, C+q)
    v["mask4"] = np.broadcast_to(np.arange(KM)[None, :] <= (C + np.arange(q)[:, None]), (B, 1, q, KM))
    # cache lengths as each layer sees them (layers < li already updated)
    v["cache0"] = cache_len.copy()
    grow = np.full(c.n_layers, q, np.int64)
    if isinstance(faults.get("cache_twice"), tuple) and faults["cache_twice"][0] == step:
        grow[faults["cache_twice"][1]] = 2 * q
    for li in range(c.n_layers):
        cur = cache_len.copy()
        cur[:li] += grow[:li]
        v[f"cache_l{li}"] = cur
    v["cache_after"] = cache_len + grow
    return v, pos


def infos(c: Any, faults: dict, step: int, v: dict[str, np.ndarray], pos: dict[str, np.ndarray],
          **dims: int) -> dict[str, Any]:
    """The values of the step's templates: probe infos (JSON) and the ``dims`` (B, q, K, C, KM)."""
    B, prefill, mrope = c.batch, step == 0, c.rope == "mrope"
    mask_dtype = faults.get("mask_dtype", c.dtype)
    out = {
        "input_ids_info": json.dumps({"image_token_id": c.image_token_id,
                                      "spans": [[b, c.img_start, c.img_start + c.n_img] for b in range(B)]
                                      if prefill else [],
                                      "image_tokens": B * c.n_img if prefill else 0}),
        "grid_info": json.dumps({"min": 1, "max": int(max(c.grid))}),
        "mask4_info": json.dumps({"style": "additive", "dtype": mask_dtype,
                                  "fill": _FINFO_MIN.get(mask_dtype, -1e38)}),
        "pos4_info": _rows_info(v["pos4"]) if mrope else "",
        "pos3_info": _rows_info(v["pos3"]) if mrope else "",
        "text_pos_info": _rows_info(pos["text"]),
        "pos1_info": _rows_info(pos["text"]),
        "rope1_info": json.dumps({"min": int(pos["rope"].min()), "max": int(pos["rope"].max())}),
        "cache0_info": _cache_info(v["cache0"], c),
    }
    for li in range(c.n_layers):
        out[f"cache_l{li}_info"] = _cache_info(v[f"cache_l{li}"], c)
    out.update(dims)
    return out


def _cache_info(lens: np.ndarray, c: Any) -> str:
    return json.dumps({"type": "DynamicCache", "layout": "BHSD", "lengths": [int(x) for x in lens],
                       "key_shape": [c.batch, c.kv_heads, int(lens[0]), c.head_dim], "dtype": c.dtype,
                       "n_layers": len(lens)})


def _rows_info(a: np.ndarray) -> str:
    if a.ndim == 3:
        return json.dumps({"rows": [[int(r.min()), int(r.max())] for r in a]})
    return json.dumps({"rows": [[int(a.min()), int(a.max())]]})
