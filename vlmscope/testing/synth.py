"""Synthetic generate traces: large, realistic and fast to write.

``make_trace(path, n_events=1_000_000)`` writes a trace shaped like a recording of a
Qwen2-VL-style generate (transformers naming: ``model.visual.blocks.N``,
``model.language_model.layers.N.self_attn.q_proj``, ...): a prefill with a vision tower and
an image spliced into the prompt, then decode steps until ``n_events`` module calls are
written. Every table is filled: events, tensors (with stats), reshapes (with call sites) and
semantic probes (input ids, M-RoPE / 1-D position ids, 4-D additive masks, cache lengths,
image grid, merger rows, rope positions).

The benchmarks and the analysis tests use it, with faults (``faults=``) injected to get traces
that break one invariant. Decode steps are emitted once as a template and patched with numpy,
so a 1M-event trace takes a few seconds to write.

Faults (``faults={name: value}``), all optional:

- ``drift=(step, layer)``: from that step on, the output of ``layers.<layer>.mlp.down_proj``
  and everything downstream has different values (stats change, shapes do not).
- ``shape=(step, layer)``: in that step, ``layers.<layer>.self_attn.o_proj`` outputs one extra
  feature column (a shape divergence).
- ``nan=(step, layer)``: ``layers.<layer>.mlp.down_proj`` produces NaN in that step; every
  later hidden state of the step (and every later step) carries it.
- ``mask_len=k``: the 4-D mask's key length is off by ``k`` in every step.
- ``mask_dtype="float32"``: the additive mask keeps that dtype (the model runs in ``dtype``).
- ``cache_twice=(step, layer)``: that layer appends its K/V twice in that step.
- ``pos_shift=k``: decode position ids are shifted by ``k`` (e.g. the image length).
- ``fallback_1d=True``: no ``mm_token_type_ids``: M-RoPE positions degrade to three equal
  1-D rows although an image is present.
- ``kv_quirk=v``: the model's computed 1-D ``position_ids`` start at ``v`` on decode steps
  while rotary uses the real KV index (the mqwen ``past_length`` quirk). Needs ``rope="1d"``.
- ``image_rows=k``: the merger outputs ``k`` more rows than there are placeholders.
- ``cat_promotion=True``: a ``cat`` in layer 0 mixes bfloat16 and float16 (gives float32).
- ``seq_len=(step, layer)``: the hidden states entering that layer have one token too many.

The decode template is emitted with ``step=1`` whatever step first needs it, so a
``(1, layer)`` shape fault (``shape``, ``seq_len``, ``cache_twice``) also shapes every later
decode step that is not itself named by a fault. The tests' traces were written so.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from vlmscope.testing._modules import module_table
from vlmscope.testing._qwen2_vl import emit_step
from vlmscope.testing._sketches import step_sketches
from vlmscope.testing._synth_values import infos, probe_values, tensor_stats, value_faults
from vlmscope.testing._writer import (
    SENT_C, SENT_K, SENT_KM, SYNTH_LAYOUT, Emitter, Strings, TableSink, attach_probe_data, build_tables,
    fill_numel, place, step_fields, sub_sentinels, write_modules,
)
from vlmscope.trace import FORMAT_VERSION, TraceWriter, open_trace

__all__ = ["make_trace", "cached_trace"]

IMAGE_TOKEN_ID = 151655


def cached_trace(path, *args: Any, **kwargs: Any) -> tuple[Path, bool]:
    """``make_trace(path, ...)`` unless ``path`` already holds a trace of the current format,
    with value sketches or without as ``sketches=`` asks (benchmarks cache their big traces
    across runs). Returns (path, written)."""
    path = Path(path)
    if path.exists():
        try:
            with open_trace(path) as t:
                if t.format_version == FORMAT_VERSION and t.has_sketches() == bool(kwargs.get("sketches", True)):
                    return path, False
        except Exception:  # noqa: BLE001 - unreadable: write it again
            pass
        path.unlink()
    return make_trace(path, *args, **kwargs), True


def make_trace(path, n_events: int = 1_000_000, *, n_steps: int | None = None, n_layers: int = 28,
               n_vision: int = 4, batch: int = 1, prompt_tokens: int = 24, image_grid: tuple = (1, 16, 16),
               merge: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 256,
               vocab: int = 1024, dtype: str = "bfloat16", rope: str = "mrope", family: str | None = None,
               seed: int = 0, faults: dict | None = None, payloads: bool = False,
               status: str = "complete", sketches: bool = True) -> Path:
    """Write a synthetic trace to ``path`` and return it.

    ``n_events`` module calls are written (whole steps: the count is reached or passed by less
    than one step), unless ``n_steps`` is given. ``rope`` is ``"mrope"`` (Qwen2-VL-style
    ``[4,B,S]`` positions reaching the text model) or ``"1d"``. See the module docstring for
    ``faults``. With ``payloads=True`` the ``lm_head`` logits are saved as payloads. With
    ``sketches=True`` (the default) every floating tensor row but masks gets a value sketch
    (made-up values: :mod:`vlmscope.testing._sketches`); ``False`` writes the trace without
    ``/sketches`` and ``/sketch_data``, as before sketches existed.
    """
    faults = dict(faults or {})
    if family is None:
        family = "qwen2_vl" if rope == "mrope" else "mqwen"
    gt, gh, gw = image_grid
    n_img = gt * gh * gw // (merge * merge)
    img_start = 3
    c = SimpleNamespace(
        batch=batch, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=hidden // heads,
        intermediate=intermediate, vocab=vocab, dtype=dtype, n_layers=n_layers, n_vision=n_vision, rope=rope,
        grid=image_grid, merge=merge, n_patches=gt * gh * gw, patch_dim=1176, vision_hidden=64, vision_heads=4,
        merger_rows=n_img + int(faults.get("image_rows", 0)), img_start=img_start, n_img=n_img,
        image_token_id=IMAGE_TOKEN_ID, L0=prompt_tokens + n_img,
        # rope delta: prefill max position + 1 - prefill length
        rope_delta=int(img_start + max(gh // merge, gw // merge) - (img_start + n_img))
        if rope == "mrope" and not faults.get("fallback_1d") else 0)
    w = TraceWriter(Path(path), meta=_meta(c, family, seed), config_json=json.dumps(_config(c, family)))
    run = _Run(w, c, faults, seed, payloads, sketches)
    step = 0
    while step < n_steps if n_steps is not None else run.n_events < n_events:
        run.write_step(step)
        step += 1
    run.sink.flush()
    return w.close(status)


def _meta(c: Any, family: str, seed: int) -> dict:
    return {
        "vlmscope": "0.1.0", "torch": "synthetic", "transformers": "synthetic", "device": "cpu",
        "dtype": c.dtype, "attn_implementation": "eager", "model": f"synthetic-{family}", "family": family,
        "model_class": "Qwen2VLForConditionalGeneration", "prompt": "synthetic", "seed": seed,
        "generation": {"max_new_tokens": None, "do_sample": False},
        "decoder_layers": "model.language_model.layers", "text_model": "model.language_model",
        "vision_model": "model.visual", "merger": "model.visual.merger", "image_token_id": c.image_token_id,
        "num_key_value_heads": c.kv_heads, "num_attention_heads": c.heads, "warnings": [], "synthetic": True,
    }


def _config(c: Any, family: str) -> dict:
    return {"model_type": family, "image_token_id": c.image_token_id,
            "vision_config": {"spatial_merge_size": c.merge},
            "text_config": {"num_hidden_layers": c.n_layers, "num_attention_heads": c.heads,
                            "num_key_value_heads": c.kv_heads, "hidden_size": c.hidden,
                            "rope_parameters": {"mrope_section": [2, 3, 3]} if c.rope == "mrope" else {}}}


class _Run:
    """The state of one ``make_trace``: the writer's helpers, the decode template, the cache."""

    def __init__(self, w: TraceWriter, c: Any, faults: dict, seed: int, payloads: bool, sketches: bool = True):
        self.w, self.c, self.faults, self.seed, self.payloads = w, c, faults, seed, payloads
        self.sketches = sketches
        self.S = Strings(w, templates=True)
        self.mods = write_modules(w, module_table("qwen2_vl", c.n_layers, c.n_vision))
        self.sink = TableSink(w)
        self.decode_tpl: dict | None = None
        self.module_scale = np.random.default_rng(seed).uniform(0.5, 2.0, size=len(self.mods))
        self.cache_len = np.zeros(c.n_layers, np.int64)   # per-layer real cache length
        self.n_events = 0

    def _build(self, prefill: bool, step: int, q: int, C: int, K: int, KM: int) -> dict:
        E = Emitter(self.mods, SYNTH_LAYOUT)
        emit_step(E, self.c, prefill, q, C, K, KM, self.faults, step)
        return build_tables(E, self.S)

    def _tables(self, step: int, q: int, C: int, K: int, KM: int) -> dict:
        """The prefill and steps named by a fault are emitted with their real numbers; the
        other decode steps share one template (sentinel shapes, template strings)."""
        if step == 0 or any(isinstance(v, tuple) and v[0] == step for v in self.faults.values()):
            return self._build(step == 0, step, q, C, K, KM)
        if self.decode_tpl is None:
            self.decode_tpl = self._build(False, 1, 1, SENT_C, SENT_K, SENT_KM)
        return self.decode_tpl

    def write_step(self, step: int) -> None:
        c, S, sink = self.c, self.S, self.sink
        q = c.L0 if step == 0 else 1
        C = int(self.cache_len[0])
        K = C + q
        KM = K + int(self.faults.get("mask_len", 0))
        tpl = self._tables(step, q, C, K, KM)
        e0, t0 = sink.counts["events"], sink.counts["tensors"]
        t = place(tpl, step, e0, t0)
        ev, te, rs, pr = t["events"], t["tensors"], t["reshapes"], t["probes"]
        rng = np.random.default_rng([self.seed, step])
        ev["dur_us"] = rng.uniform(5, 50, len(ev)).astype(np.float32)
        for shapes in (te["shape"], rs["in_shape"], rs["out_shape"]):
            sub_sentinels(shapes, K, C, KM)
        fill_numel(te)
        tmod = ev["module"][te["event"] - e0]
        tensor_stats(te, self.module_scale[tmod], rng, [S("int64"), S("int32")])
        value_faults(te, tpl["tensor_tags"], self.faults, step, c.n_layers)
        # sketches follow the stats (seeded by them): a fault changes the sketches of exactly the
        # rows whose stats or shapes it changes, as values and their statistics move together
        sk = step_sketches(te, tpl["sketch_src"], tmod, step, self.seed, t0, sink.sketch_values,
                           None) if self.sketches else None
        values, pos = probe_values(c, self.faults, step, q, C, KM, self.cache_len, rng)
        self.cache_len = values["cache_after"]
        S.resolve(infos(c, self.faults, step, values, pos, B=c.batch, q=q, K=K, C=C, KM=KM),
                  rs["in_shapes"], rs["args"], pr["info"])
        data = sink.probe_data()
        for key in sorted({k for k in tpl["probe_data"] if k is not None}):   # stored in key order
            data.add(values[key], key)
        attach_probe_data(pr, tpl["probe_data"], data, values)
        sub_sentinels(pr["shape"], K, C, KM)
        if self.payloads:
            self._payloads(ev, te, t0, step)
        rp = pos["rope"]
        ranges = list(zip(rp.reshape(3, -1).min(1), rp.reshape(3, -1).max(1))) if c.rope == "mrope" \
            else [(rp.min(), rp.max())]
        sink.add(t, data, sk, **step_fields(
            ranges, (c.batch, 1, q, KM), step=step, kind=0 if step == 0 else 1, status=0, input_len=q, q_len=q,
            cache_before=C, cache_after=int(self.cache_len[0]), image_tokens=c.batch * c.n_img if step == 0 else 0,
            wall_ms=float(ev["dur_us"][0]) / 10))
        self.n_events += len(ev)

    def _payloads(self, ev: np.ndarray, te: np.ndarray, t0: int, step: int) -> None:
        """The ``lm_head`` logits (random, shifted by the drift fault) as payloads."""
        drift_from = self.faults.get("drift")
        for j in np.nonzero(ev["module"] == self.mods["lm_head"])[0]:
            rows = np.arange(ev["tensor_start"][j], ev["tensor_start"][j] + ev["tensor_count"][j]) - t0
            for r in rows[te["role"][rows] == 2]:
                shp = tuple(te["shape"][r][: te["ndim"][r]])
                val = np.random.default_rng([self.seed, step, 7]).normal(0, 1, size=shp).astype(np.float32)
                if drift_from is not None and step >= drift_from[0]:
                    val = val + 0.5
                te["payload"][r] = self.w.add_payload(val, module="lm_head", step=step, name="out.logits",
                                                      dtype=self.c.dtype)


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import time

    ap = argparse.ArgumentParser(description="write a synthetic vlmscope trace")
    ap.add_argument("out")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rope", default="mrope")
    ap.add_argument("--no-sketches", action="store_true")
    a = ap.parse_args()
    t = time.perf_counter()
    p = make_trace(a.out, a.events, n_layers=a.layers, rope=a.rope, sketches=not a.no_sketches)
    print(f"{p} written in {time.perf_counter() - t:.1f}s, {p.stat().st_size / 1e6:.0f} MB")
