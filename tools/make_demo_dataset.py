"""Write a small generated dataset: coloured shapes on coloured backgrounds, with captions.

    python tools/make_demo_dataset.py OUT_DIR [--count N] [--seed S] [--videos]

Each image is a PNG of a few hundred bytes in one of several aspect ratios, next to a `.txt`
caption such as "a red circle on a blue background". With --videos, each item is instead a short
MP4 of a shape moving across the frame ("a red circle moving right on a blue background").
The same count and seed always give the same images (and the same video content), so it
serves as a fixture for tests and for trying a training run end to end.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
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


def _video_codec() -> str:
    """H.264 when PyAV's FFmpeg has an encoder for it (the usual training format), else MPEG-4."""
    import av

    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.FFmpegError, ValueError):
            continue
    raise RuntimeError("PyAV's FFmpeg can encode neither H.264 (libx264) nor MPEG-4")


def make_demo_videos(out_dir: Path | str, count: int = 4, seed: int = 0, frames: tuple[int, int] = (9, 17),
                     size: tuple[int, int] = (64, 64)) -> Path:
    """Write `count` MP4 clips of a shape moving across a background, with `.txt` captions.

    Frame counts cycle through `frames` (so a demo uses more than one frame bucket); `size` is
    (width, height). The shape moves one step per frame, so every frame differs from the next.
    Returns `out_dir`.
    """
    import av

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    width, height = size
    # H.264 with 4:2:0 chroma needs even sides.
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"size must be even and at least 16x16, got {width}x{height}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    codec = _video_codec()
    names = sorted(COLOURS)
    digits = max(3, len(str(count - 1)))
    for index in range(count):
        length = frames[index % len(frames)]
        background, foreground = rng.sample(names, 2)
        shape = rng.choice(SHAPES)
        side = min(width, height) // 3
        top = rng.randint(0, height - side)
        direction = rng.choice(("left", "right"))
        stem = f"clip_{index:0{digits}d}"
        with av.open(str(out_dir / f"{stem}.mp4"), mode="w") as container:
            stream = container.add_stream(codec, rate=24)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # Small keyframe interval: even these short clips have keyframes to seek to.
            stream.codec_context.gop_size = 4
            for f in range(length):
                # The shape crosses the whole width over the clip.
                progress = f / max(1, length - 1)
                left = round(progress * (width - side))
                if direction == "left":
                    left = width - side - left
                image = Image.new("RGB", (width, height), COLOURS[background])
                _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + side - 1, top + side - 1),
                            COLOURS[foreground])
                frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        caption = (f"{_article(foreground)} {foreground} {shape} moving {direction} on "
                   f"{_article(background)} {background} background")
        (out_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the images and captions to")
    parser.add_argument("--count", type=int, default=8, help="number of images (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--videos", action="store_true", help="write short MP4 clips instead of images")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.videos:
        out_dir = make_demo_videos(args.out_dir, args.count, args.seed)
        print(f"wrote {args.count} videos with captions to {out_dir}")
    else:
        out_dir = make_demo_dataset(args.out_dir, args.count, args.seed)
        print(f"wrote {args.count} images with captions to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
