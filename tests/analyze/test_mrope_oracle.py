"""The numpy M-RoPE oracle (vlmscope.analyze.mrope) against transformers' own get_rope_index."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vlmscope.analyze import mrope
from vlmscope.analyze.mrope import decode_positions, rope_index

IMG, VID, PAD = 151655, 151656, 151643
CASES_PER_FAMILY = 600


# --------------------------------------------------------------------------- hand-written cases


def test_text_only_row_counts_up_on_all_axes():
    pos, delta = rope_index("qwen2_vl", [[5, 6, 7, 8, 9]], image_token_id=IMG, video_token_id=VID)
    assert pos.shape == (3, 1, 5) and pos.dtype == np.int64
    assert (pos == np.arange(5)).all()
    assert delta.tolist() == [0]


@pytest.mark.parametrize("family", mrope.FAMILIES)
def test_one_image_after_three_text_tokens(family):
    # grid (2, 4, 4) with merge 2 -> 2 * 2 * 2 = 8 tokens; then 2 text tokens
    ids = [1, 2, 3] + [IMG] * 8 + [4, 5]
    pos, delta = rope_index(family, ids, image_token_id=IMG, video_token_id=VID,
                            image_grid_thw=[[2, 4, 4]], spatial_merge_size=2)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 6]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 4, 4, 3, 3, 4, 4, 5, 6]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 3, 4, 3, 4, 3, 4, 5, 6]
    assert delta.tolist() == [7 - 13]


def test_padding_is_position_zero_and_not_counted():
    ids = [[PAD, PAD, 1, IMG, IMG, IMG, IMG, 2], [1, 2, 3, 4, 5, 6, 7, 8]]
    mask = [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]
    pos, delta = rope_index("qwen2_vl", ids, attention_mask=mask, image_token_id=IMG, video_token_id=VID,
                            image_grid_thw=[[1, 4, 4]])
    assert pos[:, 0, :2].tolist() == [[0, 0]] * 3
    assert pos[1, 0, 2:].tolist() == [0, 1, 1, 2, 2, 3]
    assert delta.tolist() == [4 - 6, 0]


def test_qwen2_5_video_temporal_interval_and_qwen3_frames():
    # one video (t=3, h=w=2, merge 2): one token per frame
    ids = [1, VID, VID, VID, 2]
    q25, _ = rope_index("qwen2.5-vl", ids, image_token_id=IMG, video_token_id=VID, video_grid_thw=[[3, 2, 2]],
                        tokens_per_second=2, second_per_grid_ts=np.array([1.5], dtype=np.float32))
    assert q25[0, 0].tolist() == [0, 1, 4, 7, 2]  # 1 + floor(i * 3); next start = 1 + max(1, 1)
    # float32 arithmetic as torch: float32(0.7) * 10 rounds to 7.0 (float64 would give 6.99999988 -> 6)
    q25, _ = rope_index("qwen2_5_vl", [VID] * 11, image_token_id=IMG, video_token_id=VID,
                        video_grid_thw=[[11, 2, 2]], tokens_per_second=1,
                        second_per_grid_ts=np.array([0.7], dtype=np.float32))
    assert q25[0, 0, 10] == 7
    q2, d2 = rope_index("qwen2_vl", ids, image_token_id=IMG, video_token_id=VID, video_grid_thw=[[3, 2, 2]])
    assert q2[0, 0].tolist() == [0, 1, 2, 3, 2] and d2.tolist() == [4 - 5]
    # Qwen3-VL: the same video as three one-frame runs separated by timestamp text
    ids3 = [1, VID, 9, VID, 9, VID, 2]
    q3, _ = rope_index("qwen3_vl", ids3, image_token_id=IMG, video_token_id=VID, video_grid_thw=[[3, 2, 2]])
    assert (q3[:, 0] == np.arange(7)).all()


def test_mismatches_raise():
    with pytest.raises(ValueError, match="makes 4"):
        rope_index("qwen2_vl", [1, IMG, IMG, 2], image_token_id=IMG, video_token_id=VID, image_grid_thw=[[1, 4, 4]])
    with pytest.raises(ValueError, match="left over"):
        rope_index("qwen2_vl", [1, 2], image_token_id=IMG, video_token_id=VID, image_grid_thw=[[1, 4, 4]])
    with pytest.raises(ValueError, match="more image runs"):
        rope_index("qwen2_vl", [1, IMG, 2], image_token_id=IMG, video_token_id=VID)
    with pytest.raises(ValueError, match="tokens_per_second"):
        rope_index("qwen2_5_vl", [1, VID, 2], image_token_id=IMG, video_token_id=VID, video_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="unknown M-RoPE family"):
        rope_index("llava", [1, 2], image_token_id=IMG, video_token_id=VID)


def test_decode_positions():
    d = np.array([-3, 2])
    assert decode_positions(d, [7, 8]).tolist() == [[[4, 5], [9, 10]]] * 3
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert decode_positions(d, [4], attention_mask=mask)[:, :, 0].tolist() == [[-1, 6]] * 3


# --------------------------------------------------------------------------- against transformers

try:
    import torch
    import transformers
except ImportError:  # the hand-written cases above still run
    torch = transformers = None



def _model(family: str):
    """A real ``<family>Model`` built on the meta device from a one-layer config (no weights)."""
    txt = dict(vocab_size=151936, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    if family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(text_config=txt,
                                         vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2))
        cls = transformers.Qwen2VLModel
    elif family == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=txt, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                                out_hidden_size=16, fullatt_block_indexes=[0]))
        cls = transformers.Qwen2_5_VLModel
    else:
        cfg = transformers.Qwen3VLConfig(
            text_config=dict(txt, head_dim=8),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                               deepstack_visual_indexes=[], num_position_embeddings=16))
        cls = transformers.Qwen3VLModel
    with torch.device("meta"):
        return cls(cfg)


@pytest.fixture(scope="module")
def models():
    if transformers is None:
        pytest.skip("needs torch and transformers")
    return {fam: _model(fam) for fam in mrope.FAMILIES}


def _layout(rng: random.Random, family: str, merge: int):
    """One random batch: ids, token types, mask, image/video grids, seconds per grid."""
    rows, images, videos, seconds = [], [], [], []

    def text(n):
        return [rng.randrange(10, 1000) for _ in range(n)]

    for _ in range(rng.randint(1, 3)):
        row = text(rng.randint(0, 4))
        n_items = 0 if rng.random() < 0.2 else rng.randint(1, 4)
        for i in range(n_items):
            if i or row:
                row += text(rng.randint(1, 3))  # <|vision_start|> etc: runs never touch
            h, w = rng.randint(1, 4) * merge, rng.randint(1, 4) * merge
            if rng.random() < 0.5:
                t = rng.choice([1, 1, 2])
                images.append([t, h, w])
                row += [IMG] * (t * (h // merge) * (w // merge))
            else:
                t = rng.randint(1, 6)
                videos.append([t, h, w])
                # 0.7 and 0.9 sit just below in float32: float32 and float64 products truncate differently
                seconds.append(rng.choice([0.5, 1.0, 2 / 3, 0.7, 0.9, 1.5, 2.0, rng.uniform(0.1, 3.0)]))
                if family == "qwen3_vl":  # one run per frame, timestamps in between
                    for f in range(t):
                        if f:
                            row += text(rng.randint(1, 4))
                        row += [VID] * ((h // merge) * (w // merge))
                else:
                    row += [VID] * (t * (h // merge) * (w // merge))
        row += text(rng.randint(0, 3))
        if not row:
            row = text(1)
        rows.append(row)
    width = max(map(len, rows))
    left = rng.random() < 0.5
    ids = np.full((len(rows), width), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, sl] = row
        mask[b, sl] = 1
    types = mrope.token_types(ids, image_token_id=IMG, video_token_id=VID)
    return ids, types, mask, images, videos, seconds


def _both(model, family, rng, ids, types, mask, images, videos, seconds, merge):
    use_mask = not mask.all() or rng.random() < 0.5
    tps = rng.choice([1, 2, 4, 25])
    model.config.vision_config.spatial_merge_size = merge
    if family == "qwen2_5_vl":
        model.config.vision_config.tokens_per_second = tps
    with_seconds = family == "qwen2_5_vl" and videos and rng.random() < 0.7
    kwargs = {}
    if with_seconds:
        kwargs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    img_t = torch.tensor(images, dtype=torch.long) if images else None
    vid_t = torch.tensor(videos, dtype=torch.long) if videos else None
    ref_pos, ref_delta = model.get_rope_index(
        torch.from_numpy(ids), torch.from_numpy(types).int(), image_grid_thw=img_t, video_grid_thw=vid_t,
        attention_mask=torch.from_numpy(mask) if use_mask else None, **kwargs)
    # the oracle reads the token ids half of the time, mm_token_type_ids the other half
    by_types = rng.random() < 0.5
    pos, delta = rope_index(
        family, ids,
        mm_token_type_ids=types if by_types else None,
        image_token_id=None if by_types else IMG, video_token_id=None if by_types else VID,
        image_grid_thw=np.array(images, dtype=np.int64) if images else None,
        video_grid_thw=np.array(videos, dtype=np.int64) if videos else None,
        attention_mask=mask if use_mask else None, spatial_merge_size=merge, tokens_per_second=tps,
        second_per_grid_ts=np.array(seconds, dtype=np.float32) if with_seconds else None)
    return (ref_pos.numpy(), ref_delta.numpy().reshape(-1)), (pos, delta)


@pytest.mark.parametrize("family", mrope.FAMILIES)
def test_oracle_matches_transformers_on_random_layouts(models, family):
    rng = random.Random(f"mrope-{family}")
    model = models[family]
    merge0 = model.config.vision_config.spatial_merge_size
    stats = {"rows": 0, "images": 0, "videos": 0, "padded": 0, "text_only_rows": 0, "temporal_outruns": 0}
    try:
        for case in range(CASES_PER_FAMILY):
            merge = rng.choice([1, 2, 2, 2, 3])
            ids, types, mask, images, videos, seconds = _layout(rng, family, merge)
            (ref_pos, ref_delta), (pos, delta) = _both(model, family, rng, ids, types, mask, images, videos,
                                                       seconds, merge)
            assert pos.shape == ref_pos.shape, case
            np.testing.assert_array_equal(pos, ref_pos, err_msg=f"{family} case {case}")
            np.testing.assert_array_equal(delta, ref_delta, err_msg=f"{family} case {case} deltas")
            stats["rows"] += ids.shape[0]
            stats["images"] += len(images)
            stats["videos"] += len(videos)
            stats["padded"] += int(not mask.all())
            stats["text_only_rows"] += int((types == 0).all(axis=1).sum())
            stats["temporal_outruns"] += sum(t > max(h, w) // merge for t, h, w in videos)
    finally:
        model.config.vision_config.spatial_merge_size = merge0
    # the generator covered what it is meant to cover
    assert stats["images"] > 300 and stats["videos"] > 300, stats
    assert stats["padded"] > 100 and stats["text_only_rows"] > 50, stats
    if family != "qwen3_vl":
        assert stats["temporal_outruns"] > 20, stats


class _Cache:
    def __init__(self, n):
        self.n = n

    def get_seq_length(self):
        return self.n


@pytest.mark.parametrize("family", mrope.FAMILIES)
def test_decode_positions_match_transformers(models, family):
    model = models[family]
    rng = random.Random(f"decode-{family}")
    for _ in range(20):
        batch, cache_len, new = rng.randint(1, 3), rng.randint(1, 50), rng.randint(1, 3)
        deltas = torch.tensor([[rng.randint(-40, 5)] for _ in range(batch)])
        model.rope_deltas = deltas
        embeds = torch.zeros(batch, new, 16)
        kwargs = dict(input_ids=None, inputs_embeds=embeds, attention_mask=None, cache=_Cache(cache_len),
                      image_grid_thw=None, video_grid_thw=None)
        ref = model.compute_3d_position_ids(**kwargs)
        got = decode_positions(deltas.numpy(), np.arange(cache_len, cache_len + new))
        np.testing.assert_array_equal(got, ref.numpy())
    model.rope_deltas = None


def test_decode_with_mask_matches_generate_rule(models):
    """generate() places the k-th new token at the prompt's last position + k (left padding)."""
    model = models["qwen2_vl"]
    ids = np.array([[PAD, PAD, 1, IMG, IMG, IMG, IMG, 2, 3], [1, 2, IMG, IMG, IMG, IMG, 4, 5, 6]])
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    types = mrope.token_types(ids, image_token_id=IMG, video_token_id=VID)
    grids = torch.tensor([[1, 4, 4], [1, 4, 4]])
    ref_pos, ref_delta = model.get_rope_index(torch.from_numpy(ids), torch.from_numpy(types).int(),
                                              image_grid_thw=grids, attention_mask=torch.from_numpy(mask))
    full = np.concatenate([mask, np.ones((2, 3), dtype=np.int64)], axis=1)
    got = decode_positions(ref_delta.numpy(), [9, 10, 11], attention_mask=full)
    expected = ref_pos.numpy()[:, :, -1:] + np.arange(1, 4)
    np.testing.assert_array_equal(got, expected)
