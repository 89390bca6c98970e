"""The batch fault zoo (issue 10): batched, padded, multi-image, video and repeated ``generate``
calls on the REAL embedded models, each fault a few lines of patching (``batch_faults.py``).

For every fault ``check`` must name the right rule at the right step (the prefill or the first
decode step of the right call), the right batch row and the right module, with the mechanism in
its hint; and the fault must be real: the faulty model's logits differ from the clean model's
for that row; the rules of the other places stay silent. Clean batched runs (B=3, image,
text-only and two-image rows, a video row, two calls in one trace) check clean; right padding
gets one warning (generate() continues a padded row from a pad), tiny-mqwen its known quirk.

Faults are recorded with the rows API's ``build_batch_inputs`` and a ``Recorder`` around
``generate`` (which also returns the logits); clean runs through ``vlmscope.record(calls=...)``.
Speed: tiny images (``max_pixels=112*112``: 16 image tokens for a square image), 3 new tokens,
models built once and deep-copied (``batch_faults._load``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmscope.analyze import check
from vlmscope.trace import open_trace


def _load_faults():
    # pytest runs with --import-mode=importlib: the sibling module is loaded by its path
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("batch_faults", Path(__file__).with_name("batch_faults.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("batch_faults", mod)
    spec.loader.exec_module(mod)
    return mod


bf = _load_faults()

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MAX_PIXELS = 112 * 112
N = 3                      # new tokens per call
LM = "model.language_model"
Q2, Q25, MQ = "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-mqwen"


# ------------------------------------------------------------------------------ media and rows


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Three different 512x512 images (same size: same token count, so features can trade
    places), chelsea.png (another grid) and the example video (16 frames at 4 fps)."""
    from PIL import Image, ImageOps

    d = tmp_path_factory.mktemp("media")
    astro = Image.open(EXAMPLES / "astronaut.png").convert("RGB")
    cat = Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((512, 512))
    paths = {}
    for name, img in (("astro", astro), ("cat", cat), ("mirror", ImageOps.mirror(cat))):
        paths[name] = str(d / f"{name}.png")
        img.save(paths[name])
    paths["chelsea"] = str(EXAMPLES / "chelsea.png")   # 451x300: another grid than the squares
    paths["video"] = str(EXAMPLES / "astronaut-pan.mp4")
    return paths


def row(prompt, *images, video=None):
    r = {"prompt": prompt, "images": list(images)}
    if video is not None:
        r["video"] = video
    return r


def mixed(media):
    """B=3: one image, text only, two images of different grids."""
    return [row("Describe this image.", media["astro"]), row("Hi"),
            row("Compare these two pictures, please.", media["chelsea"], media["astro"])]


def mixed_other(media):
    """Another layout for a second call: two images first, then one image, then text."""
    return [row("What differs between them?", media["astro"], media["chelsea"]),
            row("What is it?", media["chelsea"]), row("Tell me a story about a cat.")]


def pair(media):
    """B=2, both with an image; row 0 is the shorter (padded) one, by a few tokens only."""
    return [row("What is this?", media["chelsea"]),
            row("Describe the picture in detail, please.", media["astro"])]


def video_rows(media):
    """A video row (every frame: 4 fps, so 0.5 s per temporal grid), a text row, an image row."""
    return [row("What happens in the video?", video=media["video"]), row("Hi there"),
            row("Describe.", media["chelsea"])]


# ------------------------------------------------------------------------------ recording


