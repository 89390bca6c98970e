"""Recording on the real tiny Qwen2-VL / Qwen2.5-VL models: what the trace must contain."""

from __future__ import annotations

import linecache
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmscope
from vlmscope.trace import FORMAT_VERSION, KIND_DECODE, KIND_PREFILL, ROLE_OUTPUT, shape_of

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples" / "astronaut.png"
PROMPT = "Describe this image."

N_IMAGE = 256          # 512x512 -> 448x448 -> 32x32 patches -> 16x16 merged tokens
PROMPT_LEN = 281       # chat template + 256 image tokens + prompt


def outputs(t, path: str, step: int = 0, nth: int = 0) -> list[tuple[str, tuple]]:
    """(name, shape) of each output tensor of a module call."""
    paths = t.module_paths
    ev = t.events(step)
    idx = np.flatnonzero((paths[ev["module"]] == path) & (ev["nth"] == nth))
    assert len(idx) == 1, f"{path} called {len(idx)} times as nth={nth} in step {step}"
    row = int(t.steps[step]["event_start"]) + int(idx[0])
    ts = t.event_tensors(row)
    return [(t.s(r["name"]), shape_of(r)) for r in ts if r["role"] == ROLE_OUTPUT]


def probes(t, step: int, kind: str, path: str | None = None):
    rows = t.probes(step, kind=kind)
    if path is not None:
        rows = rows[t.module_paths[rows["module"]] == path]
    return rows


# --------------------------------------------------------------------------- structure


def test_steps_are_prefill_then_decode(qwen25_trace):
    t = qwen25_trace
    assert t.status == "complete" and t.complete
    assert t.format_version == FORMAT_VERSION == 3
    assert list(t.steps["kind"]) == [KIND_PREFILL, KIND_DECODE, KIND_DECODE, KIND_DECODE]
    assert list(t.steps["input_len"]) == [PROMPT_LEN, 1, 1, 1]
    assert list(t.steps["q_len"]) == [PROMPT_LEN, 1, 1, 1]
    assert (t.steps["status"] == 0).all()
    # every step's block of events starts with the step's own rows, in execution order
    for i in range(t.n_steps):
        ev = t.events(i)
        assert (ev["step"] == i).all()
        assert (np.diff(ev["seq"]) > 0).all()
        assert (ev["end_seq"] >= ev["seq"]).all()


def test_exact_shapes_of_known_modules(qwen25_trace):
    t = qwen25_trace
    assert outputs(t, "model.visual.patch_embed") == [("out", (1024, 64))]
    assert outputs(t, "model.visual.merger") == [("out", (N_IMAGE, 64))]
    assert outputs(t, "model.language_model.embed_tokens") == [("out", (1, PROMPT_LEN, 64))]
    assert outputs(t, "model.language_model.layers.0.self_attn.q_proj") == [("out", (1, PROMPT_LEN, 64))]
    assert outputs(t, "model.language_model.layers.0.self_attn.k_proj") == [("out", (1, PROMPT_LEN, 32))]
    assert outputs(t, "model.language_model.layers.1.self_attn.q_proj", step=2) == [("out", (1, 1, 64))]
    # generate keeps the logits of the last position only
    assert ("out", (1, 1, 152064)) in outputs(t, "lm_head")
    assert ("out.logits", (1, 1, 152064)) in outputs(t, "")


def test_module_events_have_parent_depth_and_nth(qwen25_trace):
    t = qwen25_trace
    ev = t.events(0)
    paths = t.module_paths
    start = int(t.steps[0]["event_start"])
    for i, e in enumerate(ev):
        p = paths[e["module"]]
        if e["parent"] >= 0:
            parent = t.events()[e["parent"]]
            assert parent["seq"] < e["seq"] <= parent["end_seq"]
            assert parent["depth"] == e["depth"] - 1
            pp = paths[parent["module"]]
            assert p.startswith(pp + ".") or pp == ""
        else:
            assert e["depth"] == 0
    # the vision tower runs before the prefill forward (generate calls it first) and joins step 0
    first = paths[ev["module"][0]]
    assert first == "model.visual"
    # rotary embedding called once per step; decoder layers once each
    lay = ev[paths[ev["module"]] == "model.language_model.layers.1"]
    assert list(lay["nth"]) == [0]
    assert start == 0


