"""Value sketches in the synthetic generate traces (:func:`vlmscope.testing.make_trace`)."""

from __future__ import annotations

import numpy as np
import pytest

from vlmscope.testing import cached_trace, make_trace
from vlmscope.trace import open_trace
from vlmscope.trace.sketch import MAX_SKETCH_ROWS, SKETCH_WIDTH, sketch_dim

SMALL = dict(n_steps=4, n_layers=3, n_vision=1)
L = "model.language_model.layers"


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth_sketch")
    cache: dict = {}

    def make(name: str, **kw):
        if name not in cache:
            cache[name] = make_trace(base / f"{name}.h5", **{**SMALL, **kw})
        return cache[name]

    return make


class _Sk:
    """A trace's sketches by (step, module path, role, name)."""

    def __init__(self, path):
        with open_trace(path) as t:
            self.table, self.values = t.sketch_table().copy(), t.all_sketch_values().copy()
            te, ev = t.table("tensors"), t.table("events")
            paths = t.module_paths
            self.te = te
            self.key = [(int(r["step"]), str(paths[ev["module"][r["event"]]]), int(r["role"]), t.s(int(r["name"])),
                         t.s(int(r["dtype"]))) for r in te]
        self.by_tensor = {int(s["tensor"]): s for s in self.table}

    def rows(self, step, module, role, name):
        return [i for i, k in enumerate(self.key) if k[:4] == (step, module, role, name)]

    def get(self, step, module, role, name, nth=0):
        s = self.by_tensor[self.rows(step, module, role, name)[nth]]
        n = int(s["rows"]) * int(s["width"])
        return s, self.values[int(s["off"]):int(s["off"]) + n].reshape(int(s["rows"]), int(s["width"]))


def test_every_floating_tensor_but_masks_has_a_valid_sketch(traces):
    sk = _Sk(traces("clean"))
    assert len(sk.table) and np.all(np.diff(sk.table["tensor"]) > 0)        # one per row, in row order
    for i, (step, mod, role, name, dtype) in enumerate(sk.key):
        r = sk.te[i]
        shape = tuple(int(x) for x in r["shape"][: r["ndim"]])
        want = "float" in dtype and "mask" not in name and r["ndim"] > 0 and r["numel"] > 0 \
            and r["numel"] // sketch_dim(shape) <= MAX_SKETCH_ROWS
        assert (i in sk.by_tensor) == want, (step, mod, name, dtype)
        if want:
            s = sk.by_tensor[i]
            assert s["rows"] == r["numel"] // sketch_dim(shape) and s["width"] == SKETCH_WIDTH
    assert len(np.unique(sk.table["off"])) < len(sk.table)                  # shared sketches exist
    for s in sk.table:
        v = sk.values[int(s["off"]):int(s["off"]) + int(s["rows"]) * int(s["width"])].astype(np.float64)
        v = v.reshape(int(s["rows"]), -1)
        assert np.isfinite(v).all() and s["scale"] > 0
        assert v[:, 0].max() == 1.0 and v[:, 0].min() >= 0
        assert np.abs(v[:, 1:]).max() <= 1.0 and np.abs(v[:, 1:]).max() > 0


def test_an_output_passed_on_shares_its_sketch(traces):
    sk = _Sk(traces("clean"))
    for step in (0, 2):
        out0, _ = sk.get(step, f"{L}.0", 2, "out")
        assert sk.get(step, f"{L}.1", 0, "hidden_states")[0]["off"] == out0["off"]
        assert sk.get(step, f"{L}.1.input_layernorm", 0, "hidden_states")[0]["off"] == out0["off"]
        down, _ = sk.get(step, f"{L}.1.mlp.down_proj", 2, "out")
        assert sk.get(step, f"{L}.1.mlp", 2, "out")[0]["off"] == down["off"]
        assert sk.get(step, f"{L}.1.mlp", 2, "out")[0]["off"] != sk.get(step, f"{L}.1", 2, "out")[0]["off"]
        q_in = sk.get(step, f"{L}.1.self_attn.q_proj", 0, "input")[0]["off"]
        assert sk.get(step, f"{L}.1.self_attn.v_proj", 0, "input")[0]["off"] == q_in
    # decode: the embeddings go straight in; prefill: an image is spliced in first (a new tensor)
    emb = sk.get(2, "model.language_model.embed_tokens", 2, "out")[0]["off"]
    assert sk.get(2, "model.language_model", 1, "inputs_embeds")[0]["off"] == emb
    emb0 = sk.get(0, "model.language_model.embed_tokens", 2, "out")[0]["off"]
    assert sk.get(0, "model.language_model", 1, "inputs_embeds")[0]["off"] != emb0
    # different steps, different values
    a, b = sk.get(1, f"{L}.0", 2, "out")[1], sk.get(2, f"{L}.0", 2, "out")[1]
    assert not np.array_equal(a, b)


def test_same_arguments_same_sketches(traces, tmp_path):
    a = _Sk(traces("clean"))
    b = _Sk(make_trace(tmp_path / "again.h5", **SMALL))
    assert np.array_equal(a.table, b.table) and np.array_equal(a.values, b.values)


def _same(a: _Sk, b: _Sk, *where) -> bool:
    return np.array_equal(a.get(*where)[1], b.get(*where)[1])


def test_a_fault_changes_the_sketches_it_changes(traces):
    clean = _Sk(traces("clean"))
    drift = _Sk(traces("drift", faults={"drift": (2, 1)}))
    assert _same(clean, drift, 1, f"{L}.1.mlp.down_proj", 2, "out")                 # before the fault
    assert _same(clean, drift, 2, f"{L}.1.mlp.down_proj", 0, "input")               # its input agrees
    assert not _same(clean, drift, 2, f"{L}.1.mlp.down_proj", 2, "out")            # its output does not
    assert not _same(clean, drift, 2, f"{L}.2", 0, "hidden_states")                 # nor what follows
    assert _same(clean, drift, 2, f"{L}.0", 2, "out")                               # upstream agrees
    shape = _Sk(traces("shape", faults={"shape": (2, 1)}))
    s, v = shape.get(2, f"{L}.1.self_attn.o_proj", 2, "out")
    assert not _same(clean, shape, 2, f"{L}.1.self_attn.o_proj", 2, "out")
    assert _same(clean, shape, 2, f"{L}.0.self_attn.o_proj", 2, "out")
    nan = _Sk(traces("nan", faults={"nan": (2, 1)}))
    assert np.isnan(nan.get(2, f"{L}.1.mlp.down_proj", 2, "out")[1][:, 0]).all()
    assert np.isfinite(nan.get(2, f"{L}.1.mlp.down_proj", 0, "input")[1]).all()


def test_without_sketches_and_the_cache_key(tmp_path):
    p = make_trace(tmp_path / "plain.h5", sketches=False, **SMALL)
    with open_trace(p) as t:
        assert not t.has_sketches() and len(t.sketch_table()) == 0
    p2, written = cached_trace(p, sketches=False, **SMALL)
    assert not written
    p3, written = cached_trace(p, **SMALL)                                         # the option changed
    assert written
    with open_trace(p3) as t:
        assert t.has_sketches()
