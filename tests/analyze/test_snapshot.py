"""Golden shape snapshots: the JSON text, comparison, ``vlmscope snapshot``, ``check --golden``
and the pytest plugin (``vlmscope_golden`` / ``--vlmscope-update``)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from click.testing import CliRunner


from vlmscope.testing import make_trace
from vlmscope.analyze.check import check
from vlmscope.analyze.snapshot import (
    compare_snapshots, compare_to_file, load_snapshot, snapshot, snapshot_text, write_snapshot,
)
from vlmscope.cli.analyze import check as check_cmd
from vlmscope.cli.analyze import snapshot as snapshot_cmd
from vlmscope.pytest_plugin import GoldenSnapshot

pytest_plugins = ["pytester"]

SMALL = dict(n_steps=3, n_layers=2, n_vision=1)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    base = tmp_path_factory.mktemp("snap")
    return {
        "a": make_trace(base / "a.h5", **SMALL),
        "a2": make_trace(base / "a2.h5", **SMALL, seed=3),          # other values, same shapes
        "shape": make_trace(base / "shape.h5", faults={"shape": (1, 0)}, **SMALL),
    }


def test_snapshot_is_per_step_in_execution_order(traces):
    s = snapshot(traces["a"])
    assert s["vlmscope_snapshot"] == 1 and s["n_steps"] == 3
    st0 = s["steps"][0]
    assert (st0["kind"], st0["q_len"], st0["cache_before"], st0["cache_after"]) == ("prefill", 88, 0, 88)
    calls = st0["calls"]
    assert calls[0] == ["", 0, "in", "input_ids", [1, 88], "int64"]
    q = [c for c in calls if c[0] == "model.language_model.layers.0.self_attn.q_proj"]
    assert q == [["model.language_model.layers.0.self_attn.q_proj", 0, "in", "input", [1, 88, 64], "bfloat16"],
                 ["model.language_model.layers.0.self_attn.q_proj", 0, "out", "out", [1, 88, 64], "bfloat16"]]
    # a child's output comes before its parent's
    names = [(c[0], c[2]) for c in calls]
    assert names.index(("model.language_model.layers.0.mlp.down_proj", "out")) < \
        names.index(("model.language_model.layers.0.mlp", "out"))
    assert s["steps"][1]["calls"][0] == ["", 0, "in", "input_ids", [1, 1], "int64"]


def test_text_is_one_entry_per_line_and_valid_json(traces, tmp_path):
    text = snapshot_text(traces["a"])
    assert json.loads(text) == snapshot(traces["a"])
    lines = text.splitlines()
    assert any(ln.strip().startswith('["model.language_model.layers.1", 0, "in", "hidden_states"') for ln in lines)
    p = write_snapshot(traces["a"], tmp_path / "g.json")
    assert load_snapshot(p) == snapshot(traces["a"])
    assert snapshot_text(load_snapshot(p)) == text
    with_ops = snapshot(traces["a"], reshapes=True)
    assert any(c[2] == "reshape" for c in with_ops["steps"][0]["calls"])
    assert snapshot(traces["a"], steps=1)["n_steps"] == 1


def test_compare(traces, tmp_path):
    g = write_snapshot(traces["a"], tmp_path / "g.json")
    assert compare_to_file(traces["a2"], g) == ""          # values differ, shapes do not
    d = compare_to_file(traces["shape"], g)
    assert d.startswith("---") and "\n+++ " in d
    assert '-      ["model.language_model.layers.0.self_attn.o_proj", 0, "out", "out", [1, 1, 64], "bfloat16"]' in d
    assert '+      ["model.language_model.layers.0.self_attn.o_proj", 0, "out", "out", [1, 1, 65], "bfloat16"]' in d
    assert compare_snapshots(snapshot_text(traces["a"]), snapshot(traces["a"])) == ""
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError):
        load_snapshot(bad)


def test_cli_snapshot_and_check_golden(traces, tmp_path):
    r = CliRunner()
    out = tmp_path / "golden.json"
    res = r.invoke(snapshot_cmd, [str(traces["a"]), "-o", str(out)])
    assert res.exit_code == 0 and out.is_file()
    res = r.invoke(snapshot_cmd, [str(traces["a"])])
    assert res.exit_code == 0 and json.loads(res.output)["n_steps"] == 3
    res = r.invoke(snapshot_cmd, [str(traces["a2"]), "--compare", str(out)])
    assert res.exit_code == 0
    res = r.invoke(snapshot_cmd, [str(traces["shape"]), "--compare", str(out)])
    assert res.exit_code == 1 and "[1, 1, 65]" in res.output
    res = r.invoke(snapshot_cmd, [str(tmp_path / "missing.h5")])
    assert res.exit_code == 3
    # check --golden: the same comparison, as one more violation
    res = r.invoke(check_cmd, [str(traces["a2"]), "--golden", str(out)])
    assert res.exit_code == 0, res.output
    res = r.invoke(check_cmd, [str(traces["shape"]), "--golden", str(out)])
    assert res.exit_code == 1 and "snapshot.golden" in res.output and "[1, 1, 65]" in res.output
    res = r.invoke(check_cmd, [str(traces["a"]), "--golden", str(tmp_path / "none.json")])
    assert res.exit_code == 2
    rep = check(traces["shape"], golden=out)
    assert [v.rule for v in rep.violations] == ["snapshot.golden"] and rep.golden_diff


def test_golden_fixture_object(traces, tmp_path):
    test_file = tmp_path / "tests" / "test_model.py"
    g = GoldenSnapshot(test_file, "test_it[tiny]", update=True)
    assert g.path() == tmp_path / "tests" / "__vlmscope__" / "test_model" / "test_it_tiny.json"
    g.check(traces["a"])
    assert g.path().is_file()
    GoldenSnapshot(test_file, "test_it[tiny]", update=False).check(traces["a2"])
    with pytest.raises(pytest.fail.Exception, match="shapes differ"):
        GoldenSnapshot(test_file, "test_it[tiny]", update=False).check(traces["shape"])
    with pytest.raises(pytest.fail.Exception, match="--vlmscope-update"):
        GoldenSnapshot(test_file, "other", update=False).check(traces["a"])


def _plugin_args() -> list[str]:
    # the inner session runs in-process: keep other session-level plugins out of it
    args = ["-p", "no:textual-snapshot", "-p", "no:cacheprovider", "-p", "no:syrupy"]
    eps = importlib.metadata.entry_points(group="pytest11")
    if not any(e.value == "vlmscope.pytest_plugin" for e in eps):
        args += ["-p", "vlmscope.pytest_plugin"]
    return args


def test_pytest_plugin_update_and_diff(pytester, traces, monkeypatch):
    pytester.makepyfile(test_shapes="""
        import os
        from vlmscope.trace import open_trace

        def test_shapes(vlmscope_golden):
            with open_trace(os.environ["VLMSCOPE_TEST_TRACE"]) as t:
                vlmscope_golden.check(t)
    """)
    monkeypatch.setenv("VLMSCOPE_TEST_TRACE", str(traces["a"]))
    res = pytester.runpytest(*_plugin_args())
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*no golden shape snapshot*--vlmscope-update*"])
    res = pytester.runpytest(*_plugin_args(), "--vlmscope-update")
    res.assert_outcomes(passed=1)
    golden = pytester.path / "__vlmscope__" / "test_shapes" / "test_shapes.json"
    assert golden.is_file() and load_snapshot(golden)["n_steps"] == 3
    res = pytester.runpytest(*_plugin_args())
    res.assert_outcomes(passed=1)
    monkeypatch.setenv("VLMSCOPE_TEST_TRACE", str(traces["shape"]))
    res = pytester.runpytest(*_plugin_args())
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*shapes differ from the golden snapshot*", "*+*[1, 1, 65]*"])
