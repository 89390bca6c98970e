"""Issue 11: the from-scratch port of tiny-qwen2.5-vl's language model (``vlmscope_models.port25``).

The clean port must compute what the real transformers model computes (prefill logits for one
image prompt and for a left-padded B=2 batch, greedy decode tokens and logits); each seeded bug
must change the logits, and must start in the module the docstring names: that module is the
one whose inputs agree with the clean port's and whose output does not (the issue's definition
of the culprit). The recorder records the port's ``generate`` like any model, and the clean
port's trace has no positions / mask / cache violations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmscope
from vlmscope import trace as T
from vlmscope.analyze import check
from vlmscope.recorder import record
from vlmscope_models import load_embedded, port25
from vlmscope_models.port25 import BUG_SITES, BUGS, build_port, rope_positions, window_index

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT / "examples" / "astronaut.png"
PROMPT = "Describe this image."
TOL = 1e-4  # float32: the fused qkv / gate_up matmuls may round differently from the split ones
NEW = 4


def _chat(proc, text: str, image: bool) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)


@pytest.fixture(scope="module")
def ref_proc():
    model, proc = load_embedded("tiny-qwen2.5-vl")
    return model, proc


@pytest.fixture(scope="module")
def port(ref_proc):
    return build_port(ref_proc[0])


@pytest.fixture(scope="module")
def inputs1(ref_proc):
    proc = ref_proc[1]
    return dict(proc(text=[_chat(proc, PROMPT, True)], images=[Image.open(ASTRONAUT)], return_tensors="pt"))


@pytest.fixture(scope="module")
def inputs2(ref_proc):
    """Left-padded B=2: row 0 an image prompt, row 1 text only (padded on the left)."""
    proc = ref_proc[1]
    texts = [_chat(proc, PROMPT, True), _chat(proc, "Hello there, how are you today?", False)]
    return dict(proc(text=texts, images=[Image.open(ASTRONAUT)], padding=True, padding_side="left",
                     return_tensors="pt"))


@pytest.fixture(scope="module")
def ref_logits1(ref_proc, inputs1):
    with torch.no_grad():
        return ref_proc[0](**inputs1).logits


@pytest.fixture(scope="module")
def inputs_small(ref_proc):
    """The bug tests' input: astronaut.png at 224x224 (8x8 image tokens in 2x2 vision windows,
    so the window order still differs from raster order)."""
    proc = ref_proc[1]
    img = Image.open(ASTRONAUT).convert("RGB").resize((224, 224))
    return dict(proc(text=[_chat(proc, PROMPT, True)], images=[img], return_tensors="pt"))


@pytest.fixture(scope="module")
def ref_logits_small(ref_proc, inputs_small):
    assert inputs_small["image_grid_thw"].tolist() == [[1, 16, 16]]
    with torch.no_grad():
        return ref_proc[0](**inputs_small).logits


def _port_steps(port, inputs: dict, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The port's greedy loop written out: tokens and each step's last-position logits."""
    cache = port.new_cache()
    mask = inputs["attention_mask"]
    with torch.no_grad():
        out = port(inputs["input_ids"], attention_mask=mask, cache=cache, pixel_values=inputs.get("pixel_values"),
                   image_grid_thw=inputs.get("image_grid_thw"))
        logits, toks = [], []
        for i in range(n):
            last = out["logits"][:, -1]
            logits.append(last)
            nxt = last.argmax(-1, keepdim=True)
            toks.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            if i + 1 < n:
                out = port(nxt, attention_mask=mask, cache=cache)
    return torch.cat(toks, 1), logits


# ------------------------------------------------------------------------------- parity


def test_prefill_logits_b1(port, inputs1, ref_logits1):
    with torch.no_grad():
        got = port(**inputs1)["logits"]
    diff = (got - ref_logits1).abs().max().item()
    print(f"B=1 prefill max |port - ref| = {diff:.3g} (logits up to {ref_logits1.abs().max().item():.3g})")
    assert got.shape == ref_logits1.shape
    assert diff <= TOL


def test_prefill_logits_b2_left_padded(ref_proc, port, inputs2):
    mask = inputs2["attention_mask"].bool()
    assert not mask[1].all() and mask[0].all()  # the text row is the padded one
    with torch.no_grad():
        want = ref_proc[0](**inputs2).logits
        got = port(**inputs2)["logits"]
    diff = (got - want)[mask].abs().max().item()  # padded positions attend to nothing: not compared
    print(f"B=2 left-padded prefill max |port - ref| over real tokens = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("which", ["inputs1", "inputs2"])
def test_greedy_generate_matches_reference(request, ref_proc, port, which):
    inputs = request.getfixturevalue(which)
    ref = ref_proc[0]
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    S = inputs["input_ids"].shape[1]
    toks, logits = _port_steps(port, inputs, NEW)
    assert torch.equal(toks, out.sequences[:, S:])
    assert torch.equal(port.generate(**inputs, max_new_tokens=NEW), out.sequences)
    diffs = [(a - b).abs().max().item() for a, b in zip(logits, out.logits)]
    print(f"{which}: decode-step max |port - ref| = {[f'{d:.3g}' for d in diffs]}")
    assert max(diffs) <= TOL


def test_own_positions_and_window_index(ref_proc, inputs2):
    """The port's own position code equals transformers' get_rope_index, its window order the
    tower's (the window_reverse bug relies on it)."""
    from transformers.vision_utils import get_vision_window_index

    ref = ref_proc[0]
    cfg = ref.config
    want, want_d = ref.model.get_rope_index(inputs2["input_ids"], inputs2["mm_token_type_ids"],
                                            image_grid_thw=inputs2["image_grid_thw"],
                                            attention_mask=inputs2["attention_mask"])
    got, got_d = rope_positions(inputs2["input_ids"], inputs2["attention_mask"], inputs2["image_grid_thw"],
                                cfg.image_token_id, cfg.vision_config.spatial_merge_size)
    assert torch.equal(got, want) and torch.equal(got_d, want_d.view(-1, 1))
    v = cfg.vision_config
    grid = torch.tensor([[1, 32, 32], [1, 22, 36]])  # a whole-window grid and a ragged one
    w_ref, _ = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
    assert torch.equal(window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size), w_ref)


