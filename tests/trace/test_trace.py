"""The trace format layer: what the writer writes, the reader reads back; bad files are refused
with one line. Needs h5py, hdf5plugin and numpy only (no torch, no recording)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from vlmscope import trace as T
from vlmscope.trace import TraceError, TraceWriter, open_trace

V1 = Path(__file__).resolve().parents[1] / "data" / "tiny-qwen2.5-vl-astronaut.format-v1.h5"


def _write(path: Path, status: str = T.STATUS_COMPLETE) -> Path:
    """A two-module, one-step trace written through TraceWriter as the recorder does."""
    w = TraceWriter(path, meta={"model": "m", "prompt": "héllo ✓"}, config_json='{"model_type": "x"}')
    mods = np.zeros(2, T.MODULE_DTYPE)
    mods[0] = (w.intern(""), w.intern("Net"), 0, -1)
    mods[1] = (w.intern("lin"), w.intern("Linear"), 1, 0)
    w.set_modules(mods)
    ev = np.zeros(2, T.EVENT_DTYPE)
    ev[0] = (0, 0, 3, 0, 0, 0, -1, 0, 1, 0, 1.0)
    ev[1] = (0, 1, 2, 1, 0, 1, 0, 1, 1, 0, 0.5)
    w.append("events", ev)
    te = np.zeros(2, T.TENSOR_DTYPE)
    for i, shape in enumerate([(2, 4), (2, 3, 4)]):
        te[i]["step"], te[i]["event"], te[i]["role"] = 0, i, T.ROLE_OUTPUT
        te[i]["name"], te[i]["dtype"], te[i]["device"] = w.intern("out"), w.intern("float32"), w.intern("cpu")
        te[i]["ndim"], te[i]["shape"], te[i]["payload"] = len(shape), T.pad_shape(shape), -1
    w.append("tensors", te)
    off = w.append_probe_data(np.arange(6, dtype=np.int64).view(np.uint8))
    pr = np.zeros(1, T.PROBE_DTYPE)
    pr[0] = (0, 2, 1, 1, w.intern("position_ids"), w.intern("position_ids"), 2, T.pad_shape((1, 6)),
             w.intern("int64"), T.ENC_INT64, off, 48, w.intern(json.dumps({"rows": [[0, 5]]})))
    w.append("probes", pr)
    st = np.zeros(1, T.STEP_DTYPE)
    st[0]["q_len"], st[0]["event_count"], st[0]["tensor_count"], st[0]["probe_count"] = 6, 2, 2, 1
    w.append("steps", st)
    w.end_step()
    assert w.partial_path.exists() and not path.exists()
    return w.close(status)


def test_what_the_writer_writes_the_reader_reads(tmp_path):
    p = _write(tmp_path / "t.h5")
    assert not (tmp_path / "t.h5.partial").exists()
    with open_trace(p) as t:
        assert (t.format_version, t.status, t.n_steps) == (T.FORMAT_VERSION, "complete", 1)
        assert t.meta == {"model": "m", "prompt": "héllo ✓"} and t.config == {"model_type": "x"}
        assert list(t.module_paths) == ["", "lin"] and t.module_class(1) == "Linear"
        assert [T.shape_of(r) for r in t.tensors(0)] == [(2, 4), (2, 3, 4)]
        (probe,) = t.probes(0, kind="position_ids")
        assert t.probe_value(probe).tolist() == [[0, 1, 2, 3, 4, 5]]
        assert t.probe_info(probe) == {"rows": [[0, 5]]}
        assert t.string_id("lin") >= 0 and t.string_id("never interned") == -1
        assert t.read_rows("tensors", 1, 2)["ndim"].tolist() == [3]
        assert not t.is_loaded("tensors")


def test_a_table_smaller_than_a_chunk_is_stored_in_a_chunk_of_its_size(tmp_path):
    """HDF5 checksums and compresses whole chunks, padding included: a small recording's tables
    get chunks of their own size when the journal is converted; a table larger than a chunk
    keeps the format's chunk size, and every value reads back."""
    big = np.arange(300_000, dtype=np.int64).view(np.uint8)    # 2.4 MB of probe data: several chunks
    w = TraceWriter(tmp_path / "c.h5", meta={"model": "m"})
    off = w.append_probe_data(big)
    w.append("steps", np.zeros(1, T.STEP_DTYPE))
    w.end_step()
    p = w.close()
    with h5py.File(p) as f:
        assert f["steps"].chunks == (1,)
        assert f["probe_data"].chunks[0] == T.CHUNK_BYTES // 4 < len(big)
        assert f["tensors"].shape == (0,) and f["tensors"].chunks == (1,)
    with open_trace(p) as t:
        assert np.array_equal(t.table("probe_data")[off:off + len(big)], big)
        assert t.n_steps == 1


