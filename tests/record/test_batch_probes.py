"""Recording batches and repeated generate calls on the real tiny models: each call's prefill,
run_json ``calls`` / ``rope``, and the per-row probes (rope_deltas state, row spans, padding,
video grids, second_per_grid_ts, token norms), compared with the real tensors the model used
(captured by hooks of our own on the same modules)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlmscope
from vlmscope.trace import KIND_DECODE, KIND_PREFILL

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT / "examples" / "astronaut.png"
CHELSEA = ROOT / "examples" / "chelsea.png"
NEW = 3
P, D = KIND_PREFILL, KIND_DECODE


def _img(path: Path, side: int) -> Image.Image:
    return Image.open(path).convert("RGB").resize((side, side))


def _chat(proc, *parts: str, text: str) -> str:
    content = [{"type": p} for p in parts] + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class Reference:
    """Hooks of the test's own: what the model really computed, per root forward call."""

    def __init__(self, model):
        self.model = model
        self.rope_deltas: list[torch.Tensor | None] = []
        self.positions: list[torch.Tensor] = []
        self.embeds: list[torch.Tensor] = []
        self.merger: list[torch.Tensor] = []
        self.pooler: list[torch.Tensor] = []
        inner = model.model
        self.handles = [
            model.register_forward_hook(self._root),
            inner.language_model.register_forward_pre_hook(self._text, with_kwargs=True),
            inner.visual.merger.register_forward_hook(lambda m, a, out: self.merger.append(out.detach().clone())),
            inner.visual.register_forward_hook(
                lambda m, a, out: self.pooler.append(out.pooler_output.detach().clone())),
        ]

    def _root(self, module, args, output):
        d = self.model.model.rope_deltas
        self.rope_deltas.append(None if d is None else d.detach().clone())

    def _text(self, module, args, kwargs):
        self.embeds.append(kwargs["inputs_embeds"].detach().clone())
        self.positions.append(kwargs["position_ids"].detach().clone())

    def remove(self):
        for h in self.handles:
            h.remove()


def _probe(t, step: int, kind: str, path: str, name: str):
    rows = t.probes(step, kind=kind)
    rows = rows[(t.module_paths[rows["module"]] == path) & (np.array([t.s(n) for n in rows["name"]]) == name)]
    assert len(rows) == 1, f"{len(rows)} {kind} probes {path} {name} in step {step}"
    return rows[0]


def _expected_row_spans(pos: np.ndarray, ids: np.ndarray, mask: np.ndarray, image_id: int, video_id: int) -> list:
    """[[kind, row, start, end, [[min, max] per axis]], ...], token by token (no vectorising)."""
    out = []
    for b in range(ids.shape[0]):
        def kind(i):
            if not mask[b, mask.shape[1] - ids.shape[1] + i]:
                return "pad"
            return {image_id: "image", video_id: "video"}.get(int(ids[b, i]), "text")
        start = 0
        for i in range(1, ids.shape[1] + 1):
            if i == ids.shape[1] or kind(i) != kind(start):
                axes = [[int(pos[a, b, start:i].min()), int(pos[a, b, start:i].max())] for a in range(pos.shape[0])]
                out.append([kind(start), b, start, i, axes])
                start = i
    return out


# --------------------------------------------------------------------------- two calls, B=2, left padding


ROWS = [{"prompt": "Describe.", "images": [str(ASTRONAUT)], "video": None, "messages": False},
        {"prompt": "Say something long about cats, please.", "images": [], "video": None, "messages": False}]


@pytest.fixture(scope="module")
def qwen2_batch():
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-qwen2-vl", attn_implementation="eager")
    proc.tokenizer.padding_side = "left"
    texts = [_chat(proc, "image", text=ROWS[0]["prompt"]), _chat(proc, text=ROWS[1]["prompt"])]
    inputs = proc(text=texts, images=[_img(ASTRONAUT, 112)], padding=True, return_tensors="pt")
    return model, proc, inputs


@pytest.fixture(scope="module")
def two_calls(qwen2_batch, tmp_path_factory):
    """Two generate calls under one Recorder, each announced with begin_call."""
    model, _, inputs = qwen2_batch
    ref = Reference(model)
    out = tmp_path_factory.mktemp("calls") / "two.h5"
    try:
        with vlmscope.Recorder(model, out) as rec:
            for _ in range(2):
                rec.begin_call(batch_size=2, padding_side="left", rows=ROWS)
                model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    finally:
        ref.remove()
    with vlmscope.open_trace(rec.path) as t:
        yield t, ref