def test_port_is_independent(ref_proc, port):
    """Own module names, a fused qkv and gate_up, own parameters (only the vision tower shared)."""
    ref = ref_proc[0]
    names = dict(port.named_modules())
    for p in ("lm.embed", "lm.blocks.1.attn.qkv", "lm.blocks.1.attn.out", "lm.blocks.0.mlp.gate_up",
              "lm.blocks.0.mlp.down", "lm.blocks.0.norm1", "lm.blocks.0.norm2", "lm.norm", "head", "visual.tower"):
        assert p in names, p
    tc = ref.config.text_config
    d = tc.hidden_size // tc.num_attention_heads
    assert names["lm.blocks.0.attn.qkv"].weight.shape == ((tc.num_attention_heads + 2 * tc.num_key_value_heads) * d,
                                                          tc.hidden_size)
    ref_ptrs = {p.data_ptr() for n, p in ref.named_parameters() if not n.startswith("model.visual.")}
    own = [n for n, p in port.named_parameters() if not n.startswith("visual.")]
    assert own and not any(p.data_ptr() in ref_ptrs for n, p in port.named_parameters() if n in own)


# ------------------------------------------------------------------------------- seeded bugs


def _tensors(x, out: list, copy: bool = True) -> list:
    if isinstance(x, torch.Tensor):
        out.append(x.detach().clone() if copy else x.detach())
    elif isinstance(x, dict):
        for v in x.values():
            _tensors(v, out, copy)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _tensors(v, out, copy)
    return out


def _io(model, inputs: dict) -> dict[str, tuple[list, list]]:
    """Each module's (input tensors, output tensors) of one prefill (inputs copied when the
    module is entered: the cache list is updated in place; outputs are never written to)."""
    seen: dict[str, tuple[list, list]] = {}
    pending: dict[str, list] = {}
    handles = []
    for name, mod in model.named_modules():
        def pre(m, args, kwargs, name=name):
            pending[name] = _tensors([args, kwargs], [])

        def post(m, args, kwargs, output, name=name):
            seen.setdefault(name, (pending.pop(name), _tensors(output, [], copy=False)))

        handles += [mod.register_forward_pre_hook(pre, with_kwargs=True),
                    mod.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=1e-6)
                                    for x, y in zip(a, b))


@pytest.fixture(scope="module")
def clean_io(port, inputs_small):
    return _io(port, inputs_small)


def test_docstring_names_every_bug_site(port):
    names = dict(port.named_modules())
    for bug, site in BUG_SITES.items():
        assert site in names
        line = next(ln for ln in port25.__doc__.splitlines() if ln.startswith(f"``{bug}``"))
        assert (f"``{site}``" if site else "``(root)``") in line


@pytest.mark.parametrize("bug", BUGS)
def test_bug_changes_logits_and_starts_in_its_module(ref_proc, inputs_small, ref_logits_small, clean_io, bug):
    buggy = build_port(ref_proc[0], bugs=[bug])
    io = _io(buggy, inputs_small)
    assert (clean_io[""][1][0] - ref_logits_small).abs().max().item() <= TOL
    diff = (io[""][1][0] - ref_logits_small).abs().max().item()
    print(f"{bug}: max |logits - ref| = {diff:.3g}")
    assert diff > 10 * TOL  # clean: <= 3e-7
    # culprits: inputs agree with the clean port, outputs do not; keep those with no culprit below
    culprits = [n for n, (i, o) in io.items() if _same(i, clean_io[n][0]) and not _same(o, clean_io[n][1])]
    deepest = [n for n in culprits if not any(c != n and (n == "" or c.startswith(n + ".")) for c in culprits)]
    assert deepest == [BUG_SITES[bug]]


def test_unknown_bug_is_refused(ref_proc):
    with pytest.raises(ValueError, match="unknown bugs"):
        build_port(ref_proc[0], bugs=["no_such_bug"])


# ------------------------------------------------------------------------------- recording


@pytest.mark.parametrize("batch", [False, True])
def test_recorder_records_port_generate_and_check_is_clean(ref_proc, port, tmp_path, batch):
    proc = ref_proc[1]
    if batch:
        out = record(port, proc, rows=[{"prompt": PROMPT, "images": [str(ASTRONAUT)]},
                                       {"prompt": "Hello there, how are you today?"}],
                     out=tmp_path / "port_b2.h5", max_new_tokens=NEW)
    else:
        out = record(port, proc, image=str(ASTRONAUT), prompt=PROMPT, out=tmp_path / "port.h5", max_new_tokens=NEW)
    with vlmscope.open_trace(out) as t:
        kinds = t.steps["kind"].tolist()
        meta = t.meta
    assert kinds == [T.KIND_PREFILL] + [T.KIND_DECODE] * (NEW - 1)
    assert (meta["decoder_layers"], meta["text_model"], meta["vision_model"]) == ("lm.blocks", "lm", "visual")
    # every rule: image.features-row must read the port's plain-tensor vision output (raster order),
    # not the window-ordered merger rows
    report = check(out)
    assert report.violations == [], [v.line() for v in report.violations]
