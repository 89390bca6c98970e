"""Value sketches in the trace (``/sketches``, ``/sketch_data``): recorded by default, optional
for readers, and validated before anything is allocated or read, like every other table."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import vlmscope
from vlmscope.trace import TraceError
from vlmscope.trace.sketch import MAX_SKETCH_ROWS, SKETCH_WIDTH


def test_a_recording_has_sketches_of_its_floating_tensors(qwen25_trace_path):
    with vlmscope.open_trace(qwen25_trace_path) as t:
        assert t.has_sketches()
        sk = t.sketch_table()
        tt = t.table("tensors")
        strings = t.strings
        dtypes = strings[tt["dtype"][sk["tensor"]]]
        names = strings[tt["name"][sk["tensor"]]]
        assert set(dtypes) <= {"float32", "bfloat16", "float16", "float64"}
        assert not any("mask" in str(n) for n in names)
        assert (sk["width"] == SKETCH_WIDTH).all() and (sk["rows"] >= 1).all()
        # every floating output of the text model's layers is sketched
        floating = np.isin(strings[tt["dtype"]], ["float32"]) & (tt["role"] == 2)
        assert np.isin(np.nonzero(floating)[0], sk["tensor"]).mean() > 0.95
        vals = t.all_sketch_values()
        assert vals.dtype == np.float16 and len(vals) >= int((sk["off"] + sk["rows"] * sk["width"]).max())


@pytest.mark.parametrize("field, value, needle", [
    ("off", 1 << 40, "outside /sketch_data"),
    ("rows", MAX_SKETCH_ROWS + 1, "sketch of"),
    ("width", 1000, "sketch of"),
    ("tensor", 10**9, "outside /tensors"),
    ("dtype", 10**8, "strings"),
])
def test_a_damaged_sketch_row_is_a_one_line_error(qwen25_trace_path, tmp_path, field, value, needle):
    bad = tmp_path / "bad.h5"
    shutil.copy(qwen25_trace_path, bad)
    with h5py.File(bad, "r+") as f:
        rows = f["sketches"][:]
        rows[3][field] = value
        f["sketches"][:] = rows
    with vlmscope.open_trace(bad) as t:
        with pytest.raises(TraceError, match=needle):
            t.sketch_table()
    p = subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", "diff", str(bad), str(qwen25_trace_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and p.stderr.startswith("vlmscope: error:") and p.stderr.count("\n") == 1, p.stderr
    assert needle in p.stderr


def test_a_trace_without_sketches_reads_and_diffs(tmp_path, qwen25_trace_path):
    """Older traces (and --no-sketches) have no sketch datasets: every reader goes on."""
    old = tmp_path / "old.h5"
    shutil.copy(qwen25_trace_path, old)
    with h5py.File(old, "r+") as f:
        del f["sketches"], f["sketch_data"]
    with vlmscope.open_trace(old) as t:
        assert not t.has_sketches() and len(t.sketch_table()) == 0
    from vlmscope.analyze.diff import diff
    rep = diff(old, qwen25_trace_path)
    assert rep.same and rep.culprit.status == "same"


def test_the_recorders_device_encoding_is_sketch_encode_bit_for_bit():
    """The recorder divides and rounds the cosines on the device for the whole step; the host
    adds column 0. The stored bits equal numpy's ``sketch.encode`` of the same projections and
    norms (zero tokens, NaN tokens, wide and narrow tokens, several sizes in one step), and the
    statistics derived from the sketches are the tensors' own."""
    import torch

    from vlmscope.recorder.buffer import StepBuffer
    from vlmscope.recorder.stats import copy_to_host, queue_stats, queue_stats_sketch, sketches_from_blob
    from vlmscope.trace.sketch import encode

    rng = np.random.default_rng(0)
    xs = [torch.from_numpy((rng.standard_normal(shape) * 10.0 ** e).astype(np.float32))
          for shape, e in [((2, 5, 7), 0), ((1, 300, 16), -3), ((3, 5000), 2), ((1, 1, 128), 0), ((4, 64), 15),
                                   ((4000, 96), 0)]]
    xs[0][0, 1] = 0.0                      # a zero token
    xs[1][0, 7, 3] = float("nan")          # a NaN token
    st = StepBuffer(0)
    for x in xs:
        queue_stats(st, x.to(torch.int64))  # a chunk before the sketches: their offset is not 0
        queue_stats_sketch(st, x)
    proj = torch.cat(st.sketch_proj).numpy().copy()
    norms = torch.cat(st.sketch_norms).numpy()[:, 0].copy()
    sk = sketches_from_blob(copy_to_host(st), st)
    scales, data = encode(norms, proj[:, :-1], np.asarray(st.sketch_rows))
    assert np.array_equal(sk.data.view(np.uint16), data.view(np.uint16))
    assert np.array_equal(sk.scales, scales, equal_nan=True)
    assert (sk.data[1][1:] == 0).all() and np.isnan(sk.data[10 + 7].astype(np.float32)).all()
    for i, x in enumerate(xs):
        v = x.double().numpy()
        assert sk.mins[i] == np.nanmin(v) or np.isnan(v).any()
        if not np.isnan(v).any():
            assert sk.maxs[i] == v.max()
            assert np.isclose(sk.sums[i], v.sum(), rtol=1e-5, atol=1e-6 * np.abs(v).sum())
            assert np.isclose(sk.norms[i], np.sqrt((v * v).sum()), rtol=1e-5)


