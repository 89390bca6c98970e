"""Recording overhead, measured side by side in one run.

Builds a Qwen2.5-VL-shaped model (real transformers class, random weights): text
hidden 1024, 8 decoder layers, a 4-layer vision tower, a 448x448 image (256 merged
image tokens) and ~64 text tokens. Alternating rounds time:

  * untraced ``forward`` (the prefill) and ``generate`` (16 new tokens);
  * the same under vlmscope's full default recording (modules + reshapes + probes + stats +
    value sketches), and without the value sketches (their cost: the ratio of the two);
  * the same under transformers' ``model_addition_debugger_context`` (the reference).

It prints medians and the ratios to untraced. Run:

    python bench/overhead.py               # 448x448, 5 rounds
    python bench/overhead.py --image-size 224 --rounds 7
    python bench/overhead.py --new-tokens 64 --durability   # + the crash-safe journal's cost per step

``--durability`` also times ``generate`` recorded with ``fsync=True`` (every step forced to the
disk) and reports the time the trace writer spends per step committing the journal (records
and a flush to the OS: what makes a killed recording keep its finished steps) and, once per
run, converting the journal into the final HDF5 file.
"""

from __future__ import annotations

import argparse
import statistics
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOKENS = 64


def build(image_size: int, device: str, hidden: int = 1024, attn: str = "sdpa"):
    from PIL import Image
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmscope_models.qwen_vl import build_qwen2_5_vl

    _, processor = build_qwen2_5_vl(max_pixels=image_size * image_size, min_pixels=image_size * image_size)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=8,
                         num_attention_heads=max(hidden // 64, 2),
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [8, 12, 12]}, tie_word_embeddings=True,
                         eos_token_id=151645, pad_token_id=151643),
        vision_config=dict(depth=4, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                           num_heads=max(hidden // 64, 2), out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[3]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().to(device)
    model.generation_config.eos_token_id = None  # always generate the full 16 tokens
    model.generation_config.pad_token_id = 151643
    img = Image.open(ROOT / "examples" / "astronaut.png").convert("RGB").resize((image_size, image_size))
    # grow the prompt one word at a time until the chat has TEXT_TOKENS text tokens
    words = ("Describe the picture in detail, naming every object you can see and where it is, "
             "its colour, its size, and what it tells about the scene. ") * 4
    vocab = words.split()
    for n in range(1, len(vocab) + 1):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " ".join(vocab[:n])}]}],
            tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[img], return_tensors="pt")
        if int((inputs["input_ids"][0] != 151655).sum()) >= TEXT_TOKENS:
            break
    return model, {k: v.to(device) for k, v in inputs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=1024,
                    help="hidden size of the text and vision towers (small: per-op overhead dominates)")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--durability", action="store_true",
                    help="time the journal: commit per step, the final conversion, and fsync per step")
    args = ap.parse_args()

    model, inputs = build(args.image_size, args.device, args.hidden, args.attn)
    ids = inputs["input_ids"][0]
    n_img = int((ids == 151655).sum())
    print(f"model: hidden {args.hidden}, {args.attn} attention, 8 text layers, 4 vision layers; {ids.numel()} tokens "
          f"({n_img} image, {ids.numel() - n_img} text); image {args.image_size}x{args.image_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    tmp = Path(tempfile.mkdtemp(prefix="vlmscope-bench-"))
    try:
        _run(args, model, inputs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # every traced run left a trace or an HF dump here


def _run(args, model, inputs, tmp: Path) -> None:
    from transformers import model_addition_debugger_context

    from vlmscope import Recorder

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def forward():
        with torch.inference_mode():
            model(**inputs)

    def generate():
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)

    counter = iter(range(10**6))

    def under_vlmscope(fn, **kw):
        def run():
            with Recorder(model, tmp / f"r{next(counter)}.h5", **kw):
                fn()
        return run

    writer_time = _time_writer() if args.durability else None

    def under_hf(fn):
        def run():
            d = tmp / f"hf{next(counter)}"
            d.mkdir()
            with model_addition_debugger_context(model, debug_path=str(d)):
                fn()
        return run

    cases = {
        "prefill untraced": forward,
        "prefill vlmscope": under_vlmscope(forward),
        "prefill no-sketches": under_vlmscope(forward, sketches=False),
        "prefill hf-debugger": under_hf(forward),
    }
    if not args.skip_generate:
        cases.update({
            "generate untraced": generate,
            "generate vlmscope": under_vlmscope(generate),
            "generate no-sketches": under_vlmscope(generate, sketches=False),
            "generate hf-debugger": under_hf(generate),
        })
        if args.durability:
            cases["generate vlmscope+fsync"] = under_vlmscope(generate, fsync=True)
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, fn in cases.items():
            if writer_time is not None:
                writer_time["case"] = name
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'case':24s} {'median s':>9s} {'min s':>8s} {'ratio':>7s}   ({args.rounds} alternating rounds)")
    for name in cases:
        base = med[name.split()[0] + " untraced"]
        print(f"{name:24s} {med[name]:9.3f} {min(times[name]):8.3f} {med[name] / base:6.2f}x")
    for kind in ("prefill", "generate"):
        if f"{kind} untraced" in med:
            v = med[f"{kind} vlmscope"] / med[f"{kind} untraced"]
            h = med[f"{kind} hf-debugger"] / med[f"{kind} untraced"]
            print(f"{kind}: vlmscope {v:.2f}x untraced, hf-debugger {h:.2f}x untraced, "
                  f"vlmscope/hf-debugger {med[f'{kind} vlmscope'] / med[f'{kind} hf-debugger']:.2f}")
            # the value sketches' own cost: the default recording against one without them,
            # per round (the two run back to back), then the median of those ratios
            per_round = [a / b for a, b in zip(times[f"{kind} vlmscope"], times[f"{kind} no-sketches"])]
            print(f"{kind}: value sketches add {100 * (statistics.median(per_round) - 1):+.1f}% to recording "
                  f"(vlmscope / no-sketches, median of per-round ratios {statistics.median(per_round):.3f})")
    if writer_time is not None and "generate vlmscope" in med:
        steps = args.new_tokens
        for name in ("generate vlmscope", "generate vlmscope+fsync"):
            commit = statistics.median(writer_time["commit"][name]) * 1e3
            conv = statistics.median(writer_time["close"][name]) * 1e3
            print(f"{name}: journal commit {commit / steps:.3f} ms per step (median over runs of "
                  f"{steps} steps), final conversion {conv:.1f} ms per run")
        per_step = (med["generate vlmscope+fsync"] - med["generate vlmscope"]) / steps * 1e3
        print(f"fsync per step adds {per_step:.2f} ms ({med['generate vlmscope+fsync'] / med['generate vlmscope']:.2f}x "
              f"the default recording)")


def _time_writer() -> dict:
    """Accumulate the time TraceWriter spends in ``end_step`` (the per-step commit) and
    ``close`` (the conversion), per benchmark case and run."""
    from vlmscope.trace import TraceWriter

    acc: dict = {"case": "", "commit": {}, "close": {}}
    end_step, close, init = TraceWriter.end_step, TraceWriter.close, TraceWriter.__init__

    def timed_init(self, *a, **k):
        init(self, *a, **k)
        acc["commit"].setdefault(acc["case"], []).append(0.0)

    def timed_end_step(self):
        t0 = time.perf_counter()
        end_step(self)
        acc["commit"][acc["case"]][-1] += time.perf_counter() - t0

    def timed_close(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return close(self, *a, **k)
        finally:
            acc["close"].setdefault(acc["case"], []).append(time.perf_counter() - t0)

    TraceWriter.__init__, TraceWriter.end_step, TraceWriter.close = timed_init, timed_end_step, timed_close
    return acc


if __name__ == "__main__":
    main()