def test_tensor_stats_are_exact(tmp_path):
    """Stats of a known tensor through a plain module: min/max/mean/std/absmax/nan/inf."""
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12, dtype=torch.float32).view(3, 4) / 10)
        lin.bias.zero_()
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 1.0, -1.0, 2.0]])
    with vlmscope.Recorder(lin, tmp_path / "lin.h5") as rec:
        y = lin(x)
        x_nan = x.clone()
        x_nan[0, 0] = float("nan")
        x_nan[1, 1] = float("inf")
        lin(x_nan)
    with vlmscope.open_trace(rec.path) as t:
        assert t.n_steps == 2
        ts = t.tensors(0)
        inp = ts[ts["role"] == 0][0]
        out = ts[ts["role"] == ROLE_OUTPUT][0]
        for row, ref in ((inp, x), (out, y)):
            assert row["min"] == pytest.approx(ref.min().item())
            assert row["max"] == pytest.approx(ref.max().item())
            assert row["mean"] == pytest.approx(ref.mean().item(), rel=1e-6)
            assert row["std"] == pytest.approx(ref.std(correction=0).item(), rel=1e-5)
            assert row["absmax"] == pytest.approx(ref.abs().max().item())
            assert row["nan"] == 0 and row["inf"] == 0
            assert t.s(row["dtype"]) == "float32" and t.s(row["device"]) == "cpu"
        bad = t.tensors(1)
        bad_in = bad[bad["role"] == 0][0]
        assert bad_in["nan"] == 1 and bad_in["inf"] == 1
        bad_out = bad[bad["role"] == ROLE_OUTPUT][0]
        assert bad_out["nan"] >= 1


# --------------------------------------------------------------------------- probes


def _processor_inputs(name: str):
    import vlmscope_models
    from vlmscope.recorder.inputs import build_inputs

    model, proc = vlmscope_models.load_embedded(name)
    inputs, _ = build_inputs(model, proc, prompt=PROMPT, image=str(IMAGE))
    return model, inputs


@pytest.mark.parametrize("which", ["qwen25", "qwen2"])
def test_mrope_positions_match_the_models_rope_index(which, request):
    t = request.getfixturevalue(f"{which}_trace")
    model, inputs = _processor_inputs("tiny-qwen2.5-vl" if which == "qwen25" else "tiny-qwen2-vl")
    with torch.no_grad():
        ref, deltas = model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs.get("attention_mask"), mm_token_type_ids=inputs["mm_token_type_ids"])
    ref = ref.numpy()[-3:]
    (p,) = probes(t, 0, "position_ids", "model.language_model.rotary_emb")
    got = t.probe_value(p)
    assert got.shape == (3, 1, PROMPT_LEN)
    np.testing.assert_array_equal(got, ref)
    # per-row ranges in the probe info and the step table
    info = t.probe_info(p)
    assert info["rows"] == [[int(r.min()), int(r.max())] for r in ref]
    st = t.steps[0]
    assert st["pos_rows"] == 3
    assert list(st["pos_min"]) == [int(r.min()) for r in ref]
    assert list(st["pos_max"]) == [int(r.max()) for r in ref]
    # the image block spans a 16x16 merged grid on the h/w rows
    span = t.probe_info(probes(t, 0, "input_ids", "")[0])["spans"][0]
    img = got[:, 0, span[1]:span[2]]
    assert img[1].max() - img[1].min() == 15 and img[2].max() - img[2].min() == 15
    # per-span ranges in the probe: text, image, text; text after the image continues at max + 1
    segs = info["spans"]
    assert [s[0] for s in segs] == ["text", "image", "text"]
    assert segs[1][1:3] == [span[1], span[2]]
    assert segs[1][3] == [[int(r.min()), int(r.max())] for r in img]
    assert segs[2][3][0][0] == max(m for _, m in segs[1][3]) + 1
    # decode positions continue from the prefill max + 1, one per step, all rows equal
    last = int(ref.max())
    for k in range(1, t.n_steps):
        (p,) = probes(t, k, "position_ids", "model.language_model.rotary_emb")
        assert t.probe_value(p).ravel().tolist() == [last + k] * 3
        assert list(t.steps[k]["pos_min"]) == [last + k] * 3


