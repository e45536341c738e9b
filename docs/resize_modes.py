"""The README's picture of the four resize modes (docs/images/resize-modes.png), drawn by the code
that converts images (data.images.resize): one wide generated photo, then each mode's record.

    .venv/bin/python docs/resize_modes.py [--out docs/images/resize-modes.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import images  # noqa: E402
from data.mini import render_image  # noqa: E402

OUT = Path(__file__).resolve().parent / "images" / "resize-modes.png"
SIZE = 112          # each mode's record, SIZE x SIZE (like --resize_height=SIZE --resize_width=SIZE)
SOURCE_HW = (333, 500)  # a wide photo, 3:2: every mode treats it differently
CLASS_INDEX = 2     # data.mini's triangle: a shape whose distortion shows
SEED = 3
GAP, CAPTION = 8, 18
PALETTE_COLOURS = 64


def picture() -> Image.Image:
    rng = np.random.default_rng(SEED)
    while True:  # draw until the generator picks the wide size
        photo, _ = render_image(CLASS_INDEX, rng)
        if photo.size == SOURCE_HW[::-1]:
            break
    rgb = np.asarray(photo)
    data = cv2.imencode(".png", rgb)[1].tobytes()  # the seed of fill's noise: the file's bytes
    shown_w = round(SOURCE_HW[1] * SIZE / SOURCE_HW[0])
    panels = [(f"original {SOURCE_HW[1]}x{SOURCE_HW[0]}",
               cv2.resize(rgb, (shown_w, SIZE), interpolation=cv2.INTER_AREA))]
    for mode in images.RESIZE_MODES:
        panels.append((mode, images.resize(rgb, SIZE, SIZE, mode,
                                           noise_seed=images.noise_seed(data))))
    width = sum(p.shape[1] for _, p in panels) + GAP * (len(panels) + 1)
    canvas = Image.new("RGB", (width, SIZE + CAPTION + 2 * GAP), "white")
    draw = ImageDraw.Draw(canvas)
    x = GAP
    for label, pixels in panels:
        canvas.paste(Image.fromarray(pixels), (x, GAP))
        draw.text((x, GAP + SIZE + 3), label, fill="black")
        x += pixels.shape[1] + GAP
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # A 64-colour palette: the photo's grain and the padding noise would make a full-colour PNG
    # ~150 KB; this keeps it near a third of that and looks the same at this size.
    picture().quantize(PALETTE_COLOURS, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
