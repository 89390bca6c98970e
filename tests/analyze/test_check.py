"""``vlmscope check``: each rule on small synthetic traces that break exactly one invariant.

The traces come from :mod:`vlmscope.testing` (no torch): a Qwen2-VL-shaped generate with a
prefill (image spliced in) and decode steps, plus injected faults. Real models are covered by
``test_bugzoo.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner


from vlmscope.testing import make_trace
from vlmscope.analyze.check import RULES, check, run_checks, select_rules
from vlmscope.cli.analyze import check as check_cmd
from vlmscope.trace import open_trace, read_strings

L = "model.language_model.layers"
SMALL = dict(n_steps=4, n_layers=3, n_vision=1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """make(name, **faults) -> path of a small synthetic trace (cached per module)."""
    base = tmp_path_factory.mktemp("synth")
    cache: dict = {}

    def make(name: str, rope: str = "mrope", **faults):
        if name not in cache:
            cache[name] = make_trace(base / f"{name}.h5", rope=rope, faults=faults, **SMALL)
        return cache[name]

    return make


def rules_of(report):
    return [(v.rule, v.step, v.module) for v in report.violations]


def test_clean_traces_have_no_violations(synth):
    assert check(synth("clean")).violations == []
    assert check(synth("clean_1d", rope="1d")).violations == []


def test_mask_key_length(synth):
    rep = check(synth("mask_len", mask_len=2))
    assert {v.rule for v in rep.violations} == {"mask.length"}
    v = rep.violations[0]
    assert (v.step, v.module) == (0, f"{L}.0")
    assert "key length 88" in v.expected and "key length 90" in v.actual
    assert len(rep.violations) == 4                  # every step
    assert v.count == 3 and len(v.also) == 2         # the same mask reached every decoder layer
    assert not rep.ok


def test_nan_names_first_producer(synth):
    rep = check(synth("nan", nan=(1, 1)))
    assert rules_of(rep) == [("numbers.nonfinite", 1, f"{L}.1.mlp.down_proj")]
    assert "NaN" in rep.violations[0].actual and "produced the first" in rep.violations[0].hint


def test_mask_dtype(synth):
    rep = check(synth("mask_dtype", mask_dtype="float32"))
    assert rules_of(rep) == [("dtype.mask", 0, f"{L}.0")]
    assert "bfloat16" in rep.violations[0].expected and "float32" in rep.violations[0].actual


def test_cat_promotion(synth):
    rep = check(synth("cat", cat_promotion=True))
    assert rules_of(rep) == [("dtype.cat-promotion", 0, f"{L}.0.self_attn")]
    assert "bfloat16 float16 -> float32" in rep.violations[0].actual


def test_cache_appended_twice(synth):
    rep = check(synth("cache_twice", cache_twice=(0, 0)))
    first = rep.violations[0]
    assert (first.rule, first.step, first.module) == ("cache.growth", 0, f"{L}.0")
    assert first.expected.startswith("+88") and first.actual.startswith("+176")
    assert "twice" in first.hint
    # the uniformity break that follows is explained by the growth violation, not repeated
    assert not rep.by_rule("cache.uniform")


def _without_oracle(src, dst: Path) -> Path:
    """A copy of a trace whose metadata names no M-RoPE family: positions.oracle cannot judge it,
    and the layout rules (continuity, mrope-*, fallback-1d, rope-deltas) judge it alone."""
    dst.write_bytes(Path(src).read_bytes())
    with h5py.File(dst, "r+") as f:
        run = json.loads(f["meta"].attrs["run_json"])
        run["rope"] = {"family": None}
        f["meta"].attrs["run_json"] = json.dumps(run)
    return dst


def test_decode_positions_shifted(synth, tmp_path):
    # positions.oracle reports it (it was positions.continuity: the oracle also names the row,
    # the token, the axis and the expected value); continuity does not repeat it
    rep = check(synth("pos_shift", pos_shift=64))
    assert rules_of(rep) == [("positions.oracle", 1, "model.language_model")]
    v = rep.violations[0]
    assert "image length" in v.hint
    assert v.tokens == [88] and v.row == 0
    assert "t = 32" in v.expected and "off by +64" in v.actual and "3 of 4 steps" in v.actual
    # where the oracle cannot judge, continuity still does
    rep = check(_without_oracle(synth("pos_shift", pos_shift=64), tmp_path / "no_oracle.h5"))
    assert rules_of(rep) == [("positions.continuity", 1, "model.language_model")]
    assert "image length" in rep.violations[0].hint
    assert rep.violations[0].tokens == [88]


def test_mrope_fallback_to_1d(synth, tmp_path):
    # positions.oracle subsumes fallback-1d on the steps it judges (it was positions.fallback-1d)
    rep = check(synth("fallback", fallback_1d=True))
    assert rules_of(rep) == [("positions.oracle", 0, "model.language_model")]
    v = rep.violations[0]
    assert "fell back to 1-D" in v.hint and "mm_token_type_ids" in v.hint
    assert v.row == 0 and v.tokens == [4] and "image token" in v.expected
    rep = check(_without_oracle(synth("fallback", fallback_1d=True), tmp_path / "no_oracle.h5"))
    assert rules_of(rep) == [("positions.fallback-1d", 0, "model.language_model")]
    assert "mm_token_type_ids: missing" in rep.violations[0].actual


def test_image_rows_vs_placeholders(synth):
    rep = check(synth("image_rows", image_rows=3))
    assert rules_of(rep) == [("image.tokens", 0, "model.visual.merger")]
    assert "67" in rep.violations[0].actual


def test_sequence_length_through_layers(synth):
    rep = check(synth("seq_len", seq_len=(2, 1)))
    assert rules_of(rep) == [("seq.length", 2, f"{L}.1")]


def test_position_ids_disagree_with_kv_index(synth):
    rep = check(synth("kv_quirk", rope="1d", kv_quirk=2))
    assert [(v.rule, v.step) for v in rep.violations] == [("positions.kv-index", s) for s in (1, 2, 3)]
    assert "88" in rep.violations[0].expected and "2" in rep.violations[0].actual


def test_rope_deltas_constant_across_decode(tmp_path, synth):
    # rewrite the decode positions of step 3 so the M-RoPE delta changes there only
    src = synth("clean")
    p = tmp_path / "deltas.h5"
    p.write_bytes(Path(src).read_bytes())
    with h5py.File(p, "r+") as f:
        probes, strings = f["probes"][:], list(read_strings(f))
        kind = np.array(strings, dtype=object)[probes["kind"]]
        rows = np.nonzero((probes["step"] == 3) & (kind == "position_ids"))[0]
        data = f["probe_data"]
        for r in rows:
            off, n = int(probes["data_off"][r]), int(probes["data_len"][r])
            v = data[off:off + n].view(np.int64).copy()
            nd = int(probes["ndim"][r])
            if nd == 3:              # [3|4, B, S]: shift the M-RoPE rows
                lead = int(probes["shape"][r][0])
                v = v.reshape(lead, -1)
                v[lead - 3:] += 7
                data[off:off + n] = v.ravel().view(np.uint8)
    # the oracle reports step 3 (only it: the delta rule leaves the call to it) ...
    rep = check(p)
    assert [(v.rule, v.step) for v in rep.violations] == [("positions.oracle", 3)]
    assert "off by +7" in rep.violations[0].actual
    # ... and where the oracle cannot judge, the delta rule does
    rep = check(_without_oracle(p, tmp_path / "no_oracle.h5"))
    rules = {v.rule for v in rep.violations}
    assert "positions.rope-deltas" in rules
    rd = rep.by_rule("positions.rope-deltas")[0]
    assert rd.step == 3


def test_select_rules_and_groups():
    assert select_rules(None) == list(RULES)
    assert set(select_rules("mask")) == {"mask.length", "mask.causal", "mask.padding"}
    assert "positions.continuity" in select_rules(["positions"])
    assert select_rules("cache.growth,dtype.mask") == ["cache.growth", "dtype.mask"]
    with pytest.raises(KeyError):
        select_rules("nope")


def test_only_selected_rules_run(synth):
    rep = check(synth("mask_len", mask_len=2), rules=["positions"])
    assert rep.violations == []


def test_violation_fields_and_json(synth):
    rep = check(synth("nan", nan=(1, 1)))
    d = rep.to_dict()
    v = d["violations"][0]
    for k in ("rule", "step", "module", "expected", "actual", "hint", "severity"):
        assert k in v
    json.dumps(d)


def test_run_checks_for_summary(synth):
    with open_trace(synth("nan", nan=(1, 1))) as t:
        vs = run_checks(t)
    assert [v.rule for v in vs] == ["numbers.nonfinite"]


def test_failed_and_incomplete_traces(tmp_path):
    p = make_trace(tmp_path / "inc.h5", status="incomplete", **SMALL)
    rep = check(p)
    assert [v.rule for v in rep.violations] == ["trace.status"]
    assert rep.violations[0].severity == "warning" and rep.ok


# ---------------------------------------------------------------- CLI


def test_cli_exit_codes(synth, tmp_path):
    r = CliRunner()
    res = r.invoke(check_cmd, [str(synth("clean"))])
    assert res.exit_code == 0, res.output
    assert "clean" in res.output
    res = r.invoke(check_cmd, [str(synth("nan", nan=(1, 1)))])
    assert res.exit_code == 1
    assert "numbers.nonfinite" in res.output and "down_proj" in res.output
    res = r.invoke(check_cmd, [str(synth("clean")), "--rules", "bogus"])
    assert res.exit_code == 2
    res = r.invoke(check_cmd, [])
    assert res.exit_code == 2
    res = r.invoke(check_cmd, [str(tmp_path / "missing.h5")])
    assert res.exit_code == 3 and "trace not found" in res.output
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    res = r.invoke(check_cmd, [str(junk)])
    assert res.exit_code == 3
    assert "Traceback" not in res.output


def test_cli_json_and_rules(synth):
    r = CliRunner()
    res = r.invoke(check_cmd, [str(synth("mask_len", mask_len=2)), "--json"])
    assert res.exit_code == 1
    d = json.loads(res.output)
    assert d["errors"] == 4 and d["violations"][0]["rule"] == "mask.length"
    res = r.invoke(check_cmd, [str(synth("mask_len", mask_len=2)), "--rules", "positions,cache"])
    assert res.exit_code == 0
    res = r.invoke(check_cmd, ["--list-rules"])
    assert res.exit_code == 0 and "positions.kv-index" in res.output


def test_cli_folds_repeats(synth):
    res = CliRunner().invoke(check_cmd, [str(synth("mask_len", mask_len=2))])
    assert "0-3 (4x)" in res.output


def _shift_positions(path, step: int, row: int, by: int) -> None:
    """Shift batch row ``row``'s position ids (and rope positions) of one step by ``by``."""
    with h5py.File(path, "r+") as f:
        probes, strings = f["probes"][:], read_strings(f)
        kind = strings[probes["kind"]]
        rows = np.nonzero((probes["step"] == step) & np.isin(kind, ["position_ids", "rope_positions"]))[0]
        done = set()
        for r in rows:
            off, n = int(probes["data_off"][r]), int(probes["data_len"][r])
            if (off, n) in done:
                continue
            done.add((off, n))
            nd = int(probes["ndim"][r])
            v = f["probe_data"][off:off + n].view(np.int64).reshape(probes["shape"][r][:nd]).copy()
            if nd == 3:
                v[:, row] += by
            else:
                v[row] += by
            f["probe_data"][off:off + n] = v.ravel().view(np.uint8)


def test_position_rules_name_the_batch_row_that_is_off(tmp_path):
    p = make_trace(tmp_path / "b2.h5", n_steps=4, n_layers=2, n_vision=1, batch=2)
    assert check(p, rules="positions").violations == []
    _shift_positions(p, step=2, row=1, by=5)
    got = {}
    for v in check(p, rules="positions").violations:
        got.setdefault(v.rule, v)                       # the first of each rule
    cont = got["positions.continuity"]
    assert cont.step == 2
    assert "in batch row 1" in cont.expected and "(off by +5)" in cont.actual
    assert "jump ahead" in cont.hint
    kv = got["positions.kv-index"]
    assert kv.step == 2 and "in batch row 1" in kv.expected


def test_seq_length_quotes_the_length_it_compared_when_q_len_is_unknown(tmp_path):
    p = make_trace(tmp_path / "s.h5", n_steps=3, n_layers=3, n_vision=1, faults={"seq_len": (1, 1)})
    with h5py.File(p, "r+") as f:
        st = f["steps"][:]
        st["q_len"] = -1
        f["steps"][:] = st
    (v,) = [v for v in check(p, rules="seq").violations if v.step == 1]
    assert "-1" not in v.expected
    assert "sequence length 1 (the step's first layer)" in v.expected
