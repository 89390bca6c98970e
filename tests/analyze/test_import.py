"""``vlmscope import``: a folder of named tensors (another implementation's dump) as a trace.

The dump is made from a real recording's payloads (tiny-qwen2-vl, every module's outputs saved),
spread over the three file kinds, and imported back: its shapes, stats, payloads, order and
probes must be the recording's, ``diff`` of two imports must be clean, ``summary`` must read it.
Then the untrusted-input cases: each is one ``vlmscope: error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import vlmscope
from vlmscope.analyze import diff
from vlmscope.analyze.importer import import_dump, parse_name, role_of
from vlmscope.cli import main
from vlmscope.testing.cli import one_line_error

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """tiny-qwen2-vl on astronaut.png, 2 steps, every module's outputs saved as payloads."""
    import vlmscope_models
    from vlmscope.recorder import record

    model, proc = vlmscope_models.load_embedded("tiny-qwen2-vl")
    return record(model, proc, image=str(ROOT / "examples" / "astronaut.png"), prompt="Describe this image.",
                  out=tmp_path_factory.mktemp("orig") / "orig.h5", max_new_tokens=2, save_tensors=["*"])


def _saved(t: vlmscope.Trace) -> dict:
    """name -> (tensor row, payload, event row) of every first call's saved tensor, by step and
    execution order; and the order of their modules per step."""
    out, order = {}, {}
    ev_all = t.events()
    for s in range(t.n_steps):
        order[s] = []
        for e in np.flatnonzero(ev_all["step"] == s)[np.argsort(ev_all["seq"][ev_all["step"] == s])]:
            ev = ev_all[e]
            path = t.module_path(int(ev["module"]))
            if path == "" or ev["nth"] > 0:
                continue
            for r in t.event_tensors(int(e)):
                if r["payload"] >= 0:
                    out[f"step{s}/{path}/{t.s(int(r['name']))}"] = (r, t.payload(int(r["payload"])), ev)
                    if path not in order[s]:
                        order[s].append(path)
    return out, order