def test_each_call_starts_with_a_prefill(two_calls):
    t, _ = two_calls
    assert t.steps["kind"].tolist() == [P, D, D, P, D, D]
    calls = t.meta["calls"]
    assert [(c["call"], c["first_step"], c["batch_size"], c["padding_side"]) for c in calls] == [
        (0, 0, 2, "left"), (1, 3, 2, "left")]
    assert calls[0]["rows"] == calls[1]["rows"] == ROWS
    assert t.meta["batch"] == {"rows": ROWS, "padding_side": "left"}


def test_rope_metadata_comes_from_the_config(two_calls, qwen2_batch):
    t, _ = two_calls
    cfg = qwen2_batch[0].config
    assert t.meta["rope"] == {"family": "qwen2_vl", "spatial_merge_size": cfg.vision_config.spatial_merge_size,
                              "tokens_per_second": None, "image_token_id": cfg.image_token_id,
                              "video_token_id": cfg.video_token_id,
                              "vision_start_token_id": cfg.vision_start_token_id}


def test_rope_deltas_state_is_the_models_attribute_per_row(two_calls):
    t, ref = two_calls
    assert len(ref.rope_deltas) == t.n_steps == 6
    for s in range(t.n_steps):
        row = _probe(t, s, "rope_deltas", "model", "state")
        want = ref.rope_deltas[s].numpy()
        assert want.shape == (2, 1)
        np.testing.assert_array_equal(t.probe_value(row), want)
    # the image row is shifted back by its image span, the text-only row not at all
    assert ref.rope_deltas[0][0, 0] < 0 and ref.rope_deltas[0][1, 0] == 0


def test_padding_per_row_in_the_masks(two_calls, qwen2_batch):
    t, _ = two_calls
    mask = qwen2_batch[2]["attention_mask"].numpy().astype(bool)
    n_pad = (~mask).sum(axis=1)
    assert n_pad[0] == 0 and n_pad[1] > 0  # the text-only row is the shorter one
    for s, extra in ((0, 0), (1, 1), (2, 2), (3, 0), (5, 2)):
        info = t.probe_info(_probe(t, s, "attention_mask", "", "attention_mask"))
        assert info["row_pad"] == n_pad.tolist()
        assert info["row_keys"] == (mask.sum(axis=1) + extra).tolist()


def test_input_ids_count_placeholders_per_row(two_calls, qwen2_batch):
    t, _ = two_calls
    _, proc, inputs = qwen2_batch
    ids = inputs["input_ids"].numpy()
    info = t.probe_info(_probe(t, 0, "input_ids", "", "input_ids"))
    img, vid = proc.image_token_id, proc.video_token_id
    assert info["row_image_tokens"] == (ids == img).sum(axis=1).tolist() == [16, 0]
    assert info["row_video_tokens"] == [0, 0] and info["video_spans"] == []
    assert info["video_token_id"] == vid
    start = int(np.flatnonzero(ids[0] == img)[0])
    assert info["spans"] == [[0, start, start + 16]]


def test_position_row_spans_cover_every_row(two_calls, qwen2_batch):
    t, ref = two_calls
    _, proc, inputs = qwen2_batch
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
    pos = ref.positions[0].numpy()  # [4, 2, L]: what reached the language model in the prefill
    spans = t.probe_info(_probe(t, 0, "position_ids", "model.language_model", "position_ids"))["row_spans"]
    assert spans == _expected_row_spans(pos, ids, mask, proc.image_token_id, proc.video_token_id)
    assert [s[0] for s in spans] == ["text", "image", "text", "pad", "text"]
    # decode: one token per row, never padding; row 1 continues after its own last position
    grown = np.concatenate([mask, np.ones((2, 1), bool)], axis=1)
    nxt = t.probe_info(_probe(t, 1, "position_ids", "model.language_model", "position_ids"))["row_spans"]
    assert nxt == _expected_row_spans(ref.positions[1].numpy(), np.zeros((2, 1), np.int64), grown, -1, -1)
    assert nxt[1][4][1] == [pos[1, 1].max() + 1] * 2