def test_text_positions_are_1d_kv_indices(qwen25_trace):
    """The 1-D text positions handed to the language model (row 0 of its 4-row position ids)."""
    t = qwen25_trace
    for k in range(t.n_steps):
        (p,) = probes(t, k, "position_ids", "model.language_model")
        v = t.probe_value(p)
        assert v.shape[0] == 4
        st = t.steps[k]
        np.testing.assert_array_equal(v[0, 0], np.arange(st["cache_before"], st["cache_before"] + st["q_len"]))


@pytest.mark.parametrize("which", ["qwen25", "qwen2"])
def test_cache_grows_by_exactly_q_len(which, request):
    t = request.getfixturevalue(f"{which}_trace")
    st = t.steps
    assert st["cache_before"][0] == 0
    np.testing.assert_array_equal(st["cache_after"] - st["cache_before"], st["q_len"])
    np.testing.assert_array_equal(st["cache_before"][1:], st["cache_after"][:-1])
    for k in range(t.n_steps):
        root_out = [p for p in probes(t, k, "cache", "") if t.s(p["name"]) == "out.cache"]
        assert len(root_out) == 1
        info = t.probe_info(root_out[0])
        assert info["type"] == "DynamicCache" and info["layout"] == "BHSD" and info["n_layers"] == 2
        assert info["lengths"] == [int(st["cache_after"][k])] * 2
        assert t.probe_value(root_out[0]).tolist() == info["lengths"]
        assert info["key_shape"] == [1, 2, int(st["cache_after"][k]), 16]


def test_mask_shape_and_values_per_step(qwen25_trace):
    t = qwen25_trace
    for k in range(t.n_steps):
        st = t.steps[k]
        q, kv = int(st["q_len"]), int(st["cache_before"] + st["q_len"])
        assert st["mask_ndim"] == 4 and list(st["mask_shape"]) == [1, 1, q, kv]
        rows = probes(t, k, "attention_mask", "model.language_model.layers.0")
        assert len(rows) == 1
        info = t.probe_info(rows[0])
        assert info["style"] == "additive" and info["dtype"] == "float32"
        allowed = t.probe_value(rows[0])
        assert allowed.shape == (1, 1, q, kv)
        if k == 0:
            np.testing.assert_array_equal(allowed[0, 0], np.tril(np.ones((q, kv), bool)))
            assert info["fill"] == pytest.approx(float(np.finfo(np.float32).min))
        else:
            assert allowed.all()
            assert info["fill"] is None and info["min"] == 0.0
    # the mask reaching both layers is the same tensor: stored once, referenced twice
    m = probes(t, 0, "attention_mask")
    assert len(set(m["data_off"].tolist())) == 1 and len(m) >= 2


def test_image_spans_and_merger_rows(qwen25_trace, qwen2_trace):
    for t in (qwen25_trace, qwen2_trace):
        (ids,) = probes(t, 0, "input_ids", "")
        info = t.probe_info(ids)
        assert info["image_token_id"] == 151655
        assert info["image_tokens"] == N_IMAGE
        assert len(info["spans"]) == 1
        b, s, e = info["spans"][0]
        v = t.probe_value(ids)
        assert v[0, s - 1] == 151652 and v[0, e] == 151653 and (v[0, s:e] == 151655).all()
        assert t.steps["image_tokens"].tolist() == [N_IMAGE] + [0] * (t.n_steps - 1)
        (mr,) = probes(t, 0, "merger_rows", "model.visual.merger")
        assert t.probe_info(mr)["rows"] == N_IMAGE
        grids = probes(t, 0, "image_grid_thw")
        assert len(grids) >= 1
        assert t.probe_value(grids[0]).tolist() == [[1, 32, 32]]
        assert t.meta["image"]["resized"] == [448, 448]
        assert t.meta["image"]["size"] == [512, 512]


def _site_text(t, r) -> str:
    return linecache.getline(t.s(r["site_file"]), int(r["site_line"]))


