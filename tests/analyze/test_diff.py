"""``vlmscope diff`` and the alignment API, on small synthetic traces (no torch)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner


from vlmscope.testing import make_trace
from vlmscope.analyze.align import (
    DRIFT, MISSING_A, MISSING_B, SAME, SHAPE, align, parse_maps,
)
from vlmscope.analyze.diff import diff
from vlmscope.cli.analyze import diff as diff_cmd
from vlmscope.trace import open_trace, read_strings, write_strings

L = "model.language_model.layers"
SMALL = dict(n_steps=4, n_layers=3, n_vision=1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth_diff")
    cache: dict = {}

    def make(name: str, payloads: bool = False, **faults):
        if name not in cache:
            cache[name] = make_trace(base / f"{name}.h5", faults=faults, payloads=payloads, **SMALL)
        return cache[name]

    return make


def renamed_copy(src: Path, dst: Path, rename) -> Path:
    """A copy of a trace with its interned strings rewritten (module paths of another implementation)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        write_strings(f, [rename(s) for s in read_strings(f)])
    return dst


def test_identical_traces_are_same(synth):
    a, b = synth("a"), make_trace(Path(synth("a")).with_name("a2.h5"), **SMALL)
    rep = diff(a, b)
    assert rep.same and rep.first is None and rep.n_divergent == 0
    assert rep.counts["calls"]["same"] == rep.counts["calls"]["same"] > 0


def test_numeric_drift_first_divergence(synth):
    rep = diff(synth("a"), synth("drift", drift=(1, 1)))
    assert not rep.same
    f = rep.first
    assert (f.step, f.module, f.node, f.status, f.category) == (1, f"{L}.1.mlp.down_proj", "output", "drift", "numeric")
    assert f.tokens == [88]                       # the decode step's token (stats only: the step's tokens)
    assert "stats drift" in f.detail
    # groups list the drifting modules from the first divergence on
    assert rep.groups[0]["module"] == f"{L}.1.mlp.down_proj" and rep.groups[0]["first_step"] == 1


def test_tolerance_options(synth):
    assert not diff(synth("a"), synth("drift", drift=(1, 1))).same
    assert diff(synth("a"), synth("drift", drift=(1, 1)), rtol=1.0).same


def test_shape_divergence(synth):
    rep = diff(synth("a"), synth("shape", shape=(2, 0)))
    f = rep.first
    assert (f.step, f.module, f.status) == (2, f"{L}.0.self_attn.o_proj", "shape")
    assert "dim 2: 64 -> 65" in f.detail
    assert rep.counts["tensors"]["shape"] == 2    # o_proj's output and self_attn's


def test_nan_divergence(synth):
    rep = diff(synth("a"), synth("nan", nan=(0, 2)))
    assert (rep.first.step, rep.first.module) == (0, f"{L}.2.mlp.down_proj")
    assert rep.first.tokens == list(range(0, 88))


def test_semantic_position_diff_with_tokens(synth):
    rep = diff(synth("a"), synth("pos_shift", pos_shift=5))
    f = rep.first
    assert (f.step, f.category, f.node, f.what) == (1, "semantic", "probe", "position_ids")
    assert f.tokens == [88]
    assert "32" in f.a and "37" in f.b
    assert any(s["field"] == "pos_min" and s["step"] == 1 for s in rep.steps)


def test_mask_divergence_names_builder(synth):
    rep = diff(synth("a"), synth("mask_len", mask_len=1))
    f = rep.first
    assert (f.step, f.module, f.node, f.what) == (0, "model.language_model", "reshape", "expand")


def test_extra_op_is_only_in_b(synth):
    rep = diff(synth("a"), synth("cache_twice", cache_twice=(1, 2)))
    f = rep.first
    assert (f.step, f.module, f.node, f.status) == (1, f"{L}.2.self_attn", "reshape", "missing_in_a")
    # the inserted op does not shift the alignment of the ops after it
    same_ops = rep.counts["reshapes"]
    assert same_ops["missing_in_a"] == 6 and same_ops["shape"] == 0


def test_payload_metrics_and_tokens(synth):
    rep = diff(synth("pa", payloads=True), synth("pb", payloads=True, drift=(2, 1)))
    lm = [d for d in rep.divergences if d.module == "lm_head" and d.node == "output"]
    assert lm and "max abs" in lm[0].detail and "cosine" in lm[0].detail
    assert lm[0].tokens == [89]