@pytest.mark.parametrize("status", [T.STATUS_INCOMPLETE, T.STATUS_FAILED])
def test_unfinished_runs_open_with_their_status(tmp_path, status):
    with open_trace(_write(tmp_path / "t.h5", status)) as t:
        assert t.status == status and t.n_steps == 1


def test_a_trace_never_closed_reads_as_incomplete(tmp_path):
    p = _write(tmp_path / "t.h5")
    with h5py.File(p, "r+") as f:
        f.attrs["status"] = T.STATUS_RECORDING
    with open_trace(p) as t:
        assert t.status == T.STATUS_INCOMPLETE and not t.complete


def _damage(path: Path, how: str) -> Path:
    with h5py.File(path, "r+") as f:
        if how == "newer":
            f.attrs["format_version"] = T.FORMAT_VERSION + 1
        elif how == "invalid":
            f.attrs["format_version"] = 0
        elif how == "foreign":
            f.attrs["format"] = "something-else"
        elif how == "no-table":
            del f["reshapes"]
    return path


@pytest.mark.parametrize("how, needle", [
    ("newer", "is newer than this vlmscope reads"),
    ("invalid", "invalid format version 0"),
    ("foreign", "without the vlmscope header"),
    ("no-table", "truncated or corrupt (no /reshapes)"),
])
def test_damaged_headers_are_refused_in_one_line(tmp_path, how, needle):
    p = _damage(_write(tmp_path / "t.h5"), how)
    with pytest.raises(TraceError) as e:
        open_trace(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_text_and_truncated_files_are_refused_in_one_line(tmp_path):
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    whole = _write(tmp_path / "t.h5").read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole[: len(whole) // 3])
    for path, needle in [(tmp_path / "missing.h5", "not found"), (text, "not an HDF5 file"),
                         (cut, "truncated or corrupt")]:
        with pytest.raises(TraceError) as e:
            open_trace(path)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_format_1_traces_are_still_read():
    with open_trace(V1) as t:
        assert t.format_version == 1 and t.complete and t.n_steps == 4
        assert "model.language_model.layers" in set(t.module_paths)
        assert t.steps["q_len"].tolist()[0] == 281


def test_strings_round_trip_through_write_strings(tmp_path):
    p = _write(tmp_path / "t.h5")
    with h5py.File(p, "r+") as f:
        s = list(T.read_strings(f))
        s[s.index("lin")] = "renamed.lin"
        T.write_strings(f, s)
    with open_trace(p) as t:
        assert list(t.module_paths) == ["", "renamed.lin"]


def test_probe_encodings_decode():
    ints = np.arange(4, dtype=np.int64)
    assert T.decode_probe(ints.view(np.uint8), T.ENC_INT64, (2, 2)).tolist() == [[0, 1], [2, 3]]
    mask = np.array([[True, False, True]])
    assert T.decode_probe(np.packbits(mask.ravel()), T.ENC_BITS, (1, 3)).tolist() == mask.tolist()
    floats = np.array([0.5, -1.0])
    assert T.decode_probe(floats.view(np.uint8), T.ENC_FLOAT64, (2,)).tolist() == [0.5, -1.0]
    assert T.decode_probe(ints.view(np.uint8), 99, (4,)) is None


def test_shapes_are_padded_and_restored():
    padded = T.pad_shape((3, 5))
    assert len(padded) == T.MAX_DIMS and padded[:3] == (3, 5, -1)
    row = np.zeros(1, T.TENSOR_DTYPE)[0]
    row["ndim"], row["shape"] = 2, padded
    assert T.shape_of(row) == (3, 5)
