"""Build examples/astronaut-pan.mp4, the small example video, from the two example images.

    .venv/bin/python scripts/make_example_video.py            # writes examples/astronaut-pan.mp4
    .venv/bin/python scripts/make_example_video.py -o x.mp4   # elsewhere

16 frames at 4 fps (4 seconds), 160x120, H.264 (yuv420p) in MP4, through PyAV: a zoom-and-pan
over astronaut.png for the first 8 frames, then over chelsea.png. Deterministic: the same PyAV
(its bundled FFmpeg/x264) writes the same bytes (one encoder thread, bit-exact muxing, no
creation time in the file; x264 still writes its version in the stream).
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WIDTH, HEIGHT, FPS, FRAMES = 160, 120, 4, 16


def frames() -> list[np.ndarray]:
    """FRAMES RGB frames [HEIGHT, WIDTH, 3]: a crop window that zooms in and pans, per image."""
    out = []
    per = FRAMES // 2
    for name in ("astronaut.png", "chelsea.png"):
        with Image.open(EXAMPLES / name) as im:
            img = im.convert("RGB")
        w, h = img.size
        for k in range(per):
            f = k / (per - 1)
            # a 4:3 window from 70% of the image's height down to 45%, moving left to right
            ch = h * (0.7 - 0.25 * f)
            cw = ch * WIDTH / HEIGHT
            x0 = (w - cw) * f
            y0 = (h - ch) * 0.3
            box = (round(x0), round(y0), round(x0 + cw), round(y0 + ch))
            out.append(np.asarray(img.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC, box=box)))
    return out


def write(path: Path) -> int:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    # bitexact: no encoder version strings, no creation time in the MP4 header
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as box:
        stream = box.add_stream("libx264", rate=FPS, options={"crf": "23", "preset": "medium",
                                                             "threads": "1", "x264-params": "threads=1"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = Fraction(1, FPS)
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for i, arr in enumerate(frames()):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=EXAMPLES / "astronaut-pan.mp4")
    args = ap.parse_args()
    size = write(args.out)
    print(f"wrote {args.out} ({size} bytes, {FRAMES} frames, {WIDTH}x{HEIGHT} at {FPS} fps)")


if __name__ == "__main__":
    main()
