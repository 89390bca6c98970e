"""A small, deterministic Qwen2.5-VL-shaped trace: :func:`write_demo_trace`.

The viewer's snapshot tests need a trace whose every number is fixed (a trace recorded
from a model carries host timings and float stats that move with torch versions and
CPUs), and the viewer benchmarks need a trace when no recorder is around. This writes
one that follows ``docs/trace-format.md``: the tiny-qwen2.5-vl module tree, a prefill
with an image span and decode steps with a growing cache, M-RoPE position ids, masks,
reshapes with call sites and probes.

``variant="b"`` changes the output of ``model.visual.merger`` (values drift) and the
shape of ``model.language_model.layers.1.mlp.down_proj`` in the prefill, to exercise
the diff mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from vlmscope.testing._demo_forward import HEADS, IMAGE_TOKEN_ID, KV_HEADS, VOCAB, emit_step
from vlmscope.testing._modules import module_table
from vlmscope.testing._writer import (
    DEMO_LAYOUT, Emitter, Strings, TableSink, attach_probe_data, build_tables, place, step_fields, write_modules,
)
from vlmscope.trace import TraceWriter

__all__ = ["write_demo_trace", "IMAGE_TOKEN_ID", "MODULES"]

VISION_START, VISION_END = 151652, 151653

#: (path, class) in named_modules() order, as tiny-qwen2.5-vl has them.
MODULES: list[tuple[str, str]] = module_table("qwen2_5_vl", n_layers=2, n_vision=2)


def _mrope_positions(n_text_before: int, grid: tuple[int, int], n_text_after: int) -> np.ndarray:
    """Qwen2-VL style 3-row position ids for text, an image grid (h, w merged), text."""
    gh, gw = grid
    rows = [[], [], []]
    for i in range(n_text_before):
        for r in rows:
            r.append(i)
    base = n_text_before
    for y in range(gh):
        for x in range(gw):
            rows[0].append(base)
            rows[1].append(base + y)
            rows[2].append(base + x)
    nxt = base + max(gh, gw)
    for i in range(n_text_after):
        for r in rows:
            r.append(nxt + i)
    return np.array(rows, dtype=np.int64)[:, None, :]


def _meta(n_decode: int) -> dict:
    return {
        "vlmscope": "0.1.0", "torch": "2.x", "transformers": "5.x", "device": "cpu", "dtype": "float32",
        "attn_implementation": "sdpa", "model": "tiny-qwen2.5-vl", "family": "qwen2_5_vl",
        "model_class": "Qwen2_5_VLForConditionalGeneration", "prompt": "Describe this image.",
        "image": {"path": "examples/astronaut.png", "sha256": "0" * 64, "size": [512, 512], "resized": [112, 112]},
        "seed": 0, "generation": {"max_new_tokens": n_decode + 1, "do_sample": False},
        "argv": ["vlmscope", "record"], "generated_text": "a demo",
        "decoder_layers": "model.language_model.layers", "text_model": "model.language_model",
        "vision_model": "model.visual", "merger": "model.visual.merger", "image_token_id": IMAGE_TOKEN_ID,
        "num_key_value_heads": KV_HEADS, "num_attention_heads": HEADS, "warnings": [],
    }


def write_demo_trace(path: str | Path, *, variant: str = "a", n_decode: int = 3, status: str = "complete",
                     save_tensors: tuple[str, ...] = ("model.visual.merger", "lm_head"),
                     nan_in: str | None = None) -> Path:
    """Write the demo trace to ``path`` and return it. Deterministic: same bytes of data every time
    (timestamps apart). ``nan_in``: a module path whose outputs report NaN (a failing check)."""
    grid = (4, 4)                      # merged image grid: 16 image tokens
    n_img = grid[0] * grid[1]
    before = 4                         # <|im_start|> user \n <|vision_start|>
    prompt_ids = [151644, 872, 198, VISION_START] + [IMAGE_TOKEN_ID] * n_img + [VISION_END] + \
        [74785, 419, 2168, 13, 151645, 198, 151644]
    seq_len = len(prompt_ids)
    w = TraceWriter(Path(path), meta=_meta(n_decode), config_json=json.dumps({"model_type": "qwen2_5_vl"}))
    S = Strings(w)
    mods = write_modules(w, MODULES)
    sink = TableSink(w)
    paths = [p for p, _ in MODULES]
    pos_prefill = _mrope_positions(before, grid, seq_len - before - n_img)
    cache = 0
    for step in range(n_decode + 1):
        prefill = step == 0
        L = seq_len if prefill else 1
        total = seq_len + step
        if prefill:
            pos, step_ids = pos_prefill, np.array([prompt_ids], dtype=np.int64)
        else:
            pos = np.full((3, 1, 1), int(pos_prefill.max()) + step, dtype=np.int64)
            step_ids = np.array([[(1000 + 37 * step) % VOCAB]], dtype=np.int64)
        d = SimpleNamespace(
            E=Emitter(mods, DEMO_LAYOUT), step=step, prefill=prefill, L=L, total=total, cache=cache, pos=pos,
            step_ids=step_ids, variant=variant, grid=grid, n_img=n_img, img_start=before, seq_len=seq_len,
            pos_prefill=pos_prefill, n_layers=2, mask4=np.tril(np.ones((total, total), dtype=bool))[-L:][None, None])
        emit_step(d)
        tables = build_tables(d.E, S)
        t = place(tables, step, sink.counts["events"], sink.counts["tensors"])
        t["events"]["dur_us"] = 10.0 + t["events"]["seq"] % 50
        _tensor_values(w, t["tensors"], tables["tensor_specs"], paths, step, variant, set(save_tensors), nan_in)
        data = sink.probe_data()
        attach_probe_data(t["probes"], tables["probe_data"], data)
        sink.add(t, data, **step_fields(
            [(int(pos[k].min()), int(pos[k].max())) for k in range(3)], (1, 1, L, total), step=step,
            kind=0 if prefill else 1, status=0, input_len=L, q_len=L, cache_before=cache, cache_after=cache + L,
            image_tokens=n_img if prefill else 0, wall_ms=5.0 + step))
        cache += L
    sink.flush()
    return w.close(status)


def _stats(name: str, shape: tuple, dtype: str, salt: int) -> tuple:
    numel = int(np.prod(shape)) if shape else 1
    if dtype in ("int64", "int32"):
        return numel, 0.0, float(VOCAB - 1), 4096.0, 1024.0, float(VOCAB - 1), 0, 0
    if dtype == "bool":
        return numel, 0.0, 1.0, 0.5, 0.5, 1.0, 0, 0
    h = (sum(map(ord, name)) * 31 + salt * 17 + numel) % 997
    std = 0.5 + h / 997.0
    mean = (h % 13 - 6) / 100.0
    return numel, mean - 4 * std, mean + 4 * std, mean, std, abs(mean) + 4 * std, 0, 0


def _tensor_values(w: TraceWriter, te: np.ndarray, specs: list[tuple], paths: list[str], step: int, variant: str,
                   save: set[str], nan_in: str | None) -> None:
    """Stats made up from each tensor's module, name, shape and step (the variant and the NaN
    module change them) and the payloads of the ``save`` modules' outputs."""
    for r, (module, role, name, shape, dtype) in zip(te, specs):
        path = paths[module]
        numel, mn, mx, mean, std, amax, nan, inf = _stats(path + name, shape, dtype, step * 7 + role)
        if variant == "b" and path == "model.visual.merger" and role == 2:
            mean, std, mx = mean + 0.25, std * 1.5, mx * 1.5
        if nan_in is not None and path == nan_in and role == 2:
            nan = max(1, numel // 64)
        payload = -1
        if role == 2 and path in save and name == "out":
            vals = (np.arange(numel, dtype=np.float32).reshape(shape) % 97 - 48) / 16.0
            payload = w.add_payload(vals, module=path, step=step, name=name, dtype=dtype)
        r["numel"], r["min"], r["max"], r["mean"], r["std"], r["absmax"] = numel, mn, mx, mean, std, amax
        r["nan"], r["inf"], r["payload"] = nan, inf, payload