@pytest.fixture(scope="module")
def dump(original, tmp_path_factory) -> dict:
    """The recording's saved tensors as a dump: step 0 in one .npy per tensor (dotted names where
    the tensor name has no dot, folders where it has) and in a .safetensors file, step 1 in a
    .npz, plus each step's input_ids and position_ids and a manifest naming them."""
    d = tmp_path_factory.mktemp("dump")
    with vlmscope.open_trace(original) as t:
        saved, order = _saved(t)
        probes = {}
        for s in range(t.n_steps):
            for kind in ("input_ids", "position_ids"):
                p = t.probes(step=s, kind=kind)
                p = p[[t.module_path(int(m)) == "model" for m in p["module"]]][0]   # what reached the model
                probes[(s, kind)] = (f"step{s}/model/{kind}", t.probe_value(p))
    st0, st1 = {}, {}
    for i, (name, (_, a, _)) in enumerate(saved.items()):
        step, _, rest = name.partition("/")
        module, _, tensor = rest.rpartition("/")
        if step == "step1":
            st1[name] = a
        elif i % 2:
            st0[name] = a
        else:
            rel = f"{step}/{module}.{tensor}.npy" if "." not in tensor else f"{name}.npy"
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(d / rel, a)
    for (s, _), (name, v) in probes.items():
        (st0 if s == 0 else st1)[name] = v
    save_file(st0, str(d / "step0-part.safetensors"))
    np.savez(d / "step1.npz", **st1)
    manifest = {"model": "port-of-tiny-qwen2-vl", "family": "qwen2_vl", "prompt": "Describe this image.",
                "order": {str(s): o for s, o in order.items()},
                "steps": [{"kind": "prefill" if s == 0 else "decode", "input_ids": probes[(s, "input_ids")][0],
                           "position_ids": probes[(s, "position_ids")][0]} for s in range(2)]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return {"dir": d, "saved": saved, "order": order}


def test_import_keeps_shapes_stats_payloads_order_and_probes(original, dump, tmp_path):
    out = tmp_path / "port.h5"
    r = run("import", dump["dir"], "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "2 steps" in r.output
    again = import_dump(dump["dir"], tmp_path / "again.h5")
    assert again["tensors"] == len(dump["saved"]) + 4 and again["files"] > 3
    assert diff(out, tmp_path / "again.h5").same
    # against the HF recording: the positions agree; what the dump does not say (mask, cache, q_len:
    # -1 in the import) is no semantic difference
    assert diff(original, out).semantic == []

    with vlmscope.open_trace(out) as t, vlmscope.open_trace(original) as o:
        assert t.status == "complete" and t.meta["model"] == "port-of-tiny-qwen2-vl"
        got, order = _saved(t)
        assert set(got) == set(dump["saved"]) | {f"step{s}/model/{k}" for s in (0, 1)
                                                   for k in ("input_ids", "position_ids")}
        for name, (row, a, _) in dump["saved"].items():
            grow, ga, _ = got[name]
            assert vlmscope.trace.shape_of(grow) == vlmscope.trace.shape_of(row) == a.shape, name
            np.testing.assert_array_equal(ga, a)
            assert t.s(int(grow["dtype"])) == o.s(int(row["dtype"]))
            assert grow["role"] == row["role"] == 2
            for f in ("min", "max", "absmax"):
                assert grow[f] == row[f], (name, f)
            # the recorder sums float32 tensors in float32; the import in float64
            np.testing.assert_allclose([grow["mean"], grow["std"]], [row["mean"], row["std"]], rtol=1e-4, atol=1e-6)
        for s in (0, 1):   # execution order: the manifest's (the recording's), except that a module is
            # entered inside its parent: HF calls model.visual before model, and embed_tokens from
            # model rather than from model.language_model; the path tree nests them
            want = dump["order"][s]
            assert sorted(order[s]) == sorted(want) and order[s] != want
            leaves = [m for m in want if not any(o.startswith(m + ".") for o in want)]
            assert [m for m in order[s] if m in leaves] == leaves
            assert all(order[s].index(m.rpartition(".")[0]) < order[s].index(m)
                       for m in order[s] if m.rpartition(".")[0] in order[s])
        # depth and parent follow the module path tree
        ev = t.events()
        for e in ev:
            path = t.module_path(int(e["module"]))
            assert e["depth"] == (0 if path == "" else path.count(".") + 1)
            if e["parent"] >= 0:
                parent = ev[e["parent"]]
                assert path.rpartition(".")[0] == t.module_path(int(parent["module"]))
                assert parent["seq"] < e["seq"] < parent["end_seq"]
        for f in ("kind", "input_len", "pos_rows", "pos_min", "pos_max"):
            np.testing.assert_array_equal(t.steps[f], o.steps[f], err_msg=f)
        for s in (0, 1):
            for kind in ("input_ids", "position_ids"):   # integers: the recording's very stats
                (grow,), (orow,) = (
                    [r for r in tr.tensors(step=s) if tr.s(int(r["name"])) == kind
                     and tr.module_path(int(tr.events()[int(r["event"])]["module"])) == "model"] for tr in (t, o))
                assert [grow[f] for f in ("min", "max", "mean", "std")] == [orow[f] for f in ("min", "max", "mean", "std")]
                got_p, want_p = t.probes(step=s, kind=kind), o.probes(step=s, kind=kind)
                assert len(got_p) == 1 and t.module_path(int(got_p[0]["module"])) == "model"
                want_p = want_p[[o.module_path(int(m)) == "model" for m in want_p["module"]]][0]
                np.testing.assert_array_equal(t.probe_value(got_p[0]), o.probe_value(want_p))

    r = run("summary", out)
    assert r.exit_code == 0, r.stderr
    assert "prefill" in r.output and "decode" in r.output


def _npy(d: Path, rel: str, a: np.ndarray) -> None:
    (d / rel).parent.mkdir(parents=True, exist_ok=True)
    np.save(d / rel, a)


def test_default_order_names_dtypes_and_bf16(tmp_path):
    d = tmp_path / "d"
    rng = np.random.default_rng(0)
    for i in (10, 2, 1):
        _npy(d, f"step0/blocks.{i}.attn.out.npy", rng.standard_normal((2, 3)).astype(np.float32))
    _npy(d, "step0/blocks.1.attn/hidden_states.npy", np.ones((2, 3), np.float16))
    x = np.array([[1.0, -2.5, 3.0e38, np.inf]], np.float32)
    bits = (x.view(np.uint32) >> 16).astype("<u2")       # exactly representable in bfloat16
    header = json.dumps({"step0/head.out": {"dtype": "BF16", "shape": [1, 4], "data_offsets": [0, 8]}}).encode()
    (d / "z.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bits.tobytes())
    np.savez(d / "y.npz", **{"step0/blocks.2.mlp/out[0]": np.arange(6, dtype=np.int64).reshape(2, 3)})
    (d / "manifest.json").write_text(json.dumps({"dtypes": {"*": "bfloat16"}}))
    import_dump(d, tmp_path / "t.h5", max_tensor_bytes=40)
    with vlmscope.open_trace(tmp_path / "t.h5") as t:
        ev = t.events(step=0)
        paths = [t.module_path(int(m)) for m in ev["module"][np.argsort(ev["seq"])]]
        assert paths == ["", "blocks", "blocks.1", "blocks.1.attn", "blocks.2", "blocks.2.attn", "blocks.2.mlp",
                         "blocks.10", "blocks.10.attn", "head"]
        te = t.tensors(step=0)
        by = {(t.event_path(t.events()[int(r["event"])]), t.s(int(r["name"]))): r for r in te}
        assert by[("blocks.1.attn", "hidden_states")]["role"] == 1 and by[("blocks.1.attn", "out")]["role"] == 2
        head = by[("head", "out")]
        assert t.s(int(head["dtype"])) == "bfloat16" and head["max"] == np.inf and head["inf"] == 1
        assert head["min"] == -2.5 and head["nan"] == 0
        assert t.s(int(by[("blocks.2.mlp", "out[0]")]["dtype"])) == "int64"     # '*' is for floats only
        # 40 payload bytes, as the recorder counts them (float16 stored as float32): the first
        # [2, 3] (24 B) fits, later ones only while the total stays within 40 B ([1, 4]: 16 B)
        assert {k for k, r in by.items() if r["payload"] >= 0} == {("blocks.1.attn", "hidden_states"), ("head", "out")}
        np.testing.assert_array_equal(t.payload(int(head["payload"])), (bits.astype("<u4") << 16).view(np.float32))
        assert "--max-tensor-bytes 40" in t.meta["warnings"][0]
    assert parse_name("step3/model/out.logits", "x") == (3, "model", "out.logits")
    assert parse_name("step0/out", "x") == (0, "", "out")
    assert [role_of(n) for n in ("out", "out[1]", "out.logits", "in", "in[0]", "args[2]", "x", "output")] == \
        [2, 2, 2, 0, 0, 0, 1, 1]


def _bad_st(d: Path, header: dict, data: bytes = b"") -> None:
    h = json.dumps(header).encode()
    (d / "a.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)


def _huge_npy(d: Path) -> None:
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824, 1048576), }"
    hdr += " " * (-(len(hdr) + 11) % 64) + "\n"
    (d / "step0").mkdir()
    magic = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr))
    (d / "step0" / "m.out.npy").write_bytes(magic + hdr.encode() + b"\0" * 64)      # 64 bytes of 2^52 floats