def test_token_norms_are_the_real_features(two_calls):
    t, ref = two_calls
    prefills = [0, 3]
    assert len(ref.merger) == len(ref.pooler) == 2 and len(ref.embeds) == 6
    for k, s in enumerate(prefills):
        got = t.probe_value(_probe(t, s, "token_norms", "model.visual.merger", "out"))
        want = torch.linalg.vector_norm(ref.merger[k].float(), dim=-1).numpy()
        assert got.dtype == np.float64 and got.shape == want.shape == (16,)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for s in range(6):
        row = _probe(t, s, "token_norms", "model.language_model", "inputs_embeds")
        want = torch.linalg.vector_norm(ref.embeds[s].float(), dim=-1).numpy()
        assert want.shape == ((2, 39) if s in prefills else (2, 1))
        np.testing.assert_allclose(t.probe_value(row), want, rtol=1e-6)
    # Qwen2-VL's vision tower returns the merger's rows as they are: no second row of norms
    assert not len(t.probes(0, kind="token_norms")[t.module_paths[t.probes(0, kind="token_norms")["module"]]
                                                   == "model.visual"])


def test_image_grid_is_its_own_kind(two_calls, qwen2_batch):
    t, _ = two_calls
    grid = qwen2_batch[2]["image_grid_thw"].numpy()
    for s in (0, 3):
        np.testing.assert_array_equal(t.probe_value(_probe(t, s, "image_grid_thw", "model.visual", "grid_thw")), grid)
        assert not len(t.probes(s, kind="video_grid_thw"))


# --------------------------------------------------------------------------- calls found without begin_call


def test_calls_are_detected_without_begin_call(qwen2_batch, tmp_path):
    model, _, inputs = qwen2_batch
    with vlmscope.Recorder(model, tmp_path / "auto.h5") as rec:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        # a hand-written loop: a forward with a cache, then forwards without one
        with torch.no_grad():
            model(**inputs, use_cache=True)
            model(**inputs, use_cache=False)
            model(**inputs, use_cache=False)
    with vlmscope.open_trace(rec.path) as t:
        assert t.steps["kind"].tolist() == [P, D, P, D, P, P, D]
        assert t.steps["cache_before"].tolist()[4:] == [0, -1, -1]
        calls = t.meta["calls"]
        assert [(c["call"], c["first_step"], c["batch_size"], c["padding_side"], c["rows"]) for c in calls] == [
            (0, 0, 2, "left", None), (1, 2, 2, "left", None), (2, 4, 2, "left", None), (3, 5, 2, "left", None)]
        assert "batch" not in t.meta


# --------------------------------------------------------------------------- video and image rows, Qwen2.5-VL


@pytest.fixture(scope="module")
def qwen25_video(tmp_path_factory):
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-qwen2.5-vl", attn_implementation="eager")
    proc.tokenizer.padding_side = "left"
    frames = [np.asarray(_img(p, 56)) for p in (ASTRONAUT, CHELSEA, ASTRONAUT, CHELSEA)]
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W] uint8
    texts = [_chat(proc, "video", text="What happens?"), _chat(proc, "image", text="And here, in this picture?")]
    inputs = proc(text=texts, images=[_img(CHELSEA, 224)], videos=[video], padding=True, return_tensors="pt",
                  do_sample_frames=False)
    ref = Reference(model)
    out = tmp_path_factory.mktemp("video") / "video.h5"
    try:
        with vlmscope.Recorder(model, out) as rec:
            rec.begin_call(batch_size=2, padding_side="left", rows=[
                {"prompt": "What happens?", "images": [], "video": "frames", "messages": False},
                {"prompt": "And here, in this picture?", "images": [str(CHELSEA)], "video": None, "messages": False}])
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        ref.remove()
    with vlmscope.open_trace(rec.path) as t:
        yield t, ref, model, proc, inputs


def test_video_grid_and_image_grid_are_told_apart(qwen25_video):
    t, _, _, _, inputs = qwen25_video
    vid = _probe(t, 0, "video_grid_thw", "model.visual", "grid_thw")
    img = _probe(t, 0, "image_grid_thw", "model.visual", "grid_thw")
    np.testing.assert_array_equal(t.probe_value(vid), inputs["video_grid_thw"].numpy())
    np.testing.assert_array_equal(t.probe_value(img), inputs["image_grid_thw"].numpy())
    assert t.probe_value(vid).tolist() == [[2, 4, 4]]


def test_second_per_grid_ts_is_stored_as_floats(qwen25_video):
    t, _, _, _, inputs = qwen25_video
    want = inputs["second_per_grid_ts"].numpy().astype(np.float64)
    for path in ("", "model"):
        row = _probe(t, 0, "second_per_grid_ts", path, "second_per_grid_ts")
        assert t.s(row["dtype"]) == "float32"
        got = t.probe_value(row)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    assert 0 < want[0] < 1  # 2 frames per grid at the default 24 fps: not an integer