def test_map_rules_align_two_implementations(synth, tmp_path):
    def rename(s: str) -> str:
        s = re.sub(r"^model\.language_model\.layers\.(\d+)\.self_attn", r"transformer.h.\1.attn", s)
        return re.sub(r"^model\.language_model\.layers", "transformer.h", s)

    b = renamed_copy(synth("a"), tmp_path / "renamed.h5", rename)
    # without a map, the inferred module map pairs the renamed layers (by the recorded structure
    # and roles): the traces are the same
    inferred = diff(synth("a"), b)
    assert inferred.same and not inferred.module_map.identity
    assert inferred.module_map.counterpart(list(inferred.module_map.paths_a).index(f"{L}.0.self_attn")) == \
        "transformer.h.0.attn"
    plain = diff(synth("a"), b, auto_map=False)
    assert not plain.same and plain.counts["calls"]["missing_in_a"] > 0
    assert plain.first.status in ("missing_in_a", "missing_in_b")
    assert plain.first.module in (f"{L}.0", "transformer.h.0")
    maps = [r"model\.language_model\.layers\.(\d+)\.self_attn=transformer.h.\1.attn",
            r"^model\.language_model\.layers=transformer.h"]
    rep = diff(synth("a"), b, maps=maps)
    assert rep.same, rep.first.headline() if rep.first else ""
    # a rules file works the same
    rules = tmp_path / "rules.map"
    rules.write_text("# mqwen-style names\n" + "\n".join(maps) + "\n")
    assert diff(synth("a"), b, maps=[f"@{rules}"]).same


def test_parse_maps():
    r = parse_maps([r"a(?=b)=c", "arg:layer_past=past_key_values", r"x\.(\d+) => y.\1"])
    assert r.map_module("ab") == "cb"
    assert r.map_module("x.3") == "y.3"
    assert r.map_arg("layer_past") == "past_key_values"
    with pytest.raises(ValueError):
        parse_maps(["no-separator"])
    with pytest.raises(ValueError):
        parse_maps(["(unclosed=x"])


def test_align_api_for_viewers(synth):
    al = align(synth("a"), synth("drift", drift=(1, 1)))
    ev = al.events
    assert len(ev) == len(al.event_status_a) == len(al.event_status_b)
    assert set(np.unique(ev.status)) <= {SAME, DRIFT}
    # per-row status: the drifting call in A and its partner in B
    A = al.ix_a
    row = int(np.nonzero((A.events["step"] == 1) & (A.module_paths[A.events["module"]] == f"{L}.1.mlp.down_proj"))[0][0])
    assert al.status_of("a", row) == DRIFT
    assert al.partner("a", row) == row
    assert al.status_of("a", 0) == SAME
    o = ev.ordered()
    assert (np.diff(o.time) >= 0).all()
    assert al.tensors.counts()["drift"] > 0
    m = al.tensor_metrics(int(np.nonzero(al.tensors.status == DRIFT)[0][0]))
    assert m["stat_err"] > m["rtol"]


def test_missing_and_extra_calls(synth, tmp_path):
    # drop one step from B: calls of step 3 are missing in B
    a = synth("a")
    b = make_trace(tmp_path / "short.h5", n_steps=3, n_layers=3, n_vision=1)
    rep = diff(a, b)
    assert not rep.same
    assert rep.n_steps == (4, 3)
    assert rep.counts["calls"]["missing_in_b"] > 0 and rep.counts["calls"]["missing_in_a"] == 0
    assert rep.first.status == "missing_in_b" and rep.first.step == 3
    al = align(b, a)
    assert (al.events.status == MISSING_A).sum() == rep.counts["calls"]["missing_in_b"]
    assert not (al.events.status == MISSING_B).any()
    assert not (al.events.status == SHAPE).any()


def test_report_json(synth):
    d = diff(synth("a"), synth("shape", shape=(2, 0))).to_dict()
    json.dumps(d)
    assert d["first_divergence"]["module"] == f"{L}.0.self_attn.o_proj"
    assert d["counts"]["tensors"]["shape"] == 2


# ---------------------------------------------------------------- CLI


def test_cli_diff(synth, tmp_path):
    r = CliRunner()
    same = make_trace(tmp_path / "same.h5", **SMALL)
    res = r.invoke(diff_cmd, [str(synth("a")), str(same)])
    assert res.exit_code == 0 and "same" in res.output
    res = r.invoke(diff_cmd, [str(synth("a")), str(synth("drift", drift=(1, 1)))])
    assert res.exit_code == 1
    assert "first divergence" in res.output and "down_proj" in res.output
    res = r.invoke(diff_cmd, [str(synth("a")), str(synth("drift", drift=(1, 1))), "--json", "--limit", "3"])
    assert res.exit_code == 1
    d = json.loads(res.output)
    assert len(d["divergences"]) == 3 and d["first_divergence"]["step"] == 1
    res = r.invoke(diff_cmd, [str(synth("a")), str(synth("drift", drift=(1, 1))), "--rtol", "1"])
    assert res.exit_code == 0
    res = r.invoke(diff_cmd, [str(synth("a")), str(same), "--map", "(bad"])
    assert res.exit_code == 2
    res = r.invoke(diff_cmd, [str(synth("a"))])
    assert res.exit_code == 2
    res = r.invoke(diff_cmd, [str(synth("a")), str(tmp_path / "nope.h5")])
    assert res.exit_code == 3 and "trace not found" in res.output and "Traceback" not in res.output
    with open_trace(synth("a")):
        pass
