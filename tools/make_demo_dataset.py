"""Write a small generated image dataset: coloured shapes on coloured backgrounds, with captions.

    python tools/make_demo_dataset.py OUT_DIR [--count N] [--seed S]

Each image is a PNG of a few hundred bytes in one of several aspect ratios, next to a `.txt`
caption such as "a red circle on a blue background". The same count and seed always give the
same files, so it serves as a fixture for tests and for trying a training run end to end.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Square, landscape and portrait, so a demo run uses more than one aspect-ratio bucket.
SIZES = ((64, 64), (96, 64), (64, 96))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)


def make_demo_dataset(out_dir: Path | str, count: int = 8, seed: int = 0) -> Path:
    """Write `count` PNG images with same-named `.txt` captions to `out_dir`; return `out_dir`."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = sorted(COLOURS)
    digits = max(3, len(str(count - 1)))
    for index in range(count):
        # Cycling the sizes (rather than drawing them) puts every aspect ratio in even small sets.
        width, height = SIZES[index % len(SIZES)]
        background, foreground = rng.sample(names, 2)
        shape = rng.choice(SHAPES)
        side = rng.randint(min(width, height) // 3, min(width, height) * 3 // 4)
        left = rng.randint(0, width - side)
        top = rng.randint(0, height - side)

        image = Image.new("RGB", (width, height), COLOURS[background])
        _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + side - 1, top + side - 1),
                    COLOURS[foreground])
        stem = f"shape_{index:0{digits}d}"
        image.save(out_dir / f"{stem}.png", optimize=True)
        caption = f"{_article(foreground)} {foreground} {shape} on {_article(background)} {background} background"
        (out_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the images and captions to")
    parser.add_argument("--count", type=int, default=8, help="number of images (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    out_dir = make_demo_dataset(args.out_dir, args.count, args.seed)
    print(f"wrote {args.count} images with captions to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
