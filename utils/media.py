"""Reading training images: size from the header, pixels in RGB, and fitting to a bucket shape.

Every failure to read a file becomes a `MediaError` whose message names the file, so a dataset
scan can report it next to the other problems instead of stopping at the first bad image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})

# EXIF orientations 5-8 include a quarter turn, so the displayed image is the stored one on its side.
_QUARTER_TURN_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_DEPTH_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)

# What Pillow raises for files it cannot read: OSError covers unidentified and truncated files;
# the others come from damaged headers and chunk tables in some plugins.
_PIL_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class MediaError(ValueError):
    """A media file that cannot be read; the message names the file."""


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the image extensions (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open_error(path: Path, error: BaseException) -> MediaError:
    if isinstance(error, Image.DecompressionBombError):
        return MediaError(
            f"{path}: image is too large to open safely ({error}); downscale it, or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS if the file is trusted")
    text = str(error) or type(error).__name__
    return MediaError(f"{path}: cannot read image: {text}")


def _check_not_empty(path: Path) -> None:
    # Pillow's message for an empty file ("cannot identify image file") hides the simple cause.
    try:
        size = path.stat().st_size
    except OSError as e:
        raise MediaError(f"{path}: cannot read image: {e.strerror or e}") from None
    if size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")


def _exif_orientation(image: Image.Image) -> int:
    # PngImageFile.getexif decodes all pixel data to look for an eXIf chunk after it; the base
    # implementation only uses the chunks read with the header, which keeps this header-only.
    exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
    orientation = exif.get(_EXIF_ORIENTATION_TAG, 1)
    return orientation if isinstance(orientation, int) else 1


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) as displayed, after EXIF orientation, reading only the file header."""
    path = Path(path)
    _check_not_empty(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = _exif_orientation(image)
    except (Image.DecompressionBombError, *_PIL_READ_ERRORS) as e:
        raise _open_error(path, e) from None
    if orientation in _QUARTER_TURN_ORIENTATIONS:
        return height, width
    return width, height


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of `image`, with any transparency composited onto white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_BIT_DEPTH_GRAY_MODES:
        # Pillow's convert to 8 bits clips 16-bit values instead of scaling them. Mode "I" does
        # not say its bit depth, so values above 255 are taken to mean 16 bits.
        values = np.asarray(image, dtype=np.float64)
        is_16_bit = image.mode != "I" or values.max(initial=0) > 255
        peak = 65535.0 if is_16_bit else 255.0
        gray = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path | str) -> Image.Image:
    """The image at `path` in RGB, turned upright by its EXIF orientation, alpha composited on white."""
    path = Path(path)
    _check_not_empty(path)
    try:
        with Image.open(path) as image:
            # load() inside the try: truncation and bad pixel data only show up when decoding.
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
    except (Image.DecompressionBombError, *_PIL_READ_ERRORS) as e:
        raise _open_error(path, e) from None


def fit_to_bucket(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Scale `image` to cover width x height keeping its aspect ratio, center crop, as a
    (3, height, width) float32 tensor in [-1, 1]."""
    if width < 1 or height < 1:
        raise ValueError(f"bucket size must be positive, got {width}x{height}")
    image = _to_rgb(image)
    src_w, src_h = image.size
    # The centered source region with the target's aspect ratio; resizing just that region is the
    # same as resize-to-cover then crop, in one resampling pass and without rounding the scale.
    target_aspect = width / height
    if src_w / src_h > target_aspect:
        box_w, box_h = src_h * target_aspect, float(src_h)
    else:
        box_w, box_h = float(src_w), src_w / target_aspect
    left, top = (src_w - box_w) / 2, (src_h - box_h) / 2
    box = (left, top, left + box_w, top + box_h)
    # reducing_gap first shrinks by whole factors (cheap) for large downscales; the final pass
    # is still Lanczos over at least 3x the target, so quality is unchanged.
    fitted = image.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)


def load_sample_pixels(path: Path | str, width: int, height: int) -> torch.Tensor:
    """The media file fitted to a bucket as (3, frames, height, width) in [-1, 1].

    Images are one-frame clips, so every model's encoder sees one layout.
    """
    return fit_to_bucket(load_image(path), width, height).unsqueeze(1)
