"""Issue 3: what a trace of tiny-mqwen shows, proven on real recordings.

Every trace here is recorded once per module (into tmp_path) from the real model, the real
Qwen-1 tokenizer and examples/astronaut.png (+ chelsea.png for the batch). The `vlmscope`
command runs as a subprocess started with the module, so it overlaps the in-process
recordings; the module:factory run goes through the same click command in-process.
"""

from __future__ import annotations

import linecache
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlmscope
from vlmscope.recorder import Recorder, record
from vlmscope_models.mqwen import (
    IMAGE_TOKEN_ID,
    build_model,
    build_processor,
    token_mask_to_embedding_mask,
)

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT / "examples" / "astronaut.png"
CHELSEA = ROOT / "examples" / "chelsea.png"
PROMPT = "Describe this image."
CTX = 256  # image context length: (224 / 14) ** 2 patches, CLS dropped
HIDDEN, HEADS, HEAD_DIM, LAYERS = 64, 4, 16, 2
NEW_TOKENS = 8
VLMSCOPE = Path(sys.executable).with_name("vlmscope")


# ------------------------------------------------------------------------------------- helpers


def _chat(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _src(t, row) -> str:
    """The source text of a reshape row's call site."""
    return linecache.getline(t.s(row["site_file"]), int(row["site_line"]))


def _func(t, row) -> str:
    """The call site's function, comprehension frames folded into their function."""
    return t.s(row["site_func"]).split(".<locals>")[0]


def _model_reshapes(t, step: int, op: str, func: str = "MQwenModel.forward"):
    """Reshape rows of ``op`` in ``step`` whose call site is ``func`` in model/mqwen.py."""
    rows = t.reshapes(step)
    rows = rows[rows["op"] == t.string_id(op)]
    return [r for r in rows if t.s(r["site_file"]).endswith("mqwen.py") and _func(t, r) == func]


def _shape(row, prefix: str) -> tuple[int, ...]:
    return tuple(int(d) for d in row[f"{prefix}_shape"][: int(row[f"{prefix}_ndim"])])


def _probe(t, step: int, kind: str, module: str, name: str | None = None):
    rows = [p for p in t.probes(step, kind) if t.module_path(int(p["module"])) == module
            and (name is None or t.s(int(p["name"])) == name)]
    assert rows, f"no {kind} probe on {module!r} in step {step}"
    return rows[0]


# ------------------------------------------------------------------------------ CLI (started early)


@pytest.fixture(scope="module", autouse=True)
def cli_run(tmp_path_factory):
    """``vlmscope record --model tiny-mqwen --option use_cache_quantization=true -n 4``,
    started when the module starts; the test waits on it (``_finished``)."""
    d = tmp_path_factory.mktemp("mqwen_cli")
    # one thread: it shares the CPU with the in-process recordings (no oversubscription)
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = d / "quant.h5"
    cmd = [str(VLMSCOPE), "record", "--model", "tiny-mqwen", "--option", "use_cache_quantization=true",
           "--image", str(ASTRONAUT), "-o", str(out), "-n", "4"]
    proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = {"proc": proc, "out": out}
    yield run
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _finished(run: dict) -> tuple[int, str, str]:
    if "rc" not in run:
        stdout, stderr = run["proc"].communicate(timeout=240)
        run.update(rc=run["proc"].returncode, stdout=stdout, stderr=stderr)
    return run["rc"], run["stdout"], run["stderr"]


# ------------------------------------------------------------------------------ in-process traces


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def model():
    return build_model()  # float32, eager, plain [B, S, H, D] cache


@pytest.fixture(scope="module")
def single(processor):
    return processor(text=[_chat(processor, PROMPT)], images=[Image.open(ASTRONAUT)], return_tensors="pt")


@pytest.fixture(scope="module")
def batch(processor):
    texts = [_chat(processor, "What is in this image?"), _chat(processor, "Cat?")]
    return processor(text=texts, images=[Image.open(ASTRONAUT), Image.open(CHELSEA)], return_tensors="pt")


@pytest.fixture(scope="module")
def gen(tmp_path_factory, model, processor):
    """B=1 generation of 8 new tokens through ``vlmscope.record`` (generate drops the mask)."""
    out = tmp_path_factory.mktemp("mqwen_gen") / "gen.h5"
    t0 = time.perf_counter()
    path = record(model, processor, image=str(ASTRONAUT), prompt=PROMPT, out=out, max_new_tokens=NEW_TOKENS)
    wall = time.perf_counter() - t0
    with vlmscope.open_trace(path) as t:
        yield t, wall


@pytest.fixture(scope="module")
def quant(tmp_path_factory, processor):
    """The same generation with the Qwen-1 uint8-quantized cache."""
    qmodel = build_model(use_cache_quantization=True)
    out = tmp_path_factory.mktemp("mqwen_quant") / "quant.h5"
    path = record(qmodel, processor, image=str(ASTRONAUT), prompt=PROMPT, out=out, max_new_tokens=4)
    with vlmscope.open_trace(path) as t:
        yield t


@pytest.fixture(scope="module")
def direct(tmp_path_factory, processor, single):
    """B=1 direct forward in bfloat16 with an embedding-space mask and ``token_type_ids``.

    The first position is masked out (as a left pad would be) so the mask has a fill value."""
    bmodel = build_model(dtype="bfloat16")
    ids = single["input_ids"]
    mask = token_mask_to_embedding_mask(ids, single["attention_mask"])
    mask[0, 0] = 0
    S = mask.size(1)
    out = tmp_path_factory.mktemp("mqwen_direct") / "direct.h5"
    with Recorder(bmodel, out) as rec, torch.no_grad():
        bmodel(input_ids=ids, pixel_values=single["pixel_values"].bfloat16(), attention_mask=mask,
               token_type_ids=torch.zeros(1, S, dtype=torch.long))
    with vlmscope.open_trace(rec.path) as t:
        yield t


@pytest.fixture(scope="module")
def batched(tmp_path_factory, model, batch):
    """B=2 forward (one placeholder per row, row 1 left-padded), mask in embedding space."""
    mask = token_mask_to_embedding_mask(batch["input_ids"], batch["attention_mask"])
    out = tmp_path_factory.mktemp("mqwen_batched") / "batched.h5"
    with Recorder(model, out) as rec, torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=mask).logits
    with vlmscope.open_trace(rec.path) as t:
        yield t, logits, mask