def run_calls(model, proc, calls, padding_side="left", out: Path | None = None) -> list[torch.Tensor]:
    """``generate`` once per entry of ``calls`` (its rows, built by the rows API's
    ``build_batch_inputs``), under one :class:`vlmscope.Recorder` when ``out`` is given.
    Returns per call the logits of every generated token, [N, B, vocab]."""
    import contextlib

    import vlmscope
    from vlmscope.recorder.inputs import build_batch_inputs

    res = []
    with (vlmscope.Recorder(model, out) if out is not None else contextlib.nullcontext()) as rec:
        for rows in calls:
            inputs, info = build_batch_inputs(model, proc, rows, padding_side=padding_side)
            if rec is not None:
                rec.begin_call(batch_size=info["batch_size"], padding_side=padding_side, rows=info["rows"])
            with torch.inference_mode():
                gen = model.generate(**inputs, max_new_tokens=N, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            res.append(torch.stack(gen.logits).float())
    return res


def first_steps(path) -> list[int]:
    """The first step of each call (prefill steps, kind 0)."""
    with open_trace(path) as t:
        return [int(s) for s in np.flatnonzero(np.asarray(t.steps["kind"]) == 0)]


def lines(rep) -> list[str]:
    return [v.line() for v in rep.violations]


# ------------------------------------------------------------------------------ clean references


@pytest.fixture(scope="module")
def clean_models():
    """name -> (model, processor), built once; ``"<name>+deltas"``: the clean model with decode
    positions from rope_deltas (the reference of the faults that decode that way)."""
    cache: dict[str, tuple] = {}

    def get(key: str):
        if key not in cache:
            name, _, variant = key.partition("+")
            factory = bf.clean_decode_from_deltas if variant == "deltas" else bf.clean
            cache[key] = factory(name, max_pixels=MAX_PIXELS)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def clean_logits(clean_models):
    """(reference, calls, padding side) -> the clean model's logits per call (memoised)."""
    cache: dict[str, list] = {}

    def get(ref: str, calls, padding_side: str):
        key = repr((ref, calls, padding_side))
        if key not in cache:
            cache[key] = run_calls(*clean_models(ref), calls, padding_side)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("batch_zoo")


# ------------------------------------------------------------------------------ the fault zoo

PREFILL, FIRST_DECODE = 0, 1

# key: (model, rows of each call, padding side, rule, call, step within the call, row,
#       where ("positions" | "mask" | "splice"), hint word, clean reference)
CASES = {
    # 1. stale rope_deltas across calls (transformers PR #43952, issue #36009)
    "stale-delta": (Q2, lambda m: [mixed(m), mixed_other(m)], "left", "positions.oracle", 1, PREFILL, 0,
                    "positions", "stale rope_deltas", Q2),
    # 2. right-padded mm_token_type_ids with left-padded prompts (TRL #5785)
    "mmtt-right-padded": (Q2, lambda m: [pair(m)], "left", "positions.oracle", 0, PREFILL, 0,
                          "positions", "mm_token_type_ids", Q2),
    "mmtt-left-padded": (Q2, lambda m: [pair(m)], "right", "positions.oracle", 0, PREFILL, 0,
                         "positions", "mm_token_type_ids", Q2),
    # 3. one rope delta for the whole batch (mlx-vlm #1143): rows 1, 2 take row 0's
    "shared-delta": (Q2, lambda m: [mixed(m)], "left", "positions.oracle", 0, FIRST_DECODE, 1,
                     "positions", "shared rope delta", Q2 + "+deltas"),
    "shared-delta-row1": (Q2, lambda m: [mixed(m)], "left", "positions.oracle", 0, FIRST_DECODE, 0,
                          "positions", "shared rope delta", Q2 + "+deltas"),
    # 4. int second_per_grid_ts (lmms-eval #1393); not passed at all (transformers #41152)
    "int-seconds": (Q25, lambda m: [video_rows(m)], "left", "positions.oracle", 0, PREFILL, 0,
                    "positions", "second_per_grid_ts", Q25),
    "seconds-dropped": (Q25, lambda m: [video_rows(m)], "left", "positions.oracle", 0, PREFILL, 0,
                        "positions", "second_per_grid_ts", Q25),
    # 5. features from the wrong row (lmms-eval #971)
    "features-swapped": (Q2, lambda m: [[row("Describe.", m["astro"]), row("Describe this one.", m["cat"]),
                                         row("Hi")]], "left", "image.features-row", 0, PREFILL, 0,
                         "splice", "another row", Q2),
    "features-rotated": (Q2, lambda m: [[row("Describe.", m["astro"]), row("And this?", m["cat"]),
                                         row("And this one?", m["mirror"])]], "left", "image.features-row", 0,
                         PREFILL, 0, "splice", "another row", Q2),
    # 6. the 2-D mask not extended for a padded row (rows 0 and 1 are padded)
    "mask-not-extended": (Q2, lambda m: [mixed(m)], "left", "mask.causal", 0, FIRST_DECODE, 0,
                          "mask", "not extended", Q2),
    "mask-kept": (Q2, lambda m: [mixed(m)], "left", "mask.causal", 0, FIRST_DECODE, 0,
                  "mask", "not extended", Q2),
    # 7. padding counted as positions
    "padding-counted": (Q2, lambda m: [mixed(m)], "left", "positions.oracle", 0, PREFILL, 0,
                        "positions", "padding counted", Q2 + "+deltas"),
    "padding-counted-decode": (Q2, lambda m: [mixed(m)], "left", "positions.oracle", 0, FIRST_DECODE, 0,
                               "positions", "padding counted", Q2 + "+deltas"),
}


# rules that must stay silent: the fault is elsewhere (a mask fault leaves the positions exactly
# as the clean model computes them, and so on)
SILENT = {"positions": {"mask.causal", "mask.padding", "image.features-row"},
          "mask": {"positions.oracle", "image.features-row"},
          "splice": {"positions.oracle", "mask.causal", "mask.padding"}}


def _where_ok(where: str, module: str) -> bool:
    if where == "positions":   # the text model or its rotary module
        return module == LM or module.startswith(LM + ".rotary")
    if where == "mask":        # a decoder layer (or its attention)
        return module.startswith(LM + ".layers.")
    return module == "model"   # the splice: the multimodal model's forward


@pytest.mark.parametrize("key", list(CASES))
def test_fault(key, media, clean_logits, out_dir):
    name, calls_of, side, rule_id, call, offset, row_b, where, word, ref = CASES[key]
    calls = calls_of(media)
    model, proc = bf.FAULTS[key](name, max_pixels=MAX_PIXELS)
    path = out_dir / f"{key}.h5"
    got = run_calls(model, proc, calls, side, out=path)[call]
    step = first_steps(path)[call] + offset

    rep = check(path)
    mine = [v for v in rep.violations if v.rule == rule_id]
    assert mine, f"{rule_id} found nothing; check said: {lines(rep)}"
    first = min(mine, key=lambda v: (v.step, v.row))
    assert (first.step, first.row) == (step, row_b), first.line()
    assert _where_ok(where, first.module), first.line()
    assert word in first.hint.lower(), first.line()
    assert [v.line() for v in rep.violations if v.rule in SILENT[where]] == []

    # the fault is real: this row's logits differ from the clean model's (in this call)
    diff = (got - clean_logits(ref, calls, side)[call]).abs().amax(-1)   # [N, B]
    assert diff[:, row_b].max() > 1e-5, diff   # float32 noise: ~1e-7


def test_stale_delta_of_an_older_call(media, out_dir):
    """Three calls: the stale delta is the FIRST call's, still used by the third call."""
    model, proc = bf.FAULTS["stale-delta"](Q2, max_pixels=MAX_PIXELS)
    calls = [mixed(media), pair(media) + [row("Hello")], mixed_other(media)]
    path = out_dir / "stale3.h5"
    run_calls(model, proc, calls, out=path)
    starts = first_steps(path)
    rep = check(path)
    flagged = {v.step for v in rep.violations
               if v.rule == "positions.oracle" and "stale rope_deltas" in v.hint.lower()}
    assert flagged >= {starts[1], starts[2]}, lines(rep)
    assert not any(v.step < starts[1] for v in rep.violations), lines(rep)


# ------------------------------------------------------------------------------ clean runs
# through the Python API: vlmscope.record(model, processor, calls=[...], padding_side=...)


def record(model_proc, calls, out: Path, padding_side="left") -> Path:
    import vlmscope

    return vlmscope.record(*model_proc, calls=calls, padding_side=padding_side, out=out, max_new_tokens=N)


@pytest.mark.parametrize("name", [Q2, Q25])
def test_clean_mixed_batch_left(name, media, clean_models, out_dir):
    path = record(clean_models(name), [mixed(media)], out_dir / f"clean-{name}-left.h5")
    rep = check(path)
    assert rep.violations == [], lines(rep)


@pytest.mark.parametrize("name", [Q2, Q25])
def test_clean_mixed_batch_right(name, media, clean_models, out_dir):
    """Right padding: generate() continues a padded row from its last column, a pad (position 0),
    so the row's new tokens get position 1, 2, ... and its logits come from a pad: the row's
    output is not the row's alone. check says so, once, as a warning naming padding_side."""
    path = record(clean_models(name), [mixed(media)], out_dir / f"clean-{name}-right.h5", "right")
    rep = check(path)
    assert rep.errors == [], lines(rep)
    assert [(v.rule, v.step, v.row) for v in rep.violations] == [("positions.oracle", 1, 0)], lines(rep)
    assert "padding_side='left'" in rep.violations[0].hint, lines(rep)


@pytest.mark.parametrize("name", [Q2, Q25])
def test_clean_video_batch(name, media, clean_models, out_dir):
    path = record(clean_models(name), [video_rows(media)], out_dir / f"video-{name}.h5")
    rep = check(path)
    assert rep.violations == [], lines(rep)


def test_clean_two_calls(media, clean_models, out_dir):
    path = record(clean_models(Q25), [mixed(media), mixed_other(media)], out_dir / "two-calls.h5")
    assert len(first_steps(path)) == 2
    rep = check(path)
    assert rep.violations == [], lines(rep)


def test_mqwen_batch(media, out_dir):
    """tiny-mqwen, B=3, three image rows (it takes exactly one image per row), with the
    embedding-space mask it needs for a batch (token_mask_to_embedding_mask). On both padding
    sides check reports exactly the model's known quirk: decode-step position_ids from the head
    count (the cache read as [B, H, S, D]), which rotary ignores (it uses the KV index)."""
    import vlmscope
    from vlmscope.recorder.inputs import build_batch_inputs
    from vlmscope_models.mqwen import token_mask_to_embedding_mask

    model, proc = bf.clean(MQ)
    rows = [row("Describe this image.", media["astro"]), row("Hi", media["chelsea"]),
            row("Compare it with the other one, please.", media["cat"])]
    for side in ("left", "right"):
        inputs, info = build_batch_inputs(model, proc, rows, padding_side=side)
        mask = token_mask_to_embedding_mask(inputs["input_ids"], inputs["attention_mask"])
        path = out_dir / f"mqwen-{side}.h5"
        with vlmscope.Recorder(model, path) as rec:
            rec.begin_call(batch_size=3, padding_side=side, rows=info["rows"])
            model.generate(inputs["input_ids"], attention_mask=mask, pixel_values=inputs["pixel_values"],
                           max_new_tokens=N)
        rep = check(path)
        assert {(v.rule, v.step) for v in rep.violations} == {("positions.kv-index", 1),
                                                             ("positions.kv-index", 2)}, lines(rep)
