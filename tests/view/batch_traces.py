"""Batched recordings of the real tiny models, for the viewer's row selector and the summary's
batch rows (``tests/view/test_tui_rows.py``, ``tests/cli/test_summary_rows.py``).

:func:`record_batch` records two ``generate`` calls of tiny-qwen2-vl under one ``Recorder``:
call 0 a left-padded batch of three rows (one image; text only; two images), call 1 one row
with one image. What each row must show is computed here from the processor's own inputs and
the model's own ``get_rope_index`` -- not from the trace.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT / "examples" / "astronaut.png"
CHELSEA = ROOT / "examples" / "chelsea.png"
NEW_TOKENS = 2
PROMPTS = ["Describe this image.", "Hi.", "Compare these two pictures, please."]


def _img(path: Path, size: tuple[int, int]):
    from PIL import Image

    return Image.open(path).convert("RGB").resize(size)


def _chat(proc, n_images: int, text: str) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    d = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return [(int(a), int(b)) for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]


def expected_rows(model, inputs) -> dict:
    """Per row of one prefill: padding, allowed keys, image spans, image tokens, and the [min, max]
    of each M-RoPE axis over the row's attended tokens, from the model's own get_rope_index."""
    import torch

    ids = inputs["input_ids"].numpy()
    mask = inputs["attention_mask"].numpy().astype(bool)
    image_id = int(model.config.image_token_id)
    with torch.no_grad():
        pos, deltas = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])
    pos = pos.numpy()[-3:]
    grids = inputs["image_grid_thw"].numpy().tolist()
    taken = 0                                   # the grids are consumed in batch order
    rows = []
    for b in range(ids.shape[0]):
        p = pos[:, b, mask[b]]
        spans = _runs(ids[b] == image_id)
        rows.append({
            "pad": int((~mask[b]).sum()), "keys": int(mask[b].sum()), "length": int(ids.shape[1]),
            "image_spans": spans, "image_tokens": int((ids[b] == image_id).sum()),
            "span_positions": [[[int(x.min()), int(x.max())] for x in pos[:, b, a:e]] for a, e in spans],
            "grids": grids[taken:taken + len(spans)],
            "positions": [[int(a), int(c)] for a, c in zip(p.min(-1), p.max(-1))],
            "pad_span": _runs(~mask[b]), "rope_delta": int(deltas.numpy()[b].ravel()[0]),
        })
        taken += len(spans)
    return {"rows": rows, "grids": grids}


def record_batch(out: Path) -> dict:
    """Record the two calls into ``out``; returns ``{"path", "calls": [expected_rows(call 0),
    expected_rows(call 1)]}``."""
    import torch
    import vlmscope
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-qwen2-vl", attn_implementation="eager")
    texts = [_chat(proc, 1, PROMPTS[0]), _chat(proc, 0, PROMPTS[1]), _chat(proc, 2, PROMPTS[2])]
    images = [_img(ASTRONAUT, (112, 112)), _img(CHELSEA, (168, 112)), _img(ASTRONAUT, (112, 112))]
    batch = proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    single = proc(text=[_chat(proc, 1, "What is it?")], images=[_img(CHELSEA, (112, 112))], padding=True,
                  padding_side="left", return_tensors="pt")
    with vlmscope.Recorder(model, out) as rec, torch.no_grad():
        model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        model.generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {"path": Path(rec.path), "calls": [expected_rows(model, batch), expected_rows(model, single)]}


def record_video(out: Path) -> dict:
    """tiny-qwen2.5-vl, one call of two left-padded rows: row 0 a 4-frame video (2 frames per
    temporal grid step), row 1 one image. Returns ``{"path", "video_grid", "second_per_grid_ts",
    "video_span"}`` from the processor's inputs."""
    import torch
    import vlmscope
    import vlmscope_models

    model, proc = vlmscope_models.load_embedded("tiny-qwen2.5-vl", attn_implementation="eager")
    frames = [np.asarray(_img(p, (56, 56))) for p in (ASTRONAUT, CHELSEA, ASTRONAUT, CHELSEA)]
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()    # [T, 3, H, W] uint8
    content = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    texts = [proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True),
             _chat(proc, 1, "And in this picture?")]
    inputs = proc(text=texts, images=[_img(CHELSEA, (112, 112))], videos=[video], padding=True,
                  padding_side="left", return_tensors="pt", do_sample_frames=False)
    with vlmscope.Recorder(model, out) as rec, torch.no_grad():
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    ids = inputs["input_ids"].numpy()
    return {"path": Path(rec.path), "video_grid": inputs["video_grid_thw"].numpy().tolist(),
            "second_per_grid_ts": inputs["second_per_grid_ts"].numpy().astype(np.float64).tolist(),
            "video_span": _runs(ids[0] == int(model.config.video_token_id))}