@pytest.fixture(scope="module")
def failed(tmp_path_factory, model, batch, single):
    """B=2 ``generate`` with the tokenizer's (token-space) mask: fails in attention, recorded."""

    def check_forward():  # B=1 with the image: every module runs
        with torch.no_grad():
            return model(input_ids=single["input_ids"], pixel_values=single["pixel_values"]).logits

    before = check_forward()
    out = tmp_path_factory.mktemp("mqwen_failed") / "failed.h5"
    rec = Recorder(model, out)
    with pytest.raises(RuntimeError) as excinfo:
        with rec:
            model.generate(**batch, max_new_tokens=4)
    after = check_forward()
    with vlmscope.open_trace(rec.path) as t:
        yield {"trace": t, "rec": rec, "exc": excinfo.value, "before": before, "after": after}


# ------------------------------------------------------------------- 1. placeholder removal + splice


def test_placeholder_removal_is_a_reshape_at_its_call_site(gen, single):
    t, _ = gen
    L = int(single["input_ids"].shape[1])
    st = t.steps[0]
    assert int(st["input_len"]) == L and int(st["image_tokens"]) == 1
    # input_ids[input_ids != image_token_id] flattens to [B * (L - 1)]; .view(B, -1) restores B.
    views = [r for r in _model_reshapes(t, 0, "view") if _shape(r, "out") == (1, L - 1)]
    assert len(views) == 1, [t.s(r["in_shapes"]) for r in _model_reshapes(t, 0, "view")]
    v = views[0]
    assert t.s(v["in_shapes"]) == f"[{L - 1}]" and t.s(v["args"]) == "(1, -1)"
    assert t.module_path(int(v["module"])) == "transformer"
    src = _src(t, v)
    assert ".view(" in src and "image_token_id" in src, src
    # decode steps have no placeholder to remove
    assert all(_shape(r, "out") != (1, L - 1) for s in range(1, t.n_steps) for r in _model_reshapes(t, s, "view"))