def _symlink_out(d: Path) -> None:
    secret = d.parent / "secret.npy"
    np.save(secret, np.zeros(3))
    (d / "step0").mkdir()
    os.symlink(secret, d / "step0" / "m.out.npy")


def _good(d: Path) -> None:
    _npy(d, "step0/m.out.npy", np.zeros(3, np.float32))


BAD = {
    "not an array": (lambda d: (d / "step0.m.out.npy").write_text("hello"), ["step0.m.out.npy", "not a .npy array"]),
    "other file": (lambda d: (_good(d), (d / "notes.txt").write_text("x")), ["notes.txt", "not a tensor file"]),
    "huge npy shape": (_huge_npy, ["m.out.npy", "the file has"]),
    "huge safetensors shape": (lambda d: _bad_st(d, {"step0/m.out": {"dtype": "F32", "shape": [1 << 39, 4],
                                                                     "data_offsets": [0, 16]}}, b"\0" * 16),
                               ["a.safetensors", "needs"]),
    "offsets past the end": (lambda d: _bad_st(d, {"step0/m.out": {"dtype": "F32", "shape": [4],
                                                                   "data_offsets": [0, 1 << 40]}}, b"\0" * 16),
                             ["a.safetensors", "data_offsets"]),
    "dot dot": (lambda d: _bad_st(d, {"step0/../m.out": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                  b"\0" * 4), ["a.safetensors", "'..'"]),
    "fp8": (lambda d: _bad_st(d, {"step0/m.out": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
            ["a.safetensors", "numpy can hold"]),
    "object npy": (lambda d: (d / "step0").mkdir() or np.save(d / "step0" / "m.out.npy",
                                                               np.array([{}], dtype=object), allow_pickle=True),
                   ["m.out.npy", "not a real number"]),
    "complex npz": (lambda d: np.savez(d / "a.npz", **{"step0/m.out": np.zeros(2, np.complex64)}),
                    ["a.npz", "not a real number"]),
    "symlink out": (_symlink_out, ["m.out.npy", "symlink out of the dump folder"]),
    "no step": (lambda d: np.savez(d / "a.npz", **{"blocks.0.out": np.zeros(2)}), ["a.npz", "stepN/"]),
    "step gap": (lambda d: np.savez(d / "a.npz", **{"step0/m.out": np.zeros(2), "step2/m.out": np.zeros(2)}),
                 ["step1 has no tensors"]),
    "manifest json": (lambda d: (_good(d), (d / "manifest.json").write_text("{")), ["manifest.json", "not valid JSON"]),
    "manifest field": (lambda d: (_good(d), (d / "manifest.json").write_text('{"modle": "x"}')),
                       ["manifest.json", "unknown field 'modle'"]),
    "manifest kind": (lambda d: (_good(d), (d / "manifest.json").write_text('{"steps": [{"kind": "warmup"}]}')),
                      ["manifest.json", "prefill"]),
    "manifest probe": (lambda d: (_good(d), (d / "manifest.json").write_text('{"steps": [{"input_ids": "step0/x"}]}')),
                       ["manifest.json", "input_ids must name a tensor"]),
    "manifest dtype": (lambda d: (_good(d), (d / "manifest.json").write_text('{"dtypes": {"*": "float8"}}')),
                       ["manifest.json", "float8"]),
    "empty": (lambda d: None, ["no tensors"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_dump_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    make, needles = BAD[case]
    d = tmp_path / "dump"
    d.mkdir()
    make(d)
    outdir = tmp_path / "out"
    outdir.mkdir()
    one_line_error(run("import", d, "-o", outdir / "t.h5"), *needles)
    assert list(outdir.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    d = tmp_path / "d"
    _good(d)
    (tmp_path / "t.h5").write_text("precious")
    one_line_error(run("import", d, "-o", tmp_path / "t.h5"), "exists", "--force")
    assert (tmp_path / "t.h5").read_text() == "precious"
    assert run("import", d, "-o", tmp_path / "t.h5", "--force").exit_code == 0
    with vlmscope.open_trace(tmp_path / "t.h5") as t:
        assert t.n_steps == 1
