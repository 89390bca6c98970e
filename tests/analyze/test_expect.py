"""Symbolic shape assertions: ``expect(trace, "glob", output="B S 2048")``."""

from __future__ import annotations


import pytest


from vlmscope.testing import make_trace
from vlmscope.analyze.expect import ShapeMismatch, expect, glob_to_regex, parse_spec
from vlmscope.trace import open_trace

Q = "model.language_model.layers.*.self_attn.q_proj"


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    p = make_trace(tmp_path_factory.mktemp("expect") / "t.h5", n_steps=3, n_layers=3, n_vision=1)
    with open_trace(p) as t:
        yield t


def test_symbols_bind_per_step(trace):
    res = expect(trace, Q, output="B S 64", inputs="B S 64")
    assert res.checked == 3 * 3 * 2
    assert res.bindings[0] == {"B": 1, "S": 88}
    assert res.bindings[1] == {"B": 1, "S": 1}
    assert len(res.modules) == 3


def test_literal_mismatch_message(trace):
    with pytest.raises(ShapeMismatch) as ei:
        expect(trace, Q, output="B S 2048")
    msg = str(ei.value)
    assert "model.language_model.layers.0.self_attn.q_proj" in msg
    assert "step 0" in msg and "expected: [B, S, 2048] = [B=1, S=88, 2048]" in msg
    assert "actual:   [1, 88, 64]" in msg and "dim 2: expected 2048, got 64" in msg
    assert ei.value.details["step"] == 0 and ei.value.details["actual"] == [1, 88, 64]
    assert isinstance(ei.value, AssertionError)


def test_symbol_conflict_names_the_binding(trace):
    with pytest.raises(ShapeMismatch) as ei:
        expect(trace, "model.language_model.layers.*.self_attn.k_proj", inputs="B S D", output="B S D")
    msg = str(ei.value)
    assert "D is bound to 64" in msg and "but is 32 here" in msg


def test_bind_across_the_trace(trace):
    expect(trace, Q, output="B * 64", bind="trace")
    with pytest.raises(ShapeMismatch, match="S is bound to 88"):
        expect(trace, Q, output="B S 64", bind="trace")


def test_wildcards_ellipsis_and_known(trace):
    expect(trace, "**.q_proj", output="... 64")
    expect(trace, "model.language_model.layers.[0-1].mlp.up_proj", output="B S I", I=256)
    with pytest.raises(ShapeMismatch, match="expected I=128"):
        expect(trace, "model.language_model.layers.*.mlp.up_proj", output="B S I", I=128)
    with pytest.raises(ShapeMismatch, match="rank"):
        expect(trace, Q, output="B S")


def test_named_arguments(trace):
    res = expect(trace, "model.language_model.layers.*", inputs={"attention_mask": "B 1 S K"}, output="B S 64")
    assert res.bindings[1]["K"] == 89 and res.bindings[2]["K"] == 90
    with pytest.raises(ShapeMismatch, match="no input 'nope' tensor"):
        expect(trace, "model.language_model.layers.*", inputs={"nope": "B"})


def test_step_filter_and_errors(trace):
    expect(trace, Q, output="1 1 64", step=2)
    with pytest.raises(ShapeMismatch, match="no module matches"):
        expect(trace, "nothing.*", output="B")
    with pytest.raises(ShapeMismatch, match="none was called"):
        expect(trace, "model.visual.blocks.0", output="N D", step=1)
    with pytest.raises(ValueError):
        expect(trace, Q)
    with pytest.raises(ValueError):
        parse_spec("B ... S ...")
    with pytest.raises(ValueError):
        parse_spec("B S+1")


def test_accepts_a_path(trace):
    expect(trace.path, Q, output=["B", "S", 64])


def test_glob_semantics():
    rx = glob_to_regex("a.*.c")
    assert rx.match("a.b.c") and not rx.match("a.b.x.c")
    assert glob_to_regex("a.**.c").match("a.b.x.c")
    assert glob_to_regex("layers.[!0].x").match("layers.1.x") and not glob_to_regex("layers.[!0].x").match("layers.0.x")