def test_cat_and_stack_splice_at_their_call_sites(gen):
    t, _ = gen
    st = t.steps[0]
    L, S = int(st["input_len"]), int(st["q_len"])
    (span,) = t.probe_info(_probe(t, 0, "input_ids", "transformer"))["spans"]
    row, start, end = span
    assert (row, end - start) == (0, 1)
    (cat,) = _model_reshapes(t, 0, "cat")  # one per row
    # the text before the placeholder, the 256 projected features, the text after it
    assert t.s(cat["in_shapes"]) == f"[{start}, {HIDDEN}] [{CTX}, {HIDDEN}] [{L - 1 - start}, {HIDDEN}]"
    assert t.s(cat["args"]) == "(dim=0)" and _shape(cat, "out") == (S, HIDDEN)
    assert "torch.cat(" in _src(t, cat) and "image_features" in _src(t, cat)
    assert t.module_path(int(cat["module"])) == "transformer"
    (stack,) = _model_reshapes(t, 0, "stack")
    assert _shape(stack, "out") == (1, S, HIDDEN) and "torch.stack(" in _src(t, stack)
    assert int(stack["seq"]) > int(cat["seq"])
    # and the projector's output that went in: 256 rows
    assert t.probe_info(_probe(t, 0, "merger_rows", "transformer.projector"))["rows"] == CTX
    for s in range(1, t.n_steps):
        assert not _model_reshapes(t, s, "cat") and not _model_reshapes(t, s, "stack")


# -------------------------------------------------------------------------- 2. extended S and mask


def test_extended_length_on_prefill(gen):
    t, _ = gen
    st = t.steps
    L = int(st["input_len"][0])
    assert int(st["q_len"][0]) == L - 1 + CTX
    assert st["input_len"][1:].tolist() == [1] * (t.n_steps - 1)
    assert st["q_len"][1:].tolist() == [1] * (t.n_steps - 1)
    # step 9 of the forward: the final .view(B, S, hidden) after ln_f
    final = [r for r in _model_reshapes(t, 0, "view") if _shape(r, "out") == (1, L - 1 + CTX, HIDDEN)]
    assert final and t.s(final[-1]["args"]) == f"(1, {L - 1 + CTX}, {HIDDEN})"
    assert ".view(B, S" in _src(t, final[-1])


def test_direct_forward_shows_token_type_view_and_additive_mask(direct, single):
    t = direct
    L = int(single["input_ids"].shape[1])
    S = L - 1 + CTX
    st = t.steps[0]
    assert (int(st["input_len"]), int(st["q_len"])) == (L, S)
    # step 3 of the forward: token_type_ids.view(-1, S)
    tt = [r for r in _model_reshapes(t, 0, "view") if "token_type_ids" in _src(t, r)]
    assert len(tt) == 1 and t.s(tt[0]["args"]) == f"(-1, {S})"
    # step 6: attention_mask.view(B, -1)[:, None, None, :] -> [B, 1, 1, S_kv], additive, model dtype
    mv = [r for r in _model_reshapes(t, 0, "view") if "attention_mask" in _src(t, r)]
    assert len(mv) == 1 and _shape(mv[0], "out") == (1, S)
    assert int(st["mask_ndim"]) == 4 and st["mask_shape"].tolist() == [1, 1, 1, S]
    for layer in range(LAYERS):
        p = _probe(t, 0, "attention_mask", f"transformer.h.{layer}.attn")
        info = t.probe_info(p)
        assert info["style"] == "additive" and info["dtype"] == "bfloat16" and t.s(p["dtype"]) == "bfloat16"
        assert info["fill"] == float(torch.finfo(torch.bfloat16).min)
        allowed = t.probe_value(p)
        assert allowed.shape == (1, 1, 1, S) and not allowed[0, 0, 0, 0] and allowed[..., 1:].all()
    # what the caller gave: the embedding-space 0/1 mask, [B, S]
    top = t.probe_info(_probe(t, 0, "attention_mask", "transformer"))
    assert top["style"] == "int"