def test_vision_patch_embed_and_merger_reshapes_with_call_sites(qwen25_trace):
    t = qwen25_trace
    rs = t.reshapes(0)
    paths = t.module_paths
    pe = rs[paths[rs["module"]] == "model.visual.patch_embed"]
    ops = [t.s(o) for o in pe["op"]]
    assert ops == ["view", "view"]
    first, second = pe
    assert shape_of(first, "in_shape", "in_ndim") == (1024, 3 * 2 * 14 * 14)
    assert shape_of(first, "out_shape", "out_ndim") == (1024, 3, 2, 14, 14)
    assert t.s(first["args"]) == "(-1, 3, 2, 14, 14)"
    assert shape_of(second, "out_shape", "out_ndim") == (1024, 64)
    for r in pe:
        assert t.s(r["site_file"]).endswith("transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py")
        assert t.s(r["site_func"]) == "Qwen2_5_VisionPatchEmbed.forward"
        assert ".view(" in _site_text(t, r)
    mg = rs[(paths[rs["module"]] == "model.visual.merger")]
    views = [r for r in mg if t.s(r["op"]) == "view"]
    assert len(views) == 1
    assert shape_of(views[0], "in_shape", "in_ndim") == (1024, 64)
    assert shape_of(views[0], "out_shape", "out_ndim") == (N_IMAGE, 256)
    assert t.s(views[0]["site_func"]) == "Qwen2_5_VLPatchMerger.forward"
    assert "view(-1, self.hidden_size)" in _site_text(t, views[0])
    # every reshape has a call site outside torch and vlmscope
    files = {t.s(f) for f in t.reshapes()["site_file"]}
    assert not any("/torch/" in f or "/vlmscope/" in f for f in files)


def test_reshape_events_cover_the_common_ops(qwen25_trace):
    t = qwen25_trace
    ops = {t.s(o) for o in t.reshapes()["op"]}
    for op in ("view", "reshape", "transpose", "cat", "permute", "flatten", "expand", "masked_scatter"):
        assert op in ops, op


def test_run_metadata(qwen25_trace):
    m = qwen25_trace.meta
    for key in ("vlmscope", "torch", "transformers", "device", "dtype", "attn_implementation", "prompt",
                "image", "generation", "argv", "decoder_layers", "generated_text"):
        assert key in m, key
    assert m["decoder_layers"] == "model.language_model.layers"
    assert m["merger"] == "model.visual.merger"
    assert m["image_token_id"] == 151655
    assert m["prompt"] == PROMPT
    assert len(m["image"]["sha256"]) == 64
    cfg = qwen25_trace.config
    assert cfg["model_type"] == "qwen2_5_vl"


def test_same_command_gives_the_same_trace(qwen25_trace, tmp_path, record_embedded):
    again = record_embedded("tiny-qwen2.5-vl", tmp_path / "again.h5")
    with vlmscope.open_trace(again) as t2:
        t1 = qwen25_trace
        for table in ("steps", "events", "tensors", "reshapes", "probes"):
            a, b = getattr(t1, table) if table == "steps" else getattr(t1, table)(), \
                getattr(t2, table) if table == "steps" else getattr(t2, table)()
            assert len(a) == len(b), table
        for f in ("min", "max", "mean", "std", "numel"):
            np.testing.assert_array_equal(t1.tensors()[f], t2.tensors()[f])
        np.testing.assert_array_equal(t1.reshapes()["out_shape"], t2.reshapes()["out_shape"])
        assert t1.meta["generated_text"] == t2.meta["generated_text"]


# --------------------------------------------------------------------------- API, hooks, failures


def _tiny(name="tiny-qwen2.5-vl"):
    import vlmscope_models
    from vlmscope.recorder.inputs import build_inputs

    model, proc = vlmscope_models.load_embedded(name)
    inputs, _ = build_inputs(model, proc, prompt=PROMPT, image=str(IMAGE))
    return model, proc, inputs


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_recorder_context_manager_and_hook_removal(tmp_path):
    model, proc, inputs = _tiny()
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = _hook_count(model)
    with vlmscope.Recorder(model, out=tmp_path / "ctx.h5") as rec:
        assert _hook_count(model) > hooks
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert _hook_count(model) == hooks
    assert rec.path == tmp_path / "ctx.h5" and rec.path.exists()
    assert not (tmp_path / "ctx.h5.partial").exists()
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    # no TorchFunctionMode left behind
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()


