"""A trace file is untrusted input (issue 13): the reader checks names, storage, layouts,
attributes and references before it uses them, refuses in one line, and never reads outside
the file. Each test damages a copy of a real recording (traces/examples) in one way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from vlmscope.analyze._index import index_of
from vlmscope.trace import TraceError, open_trace, preflight

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "traces" / "examples" / "tiny-qwen2.5-vl-astronaut.h5"
SMALL = ROOT / "traces" / "examples" / "tiny-mqwen-astronaut.h5"
HANGS = ROOT / "tests" / "data" / "hangs-hdf5.h5"
SECRET = "TOP-SECRET-7f3a9c-DO-NOT-PRINT"


def _copy(tmp_path: Path, src: Path = EXAMPLE, name: str = "t.h5") -> Path:
    p = tmp_path / name
    shutil.copyfile(src, p)
    return p


def _refused(path: Path, needle: str, read=lambda t: None) -> str:
    """Opening (and ``read``) raise one TraceError line naming the file and holding ``needle``."""
    with pytest.raises(TraceError) as e:
        with open_trace(path) as t:
            read(t)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, msg
    return msg


def _every_accessor(t) -> None:
    t.meta, t.config, t.error, t.status, t.strings
    for name in ("steps", "modules", "events", "tensors", "reshapes", "probes", "probe_data"):
        t.table(name)
    for i in range(t.n_steps):
        t.step(i)
    for r in t.probes():
        t.probe_value(r)
        t.probe_info(r)
    for i in range(t.n_payloads):
        t.payload(i)


def _cli(*args: str, timeout: float = 60, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))      # the installed vlmscope (-P: not the checkout)
    return subprocess.run([sys.executable, "-P", "-m", "vlmscope.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


# ============================================================================ outside the file


@pytest.fixture
def secret(tmp_path) -> Path:
    p = tmp_path / "secrets.txt"
    p.write_text((SECRET + "\n") * 64)
    return p


def _external_storage(path: Path, target: Path, name: str = "probe_data") -> Path:
    n = target.stat().st_size
    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, shape=(n,), dtype=np.uint8, external=[(str(target), 0, n)])
    return path


def test_external_storage_is_refused_before_any_read(tmp_path, secret):
    p = _external_storage(_copy(tmp_path), secret)
    msg = _refused(p, "trace refers to a file outside itself: /probe_data stores its data in external file")
    assert SECRET not in msg


@pytest.mark.parametrize("cmd", [["snapshot"], ["summary"], ["check"], ["check", "--json"]])
def test_the_commands_never_print_a_file_named_by_external_storage(tmp_path, secret, cmd):
    for name in ("probe_data", "strings"):
        p = _external_storage(_copy(tmp_path, name=f"{name}.h5"), secret, name)
        r = _cli(*cmd, str(p))
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert SECRET not in r.stdout + r.stderr
        assert "outside itself" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_payload_in_external_storage_is_refused_on_access(tmp_path, secret):
    p = _copy(tmp_path)
    n = secret.stat().st_size
    with h5py.File(p, "r+") as f:
        f["payloads"].create_dataset("0", shape=(n,), dtype=np.uint8, external=[(str(secret), 0, n)])
    with open_trace(p) as t:
        assert t.n_payloads == 1
        with pytest.raises(TraceError) as e:
            t.payload(0)
        assert "outside itself: /payloads/0 stores its data in external file" in str(e.value)
        assert SECRET not in str(e.value)
        with pytest.raises(TraceError):
            t.payload_attrs(0)


def test_a_virtual_dataset_is_refused(tmp_path, secret):
    src = tmp_path / "src.h5"
    data = np.frombuffer(secret.read_bytes(), np.uint8)
    with h5py.File(src, "w") as g:
        g["data"] = data
    p = _copy(tmp_path)
    layout = h5py.VirtualLayout(shape=data.shape, dtype=np.uint8)
    layout[:] = h5py.VirtualSource(str(src), "data", shape=data.shape)
    with h5py.File(p, "r+") as f:
        del f["probe_data"]
        f.create_virtual_dataset("probe_data", layout)
    assert SECRET not in _refused(p, "outside itself: /probe_data is a virtual dataset")


def test_external_and_soft_links_are_refused(tmp_path):
    other = _copy(tmp_path, SMALL, "other.h5")
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        del f["events"]
        f["events"] = h5py.ExternalLink(str(other), "/events")
    _refused(p, "outside itself: /events is an external link to")
    q = _copy(tmp_path, name="soft.h5")
    with h5py.File(q, "r+") as f:
        del f["payloads"]
        f["payloads"] = h5py.SoftLink("/meta")
    _refused(q, "/payloads is a soft link", lambda t: t.n_payloads)


# ============================================================================ layouts and sizes


def test_a_huge_declared_length_is_refused_not_allocated(tmp_path):
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        f["events"].resize((1 << 40,))
    t0 = time.monotonic()
    _refused(p, "/events declares 1,099,511,627,776 rows but stores 1 of their", lambda t: t.events())
    assert time.monotonic() - t0 < 5


def test_a_length_backed_only_by_well_compressed_chunks_is_refused(tmp_path):
    """A small file cannot declare a table that would take far more memory than its size: 30M
    rows of zeros compress to a few hundred kB (blosc2), but are refused, not read."""
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        ds = f["steps"]
        n, k = 1_600_000, 200_000                       # 270 MB of rows, every chunk written
        ds.resize((n,))
        for s in range(4, n, k):
            ds[s:min(n, s + k)] = np.zeros(min(n, s + k) - s, ds.dtype)
    assert p.stat().st_size < 1 << 20
    _refused(p, "/steps declares", lambda t: t.steps)


@pytest.mark.parametrize("how, needle", [
    ("int-dtype", "/tensors has the wrong row type"),
    ("2-d", "/tensors has shape (2, 3), not one dimension"),
    ("group", "/tensors is not a dataset"),
    ("strings-float", "/strings has the wrong row type"),
])
def test_tables_of_the_wrong_type_or_shape_are_refused(tmp_path, how, needle):
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        name = "strings" if how.startswith("strings") else "tensors"
        del f[name]
        if how == "int-dtype":
            f.create_dataset(name, data=np.arange(10))
        elif how == "2-d":
            f.create_dataset(name, data=np.zeros((2, 3)))
        elif how == "group":
            f.create_group(name)
        else:
            f.create_dataset(name, data=np.zeros(10))
    _refused(p, needle)


# ============================================================================ attributes


@pytest.mark.parametrize("obj, attr, value, needle", [
    ("/", "format_version", "2", "invalid format version '2'"),
    ("/", "format_version", np.arange(1000), "format_version holds 1,000 values, not one"),
    ("/", "format", 7, "an HDF5 file without the vlmscope header"),
    ("/", "status", "exploded", "unknown status 'exploded'"),
    ("/meta", "run_json", "{not json", "attribute /meta/run_json is not valid JSON"),
    pytest.param("/meta", "run_json", "[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)",
                 id="deeply-nested-json"),
    ("/meta", "run_json", "[1, 2]", "holds a JSON list, not a dict"),
    ("/meta", "run_json", json.dumps({"decoder_layers": ["x"]}), "'decoder_layers' is a list"),
])
def test_bad_attributes_give_one_line(tmp_path, obj, attr, value, needle):
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        f[obj].attrs[attr] = value
    _refused(p, needle, lambda t: (t.status, t.meta))


def test_a_missing_run_metadata_is_damage_and_a_bad_config_reads_as_none(tmp_path):
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        f["meta"].attrs["config_json"] = "{broken"
        del f["meta"].attrs["run_json"]
    with open_trace(p) as t:
        assert t.config == {}
    _refused(p, "no /meta run_json", lambda t: t.meta)


# ============================================================================ references


def _set(file: Path, table: str, row: int, **fields) -> Path:
    with h5py.File(file, "r+") as f:
        r = f[table][row]
        for k, v in fields.items():
            r[k] = v
        f[table][row] = r
    return file


@pytest.mark.parametrize("table, row, fields, needle", [
    ("events", 5, {"parent": 10_000}, "events row 5: parent 10000 is outside /events (164 rows)"),
    ("events", 5, {"module": -3}, "events row 5: module -3 is outside /modules"),
    ("events", 5, {"tensor_start": 440, "tensor_count": 50}, "events row 5: rows [440, +50) lie outside /tensors"),
    ("tensors", 7, {"event": 164}, "tensors row 7: event 164 is outside /events"),
    ("tensors", 7, {"name": 1 << 30}, "tensors row 7: name 1073741824 is outside the 330 strings"),
    ("tensors", 7, {"ndim": 99}, "tensors row 7: ndim 99 is outside 0..64 dimensions"),
    ("tensors", 7, {"role": 127}, "tensors row 7: role 127 is outside 0..2"),
    ("reshapes", 3, {"site_file": -2}, "reshapes row 3: site_file -2 is outside"),
    ("probes", 2, {"data_off": 1 << 40}, "probes row 2: probe bytes [1099511627776, +"),
    ("probes", 1, {"shape": [1 << 20, 1 << 20, 1 << 20, -1, -1, -1, -1, -1], "ndim": 3},
     "probes row 1: probe shape (1048576, 1048576, 1048576) does not match its 16384 bytes"),
    ("probes", 1, {"ndim": 9}, "probes row 1: ndim 9 is outside 0..8 dimensions"),
    ("modules", 4, {"path": 99_999}, "modules row 4: path 99999 is outside the 330 strings"),
])
def test_references_outside_the_file_are_refused_naming_the_row(tmp_path, table, row, fields, needle):
    p = _set(_copy(tmp_path), table, row, **fields)
    _refused(p, needle, lambda t: t.table(table))
    _refused(p, needle.split(":")[0], lambda t: index_of(t).__getattribute__(table))   # the analysis too
    r = _cli(*(["snapshot", "--reshapes"] if table == "reshapes" else ["check"]), str(p))
    assert r.returncode == 3 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr


def test_parent_cycles_are_refused_and_loops_over_parents_end(tmp_path):
    p = _set(_set(_copy(tmp_path), "events", 3, parent=9), "events", 9, parent=3)
    _refused(p, "its parents form a cycle", lambda t: t.events())
    q = _set(_copy(tmp_path, name="m.h5"), "modules", 2, parent=2)
    _refused(q, "modules row 2: its parents form a cycle", lambda t: t.modules)


def test_a_damaged_step_is_named_and_the_other_steps_still_read(tmp_path):
    p = _copy(tmp_path)
    with open_trace(EXAMPLE) as t:
        good = [t.events(i).tobytes() for i in range(4)]
        n_probes = t.n_rows("probes")
    _set(p, "steps", 2, probe_start=n_probes - 1, probe_count=50)
    with open_trace(p) as t:
        assert [t.events(i).tobytes() for i in (0, 1, 3)] == [good[0], good[1], good[3]]
        assert len(t.step(3).probes) and set(t.damaged_steps) == {2}
        with pytest.raises(TraceError, match=r"step 2: its probes rows \[106, \+50\) lie outside /probes"):
            t.probes(2)
        with pytest.raises(TraceError, match="step 2: "):
            t.steps
        with pytest.raises(TraceError, match="step 2: "):
            index_of(t).steps


def test_damaged_rows_inside_one_step_leave_the_other_steps_readable(tmp_path):
    p = _copy(tmp_path)
    with open_trace(EXAMPLE) as t:
        s3 = t.steps[3]
        row = int(s3["event_start"]) + 1
    _set(p, "events", row, module=10_000)
    with open_trace(p) as t:
        assert all(len(t.events(i)) for i in (0, 1, 2))
        with pytest.raises(TraceError, match=f"step 3: events row {row}: module 10000 is outside"):
            t.events(3)
        with pytest.raises(TraceError, match=f"events row {row}"):
            t.events()


def test_a_row_inside_another_steps_block_is_refused(tmp_path):
    p = _copy(tmp_path)
    with open_trace(EXAMPLE) as t:
        row = int(t.steps[1]["event_start"])
    _set(p, "events", row, step=0)
    _refused(p, f"step 1: events row {row}: step 0, inside the block of step 1", lambda t: t.events(1))


# ============================================================================ strings


def test_string_offsets_going_back_or_not_covering_a_closed_trace_are_refused(tmp_path):
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        ends = f["string_ends"][:]
        ends[10] = ends[9] - 1
        f["string_ends"][:] = ends
    _refused(p, "/string_ends goes backwards at string 10", lambda t: t.strings)
    q = _copy(tmp_path, name="q.h5")
    with h5py.File(q, "r+") as f:
        f["string_ends"][:] = np.arange(f["string_ends"].shape[0])       # plausible, but wrong
    _refused(q, "/string_ends does not cover /strings", lambda t: t.strings)


def test_invalid_utf8_is_shown_escaped(tmp_path):
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        ends = f["string_ends"][:]
        a = int(ends[0])
        blob = f["strings"][:]
        blob[a] = 0xFF                                     # first byte of string 1
        f["strings"][:] = blob
    with open_trace(p) as t, open_trace(EXAMPLE) as good:
        assert t.strings[1] == "\\xff" + good.strings[1][1:]


# ============================================================================ probes and payloads


def test_probe_values_and_info_are_checked_on_decode(tmp_path):
    p = _copy(tmp_path)
    with open_trace(p) as t:
        row = t.probes()[1].copy()
        row["data_len"] = 8
        with pytest.raises(TraceError, match="does not match its 8 bytes"):
            t.probe_value(row)
    with h5py.File(p, "r+") as f:
        ends = f["string_ends"][:]
    with open_trace(p) as t:
        info = int(t.probes()[0]["info"])
    # make the probe's info string invalid JSON of the same length (strings stay covered)
    with h5py.File(p, "r+") as f:
        blob = f["strings"][:]
        a = int(ends[info - 1])
        blob[a] = ord("}")
        f["strings"][:] = blob
    with open_trace(p) as t:
        with pytest.raises(TraceError, match="is not valid JSON"):
            t.probe_info(t.probes()[0])
        with pytest.raises(TraceError, match=f"probe info, string {info}, is not a JSON object"):
            index_of(t).info(0)


def test_a_payload_declared_far_larger_than_stored_is_refused(tmp_path):
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        f["payloads"].create_dataset("0", shape=(1 << 40, 1024), dtype=np.float32, chunks=(1, 1024))
    with open_trace(p) as t:
        with pytest.raises(TraceError, match=r"/payloads/0 declares 1,099,511,627,776 rows but stores 0"):
            t.payload(0)
        with pytest.raises(TraceError, match="no /payloads/1"):
            t.payload(1)


# ============================================================================ files that hang HDF5


def test_preflight_passes_a_sound_trace_quickly(tmp_path):
    t0 = time.monotonic()
    preflight(EXAMPLE, timeout=10)
    preflight(_copy(tmp_path), timeout=10)
    assert time.monotonic() - t0 < 2
    with open_trace(EXAMPLE) as t:
        _every_accessor(t)                              # the sound file reads whole through every check


def test_a_trace_that_hangs_hdf5_is_refused_by_preflight_and_the_commands(tmp_path):
    """4 KiB zeroed in the metadata of a real recording make HDF5 loop forever while reading the
    root's attributes (tests/data/hangs-hdf5.h5: a format-2 recording of traces/examples with
    bytes [2560, 6656) zeroed, found by zeroing every 512-byte offset). The preflight's child is
    killed; the command exits 3 with one line instead of spinning."""
    p = _copy(tmp_path, HANGS)
    t0 = time.monotonic()
    with pytest.raises(TraceError, match="reading it does not finish"):
        preflight(p, timeout=2)
    assert time.monotonic() - t0 < 6

    def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        r = _cli(*cmd, str(p), timeout=40, env_extra={"VLMSCOPE_PREFLIGHT_TIMEOUT": "2"})
        return r, time.monotonic() - t0

    cmds = (["summary"], ["check"], ["snapshot"], ["diff", str(EXAMPLE)])
    with ThreadPoolExecutor(max_workers=len(cmds)) as pool:       # the commands wait on timeouts: at once
        runs = list(pool.map(timed, cmds))
    for cmd, (r, took) in zip(cmds, runs):
        assert r.returncode == 3 and "reading it does not finish" in r.stderr, (cmd, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and took < 30


def test_a_tensor_row_whose_shape_does_not_hold_its_elements_is_refused_where_shown(tmp_path):
    """A doctored row (checksums rewritten by h5py, so no chunk is damaged) claims a shape of
    2^31-1 in every dimension: snapshot and diff refuse it in one line rather than print or
    range over it."""
    p = _copy(tmp_path)
    with h5py.File(p, "r+") as f:
        te = f["tensors"][:]
        te["shape"][5, :3] = 2**31 - 1
        f["tensors"][:] = te
    r = _cli("snapshot", str(p))
    assert r.returncode == 3 and "does not hold" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _cli("diff", str(EXAMPLE), str(p))
    assert r.returncode == 3 and "does not hold" in r.stderr and "Traceback" not in r.stderr, r.stderr
