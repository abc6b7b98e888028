"""Finding the training items of a dataset: media files with their captions and sizes.

A scan never stops at a bad file. Each file that cannot be used (no caption, caption not UTF-8,
image or video unreadable, a broken or looping symbolic link) is collected as a problem with a
short reason, so one run lists them all. A missing caption is a problem, an empty caption or an
error, as the directory's `missing_caption` says. In a directory with a `mask_path`, each media
file needs a mask there (the image with the file's name stem, any image extension, of the same
aspect ratio; for a video, also a video of the same name stem and frame count: a mask per frame);
a missing, unreadable or misshapen one is a problem too. Videos are read for their size and frame count
here; which clips they give is decided by the buckets.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from config.dataset_config import Dataset, ResolvedDirectory
from data.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, image_size, is_media_file, is_video_file, video_info
from utils.errors import MediaError

CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class Item:
    """One training item: a media file, its caption, its displayed size and its frame count."""

    path: Path
    caption: str
    width: int
    height: int
    directory_index: int
    frames: int = 1  # images have one
    # The loss mask (data/media.load_mask: an image, or a video of masks per frame), or None: every
    # element weighs 1.
    mask: Path | None = None

    @property
    def is_video(self) -> bool:
        """Whether the file is a video (by extension), even one of a single frame."""
        return is_video_file(self.path)

    @property
    def aspect(self) -> float:
        """Width over height."""
        return self.width / self.height


@dataclass
class ScanResult:
    """Items that can be trained on, and (path, reason) for everything that cannot."""

    items: list[Item] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    # Files without a caption in a directory with missing_caption = "error": they stop the run.
    caption_errors: list[tuple[Path, str]] = field(default_factory=list)
    # Items without a caption file that train with an empty caption (missing_caption = "empty").
    empty_captions: list[Path] = field(default_factory=list)

    def extend(self, other: "ScanResult") -> None:
        """Append another result's items and problems to this one."""
        self.items.extend(other.items)
        self.problems.extend(other.problems)
        self.caption_errors.extend(other.caption_errors)
        self.empty_captions.extend(other.empty_captions)


class _NoCaption(ValueError):
    pass


def _read_caption(caption_path: Path) -> str:
    """The stripped caption text; raises ValueError with a short reason when it cannot be used
    (_NoCaption when there is no caption file)."""
    try:
        data = caption_path.read_bytes()
    except FileNotFoundError:
        if caption_path.is_symlink():
            raise ValueError(f"caption {caption_path.name} is a broken symbolic link "
                             f"(to {os.readlink(caption_path)})") from None
        raise _NoCaption(f"no caption file ({caption_path.name})") from None
    except OSError as e:
        raise ValueError(f"cannot read caption {caption_path.name}: {e.strerror or e}") from None
    try:
        # utf-8-sig: editors on Windows often start UTF-8 files with a byte order mark.
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {caption_path.name} is not UTF-8 text "
                         f"(byte 0x{data[e.start]:02x} at position {e.start})") from None


def _find_mask(folder: Path, media: Path, width: int, height: int, frames: int) -> Path:
    """The mask of `media` in `folder`; raises ValueError with a short reason when there is none
    or it cannot be used. A video's mask is an image (one for every frame) or a video of its
    frame count (one per frame)."""
    extensions = sorted(IMAGE_EXTENSIONS) + (sorted(VIDEO_EXTENSIONS) if is_video_file(media) else [])
    found = [p for p in (folder / f"{media.stem}{ext}" for ext in extensions) if p.is_file()]
    if not found:
        also = " or a video of its frames" if is_video_file(media) else ""
        raise ValueError(f"no mask in {folder} (an image named {media.stem}.png, .jpg, ...{also})")
    if len(found) > 1:
        raise ValueError(f"{len(found)} masks in {folder} ({', '.join(p.name for p in found)}); keep one")
    mask = found[0]
    try:
        if is_video_file(mask):
            mask_w, mask_h, mask_frames, _ = video_info(mask)
        else:
            (mask_w, mask_h), mask_frames = image_size(mask), None
    except MediaError as e:
        raise ValueError(f"mask {e}") from None
    # Cropped to the bucket like the media: the same aspect ratio keeps them aligned.
    if abs(mask_w * height - mask_h * width) > max(width, height):
        raise ValueError(f"mask {mask} is {mask_w}x{mask_h}, not of the media's aspect ratio ({width}x{height})")
    if mask_frames is not None and mask_frames != frames:
        raise ValueError(f"mask {mask} has {mask_frames} frames, the video {frames}: a mask video has one per frame")
    return mask


def _media_files(folder: Path) -> list[Path]:
    # Only the folder's own files: sub-folders, the `cache` folder among them, are not entered.
    # Symbolic links that lead nowhere are kept, to be reported.
    return sorted(p for p in folder.iterdir() if is_media_file(p) and (p.is_file() or p.is_symlink()))


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link at `path` cannot be read, or None when it leads to a file."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself); remove or fix the link"
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
    return None if path.is_file() else "symbolic link to something that is not a file"


def scan_directory(directory: ResolvedDirectory, index: int) -> ScanResult:
    """Items of one dataset directory (not recursive, so its `cache` folder is never read).

    `index` is the directory's position in the dataset, kept on each item to find its settings.
    A folder without any media file is reported as a problem naming the folder.
    """
    result = ScanResult()
    folder = Path(directory.path)
    try:
        media = _media_files(folder)
    except OSError as e:
        result.problems.append((folder, f"cannot list folder: {e.strerror or e}"))
        return result
    if not media:
        images, videos = ", ".join(sorted(IMAGE_EXTENSIONS)), ", ".join(sorted(VIDEO_EXTENSIONS))
        result.problems.append((folder, f"no media files ({images}) or videos ({videos}) in this folder"))
        return result
    missing_caption = directory.settings.missing_caption or "skip"
    for path in media:
        if path.is_symlink():
            reason = _link_problem(path)
            if reason:
                result.problems.append((path, reason))
                continue
        try:
            caption = _read_caption(path.with_suffix(CAPTION_SUFFIX))
        except _NoCaption as e:
            if missing_caption == "error":
                result.caption_errors.append((path, str(e)))
                continue
            if missing_caption == "skip":
                result.problems.append((path, str(e)))
                continue
            caption = None  # trains with an empty caption once the file itself reads
        except ValueError as e:
            result.problems.append((path, str(e)))
            continue
        try:
            if is_video_file(path):
                width, height, frames, _ = video_info(path)
            else:
                (width, height), frames = image_size(path), 1
        except MediaError as e:
            # The message starts with the path; the problem list already shows it.
            result.problems.append((path, str(e).removeprefix(f"{path}: ")))
            continue
        mask = None
        if directory.mask_path is not None:
            try:
                mask = _find_mask(directory.mask_path, path, width, height, frames)
            except ValueError as e:
                result.problems.append((path, str(e)))
                continue
        if caption is None:
            caption = ""
            result.empty_captions.append(path)
        result.items.append(Item(path, caption, width, height, index, frames, mask))
    return result


def scan_dataset(dataset: Dataset) -> ScanResult:
    """Items and problems of every directory of `dataset`, in config order."""
    result = ScanResult()
    for index, directory in enumerate(dataset.directories):
        result.extend(scan_directory(directory, index))
    return result


def format_problems(problems: list[tuple[Path, str]]) -> str:
    """One line per problem: `path: reason`."""
    return "\n".join(f"{path}: {reason}" for path, reason in problems)
