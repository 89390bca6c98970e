"""``diff`` says what the steps were fed before any tensor drift (issue 11, item 3): positions,
mask, cache length, q_len and placeholder spans per aligned step, headlined first, side by side
in the step table, and as a ``semantic`` list in ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlmscope.analyze.diff import diff
from vlmscope.cli import main
from vlmscope.testing import make_trace

ROOT = Path(__file__).resolve().parents[2]
QWEN25 = ROOT / "traces" / "examples" / "tiny-qwen2.5-vl-astronaut.h5"
MQWEN = ROOT / "traces" / "examples" / "tiny-mqwen-astronaut.h5"
README_MAP = r"transformer\.h\.(\d+)\.attn=model.language_model.layers.\1.self_attn"


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_readme_comparison_headlines_the_positions_not_the_vision_tower():
    r = run("diff", str(MQWEN), str(QWEN25), "--map", README_MAP, "--format", "plain")
    assert r.exit_code == 1, r.output
    lines = r.stdout.splitlines()
    sem = next(i for i, ln in enumerate(lines) if ln.startswith("first semantic divergence: "))
    loc = next(i for i, ln in enumerate(lines) if ln.startswith("localization: "))
    ten = next(i for i, ln in enumerate(lines) if ln.startswith("first divergence detected: "))
    assert sem == 2 and loc > sem and ten > loc, r.stdout   # under the title and the map line, before any tensor
    assert lines[1].startswith("module map inferred: ")
    # two different models fed different token ids: no module is blamed
    assert lines[loc] == ("localization: no culprit: the runs' own inputs differ at step 0 (prefill) "
                          "(input_ids: shape [1, 24] vs [1, 281])")
    # MQwen's 1-D positions against Qwen2.5-VL's t/h/w: the first token where they part (the
    # image's second placeholder: Qwen2.5-VL's h/w stay on the grid, MQwen counts on)
    assert lines[sem] == ("first semantic divergence: step 0 (prefill): positions differ: row 0 t/h/w "
                          "[16, 16, 16] vs [15, 15, 16] at token 16 (A's 1-D positions compared on each axis)")
    assert "model.visual" not in lines[sem]
    assert "may lie downstream of its cause" in lines[ten + 1] and "no culprit" in lines[ten + 1]
    # the decode steps' positions, side by side, the differing cells marked, the others not
    table = lines[next(i for i, ln in enumerate(lines) if ln.startswith("semantic, A | B side by side")):]
    step1 = table[table.index(next(ln for ln in table if ln.split()[:3] == ["1", "decode", "positions"])):][:5]
    assert step1[0].split()[3:6] == ["4..4", "≠", "41..41"] and "[4, 4, 4] vs [41, 41, 41] at token 0" in step1[0]
    by_field = {ln.split()[0]: ln for ln in step1[1:]}
    assert "≠ 281 -> 282" in by_field["cache"] and "279 -> 280" in by_field["cache"]
    assert "≠" not in by_field["q_len"] and "≠" not in by_field["image_spans"]
    assert "≠ 1x1x1x282, keys 282" in by_field["mask"] and "- (causal), keys 280" in by_field["mask"]


def test_json_carries_the_semantic_list():
    r = run("diff", str(MQWEN), str(QWEN25), "--json")
    j = json.loads(r.stdout)
    sem = j["semantic"]
    assert j["first_semantic"] == sem[0] and sem[0]["field"] == "positions" and sem[0]["step"] == 0
    dec = [(d["step"], d["row"], d["token"], d["a"], d["b"]) for d in sem if d["field"] == "positions"][1:]
    assert dec == [(s, 0, 0, [4] * 3, [40 + s] * 3) for s in (1, 2, 3)]
    assert {d["field"] for d in sem} == {"positions", "mask", "cache", "q_len", "image_spans"}
    q = next(d for d in sem if d["field"] == "q_len")
    assert (q["step"], q["a"], q["b"]) == (0, 279, 281)
    img = next(d for d in sem if d["field"] == "image_spans")
    assert (img["row"], img["a"], img["b"]) == (0, [[14, 15]], [[15, 271]])
    assert j["semantic_counts"] == {"positions": 4, "mask": 4, "cache": 4, "q_len": 1, "image_spans": 1,
                                    "video_spans": 0}
    assert "downstream" in j["first_divergence_caveat"] and j["first_divergence"]["what"] == "input_ids"
    assert j["culprit"]["status"] == "inputs" and j["culprit"]["step_a"] == 0 and j["module_map"]["pairs"]


def test_identical_traces_have_no_semantic_divergence():
    rep = diff(QWEN25, QWEN25)
    assert rep.same and rep.semantic == [] and rep.semantic_steps == [] and not any(rep.semantic_counts.values())
    r = run("diff", str(QWEN25), str(QWEN25), "--format", "plain")
    assert r.exit_code == 0 and "semantic" not in r.stdout and "downstream" not in r.stdout, r.stdout


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("sem")
    kw = dict(n_steps=4, n_layers=2)
    return {name: make_trace(d / f"{name}.h5", faults=f, **kw)
            for name, f in (("clean", {}), ("mask", {"mask_len": 1}), ("cache", {"cache_twice": (1, 0)}))}


def test_only_the_mask_differs(synth):
    rep = diff(synth["clean"], synth["mask"])
    assert not rep.same and {d.field for d in rep.semantic} == {"mask"}
    assert [d.step for d in rep.semantic] == [0, 1, 2, 3]
    # the key length is one longer, and that key is blocked: the shape differs, no query sees more
    assert [(d.a, d.b) for d in rep.semantic[:2]] == [([1, 1, 88, 88], [1, 1, 88, 89]), ([1, 1, 1, 89], [1, 1, 1, 90])]
    assert rep.semantic[0].headline() == "step 0 (prefill): mask differs: shape 1x1x88x88 vs 1x1x88x89"
    assert rep.semantic_counts["mask"] == 4 and sum(rep.semantic_counts.values()) == 4


def test_only_the_cache_length_differs(synth):
    rep = diff(synth["clean"], synth["cache"])
    first = rep.semantic[0]
    assert (first.step, first.kind, first.field, first.a, first.b) == (1, "decode", "cache", [88, 89], [88, 90])
    assert [d.field for d in rep.semantic if d.step == 1] == ["cache"]      # the step's positions and mask agree
    assert rep.semantic_counts["q_len"] == rep.semantic_counts["image_spans"] == 0
    cells = {c["field"]: c for c in rep.semantic_steps[0]["cells"]}
    assert rep.semantic_steps[0]["step"] == 1 and [f for f, c in cells.items() if c["differs"]] == ["cache"]
    assert (cells["cache"]["a"], cells["cache"]["b"]) == ("88 -> 89", "88 -> 90")