# ------------------------------------------------------------------------------- 3. cache lengths


def test_cache_length_per_step_plain_layout(gen, model):
    t, _ = gen
    st = t.steps
    S = int(st["q_len"][0])
    n = t.n_steps
    assert st["cache_before"].tolist() == [0] + [S + i for i in range(n - 1)]
    assert st["cache_after"].tolist() == [S + i for i in range(n)]
    for s in range(1, n):
        info = t.probe_info(_probe(t, s, "cache", "transformer", "past_key_values"))
        assert info["layout"] == "BSHD" and info["type"] == "tuple" and info["n_layers"] == LAYERS
        assert info["lengths"] == [S + s - 1] * LAYERS
        assert info["key_shape"] == [1, S + s - 1, HEADS, HEAD_DIM]  # the real K tensor's shape
        for layer in range(LAYERS):  # each block's layer_past
            li = t.probe_info(_probe(t, s, "cache", f"transformer.h.{layer}.attn", "layer_past"))
            assert (li["layout"], li["lengths"], li["n_layers"]) == ("BSHD", [S + s - 1], 1)
    # NOT the model's own past_length: past_key_values[0][0].size(-2) is the head count
    assert model.config.num_attention_heads == HEADS
    assert HEADS not in st["cache_before"][1:].tolist()


def test_cache_length_per_step_quantized_layout(quant):
    t = quant
    st = t.steps
    S = int(st["q_len"][0])
    n = t.n_steps
    assert n == 4 and t.config["use_cache_quantization"] is True
    assert st["cache_before"].tolist() == [0] + [S + i for i in range(n - 1)]
    assert st["cache_after"].tolist() == [S + i for i in range(n)]
    for s in range(1, n):
        info = t.probe_info(_probe(t, s, "cache", "transformer", "past_key_values"))
        assert info["layout"] == "quantized-BHSD" and info["dtype"] == "uint8"
        assert info["lengths"] == [S + s - 1] * LAYERS
        assert info["key_shape"] == [1, HEADS, S + s - 1, HEAD_DIM]
    out = t.probe_info(_probe(t, 0, "cache", "transformer", "out.cache"))
    assert (out["layout"], out["lengths"]) == ("quantized-BHSD", [S] * LAYERS)


def test_quantized_layer_past_probe_is_one_quantized_layer(quant):
    """A block's ``layer_past`` on a quantized cache is ONE layer ``((q, scale, zero), (q, scale, zero))``."""
    t = quant
    S = int(t.steps["q_len"][0])
    for layer in range(LAYERS):
        info = t.probe_info(_probe(t, 1, "cache", f"transformer.h.{layer}.attn", "layer_past"))
        assert (info["layout"], info["n_layers"], info["lengths"]) == ("quantized-BHSD", 1, [S]), info


# ----------------------------------------------------------------- 4. position_ids vs rotary positions


def _streams(t, step):
    """(model-computed position_ids as seen by block 0, positions rotary produced), flattened."""
    pos = t.probe_value(_probe(t, step, "position_ids", "transformer.h.0.attn", "position_ids")).ravel()
    rope = t.probe_value(_probe(t, step, "rope_positions", "transformer.rotary_emb")).ravel()
    return pos, rope