def _digest_by_definition(data: np.ndarray, counts) -> list[int]:
    """``sketch.digests`` as documented, with Python integers: sum of u_i * (i * G + 1) mod 2^64."""
    g = 0x9E3779B97F4A7C15
    u = np.ascontiguousarray(data, dtype=np.float16).view(np.uint16).reshape(len(data), -1)
    out, o = [], 0
    for n in counts:
        flat = u[o:o + n].reshape(-1).tolist()
        o += n
        out.append(sum(v * ((i * g + 1) % 2 ** 64) for i, v in enumerate(flat)) % 2 ** 64)
    return out


@pytest.mark.parametrize("width", [9, 40])
def test_digests_follow_their_definition_and_see_a_swap(width):
    """The digest is what lets ``diff`` skip the values of equal sketches, so it must be the
    documented sum exactly (any bits: NaN, infinities, negative zero, largest patterns), for
    several sketches back to back and for rows wide enough to need float64 sums; swapping two
    tokens of one sketch changes its digest and no other."""
    from vlmscope.trace.sketch import digests

    rng = np.random.default_rng(width)
    counts = np.array([1, 7, 3, 60, 1, 12])
    data = rng.standard_normal((counts.sum(), width)).astype(np.float16)
    data[2, :3] = [np.nan, np.inf, -np.inf]
    data[5, 0] = -0.0
    data[9] = np.frombuffer(np.full(width, 0xFFFF, np.uint16).tobytes(), np.float16)   # largest bit patterns
    want = _digest_by_definition(data, counts)
    got = digests(data, counts)
    assert got.dtype == np.uint64 and [int(x) for x in got] == want
    swapped = data.copy()
    swapped[[20, 21]] = swapped[[21, 20]]       # two tokens of the fourth sketch
    after = digests(swapped, counts)
    assert after[3] != got[3]
    assert np.array_equal(np.delete(after, 3), np.delete(got, 3))


def test_a_convolutions_tokens_are_its_samples(tmp_path):
    """A convolution's input and output are channel-first, ``[N, C, H, W]``: their tokens are the
    N samples (a row of the last dimension is a line of pixels). The same tensor given to
    another module is read as rows of its last dimension there: each reading gets its own
    sketch, and each is numpy's ``sketch_of`` of that reading, bit for bit."""
    import torch

    from vlmscope.trace.sketch import sketch_of

    class Tap(torch.nn.Module):
        def forward(self, x):
            return x * 2.0

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.tap = Tap()

        def forward(self, x):
            return self.conv(x), self.tap(x)

    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 3, 8, 8)
    with vlmscope.Recorder(net, out=tmp_path / "conv.h5") as rec, torch.no_grad():
        y, _ = net(x)
    with vlmscope.open_trace(rec.path) as t:
        sk = t.sketch_table()
        tt = t.table("tensors")
        ev = t.table("events")
        by_tensor = {int(r["tensor"]): r for r in sk}

        def sketch(path: str, role: int):
            rows = [i for i in range(len(tt)) if tt["role"][i] == role
                    and t.module_path(int(ev["module"][tt["event"][i]])) == path]
            assert len(rows) == 1, (path, role)
            r = by_tensor[rows[0]]
            return float(r["scale"]), t.sketch_values(int(r["off"]), int(r["rows"] * r["width"])).reshape(int(r["rows"]), -1)

        for (path, role), value in {("conv", 0): x.reshape(2, -1), ("conv", 2): y.reshape(2, -1),
                                    ("tap", 0): x}.items():
            scale, data = sketch(path, role)
            want_scale, want = sketch_of(value.numpy())
            assert data.shape == want.shape, (path, role)
            assert scale == np.float32(want_scale)
            assert np.array_equal(data.view(np.uint16), want.view(np.uint16)), (path, role)
        assert sketch("conv", 0)[1].shape[0] == 2 and sketch("tap", 0)[1].shape[0] == 2 * 3 * 8


