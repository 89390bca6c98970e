"""Issue 11: porting parity. ``diff`` pairs a from-scratch port with its reference without a map,
and names the module whose inputs agree and whose outputs do not (the culprit).

The port (``vlmscope_models.port25``) has its own module names, a fused qkv and gate_up, its
own cache, mask and image splice; each seeded bug sits in the module ``BUG_SITES`` names. Both
traces are recorded with the default value sketches. The expectations come from the bug's
site, never from the diff's output: the culprit is the buggy module (or, diffing the other way
round, its counterpart in the reference).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vlmscope
from vlmscope.analyze.diff import diff as run_diff
from vlmscope.analyze._index import index_of
from vlmscope.analyze.automap import in_scope, infer_map
from vlmscope.analyze.sketchdiff import compare_sketches
from vlmscope.trace import sketch as S

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT / "examples" / "astronaut.png"
BUG_NAMES = ("rotate_half_sign", "rmsnorm_eps", "gqa_repeat", "softmax_scale", "gate_up_swapped", "splice_late",
             "window_reverse")


@pytest.fixture(scope="module")
def port_traces(tmp_path_factory):
    from vlmscope.recorder import record
    from vlmscope_models import load_embedded
    from vlmscope_models.port25 import BUG_SITES, build_port

    assert set(BUG_NAMES) <= set(BUG_SITES)
    d = tmp_path_factory.mktemp("parity")
    model, proc = load_embedded("tiny-qwen2.5-vl")
    kw = dict(image=str(ASTRONAUT), prompt="Describe this image.", max_new_tokens=2)
    out = {"ref": record(model, proc, out=d / "ref.h5", **kw), "port": record(build_port(model), proc, out=d / "port.h5", **kw)}
    for bug in BUG_NAMES:
        out[bug] = record(build_port(model, [bug]), proc, out=d / f"{bug}.h5", **kw)
    out["sites"] = dict(BUG_SITES)
    out["nosk_port"] = record(build_port(model, ["window_reverse"]), proc, out=d / "nosk_port.h5", sketches=False, **kw)
    out["nosk_ref"] = record(model, proc, out=d / "nosk_ref.h5", sketches=False, **kw)
    return out


def _map(a, b):
    with vlmscope.open_trace(a) as ta, vlmscope.open_trace(b) as tb:
        return infer_map(index_of(ta), index_of(tb))


def test_clean_port_is_the_same_within_tolerance_without_a_map(port_traces):
    rep = run_diff(port_traces["port"], port_traces["ref"])
    assert rep.module_map is not None and not rep.module_map.identity
    assert rep.culprit is not None and rep.culprit.status == "same", rep.culprit.headline()
    assert rep.semantic == [] and rep.same


@pytest.mark.parametrize("bug", BUG_NAMES)
def test_each_seeded_bug_is_named_as_the_culprit(port_traces, bug):
    site = port_traces["sites"][bug]
    rep = run_diff(port_traces[bug], port_traces["ref"])
    c = rep.culprit
    assert not rep.same
    assert c.status in ("found", "upstream"), c.headline()
    assert c.module_a == site, c.headline()
    assert c.step_a == 0 and c.caveat is None
    # the headline names the counterpart the map gives the buggy module
    mm = rep.module_map
    assert c.module_b == mm.counterpart(mm.paths_a.index(site))


@pytest.mark.parametrize("bug", BUG_NAMES)
def test_the_other_way_round_names_the_counterpart_in_the_reference(port_traces, bug):
    """Reference as A: the culprit is the reference module the map pairs with the buggy site;
    for the splice, done in the port's own forward, it is the reference module whose forward
    splices: the caller of the language model."""
    site = port_traces["sites"][bug]
    rep = run_diff(port_traces["ref"], port_traces[bug])
    c = rep.culprit
    assert c.status in ("found", "upstream"), c.headline()
    back = _map(port_traces[bug], port_traces["ref"])
    counterpart = back.counterpart(back.paths_a.index(site))
    if bug == "splice_late":
        with vlmscope.open_trace(port_traces["ref"]) as t:
            text = t.meta["text_model"]
        assert c.module_a == text.rpartition(".")[0]
    else:
        assert c.module_a == counterpart


def test_shift_and_permutation_are_said(port_traces):
    rep = run_diff(port_traces["window_reverse"], port_traces["ref"])
    assert "permuted" in rep.culprit.reason
    rep = run_diff(port_traces["splice_late"], port_traces["ref"])
    assert "shifted by 1 position" in rep.culprit.reason


def test_without_sketches_the_culprit_is_not_claimed(port_traces):
    """A reordering leaves every statistic unchanged: without sketches the window-reverse bug is
    not seen where it happens, and the diff does not claim a culprit it cannot establish."""
    with vlmscope.open_trace(port_traces["nosk_port"]) as t:
        assert not t.has_sketches()
    rep = run_diff(port_traces["nosk_port"], port_traces["nosk_ref"])
    c = rep.culprit
    assert c.module_a != "visual"
    assert c.caveat is not None and "upstream" in c.caveat
    # a module is named (statistics differ there) but not claimed: the text says "tentative"
    # everywhere, and never both names a culprit and says that none is established
    assert c.status in ("found", "upstream") and c.headline().startswith("tentative culprit: ")
    assert "tentative" in rep.first_caveat and "no culprit" not in rep.first_caveat
    p = subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", "diff", str(port_traces["nosk_port"]),
                        str(port_traces["nosk_ref"])], capture_output=True, text=True, timeout=300)
    lines = p.stdout.splitlines()
    assert p.returncode == 1 and any(ln.startswith("tentative culprit: ") for ln in lines), p.stdout
    assert not any(ln.startswith("culprit: ") for ln in lines) and "no culprit is established" not in p.stdout
    j = json.loads(subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", "diff", "--json",
                                   str(port_traces["nosk_port"]), str(port_traces["nosk_ref"])],
                                  capture_output=True, text=True, timeout=300).stdout)
    assert j["culprit"]["headline"].startswith("tentative culprit: ") and "tentative" in j["first_divergence_caveat"]


def test_inferred_map_pairs_roles_and_notes_fused_modules(port_traces):
    mm = _map(port_traces["port"], port_traces["ref"])
    pairs = {mm.paths_a[a]: mm.paths_b[b] for a, b in mm.pairs.items()}
    assert pairs["lm.blocks.1.norm2"] == "model.language_model.layers.1.post_attention_layernorm"
    assert pairs["lm.blocks.0.norm1"] == "model.language_model.layers.0.input_layernorm"
    assert pairs["lm.blocks.0.attn.out"] == "model.language_model.layers.0.self_attn.o_proj"
    assert pairs["lm.blocks.0.mlp.down"] == "model.language_model.layers.0.mlp.down_proj"
    assert pairs["head"] == "lm_head" and pairs["lm.embed"] == "model.language_model.embed_tokens"
    assert pairs["visual.tower.blocks.1.attn.qkv"] == "model.visual.blocks.1.attn.qkv"
    assert "lm.blocks.0.attn.qkv" not in pairs and "lm.blocks.0.mlp.gate_up" not in pairs
    assert any("lm.blocks.0.attn.qkv fuses" in n and "q_proj, k_proj, v_proj" in n and "self_attn" in n for n in mm.notes)
    assert any("gate_up fuses" in n and "gate_proj, up_proj" in n for n in mm.notes)
    assert _map(port_traces["ref"], port_traces["ref"]).identity


def test_cli_show_map_map_override_and_scope(port_traces, tmp_path):
    py = [sys.executable, "-P", "-m", "vlmscope.cli", "diff"]
    a, b = str(port_traces["rmsnorm_eps"]), str(port_traces["ref"])
    p = subprocess.run(py + [a, b, "--show-map"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "lm.blocks.1.norm2" in p.stdout and "->  model.language_model.layers.1.post_attention_layernorm" in p.stdout
    assert "culprit: lm.blocks.1.norm2" in p.stdout
    # --ignore the culprit's layer: what differs downstream comes from outside the scope, which
    # is said, never blamed on an in-scope module
    p = subprocess.run(py + [a, b, "--ignore", "lm.blocks.1", "--json"], capture_output=True, text=True, timeout=120)
    d = json.loads(p.stdout)["culprit"]
    assert d["status"] == "unknown" and "lm.blocks.1, outside the scope" in d["reason"], d
    # --only the vision side: nothing differs there
    p = subprocess.run(py + [a, b, "--only", "visual*", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(p.stdout)["culprit"]["status"] == "same"
    # --map overrides the inferred pair: norm2 forced onto the input norm, which it does not compute
    p = subprocess.run(py + [a, b, "--json", "--map",
                             r"lm\.blocks\.1\.norm2=model.language_model.layers.1.input_layernorm"],
                       capture_output=True, text=True, timeout=120)
    d = json.loads(p.stdout)
    pairs = {x["a"]: x["b"] for x in d["module_map"]["pairs"]}
    assert pairs["lm.blocks.1.norm2"] == "model.language_model.layers.1.input_layernorm"
    p = subprocess.run(py + [a, b, "--map", "(="], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("vlmscope: error:"), p.stderr
    assert "Traceback" not in p.stderr


def test_scope_patterns_cover_subtrees():
    assert in_scope("lm.blocks.1.attn", ["lm.blocks.1"], None)
    assert not in_scope("lm.blocks.10", ["lm.blocks.1"], None)
    assert in_scope("lm.blocks.10", ["lm.blocks.1*"], None)
    assert not in_scope("visual.tower", None, ["visual"])
    assert in_scope("lm", None, ["visual"])


# ------------------------------------------------------------------------------- sketches


def test_recorded_sketches_match_the_tensor(port_traces):
    """A stored sketch is the tensor's token norms and projections (checked on a saved tensor)."""
    from vlmscope.recorder import record
    from vlmscope_models import load_embedded

    model, proc = load_embedded("tiny-qwen2.5-vl")
    out = record(model, proc, prompt="Hi", out=Path(port_traces["ref"]).parent / "saved.h5", max_new_tokens=1,
                 save_tensors=["model.language_model.norm"])
    with vlmscope.open_trace(out) as t:
        tt = t.table("tensors")
        sk = t.sketch_table()
        pid = int(tt["payload"][tt["payload"] >= 0][0])
        row = int(np.nonzero(tt["payload"] == pid)[0][0])
        x = t.payload(pid)
        j = int(np.nonzero(sk["tensor"] == row)[0][0])
        got = t.sketch_values(int(sk["off"][j]), int(sk["rows"][j]) * int(sk["width"][j])).reshape(int(sk["rows"][j]), -1)
        scale = float(sk["scale"][j])
    want_scale, want = S.sketch_of(x)
    assert abs(scale - want_scale) <= 1e-5 * want_scale
    assert np.allclose(got.astype(np.float64), want.astype(np.float64), atol=2e-3)