def test_failed_forward_is_recorded_up_to_the_failure(tmp_path):
    """Fewer image placeholder tokens than image features: the model raises inside its forward."""
    model, proc, inputs = _tiny()
    ids = inputs["input_ids"].clone()
    pad = (ids[0] == 151655).nonzero().ravel()
    ids[0, pad[:4]] = 151654  # 4 of the 256 placeholders become <|vision_pad|>: 252 tokens, 256 features
    bad = {**inputs, "input_ids": ids}
    hooks = _hook_count(model)
    with pytest.raises(Exception) as exc_info:
        with vlmscope.Recorder(model, out=tmp_path / "fail.h5"):
            with torch.no_grad():
                model.generate(**bad, max_new_tokens=2, do_sample=False)
    assert _hook_count(model) == hooks
    with vlmscope.open_trace(tmp_path / "fail.h5") as t:
        assert t.status == "failed"
        err = t.error
        assert err["type"] == type(exc_info.value).__name__
        assert "token" in err["message"].lower() and "feature" in err["message"].lower()
        assert err["module_stack"][0] == "" and err["module_stack"][-1] == "model"
        assert err["last_reshape"] is not None and err["last_reshape"]["in_shapes"]
        assert t.n_steps == 1 and t.steps[0]["status"] == 1
        # events up to the failure are kept: the vision tower ran fully, with its merger output
        paths = t.module_paths[t.events(0)["module"]]
        assert "model.visual.merger" in set(paths)
        assert t.events(0)["status"][list(paths).index("model")] == 1
        (mr,) = probes(t, 0, "merger_rows")
        assert t.probe_info(mr)["rows"] == N_IMAGE
        (ids_probe,) = probes(t, 0, "input_ids", "")
        assert t.probe_info(ids_probe)["image_tokens"] == N_IMAGE - 4


def test_interrupt_keeps_finished_steps(tmp_path):
    model, proc, inputs = _tiny()

    def stop(step, rec):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with vlmscope.Recorder(model, out=tmp_path / "int.h5", on_step=stop):
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=8, do_sample=False)
    with vlmscope.open_trace(tmp_path / "int.h5") as t:
        assert t.status == "incomplete"
        assert t.n_steps == 3
        assert t.steps["cache_after"].tolist() == [PROMPT_LEN, PROMPT_LEN + 1, PROMPT_LEN + 2]


def test_sigint_during_cli_record_leaves_readable_incomplete_trace(tmp_path):
    import signal

    out = tmp_path / "sig.h5"
    # a run started in the background by a shell without job control (nohup ... &) inherits
    # SIGINT ignored, as POSIX has it: the child is given the default disposition, as a
    # terminal's Ctrl-C finds it
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "vlmscope.cli", "record", "-v", "--image", str(IMAGE), "-o", str(out),
         "-n", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stderr:  # one line per recorded step with -v
            seen.append(line)
            if line.startswith("step 3 recorded"):
                break
    finally:
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    stderr = "".join(seen) + stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    with vlmscope.open_trace(out) as t:
        assert t.status == "incomplete"
        assert t.n_steps >= 4
        np.testing.assert_array_equal(t.steps["cache_after"] - t.steps["cache_before"], t.steps["q_len"])
    assert "incomplete" in stdout


def test_save_tensors_and_byte_cap(tmp_path):
    model, proc, inputs = _tiny()
    with vlmscope.Recorder(model, out=tmp_path / "pl.h5", save_tensors="model.language_model.norm") as rec:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        ref = model.model(**{k: v for k, v in inputs.items()}).last_hidden_state
    with vlmscope.open_trace(rec.path) as t:
        ts = t.tensors(0)
        saved = ts[ts["payload"] >= 0]
        assert len(saved) == 1
        arr = t.payload(int(saved[0]["payload"]))
        assert arr.shape == (1, PROMPT_LEN, 64)
        np.testing.assert_allclose(arr, ref.numpy(), rtol=1e-5, atol=1e-5)
        assert t.payload_attrs(int(saved[0]["payload"]))["module"] == "model.language_model.norm"
        # slices load on demand
        assert t.payload(int(saved[0]["payload"]), np.s_[0, :2]).shape == (2, 64)
    cap = PROMPT_LEN * 64 * 4 + 100  # room for the prefill output only
    with vlmscope.Recorder(model, out=tmp_path / "cap.h5", save_tensors=["model.language_model.norm"],
                           max_tensor_bytes=cap) as rec:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with vlmscope.open_trace(rec.path) as t:
        assert t.n_payloads == 1
        assert any("max-tensor-bytes" in w for w in t.meta["warnings"])
        later = t.tensors(2)
        norm_rows = later[t.module_paths[t.events()["module"][later["event"]]] == "model.language_model.norm"]
        assert (norm_rows["payload"] == -1).all() and np.isfinite(norm_rows["mean"]).all()


