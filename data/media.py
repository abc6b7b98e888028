"""Reading training media: image and video sizes, pixels in RGB, and fitting to a bucket shape.

Images are read with Pillow, videos with PyAV; an image is a one-frame video. Every failure to
read a file becomes a `MediaError` whose message names the file, so a dataset scan can report
it next to the other problems instead of stopping at the first bad file.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import NamedTuple, Optional

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from utils.errors import MediaError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv"})

# EXIF orientations 5-8 include a quarter turn, so the displayed image is the stored one on its side.
_QUARTER_TURN_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_DEPTH_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)

# What Pillow raises for files it cannot read: OSError covers unidentified and truncated files;
# the others come from damaged headers and chunk tables in some plugins.
_PIL_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the image extensions (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_video_file(path: Path) -> bool:
    """Whether `path` has one of the video extensions (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_media_file(path: Path) -> bool:
    """Whether `path` is an image or a video by its extension."""
    return is_image_file(path) or is_video_file(path)


def _open_error(path: Path, error: BaseException) -> MediaError:
    if isinstance(error, Image.DecompressionBombError):
        return MediaError(
            f"{path}: image is too large to open safely ({error}); downscale it, or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS if the file is trusted")
    text = str(error) or type(error).__name__
    return MediaError(f"{path}: cannot read image: {text}")


def _check_not_empty(path: Path, kind: str = "image") -> None:
    # Pillow's and FFmpeg's messages for an empty file ("cannot identify image file", "Invalid
    # data found when processing input") hide the simple cause.
    try:
        size = path.stat().st_size
    except OSError as e:
        raise MediaError(f"{path}: cannot read {kind}: {e.strerror or e}") from None
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
    return to_unit_range(fit_to_bucket_uint8(image, width, height))


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixel values as float32 in [-1, 1], the range the VAEs take."""
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


def fit_to_bucket_uint8(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """`fit_to_bucket` before the conversion to [-1, 1]: (3, height, width) uint8, a quarter of
    the bytes to pass between processes."""
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
    return torch.from_numpy(np.asarray(fitted, dtype=np.uint8).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# Videos

# What PyAV raises for files FFmpeg cannot open or decode (FFmpegError covers InvalidDataError,
# EOFError and the errno-based ones); OSError and ValueError come from the file system and from
# streams with unusable parameters.
_AV_READ_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


class VideoInfo(NamedTuple):
    """A video's displayed size (after its rotation metadata), frame count and frame rate."""

    width: int
    height: int
    frames: int
    fps: Optional[float]


def _video_error(path: Path, error: BaseException) -> MediaError:
    # FFmpeg errors end with the file name; strerror is the reason alone.
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return MediaError(f"{path}: cannot read video: {text}")


def _open_video(path: Path):
    """(container, its first video stream); the caller closes the container."""
    container = av.open(str(path), mode="r")
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: no video stream in this file")
    stream = container.streams.video[0]
    # Frame threads decode several frames at once; slice threads help single frames.
    stream.thread_type = "AUTO"
    return container, stream


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that show `frame` upright (its display matrix rotation).

    PyAV exposes only the rotation part of the matrix: the rare mirrored videos keep their flip.
    """
    return round((frame.rotation or 0) / 90) % 4


def _frame_rate(stream) -> Optional[Fraction]:
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else None


def video_info(path: Path | str) -> VideoInfo:
    """Displayed size, frame count and frame rate of the video at `path`.

    The first frame is always decoded (it carries the rotation and proves the file decodes). The
    frame count is the container's when it states one, else every frame is decoded and counted:
    WebM and Matroska seldom state it, and for short training clips decoding is cheap.
    """
    path = Path(path)
    _check_not_empty(path, "video")
    try:
        container, stream = _open_video(path)
        with container:
            frames = container.decode(stream)
            first = next(frames, None)
            if first is None:
                raise MediaError(f"{path}: video has no decodable frames")
            width, height = first.width, first.height
            turns = _quarter_turns(first)
            count = stream.frames if stream.frames > 0 else 1 + sum(1 for _ in frames)
            rate = _frame_rate(stream)
    except MediaError:
        raise
    except _AV_READ_ERRORS as e:
        raise _video_error(path, e) from None
    if turns % 2:
        width, height = height, width
    return VideoInfo(width, height, count, float(rate) if rate else None)


def _frame_index(frame: av.VideoFrame, stream, rate: Fraction) -> Optional[int]:
    if frame.pts is None:
        return None
    start = stream.start_time or 0
    return round((frame.pts - start) * stream.time_base * rate)


def _seek_clip(container, stream, frames: int, clip_start: int) -> Optional[list[np.ndarray]]:
    """The clip's frames by seeking to the keyframe before it, or None when seeking fails or the
    timestamps cannot be trusted to number the frames (no rate or pts, a seek past the start,
    uneven steps)."""
    rate = _frame_rate(stream)
    if rate is None or stream.time_base is None:
        return None
    target = round(Fraction(clip_start) / rate / stream.time_base) + (stream.start_time or 0)
    try:
        container.seek(target, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError:
        return None  # a container that cannot seek: decode from the start instead
    clip, previous = [], None
    for frame in container.decode(stream):
        index = _frame_index(frame, stream, rate)
        if index is None or (previous is None and index > clip_start):
            return None
        if previous is not None and index != previous + 1:
            return None  # variable frame rate or a gap: timestamps do not count frames
        previous = index
        if index >= clip_start:
            clip.append(_upright(frame))
            if len(clip) == frames:
                return clip
    return None  # ran out early: let counting from the start decide


def _decode_clip(path: Path, frames: int, clip_start: int) -> list[np.ndarray]:
    """RGB arrays (height, width, 3) of frames clip_start .. clip_start + frames - 1, upright."""
    if clip_start > 0:
        container, stream = _open_video(path)
        with container:
            clip = _seek_clip(container, stream, frames, clip_start)
        if clip is not None:
            return clip
    # Counting decoded frames from the start is always right: it serves clips at the start and
    # every clip whose timestamps were no help.
    container, stream = _open_video(path)
    clip, decoded = [], 0
    with container:
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index >= clip_start:
                clip.append(_upright(frame))
                if len(clip) == frames:
                    return clip
    raise MediaError(f"{path}: video has {decoded} frames, too few for a "
                     f"{frames}-frame clip from frame {clip_start}")


def _upright(frame: av.VideoFrame) -> np.ndarray:
    pixels = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    # np.rot90 turns counter-clockwise, as the display matrix rotation is measured.
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels


def load_video_clip(path: Path | str, width: int, height: int, frames: int, clip_start: int = 0) -> torch.Tensor:
    """`frames` consecutive frames from `clip_start`, each fitted to width x height like an image,
    as (3, frames, height, width) float32 in [-1, 1]. Only the needed frames are decoded: the
    reader seeks to the keyframe before the clip when the timestamps allow it."""
    return to_unit_range(load_video_clip_uint8(path, width, height, frames, clip_start))


def load_video_clip_uint8(path: Path | str, width: int, height: int, frames: int, clip_start: int = 0) -> torch.Tensor:
    """`load_video_clip` before the conversion to [-1, 1]: uint8."""
    path = Path(path)
    if frames < 1 or clip_start < 0:
        raise ValueError(f"need frames >= 1 and clip_start >= 0, got {frames} and {clip_start}")
    _check_not_empty(path, "video")
    try:
        arrays = _decode_clip(path, frames, clip_start)
    except MediaError:
        raise
    except _AV_READ_ERRORS as e:
        raise _video_error(path, e) from None
    return torch.stack([fit_to_bucket_uint8(Image.fromarray(a), width, height) for a in arrays], dim=1)


def load_sample_pixels(path: Path | str, width: int, height: int, frames: int = 1,
                       clip_start: int = 0) -> torch.Tensor:
    """The media file (or one clip of a video) fitted to a bucket as (3, frames, height, width)
    in [-1, 1].

    Images are one-frame clips, so every model's encoder sees one layout.
    """
    return to_unit_range(load_sample_pixels_uint8(path, width, height, frames, clip_start))


def load_sample_pixels_uint8(path: Path | str, width: int, height: int, frames: int = 1,
                             clip_start: int = 0) -> torch.Tensor:
    """`load_sample_pixels` before the conversion to [-1, 1]: (3, frames, height, width) uint8."""
    if is_video_file(path):
        return load_video_clip_uint8(path, width, height, frames, clip_start)
    if frames != 1 or clip_start != 0:
        raise ValueError(f"{path}: an image has one frame; asked for {frames} from frame {clip_start}")
    return fit_to_bucket_uint8(load_image(path), width, height).unsqueeze(1)


def load_mask(path: Path | str, width: int, height: int, frames: int = 1, clip_start: int = 0) -> torch.Tensor:
    """A loss mask fitted to a bucket exactly as its media file is (scaled to cover, center
    cropped), as float32 weights in [0, 1]: white 1, black 0, gray between (the mean of the R, G
    and B values; transparency composited on white). A mask image is (1, height, width), one
    weight map for every frame; a mask video (a video's masks per frame) gives the same clip as
    its video, (1, frames, height, width)."""
    if is_video_file(path):
        rgb = load_video_clip(path, width, height, frames, clip_start)
    else:
        rgb = fit_to_bucket(load_image(path), width, height)
    # Lanczos overshoots at hard edges: clamp back to [0, 1].
    return rgb.mean(dim=0, keepdim=True).add_(1.0).div_(2.0).clamp_(0.0, 1.0)


def write_video(path: Path | str, frames: np.ndarray, fps: float) -> None:
    """Write RGB frames (frames, height, width, 3; uint8) as an MP4: H.264 when PyAV's FFmpeg
    has an encoder for it, else MPEG-4. Even sizes only (yuv420p)."""
    codec = None
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            codec = name
            break
        except (av.FFmpegError, ValueError):
            continue
    if codec is None:
        raise RuntimeError("PyAV's FFmpeg can encode neither H.264 (libx264) nor MPEG-4")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