def _sk(x):
    s, v = S.sketch_of(x)
    return v, s


def test_sketch_comparison_sees_reorderings_and_shifts_that_stats_miss():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    same = compare_sketches(*_sk(x), *_sk(x + 1e-6), 3e-3)
    assert same is None
    perm = x.copy()
    perm[5:12] = perm[5:12][::-1]
    msg = compare_sketches(*_sk(x), *_sk(perm), 3e-3)
    assert msg is not None and msg.startswith("tokens 5..11 permuted")
    shifted = np.concatenate([x[:10], x[9:-1]])       # tokens from 10 on sit one position later
    msg = compare_sketches(*_sk(shifted), *_sk(x), 3e-3)
    assert msg is not None and "shifted by 1 position" in msg, msg
    small = x.copy()
    small[3] *= 1.01                                    # one token's values 1% off
    msg = compare_sketches(*_sk(x), *_sk(small), 3e-3)
    assert msg is not None and msg.startswith("token 3 differ")


def test_sketch_projection_depends_on_the_hidden_size_only():
    assert np.array_equal(S.projection(64), S.projection(64))
    assert S.projection(64).shape == (64, S.SKETCH_DIRS)
    assert np.allclose(np.linalg.norm(S.projection(48), axis=0), 1.0, atol=1e-6)
    assert S.sketch_dim((1024, 64, 1, 1, 1)) == 64 and S.sketch_dim((3, 1)) == 3


def test_the_viewer_names_the_culprit_and_g_goes_to_it(port_traces):
    """The viewer's diff mode uses diff's alignment and localization: between two
    implementations its summary names the culprit, and g lands on that call."""
    import asyncio

    from vlmscope.tui.app import ViewerApp
    from vlmscope.tui.pilot import press, settle
    from vlmscope.tui.widgets.summary import DiffSummary

    async def go():
        app = ViewerApp([port_traces["window_reverse"], port_traces["ref"]], checks=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(pilot)
            scr = app.screen
            summary = scr.query_one(DiffSummary).content
            text = summary.plain if hasattr(summary, "plain") else str(summary)
            assert text.startswith("culprit prefill visual"), text
            await press(pilot, "g")
            item = scr.nav.current
            tm, idx = scr.session.model_for(item)
            assert tm.module_path(int(idx.module[idx.event_of(item)])) == "visual" and item[0] == 0
    asyncio.run(go())