def test_a_wide_tokens_blocks_are_projected_as_numpy_does(tmp_path):
    """A token of more than 4096 values (vocabulary logits) is projected on 8 blocks of contiguous
    values spread over it (read in place, no gather), its cosines taken against the values read;
    the recorder's sketch is numpy's ``sketch_of`` (within a float16 ulp: the sums run in another
    order), a change in the last block shows, and the trace says which definition its sketches
    follow."""
    import torch

    from vlmscope.trace.sketch import SKETCH_VERSION, sampled_columns, sketch_of

    d = 65_539
    cols = sampled_columns(d)
    assert len(cols) == 4096 and len(set(cols.tolist())) == 4096 and cols.max() > d * 7 // 8

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, d)

        def forward(self, x):
            return self.head(x)

    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 3, 16)
    with vlmscope.Recorder(net, out=tmp_path / "wide.h5") as rec, torch.no_grad():
        y = net(x)
    with vlmscope.open_trace(rec.path) as t:
        assert t.meta["sketch_version"] == SKETCH_VERSION
        tt, sk = t.table("tensors"), t.sketch_table()
        rows = [r for r in sk if tt["role"][r["tensor"]] == 2 and tt["numel"][r["tensor"]] == y.numel()]
        assert len({int(r["off"]) for r in rows}) == 1      # the head's output, the root's too
        r = rows[0]
        got = t.sketch_values(int(r["off"]), int(r["rows"] * r["width"])).reshape(int(r["rows"]), -1)
    scale, want = sketch_of(y.numpy())
    assert got.shape == want.shape == (6, SKETCH_WIDTH)
    assert np.isclose(float(r["scale"]), scale, rtol=1e-6)
    assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() <= 2e-3
    # cosines against the values read: ~1/sqrt(4096), not ~1/sqrt(D) (four times smaller here,
    # and below diff's tolerance of 3e-3)
    assert np.abs(got[:, 1:].astype(np.float32)).mean() > 0.008
    z = y.numpy().copy()
    z[0, 1, cols[-1]] += np.linalg.norm(z[0, 1])          # a value of the last block, in one token
    moved = np.abs(sketch_of(z)[1][:, 1:].astype(np.float32) - want[:, 1:].astype(np.float32)).max(1)
    assert moved[1] > 3e-3 and moved[np.arange(6) != 1].max() < 3e-3    # beyond diff's float32 tolerance


def test_wide_token_sketches_of_an_earlier_definition_compare_with_nothing(qwen25_trace_path, tmp_path):
    """A trace written before ``sketch_version`` 2 projected wide tokens on other values: its
    wide-token sketches are left out of comparisons (its other sketches still count), so a diff
    against today's recording of the same run finds nothing, where comparing them would report
    the logits as drifting. (The old trace here is today's, its wide-token sketches replaced by
    other cosines and its version taken out.)"""
    from vlmscope.analyze._index import index_of
    from vlmscope.analyze.diff import diff
    from vlmscope.analyze.sketchdiff import sketch_table

    import json

    from vlmscope.trace.sketch import digests

    old = tmp_path / "old.h5"
    shutil.copy(qwen25_trace_path, old)
    with h5py.File(old, "r+") as f:
        run = json.loads(f["meta"].attrs["run_json"])
        del run["sketch_version"]
        f["meta"].attrs["run_json"] = json.dumps(run)
        # the wide tokens' sketches as another definition gives them: other cosines (and digests)
        sk, data = f["sketches"][:], f["sketch_data"][:]
        numel = f["tensors"]["numel"][sk["tensor"]]
        for i in np.flatnonzero(numel // sk["rows"] > 4096):
            o, n, w = int(sk["off"][i]), int(sk["rows"][i]), int(sk["width"][i])
            block = data[o:o + n * w].reshape(n, w)
            block[:, 1:] += 0.1
            sk["digest"][i] = digests(block, np.array([n]))[0]
        f["sketch_data"][:] = data
        f["sketches"][:] = sk
    assert diff(old, qwen25_trace_path).same
    with vlmscope.open_trace(qwen25_trace_path) as tn, vlmscope.open_trace(old) as to:
        new_sk, old_sk = sketch_table(index_of(tn)), sketch_table(index_of(to))
        numel = tn.table("tensors")["numel"]
        wide = numel[new_sk["tensor"]] // new_sk["rows"] > 4096
        assert wide.any() and (~wide).sum() > 100
        assert np.array_equal(old_sk["off"], new_sk["off"][~wide])
