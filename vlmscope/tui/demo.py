"""A small, deterministic Qwen2.5-VL-shaped trace, written with :class:`TraceWriter`.

The viewer's snapshot tests need a trace whose every number is fixed (a trace recorded
from a model carries host timings and float stats that move with torch versions and
CPUs), and the viewer benchmarks need a trace when no recorder is around. This writes
one that follows ``docs/trace-format.md``: the tiny-qwen2.5-vl module tree, a prefill
with an image span and decode steps with a growing cache, M-RoPE position ids, masks,
reshapes with call sites and probes.

``variant="b"`` changes the output of ``model.visual.merger`` (values drift) and the
shape of ``model.language_model.layers.1.mlp.down_proj`` in the prefill, to exercise
the diff mode. Only numpy and h5py are used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmscope.trace import (
    ENC_BITS, ENC_INT64, ENC_NONE, EVENT_DTYPE, MODULE_DTYPE, PROBE_DTYPE, RESHAPE_DTYPE,
    STEP_DTYPE, TENSOR_DTYPE, TraceWriter, pad_shape,
)

IMAGE_TOKEN_ID = 151655
VISION_START, VISION_END = 151652, 151653
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 256, 152064
MODELING = "/site-packages/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py"

#: (path, class) in named_modules() order, as tiny-qwen2.5-vl has them.
MODULES: list[tuple[str, str]] = [("", "Qwen2_5_VLForConditionalGeneration"), ("model", "Qwen2_5_VLModel"),
                                  ("model.visual", "Qwen2_5_VisionTransformerPretrainedModel"),
                                  ("model.visual.patch_embed", "Qwen2_5_VisionPatchEmbed"),
                                  ("model.visual.patch_embed.proj", "Conv3d"),
                                  ("model.visual.rotary_pos_emb", "Qwen2_5_VLVisionRotaryEmbedding"),
                                  ("model.visual.blocks", "ModuleList")]
for _b in range(2):
    _p = f"model.visual.blocks.{_b}"
    MODULES += [(_p, "Qwen2_5_VLVisionBlock"), (f"{_p}.norm1", "Qwen2_5_VLRMSNorm"),
                (f"{_p}.norm2", "Qwen2_5_VLRMSNorm"), (f"{_p}.attn", "Qwen2_5_VLVisionAttention"),
                (f"{_p}.attn.qkv", "Linear"), (f"{_p}.attn.proj", "Linear"), (f"{_p}.mlp", "Qwen2_5_VLMLP"),
                (f"{_p}.mlp.gate_proj", "Linear"), (f"{_p}.mlp.up_proj", "Linear"),
                (f"{_p}.mlp.down_proj", "Linear"), (f"{_p}.mlp.act_fn", "SiLUActivation")]
MODULES += [("model.visual.merger", "Qwen2_5_VLPatchMerger"), ("model.visual.merger.ln_q", "Qwen2_5_VLRMSNorm"),
            ("model.visual.merger.mlp", "Sequential"), ("model.visual.merger.mlp.0", "Linear"),
            ("model.visual.merger.mlp.1", "GELU"), ("model.visual.merger.mlp.2", "Linear"),
            ("model.language_model", "Qwen2_5_VLTextModel"), ("model.language_model.embed_tokens", "Embedding"),
            ("model.language_model.layers", "ModuleList")]
for _l in range(2):
    _p = f"model.language_model.layers.{_l}"
    MODULES += [(_p, "Qwen2_5_VLDecoderLayer"), (f"{_p}.self_attn", "Qwen2_5_VLAttention"),
                (f"{_p}.self_attn.q_proj", "Linear"), (f"{_p}.self_attn.k_proj", "Linear"),
                (f"{_p}.self_attn.v_proj", "Linear"), (f"{_p}.self_attn.o_proj", "Linear"),
                (f"{_p}.mlp", "Qwen2MLP"), (f"{_p}.mlp.gate_proj", "Linear"), (f"{_p}.mlp.up_proj", "Linear"),
                (f"{_p}.mlp.down_proj", "Linear"), (f"{_p}.mlp.act_fn", "SiLUActivation"),
                (f"{_p}.input_layernorm", "Qwen2_5_VLRMSNorm"),
                (f"{_p}.post_attention_layernorm", "Qwen2_5_VLRMSNorm")]
MODULES += [("model.language_model.norm", "Qwen2_5_VLRMSNorm"),
            ("model.language_model.rotary_emb", "Qwen2_5_VLRotaryEmbedding"), ("lm_head", "Linear")]


class _Step:
    """Collects one step's rows while the fake forward 'runs'."""

    def __init__(self, w: TraceWriter, step: int, mod_index: dict[str, int], variant: str, save: set[str],
                 nan_in: str | None = None):
        self.w, self.step, self.mod, self.variant, self.save = w, step, mod_index, variant, save
        self.nan_in = nan_in
        self.seq = 0
        self.ev_base = w.counts["events"]
        self.t_base = w.counts["tensors"]
        self.events: list[dict] = []
        self.tensors: list[tuple] = []
        self.reshapes: list[tuple] = []
        self.probes: list[tuple] = []
        self.stack: list[int] = []
        self.probe_cache: dict[bytes, tuple[int, int]] = {}

    def _next(self) -> int:
        s = self.seq
        self.seq += 1
        return s

    # modules -------------------------------------------------------------
    def enter(self, path: str, inputs: list[tuple[str, tuple, str]]) -> int:
        i = len(self.events)
        nth = sum(1 for e in self.events if e["module"] == self.mod[path])
        self.events.append(dict(module=self.mod[path], seq=self._next(), depth=len(self.stack), nth=nth,
                                parent=self.stack[-1] if self.stack else -1, ins=inputs, outs=[],
                                path=path, status=0))
        self.stack.append(i)
        return i

    def leave(self, outputs: list[tuple[str, tuple, str]]) -> None:
        i = self.stack.pop()
        e = self.events[i]
        e["outs"] = outputs
        e["end_seq"] = self.seq
        self._next()

    def call(self, path: str, ins, outs, body=None) -> None:
        self.enter(path, ins)
        if body is not None:
            body()
        self.leave(outs)

    # reshapes ------------------------------------------------------------
    def reshape(self, op: str, ins: list[tuple], out: tuple, args: str, line: int, func: str,
                dtype: str = "float32", n_out: int = 1) -> None:
        ev = self.stack[-1] if self.stack else -1
        module = self.events[ev]["module"] if ev >= 0 else -1
        nth = sum(1 for r in self.reshapes if r[2] == ev and r[4] == op)
        self.reshapes.append((self.step, self._next(), ev, module, op, nth, ins, out, args, line, func, dtype, n_out))

    # probes --------------------------------------------------------------
    def probe(self, kind: str, name: str, value: np.ndarray | None, info: dict, shape: tuple | None = None,
              dtype: str = "int64") -> None:
        ev = self.stack[-1]
        if value is None:
            enc, off, n, shp = ENC_NONE, 0, 0, shape or ()
        else:
            shp = value.shape
            if value.dtype == bool:
                blob, enc = np.packbits(value.ravel()).tobytes(), ENC_BITS
            else:
                blob, enc = value.astype("<i8").tobytes(), ENC_INT64
            key = bytes([enc]) + repr(shp).encode() + blob
            if key in self.probe_cache:
                off, n = self.probe_cache[key]
            else:
                off, n = self.w.append_probe_data(blob), len(blob)
                self.probe_cache[key] = (off, n)
        self.probes.append((self.step, self._next(), ev, self.events[ev]["module"], kind, name, shp, dtype,
                            enc, off, n, json.dumps(info, sort_keys=True)))

    # writing ---------------------------------------------------------------
    def _stats(self, name: str, shape: tuple, dtype: str, salt: int) -> tuple:
        numel = int(np.prod(shape)) if shape else 1
        if dtype in ("int64", "int32"):
            return numel, 0.0, float(VOCAB - 1), 4096.0, 1024.0, float(VOCAB - 1), 0, 0
        if dtype == "bool":
            return numel, 0.0, 1.0, 0.5, 0.5, 1.0, 0, 0
        h = (sum(map(ord, name)) * 31 + salt * 17 + numel) % 997
        std = 0.5 + h / 997.0
        mean = (h % 13 - 6) / 100.0
        return numel, mean - 4 * std, mean + 4 * std, mean, std, abs(mean) + 4 * std, 0, 0

    def flush(self, kind: int, input_len: int, q_len: int, cache_before: int, cache_after: int,
              pos: np.ndarray | None, mask_shape: tuple, image_tokens: int, wall_ms: float) -> None:
        w, s = self.w, self.step
        ev_rows = np.zeros(len(self.events), EVENT_DTYPE)
        t_rows: list[np.void] = []
        for i, e in enumerate(self.events):
            tstart = self.t_base + len(t_rows)
            groups = [(0, e["ins"]), (2, e["outs"])]
            for role, items in groups:
                for name, shape, dtype in items:
                    r = np.zeros((), TENSOR_DTYPE)
                    numel, mn, mx, mean, std, amax, nan, inf = self._stats(e["path"] + name, shape, dtype,
                                                                            s * 7 + role)
                    if self.variant == "b" and e["path"] == "model.visual.merger" and role == 2:
                        mean, std, mx = mean + 0.25, std * 1.5, mx * 1.5
                    if self.nan_in is not None and e["path"] == self.nan_in and role == 2:
                        nan = max(1, numel // 64)
                    payload = -1
                    if role == 2 and e["path"] in self.save and name == "out":
                        vals = (np.arange(numel, dtype=np.float32).reshape(shape) % 97 - 48) / 16.0
                        payload = w.add_payload(vals, module=e["path"], step=s, name=name, dtype=dtype)
                    r["step"], r["event"], r["role"], r["name"] = s, self.ev_base + i, role, w.intern(name)
                    r["ndim"], r["shape"] = len(shape), pad_shape(shape)
                    r["dtype"], r["device"], r["numel"] = w.intern(dtype), w.intern("cpu"), numel
                    r["min"], r["max"], r["mean"], r["std"], r["absmax"] = mn, mx, mean, std, amax
                    r["nan"], r["inf"], r["payload"] = nan, inf, payload
                    t_rows.append(r)
            row = ev_rows[i]
            row["step"], row["seq"], row["end_seq"], row["module"] = s, e["seq"], e["end_seq"], e["module"]
            row["nth"], row["depth"] = e["nth"], e["depth"]
            row["parent"] = self.ev_base + e["parent"] if e["parent"] >= 0 else -1
            row["tensor_start"], row["tensor_count"] = tstart, self.t_base + len(t_rows) - tstart
            row["status"], row["dur_us"] = e["status"], 10.0 + (e["seq"] % 50)
        t_arr = np.array(t_rows, dtype=TENSOR_DTYPE) if t_rows else np.zeros(0, TENSOR_DTYPE)

        r_arr = np.zeros(len(self.reshapes), RESHAPE_DTYPE)
        for j, (st, seq, ev, module, op, nth, ins, out, args, line, func, dtype, n_out) in enumerate(self.reshapes):
            r = r_arr[j]
            r["step"], r["seq"], r["event"], r["module"] = st, seq, self.ev_base + ev if ev >= 0 else -1, module
            r["op"], r["nth"], r["n_in"] = w.intern(op), nth, len(ins)
            r["in_ndim"], r["in_shape"] = len(ins[0]), pad_shape(ins[0])
            r["in_shapes"] = w.intern(" ".join("[" + ", ".join(map(str, t)) + "]" for t in ins))
            r["in_dtypes"] = w.intern(" ".join(dtype for _ in ins))
            r["args"], r["n_out"] = w.intern(args), n_out
            r["out_ndim"], r["out_shape"], r["out_dtype"] = len(out), pad_shape(out), w.intern(dtype)
            r["site_file"], r["site_line"], r["site_func"] = w.intern(MODELING), line, w.intern(func)
            r["status"] = 0

        p_arr = np.zeros(len(self.probes), PROBE_DTYPE)
        for j, (st, seq, ev, module, kind_, name, shp, dtype, enc, off, n, info) in enumerate(self.probes):
            p = p_arr[j]
            p["step"], p["seq"], p["event"], p["module"] = st, seq, self.ev_base + ev, module
            p["kind"], p["name"], p["ndim"], p["shape"] = w.intern(kind_), w.intern(name), len(shp), pad_shape(shp)
            p["dtype"], p["enc"], p["data_off"], p["data_len"] = w.intern(dtype), enc, off, n
            p["info"] = w.intern(info)

        st = np.zeros((), STEP_DTYPE)
        st["step"], st["kind"], st["status"], st["input_len"], st["q_len"] = s, kind, 0, input_len, q_len
        st["cache_before"], st["cache_after"] = cache_before, cache_after
        if pos is not None:
            st["pos_rows"] = pos.shape[0]
            st["pos_min"] = [int(pos[k].min()) for k in range(3)]
            st["pos_max"] = [int(pos[k].max()) for k in range(3)]
        st["mask_ndim"] = len(mask_shape)
        st["mask_shape"] = list(mask_shape) + [-1] * (4 - len(mask_shape))
        st["image_tokens"] = image_tokens
        st["event_start"], st["event_count"] = w.append("events", ev_rows), len(ev_rows)
        st["tensor_start"], st["tensor_count"] = w.append("tensors", t_arr), len(t_arr)
        st["reshape_start"], st["reshape_count"] = w.append("reshapes", r_arr), len(r_arr)
        st["probe_start"], st["probe_count"] = w.append("probes", p_arr), len(p_arr)
        st["wall_ms"] = wall_ms
        w.append("steps", st.reshape(1))
        w.end_step()


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


def write_demo_trace(path: str | Path, *, variant: str = "a", n_decode: int = 3, status: str = "complete",
                     save_tensors: tuple[str, ...] = ("model.visual.merger", "lm_head"),
                     nan_in: str | None = None) -> Path:
    """Write the demo trace to ``path`` and return it. Deterministic: same bytes of data every time
    (timestamps apart). ``nan_in``: a module path whose outputs report NaN (a failing check)."""
    path = Path(path)
    grid = (4, 4)                      # merged image grid: 16 image tokens
    n_img = grid[0] * grid[1]
    before = 4                         # <|im_start|> user \n <|vision_start|>
    prompt_ids = [151644, 872, 198, VISION_START] + [IMAGE_TOKEN_ID] * n_img + [VISION_END] + \
        [74785, 419, 2168, 13, 151645, 198, 151644]
    seq_len = len(prompt_ids)
    n_after = seq_len - before - n_img
    meta = {
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
    w = TraceWriter(path, meta=meta, config_json=json.dumps({"model_type": "qwen2_5_vl"}))
    mrows = np.zeros(len(MODULES), MODULE_DTYPE)
    index = {}
    for i, (p, c) in enumerate(MODULES):
        index[p] = i
        mrows[i]["path"], mrows[i]["cls"] = w.intern(p), w.intern(c)
        mrows[i]["depth"] = 0 if p == "" else p.count(".") + 1
        parent = p.rpartition(".")[0] if "." in p else ("" if p else None)
        mrows[i]["parent"] = -1 if parent is None else index[parent]
    w.set_modules(mrows)

    pos_prefill = _mrope_positions(before, grid, n_after)
    ids = np.array([prompt_ids], dtype=np.int64)
    img_start = before
    n_layers = 2
    save = set(save_tensors)
    f32 = "float32"
    cache = 0
    for step in range(n_decode + 1):
        prefill = step == 0
        L = seq_len if prefill else 1
        total = seq_len + step
        S = _Step(w, step, index, variant, save, nan_in)
        if prefill:
            pos = pos_prefill
            step_ids = ids
        else:
            nxt = int(pos_prefill.max()) + step
            pos = np.full((3, 1, 1), nxt, dtype=np.int64)
            step_ids = np.array([[(1000 + 37 * step) % VOCAB]], dtype=np.int64)
        mask4 = np.tril(np.ones((total, total), dtype=bool))[-L:][None, None]
        root_mask = np.ones((1, total), dtype=np.int64)

        def text_layer(l: int) -> None:
            p = f"model.language_model.layers.{l}"
            h = ("hidden_states", (1, L, HIDDEN), f32)

            def attn() -> None:
                S.probe("position_ids", "position_ids", pos, {"rows": [[int(pos[k].min()), int(pos[k].max())]
                                                                      for k in range(3)]})
                S.probe("attention_mask", "attention_mask", mask4, {"style": "additive", "dtype": f32,
                                                                   "fill": -3.4028234663852886e38})
                lengths = [cache + (L if i < l else 0) for i in range(n_layers)]
                S.probe("cache", "past_key_values", np.array(lengths, dtype=np.int64),
                        {"type": "DynamicCache", "layout": "BHSD", "lengths": lengths,
                         "key_shape": [1, KV_HEADS, lengths[0], HEAD_DIM], "dtype": f32, "n_layers": n_layers})
                S.call(f"{p}.self_attn.q_proj", [("args[0]", (1, L, HIDDEN), f32)], [("out", (1, L, HIDDEN), f32)])
                S.reshape("view", [(1, L, HIDDEN)], (1, L, HEADS, HEAD_DIM), f"(1, {L}, -1, {HEAD_DIM})", 702,
                          "forward")
                S.reshape("transpose", [(1, L, HEADS, HEAD_DIM)], (1, HEADS, L, HEAD_DIM), "(1, 2)", 702, "forward")
                for proj in ("k_proj", "v_proj"):
                    S.call(f"{p}.self_attn.{proj}", [("args[0]", (1, L, HIDDEN), f32)],
                           [("out", (1, L, KV_HEADS * HEAD_DIM), f32)])
                    S.reshape("view", [(1, L, KV_HEADS * HEAD_DIM)], (1, L, KV_HEADS, HEAD_DIM),
                              f"(1, {L}, -1, {HEAD_DIM})", 703 if proj == "k_proj" else 704, "forward")
                S.reshape("cat", [(1, HEADS, L, HEAD_DIM // 2)] * 2, (1, HEADS, L, HEAD_DIM), "dim=-1", 230,
                          "rotate_half")
                S.reshape("cat", [(1, KV_HEADS, cache, HEAD_DIM), (1, KV_HEADS, L, HEAD_DIM)],
                          (1, KV_HEADS, cache + L, HEAD_DIM), "dim=-2", 612, "update")
                S.reshape("reshape", [(1, L, HEADS, HEAD_DIM)], (1, L, HIDDEN), f"(1, {L}, -1)", 741, "forward")
                S.call(f"{p}.self_attn.o_proj", [("args[0]", (1, L, HIDDEN), f32)], [("out", (1, L, HIDDEN), f32)])

            def mlp() -> None:
                down_out = (1, L, HIDDEN)
                if variant == "b" and l == 1 and prefill:
                    down_out = (1, L, HIDDEN + 8)
                S.call(f"{p}.mlp.gate_proj", [("args[0]", (1, L, HIDDEN), f32)], [("out", (1, L, INTER), f32)])
                S.call(f"{p}.mlp.act_fn", [("args[0]", (1, L, INTER), f32)], [("out", (1, L, INTER), f32)])
                S.call(f"{p}.mlp.up_proj", [("args[0]", (1, L, HIDDEN), f32)], [("out", (1, L, INTER), f32)])
                S.call(f"{p}.mlp.down_proj", [("args[0]", (1, L, INTER), f32)], [("out", down_out, f32)])

            def layer() -> None:
                S.call(f"{p}.input_layernorm", [h], [("out", (1, L, HIDDEN), f32)])
                S.call(f"{p}.self_attn", [h], [("out[0]", (1, L, HIDDEN), f32),
                                               ("out[1]", (1, HEADS, L, total), f32)], attn)
                S.call(f"{p}.post_attention_layernorm", [h], [("out", (1, L, HIDDEN), f32)])
                S.call(f"{p}.mlp", [("args[0]", (1, L, HIDDEN), f32)], [("out", (1, L, HIDDEN), f32)], mlp)

            S.call(p, [h, ("position_ids", pos.shape, "int64")], [("out", (1, L, HIDDEN), f32)], layer)

        def visual() -> None:
            n_patch = n_img * 4
            S.probe("image_grid_thw", "grid_thw", np.array([[1, grid[0] * 2, grid[1] * 2]]), {"min": 1, "max": 8})
            S.call("model.visual.patch_embed", [("args[0]", (n_patch, 1176), f32)],
                   [("out", (n_patch, HIDDEN), f32)],
                   lambda: (S.reshape("view", [(n_patch, 1176)], (n_patch, 3, 2, 14, 14), "(-1, 3, 2, 14, 14)",
                                      95, "forward"),
                            S.call("model.visual.patch_embed.proj", [("args[0]", (n_patch, 3, 2, 14, 14), f32)],
                                   [("out", (n_patch, HIDDEN, 1, 1, 1), f32)]),
                            S.reshape("view", [(n_patch, HIDDEN, 1, 1, 1)], (n_patch, HIDDEN), "(-1, 64)", 97,
                                      "forward")))
            S.call("model.visual.rotary_pos_emb", [("args[0]", (), "int64")], [("out", (8, 4), f32)])
            for b in range(2):
                bp = f"model.visual.blocks.{b}"

                def block(bp=bp) -> None:
                    S.call(f"{bp}.norm1", [("args[0]", (n_patch, HIDDEN), f32)], [("out", (n_patch, HIDDEN), f32)])

                    def vattn() -> None:
                        S.call(f"{bp}.attn.qkv", [("args[0]", (n_patch, HIDDEN), f32)],
                               [("out", (n_patch, 3 * HIDDEN), f32)])
                        S.reshape("reshape", [(n_patch, 3 * HIDDEN)], (n_patch, 3, HEADS, HEAD_DIM),
                                  f"({n_patch}, 3, 4, -1)", 180, "forward")
                        S.reshape("permute", [(n_patch, 3, HEADS, HEAD_DIM)], (3, n_patch, HEADS, HEAD_DIM),
                                  "(1, 0, 2, 3)", 180, "forward")
                        S.reshape("unbind", [(3, n_patch, HEADS, HEAD_DIM)], (n_patch, HEADS, HEAD_DIM), "(0)",
                                  180, "forward", n_out=3)
                        S.call(f"{bp}.attn.proj", [("args[0]", (n_patch, HIDDEN), f32)],
                               [("out", (n_patch, HIDDEN), f32)])
                    S.call(f"{bp}.attn", [("hidden_states", (n_patch, HIDDEN), f32)],
                           [("out", (n_patch, HIDDEN), f32)], vattn)
                    S.call(f"{bp}.norm2", [("args[0]", (n_patch, HIDDEN), f32)], [("out", (n_patch, HIDDEN), f32)])
                    S.call(f"{bp}.mlp", [("args[0]", (n_patch, HIDDEN), f32)], [("out", (n_patch, HIDDEN), f32)])
                S.call(bp, [("hidden_states", (n_patch, HIDDEN), f32)], [("out", (n_patch, HIDDEN), f32)], block)

            def merger() -> None:
                S.probe("merger_rows", "out", None, {"rows": n_img}, shape=(n_img, HIDDEN), dtype=f32)
                S.call("model.visual.merger.ln_q", [("args[0]", (n_patch, HIDDEN), f32)],
                       [("out", (n_patch, HIDDEN), f32)])
                S.reshape("view", [(n_patch, HIDDEN)], (n_img, 4 * HIDDEN), "(-1, 256)", 146, "forward")
                S.call("model.visual.merger.mlp", [("args[0]", (n_img, 4 * HIDDEN), f32)],
                       [("out", (n_img, HIDDEN), f32)],
                       lambda: (S.call("model.visual.merger.mlp.0", [("args[0]", (n_img, 4 * HIDDEN), f32)],
                                       [("out", (n_img, 4 * HIDDEN), f32)]),
                                S.call("model.visual.merger.mlp.1", [("args[0]", (n_img, 4 * HIDDEN), f32)],
                                       [("out", (n_img, 4 * HIDDEN), f32)]),
                                S.call("model.visual.merger.mlp.2", [("args[0]", (n_img, 4 * HIDDEN), f32)],
                                       [("out", (n_img, HIDDEN), f32)])))
            S.call("model.visual.merger", [("args[0]", (n_patch, HIDDEN), f32)], [("out", (n_img, HIDDEN), f32)],
                   merger)

        def language_model() -> None:
            S.probe("position_ids", "position_ids", pos, {"rows": [[int(pos[k].min()), int(pos[k].max())]
                                                                  for k in range(3)]})
            S.probe("cache_position", "cache_position", np.arange(cache, cache + L),
                    {"min": cache, "max": cache + L - 1})
            S.call("model.language_model.rotary_emb", [("args[0]", (1, L, HIDDEN), f32),
                                                       ("position_ids", pos.shape, "int64")],
                   [("out[0]", (3, 1, L, HEAD_DIM), f32), ("out[1]", (3, 1, L, HEAD_DIM), f32)],
                   lambda: S.probe("rope_positions", "position_ids", pos[0, 0], {"min": int(pos.min()),
                                                                                 "max": int(pos.max())}))
            for l in range(n_layers):
                text_layer(l)
            S.call("model.language_model.norm", [("args[0]", (1, L, HIDDEN), f32)], [("out", (1, L, HIDDEN), f32)])

        def model() -> None:
            S.probe("input_ids", "input_ids", step_ids,
                    {"image_token_id": IMAGE_TOKEN_ID, "spans": [[0, img_start, img_start + n_img]] if prefill
                     else [], "image_tokens": n_img if prefill else 0})
            S.call("model.language_model.embed_tokens", [("args[0]", (1, L), "int64")],
                   [("out", (1, L, HIDDEN), f32)])
            if prefill:
                S.call("model.visual", [("hidden_states", (n_img * 4, 1176), f32),
                                        ("grid_thw", (1, 3), "int64")], [("out", (n_img, HIDDEN), f32)], visual)
                S.reshape("masked_scatter", [(1, L, HIDDEN), (1, L, HIDDEN), (n_img, HIDDEN)], (1, L, HIDDEN),
                          "", 1234, "forward")
            S.probe("rope_deltas", "rope_deltas", np.array([[int(pos_prefill.max()) + 1 - seq_len]]),
                    {"min": int(pos_prefill.max()) + 1 - seq_len, "max": int(pos_prefill.max()) + 1 - seq_len})
            S.call("model.language_model", [("inputs_embeds", (1, L, HIDDEN), f32),
                                            ("position_ids", pos.shape, "int64")],
                   [("out.last_hidden_state", (1, L, HIDDEN), f32)], language_model)

        def root() -> None:
            S.probe("input_ids", "input_ids", step_ids,
                    {"image_token_id": IMAGE_TOKEN_ID, "spans": [[0, img_start, img_start + n_img]] if prefill
                     else [], "image_tokens": n_img if prefill else 0})
            S.probe("attention_mask", "attention_mask", root_mask.astype(bool),
                    {"style": "int", "dtype": "int64", "fill": 0})
            S.call("model", [("input_ids", (1, L), "int64"), ("attention_mask", (1, total), "int64")],
                   [("out.last_hidden_state", (1, L, HIDDEN), f32)], model)
            S.call("lm_head", [("args[0]", (1, L, HIDDEN), f32)], [("out", (1, L, VOCAB), f32)])

        S.call("", [("input_ids", (1, L), "int64"), ("attention_mask", (1, total), "int64")],
               [("out.logits", (1, L, VOCAB), f32)], root)
        S.flush(0 if prefill else 1, L, L, cache, cache + L, pos,
                (1, 1, L, total), n_img if prefill else 0, 5.0 + step)
        cache += L
    out = w.close(status)
    return out