def test_position_ids_vs_rope_positions_plain_cache(gen):
    t, _ = gen
    st = t.steps
    S = int(st["q_len"][0])
    pos, rope = _streams(t, 0)
    assert np.array_equal(pos, np.arange(S)) and np.array_equal(rope, np.arange(S))
    for s in range(1, t.n_steps):
        pos, rope = _streams(t, s)
        # rotary uses the KV index (= the real cache length before the step) ...
        assert rope.tolist() == [int(st["cache_before"][s])] == [S + s - 1]
        # ... the model's position_ids are stuck at past_length = size(-2) = the head count
        assert pos.tolist() == [HEADS]
        assert not np.array_equal(pos, rope)
        # the steps table carries the model's stream: what a check compares to cache_before
        assert (int(st["pos_min"][s][0]), int(st["pos_max"][s][0])) == (HEADS, HEADS)
    assert (int(st["pos_min"][0][0]), int(st["pos_max"][0][0])) == (0, S - 1)


def test_position_ids_vs_rope_positions_agree_with_quantized_cache(quant):
    t = quant
    for s in range(t.n_steps):
        pos, rope = _streams(t, s)
        assert np.array_equal(pos, rope), (s, pos[:4], rope[:4])


# --------------------------------------------------------------------------------- 5. generation


def test_generation_of_8_tokens_on_cpu(gen):
    t, wall = gen
    # one top-level forward per new token: the prefill gives the first, 7 decode steps the rest
    assert t.status == "complete" and t.n_steps == NEW_TOKENS
    assert t.steps["kind"].tolist() == [0] + [1] * (NEW_TOKENS - 1)
    assert t.steps["status"].tolist() == [0] * NEW_TOKENS
    assert t.meta["generated_text"]
    assert t.meta["decoder_layers"] == "transformer.h" and t.meta["merger"] == "transformer.projector"
    assert wall < 30, f"8 new tokens took {wall:.1f} s"


# ------------------------------------------------------------------------------ 6. batched forward


def test_batched_forward_recorded(batched, batch):
    t, logits, mask = batched
    ids = batch["input_ids"]
    B, L = ids.shape
    S = L - 1 + CTX
    assert t.status == "complete" and t.n_steps == 1 and tuple(logits.shape[:2]) == (2, S)
    st = t.steps[0]
    assert (int(st["input_len"]), int(st["q_len"]), int(st["image_tokens"])) == (L, S, 2)
    assert st["mask_shape"].tolist() == [2, 1, 1, S]
    # one image span per row, where the tokenizer put the placeholder (row 1 is left-padded)
    spans = t.probe_info(_probe(t, 0, "input_ids", "transformer"))["spans"]
    expect = [[b, int(c), int(c) + 1] for b, c in enumerate((ids == IMAGE_TOKEN_ID).int().argmax(1).tolist())]
    assert spans == expect and spans[0][1] != spans[1][1]
    # the projector output: B x 256 rows
    mp = _probe(t, 0, "merger_rows", "transformer.projector")
    assert t.probe_info(mp)["rows"] == 2 * CTX
    assert tuple(int(d) for d in mp["shape"][: int(mp["ndim"])]) == (2, CTX, HIDDEN)
    # placeholder removal on [2 * (L - 1)], one cat per row around its own placeholder, the stack
    (rm,) = [r for r in _model_reshapes(t, 0, "view") if "image_token_id" in _src(t, r)]
    assert t.s(rm["in_shapes"]) == f"[{2 * (L - 1)}]" and _shape(rm, "out") == (2, L - 1)
    cats = _model_reshapes(t, 0, "cat")
    assert [t.s(c["in_shapes"]) for c in cats] == [
        f"[{s}, {HIDDEN}] [{CTX}, {HIDDEN}] [{L - 1 - s}, {HIDDEN}]" for _, s, _ in spans]
    (stack,) = _model_reshapes(t, 0, "stack")
    assert _shape(stack, "out") == (2, S, HIDDEN)
    # shapes with B=2 through the blocks; the mask shows the pad of row 1, fill finfo(float32).min
    for layer in range(LAYERS):
        got = _event_inputs(t, 0, f"transformer.h.{layer}.attn")
        assert got["hidden_states"] == (2, S, HIDDEN) and got["attention_mask"] == (2, 1, 1, S)
    p = _probe(t, 0, "attention_mask", "transformer.h.0.attn")
    info = t.probe_info(p)
    assert info["dtype"] == "float32" and info["fill"] == float(torch.finfo(torch.float32).min)
    allowed = t.probe_value(p)
    assert allowed.shape == (2, 1, 1, S)
    assert np.array_equal(allowed[:, 0, 0, :], mask.bool().numpy())
    cache = t.probe_info(_probe(t, 0, "cache", "transformer", "out.cache"))
    assert cache["key_shape"] == [2, S, HEADS, HEAD_DIM] and cache["lengths"] == [S] * LAYERS