def test_video_rows_and_rope_meta(qwen25_video):
    t, ref, model, proc, inputs = qwen25_video
    assert t.meta["rope"]["family"] == "qwen2_5_vl"
    assert t.meta["rope"]["tokens_per_second"] == model.config.vision_config.tokens_per_second
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
    info = t.probe_info(_probe(t, 0, "input_ids", "", "input_ids"))
    assert info["row_video_tokens"] == [8, 0] and info["row_image_tokens"] == [0, 64]
    start = int(np.flatnonzero(ids[0] == proc.video_token_id)[0])
    assert info["video_spans"] == [[0, start, start + 8]]
    spans = t.probe_info(_probe(t, 0, "position_ids", "model.language_model", "position_ids"))["row_spans"]
    assert spans == _expected_row_spans(ref.positions[0].numpy(), ids, mask, proc.image_token_id,
                                        proc.video_token_id)
    assert [s[0] for s in spans if s[1] == 0] == ["pad", "text", "video", "text"]
    for s in range(t.n_steps):
        np.testing.assert_array_equal(t.probe_value(_probe(t, s, "rope_deltas", "model", "state")),
                                      ref.rope_deltas[s].numpy())


def test_vision_features_in_scatter_order(qwen25_video):
    """Qwen2.5-VL's merger emits window-ordered rows; the tower's pooler_output is what gets scattered."""
    t, ref, *_ = qwen25_video
    rows = t.probes(0, kind="token_norms")
    paths = t.module_paths[rows["module"]]
    tower = rows[paths == "model.visual"]
    assert len(ref.pooler) == len(tower) == 2  # generate encodes the images, then the videos
    got = {}
    for r, want in zip(tower, ref.pooler):
        np.testing.assert_allclose(t.probe_value(r), torch.linalg.vector_norm(want.float(), dim=-1).numpy(), rtol=1e-6)
        grid = t.probes(0)[t.probes(0)["event"] == r["event"]]
        kinds = {t.s(k) for k in grid["kind"]} & {"image_grid_thw", "video_grid_thw"}
        assert len(kinds) == 1
        got[kinds.pop()] = t.probe_value(r)
    # the embeddings entering the language model hold exactly these norms at the placeholders
    emb = t.probe_value(_probe(t, 0, "token_norms", "model.language_model", "inputs_embeds"))
    ids = t.probe_value(_probe(t, 0, "input_ids", "", "input_ids"))
    np.testing.assert_allclose(emb[ids == t.meta["rope"]["video_token_id"]], got["video_grid_thw"], rtol=1e-6)
    np.testing.assert_allclose(emb[ids == t.meta["rope"]["image_token_id"]], got["image_grid_thw"], rtol=1e-6)
    # while the merger emits the image's rows in another order: 2x2 windows of 4x4 merged tokens
    merger = [t.probe_value(r) for r in rows[paths == "model.visual.merger"]]
    assert len(merger) == 2
    np.testing.assert_allclose(np.sort(merger[0]), np.sort(got["image_grid_thw"]), rtol=1e-6)
    assert not np.allclose(merger[0], got["image_grid_thw"], rtol=1e-6)


# --------------------------------------------------------------------------- a text model that embeds its ids


def test_token_norms_fall_back_to_the_first_layers_input(tmp_path):
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-mqwen")
    seen: list[torch.Tensor] = []
    layer0 = model.transformer.h[0] if hasattr(model, "transformer") else None
    assert layer0 is not None
    h = layer0.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        path = vlmscope.record(model, proc, image=str(ASTRONAUT), prompt="Hi", out=tmp_path / "mq.h5",
                               max_new_tokens=2)
    finally:
        h.remove()
    with vlmscope.open_trace(path) as t:
        assert t.meta["rope"]["family"] is None
        for s in range(t.n_steps):
            rows = t.probes(s, kind="token_norms")
            rows = rows[np.array([t.s(n) for n in rows["name"]]) == "inputs_embeds"]
            assert len(rows) == 1
            assert t.module_paths[rows[0]["module"]] == t.meta["text_model"]
            np.testing.assert_allclose(t.probe_value(rows[0]),
                                       torch.linalg.vector_norm(seen[s].float(), dim=-1).numpy(), rtol=1e-6)