def test_reader_imports_neither_torch_nor_textual(qwen25_trace_path):
    code = (
        "import sys, vlmscope\n"
        f"t = vlmscope.open_trace({str(qwen25_trace_path)!r})\n"
        "t.steps; t.events(0); t.tensors(1); t.reshapes(0); t.probe_value(t.probes(0, kind='attention_mask')[0])\n"
        "bad = [m for m in ('torch', 'textual', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_trace_format_doc_example_runs(qwen25_trace_path):
    doc = (ROOT / "docs" / "trace-format.md").read_text()
    blocks = doc.split("```python\n")[1:]
    code = blocks[0].split("```")[0].replace("traces/example.h5", str(qwen25_trace_path))
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "q_len 281 cache 0 -> 281" in r.stdout
    assert "modeling_qwen2_5_vl.py" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recording_adds_no_cuda_synchronisation(tmp_path):
    import warnings

    model, proc, inputs = _tiny()
    model.cuda()
    inputs = {k: v.cuda() for k, v in inputs.items()}

    def count(fn) -> int:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(x.message) for x in w)

    def fwd():
        with torch.no_grad():
            model(**inputs)

    fwd()
    plain = count(fwd)
    rec = vlmscope.Recorder(model, out=tmp_path / "cuda.h5")
    rec.start()
    try:
        recorded = None
        # the end-of-step copy is the one sync vlmscope adds: count the forward without it
        orig = rec._end_step
        rec._end_step = lambda output: None
        recorded = count(fwd)
        rec._end_step = orig
    finally:
        rec._step = None
        rec.stop()
    assert recorded == plain


def test_submodule_calls_outside_the_root_are_kept(tmp_path):
    """Running only the vision tower (no root forward) still yields a step with its events."""
    model, proc, inputs = _tiny()
    with vlmscope.Recorder(model, out=tmp_path / "vis.h5") as rec:
        with torch.no_grad():
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    with vlmscope.open_trace(rec.path) as t:
        assert t.n_steps == 1 and t.complete
        paths = set(t.module_paths[t.events(0)["module"]])
        assert "model.visual.merger" in paths and "" not in paths
        assert t.steps[0]["cache_before"] == -1


def test_a_recorder_bug_never_breaks_the_model(tmp_path, monkeypatch):
    """An exception inside vlmscope's own hook code stops the recording, not the model."""
    model, proc, inputs = _tiny()
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    rec = vlmscope.Recorder(model, out=tmp_path / "bug.h5")
    real = rec._end_step
    calls = []

    def flaky(output):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated recorder bug")
        return real(output)

    monkeypatch.setattr(rec, "_end_step", flaky)
    with rec:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    assert rec.broken and "simulated recorder bug" in rec.broken
    with vlmscope.open_trace(rec.path) as t:
        assert t.status == "incomplete" and t.n_steps == 1
        assert any("internal error" in w for w in t.meta["warnings"])


def test_a_failure_inside_reshape_capture_stops_the_recording_never_the_model(tmp_path):
    """A recorder bug while logging an op (here: an argument whose repr raises) must not reach the
    user's forward: the model's outputs stay what they are untraced, recording stops for good with
    a warning in the trace, and the steps already finished are kept."""

    class BadRepr(int):
        def __repr__(self):
            raise RuntimeError("no repr for you")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.bad = False

        def forward(self, x):
            y = self.lin(x)
            return torch.cat([y, y], dim=BadRepr(1) if self.bad else 1)

    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 4)
    want = net(x)
    with vlmscope.Recorder(net, out=tmp_path / "t.h5") as rec:
        first = net(x)           # recorded normally
        net.bad = True
        second = net(x)          # reshape capture fails inside this forward
        third = net(x)           # and nothing is recorded any more
    assert torch.equal(first, want) and torch.equal(second, want) and torch.equal(third, want)
    assert rec.broken is not None and "RuntimeError: no repr for you" in rec.broken
    with vlmscope.open_trace(rec.path) as t:
        assert t.status == "incomplete"
        assert t.n_steps == 1
        assert any("stopped recording at step 1" in w for w in t.meta["warnings"])