def _event_inputs(t, step: int, module: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors of ``module``'s first call in ``step``."""
    base = int(t.steps[step]["event_start"])
    ev = t.events(step)
    (idx,) = np.flatnonzero(ev["module"] == int(np.flatnonzero(t.module_paths == module)[0]))[:1]
    return {t.s(r["name"]): tuple(int(d) for d in r["shape"][: int(r["ndim"])])
            for r in t.event_tensors(base + int(idx))}


# --------------------------------------------------------------------- 7. batched generate fails


def test_batched_generate_failure_is_recorded(failed, batch):
    t, rec, exc = failed["trace"], failed["rec"], failed["exc"]
    L = int(batch["input_ids"].shape[1])
    S = L - 1 + CTX
    assert rec.status == "failed" and t.status == "failed"
    assert f"size of tensor a ({S})" in str(exc) and f"tensor b ({L})" in str(exc)
    err = t.error
    assert err["type"] == "RuntimeError" and err["message"] == str(exc) and err["step"] == 0
    assert err["module_stack"] == ["", "transformer", "transformer.h.0", "transformer.h.0.attn"]
    assert "attn_weights + attention_mask" in err["traceback"]
    # the step row: marked failed, with the token-space mask next to the embedding-space q_len
    assert t.n_steps == 1
    st = t.steps[0]
    assert int(st["status"]) == 1 and (int(st["input_len"]), int(st["q_len"])) == (L, S)
    assert st["mask_shape"].tolist() == [2, 1, 1, L]
    # every call up to the failure is kept; the raising chain is marked, nothing after it exists
    ev = t.events(0)
    paths = [t.module_path(int(m)) for m in ev["module"]]
    raised = [p for p, s in zip(paths, ev["status"]) if s]
    assert raised == ["", "transformer", "transformer.h.0", "transformer.h.0.attn"]
    for done in ("transformer.visual", "transformer.projector", "transformer.wte", "transformer.rotary_emb",
                 "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn"):
        assert done in paths, done
    assert "transformer.h.0.attn.c_proj" not in paths and "transformer.h.1" not in paths
    assert int(ev["end_seq"].max()) >= int(ev["seq"].max())
    # what the failing attention call received: hidden states in embedding space, mask in token space
    got = _event_inputs(t, 0, "transformer.h.0.attn")
    assert got["hidden_states"] == (2, S, HIDDEN) and got["attention_mask"] == (2, 1, 1, L)
    # the last reshape before the raise is recorded, in that module, with its input shapes
    last = t.reshapes(0)[-1]
    lr = err["last_reshape"]
    assert lr["module"] == "transformer.h.0.attn" == t.module_path(int(last["module"]))
    assert (lr["op"], lr["in_shapes"]) == (t.s(last["op"]), t.s(last["in_shapes"]))
    assert lr["site"] == f'{t.s(last["site_file"])}:{int(last["site_line"])}'
    assert lr["site"].split(":")[0].endswith("mqwen.py")


def test_batched_generate_failure_names_the_op_that_raised(failed, batch):
    """The op that raised (the broadcasting ``attn_weights + attention_mask``) with its input
    shapes is in the trace, so ``error.last_reshape`` points at the raising line, not at the
    last successful transpose before it."""
    t = failed["trace"]
    L = int(batch["input_ids"].shape[1])
    S = L - 1 + CTX
    rows = t.reshapes(0)
    bad = rows[rows["status"] == 1]
    assert len(bad) == 1, "no recorded op with status 1 (raised)"
    assert t.s(bad[0]["in_shapes"]) == f"[2, {HEADS}, {S}, {S}] [2, 1, 1, {L}]"
    assert "attention_mask" in _src(t, bad[0]) and t.module_path(int(bad[0]["module"])) == "transformer.h.0.attn"
    assert t.error["last_reshape"]["in_shapes"] == t.s(bad[0]["in_shapes"])


def test_hooks_removed_after_failure(failed, model):
    assert torch.equal(failed["before"], failed["after"])
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0


# ---------------------------------------------------------------------------------------- 8. CLI


def test_cli_tiny_mqwen_with_option(cli_run):
    run = cli_run
    rc, stdout, stderr = _finished(run)
    assert rc == 0, stderr
    assert "complete" in stdout and "279->280" in stdout
    with vlmscope.open_trace(run["out"]) as t:
        assert t.status == "complete" and t.n_steps == 4
        assert (t.meta["model"], t.meta["model_kind"], t.meta["family"]) == ("tiny-mqwen", "embedded", "mqwen")
        assert t.config["use_cache_quantization"] is True  # the option reached the factory
        info = t.probe_info(_probe(t, 1, "cache", "transformer", "past_key_values"))
        assert info["layout"] == "quantized-BHSD"
        assert t.steps["q_len"][0] == t.steps["input_len"][0] - 1 + CTX


def test_cli_module_factory(tmp_path):
    from click.testing import CliRunner

    from vlmscope.cli import main

    out = tmp_path / "factory.h5"
    res = CliRunner().invoke(main, ["record", "--model", "vlmscope_models.mqwen:build",
                                    "--image", str(ASTRONAUT), "-o", str(out), "-n", "4"])
    assert res.exit_code == 0, res.output
    with vlmscope.open_trace(out) as t:
        assert t.status == "complete" and t.n_steps == 4
        assert (t.meta["model"], t.meta["model_kind"]) == ("vlmscope_models.mqwen:build", "factory")
        assert t.config["use_cache_quantization"] is False
        assert t.probe_info(_probe(t, 1, "cache", "transformer", "past_key_values"))["layout"] == "BSHD"
        assert t.steps["pos_min"][1:, 0].tolist() == [HEADS] * 3  # the quirk, from the CLI too


def test_users_own_factory_module(tmp_path, monkeypatch):
    """The ``my_mqwen.py`` factory of model/README.md, as a user copies it, records."""
    readme = (ROOT / "model" / "README.md").read_text()
    found = re.search(r'```python\n("""my_mqwen\.py.*?)```', readme, re.S)
    assert found, "model/README.md lost its my_mqwen.py factory example"
    (tmp_path / "my_mqwen.py").write_text(found.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_mqwen", raising=False)
    from vlmscope.recorder.loader import load_model

    m, proc, info = load_model("my_mqwen:build", options={"use_cache_quantization": True})
    assert info == {"model": "my_mqwen:build", "model_kind": "factory", "family": "mqwen"}
    path = record(m, proc, image=str(ASTRONAUT), prompt=PROMPT, out=tmp_path / "mine.h5", max_new_tokens=2)
    with vlmscope.open_trace(path) as t:
        assert t.status == "complete" and t.n_steps == 2
        assert t.probe_info(_probe(t, 1, "cache", "transformer", "past_key_values"))["layout"] == "quantized-BHSD"
