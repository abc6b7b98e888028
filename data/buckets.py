"""Buckets: the shapes items are trained at, which item goes where, and batching.

Each configured resolution is an area (a side r: r x r pixels; a pair [w, h]: w x h pixels, as in
diffusion-pipe) and gives a set of bucket shapes of about that area. Every item goes
to the bucket nearest its aspect ratio for every resolution of its directory. Its frame count
comes from the directory's `frame_buckets`: the largest one that fits the item (an image is a
one-frame video), with clips cut from longer videos by `video_clip_mode`. Only an item shorter
than every frame bucket is left out, and it is reported. Items outside the aspect-ratio range,
videos cut short and batches topped up by repetition are counted, so `format_bucket_table` can
say what was adjusted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

from config.dataset_config import BucketSettings, Dataset, DatasetConfig, Resolution
from data.scan import Item
from utils.errors import ConfigError


@dataclass(frozen=True, order=True)
class Bucket:
    """A training shape: width and height in pixels, frames (1 for images)."""

    width: int
    height: int
    frames: int = 1

    @property
    def aspect(self) -> float:
        """Width over height."""
        return self.width / self.height

    @property
    def label(self) -> str:
        """`WxHxF`, e.g. `768x512x1`."""
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass(frozen=True)
class Sample:
    """An item trained at one bucket shape, `repeats` times per epoch.

    `resolution` is the configured resolution the bucket came from; `outside_ar_range` marks an
    item whose aspect ratio lies outside the directory's [min_ar, max_ar], so more of it is cropped.
    `clip_start` is the first frame of the clip (`bucket.frames` frames long); 0 for images.
    """

    item: Item
    bucket: Bucket
    repeats: int
    resolution: Optional[Resolution] = None
    outside_ar_range: bool = False
    clip_start: int = 0
    # The probability that a training step sees this sample with the empty caption.
    caption_dropout: float = 0.0
    # Caption shuffling: this many shuffled variants of the caption (0: none), the first
    # `keep_tokens` comma-separated tags kept in place.
    caption_shuffle_variants: int = 0
    keep_tokens: int = 0


@dataclass(frozen=True)
class BucketPlan:
    """How one bucket is batched in an epoch.

    `padding` is the number of slots in the last batch filled by repeating items of the same
    bucket, so a bucket with fewer items than a batch still trains and nothing is dropped.
    """

    bucket: Bucket
    items: int
    repeated_items: int
    batches: int
    padding: int


def format_resolution(resolution: Optional[Resolution]) -> str:
    """`512` for a square resolution, `768x512` for a (width, height) one, `-` for none."""
    if resolution is None:
        return "-"
    if isinstance(resolution, int):
        return str(resolution)
    width, height = resolution
    return f"{width}x{height}"


def _round_to_multiple(value: float, multiple: int) -> int:
    return multiple * max(1, round(value / multiple))


def _aspect_ratios(settings: BucketSettings) -> list[float]:
    count = settings.num_ar_buckets
    low, high = settings.min_ar, settings.max_ar
    if count == 1:
        # A single bucket is square when the range allows it, else the middle of the range.
        return [1.0 if low <= 1.0 <= high else math.sqrt(low * high)]
    # Evenly spaced in log space, so 1:2 and 2:1 are as far from square as each other.
    step = (math.log(high) - math.log(low)) / (count - 1)
    return [math.exp(math.log(low) + i * step) for i in range(count)]


def resolution_area(resolution: Optional[Resolution]) -> int:
    """Pixels of a configured resolution: r * r for a side, w * h for a pair (0 for none)."""
    if resolution is None:
        return 0
    return resolution * resolution if isinstance(resolution, int) else resolution[0] * resolution[1]


def _shapes_for(resolution: Resolution, settings: BucketSettings, size_multiple: int) -> list[Bucket]:
    area = resolution_area(resolution)
    if not settings.enable_ar_bucket:
        side = _round_to_multiple(math.sqrt(area), size_multiple)
        return [Bucket(side, side)]
    shapes = {Bucket(_round_to_multiple(math.sqrt(area * ar), size_multiple),
                     _round_to_multiple(math.sqrt(area / ar), size_multiple))
              for ar in _aspect_ratios(settings)}
    return sorted(shapes, key=lambda b: (b.aspect, b.width))


def bucket_shapes(settings: BucketSettings, size_multiple: int) -> dict[Resolution, list[Bucket]]:
    """Bucket shapes per configured resolution, each list sorted by aspect ratio.

    A resolution r gives shapes of area about r*r, a (w, h) resolution of area about w*h, at
    `num_ar_buckets` aspect ratios spaced evenly in log space over [min_ar, max_ar] (or one square
    of that area without AR buckets), with sides rounded to multiples of `size_multiple`;
    duplicates after rounding are removed.
    """
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be at least 1, got {size_multiple}")
    return {resolution: _shapes_for(resolution, settings, size_multiple)
            for resolution in settings.resolutions}


# ----------------------------------------------------------------------------------------------
# Checking resolutions against what the model takes


def _nearest_multiples(value: int, multiple: int) -> str:
    lower = max(multiple, value // multiple * multiple)
    upper = lower + multiple if lower < value else lower
    return str(lower) if lower == upper else f"{lower} or {upper}"


def _check_resolution(resolution: Resolution, size_multiple: int, model_name: str,
                      file, where: str, is_default: bool = False) -> None:
    # A pair is an area: its sides are no bucket's, and the buckets are rounded anyway.
    sides = [("", resolution)] if isinstance(resolution, int) else []
    if not isinstance(resolution, int) and min(resolution) <= 0:
        raise ConfigError(f"{file}: '{where}' must be positive, got {list(resolution)!r}")
    # Shown as written in TOML: a (w, h) pair is a list there.
    shown = resolution if isinstance(resolution, int) else list(resolution)
    value_text = f"is not set, and the default is {shown!r}" if is_default else f"is {shown!r}"
    for side_name, value in sides:
        if value <= 0:
            raise ConfigError(f"{file}: '{where}' must be positive, got {shown!r}")
        if value % size_multiple:
            raise ConfigError(
                f"{file}: '{where}' {value_text}: the {side_name}{value} is not a multiple of "
                f"{size_multiple}; {model_name} takes multiples of {size_multiple} "
                f"(nearest: {_nearest_multiples(value, size_multiple)})")


def _resolution_source(dataset: Dataset, directory_index: int) -> tuple[str, Optional[list]]:
    """The key a directory's resolutions were set by, and that list as written (None: default)."""
    directory = dataset.directories[directory_index]
    if directory.raw is not None and directory.raw.resolutions is not None:
        return f"directory[{directory_index}].resolutions", directory.raw.resolutions
    if dataset.raw is not None:
        return "resolutions", dataset.raw.resolutions
    # Built in code without the raw config: the directory's own settings are all there is.
    return f"directory[{directory_index}].resolutions", directory.settings.resolutions


def check_resolutions(dataset: Dataset, size_multiple: int, model_name: str) -> None:
    """Raise ConfigError naming the dataset file and key of the first side resolution that is not a
    positive multiple of `size_multiple` (the model's patch/latent granularity); a (w, h) pair is an
    area and only needs to be positive."""
    raw: Optional[DatasetConfig] = dataset.raw
    # Dataset-level values are checked even where every directory overrides them: they are
    # still wrong in the file.
    if raw is not None and raw.resolutions is not None:
        for i, resolution in enumerate(raw.resolutions):
            _check_resolution(resolution, size_multiple, model_name, dataset.file, f"resolutions[{i}]")
    for index, directory in enumerate(dataset.directories):
        where, written = _resolution_source(dataset, index)
        if written is None:
            for resolution in directory.settings.resolutions:
                _check_resolution(resolution, size_multiple, model_name, dataset.file, where,
                                  is_default=True)
            continue
        for i, resolution in enumerate(written):
            _check_resolution(resolution, size_multiple, model_name, dataset.file, f"{where}[{i}]")


def _nearest_frame_counts(value: int, frame_multiple: int) -> str:
    lower = (value - 1) // frame_multiple * frame_multiple + 1
    return f"{lower} or {lower + frame_multiple}"


def _check_frame_bucket(frames: int, frame_multiple: int, model_name: str, file, where: str) -> None:
    if frames < 1:
        raise ConfigError(f"{file}: '{where}' must be at least 1, got {frames}")
    if frame_multiple == 0:
        if frames != 1:
            raise ConfigError(f"{file}: '{where}' is {frames}: {model_name} trains on images only "
                              f"(1 frame); leave frame_buckets unset or set it to [1]")
    elif (frames - 1) % frame_multiple:
        raise ConfigError(f"{file}: '{where}' is {frames}: {model_name} takes {frame_multiple}k+1 frames "
                          f"(nearest: {_nearest_frame_counts(frames, frame_multiple)})")


def check_frame_buckets(dataset: Dataset, frame_multiple: int, model_name: str) -> None:
    """Raise ConfigError naming the dataset file and key of the first frame bucket the model cannot
    take: frames must be `frame_multiple`*k+1, and 0 means images only (every bucket must be 1)."""
    raw: Optional[DatasetConfig] = dataset.raw
    if raw is not None and raw.frame_buckets is not None:
        for i, frames in enumerate(raw.frame_buckets):
            _check_frame_bucket(frames, frame_multiple, model_name, dataset.file, f"frame_buckets[{i}]")
    for index, directory in enumerate(dataset.directories):
        if directory.raw is not None and directory.raw.frame_buckets is not None:
            written = directory.raw.frame_buckets
        elif raw is not None:
            # The dataset-level list (checked above) or the default [1], which every model takes.
            continue
        else:
            # Built in code without the raw config: the directory's own settings are all there is.
            written = directory.settings.frame_buckets or [1]
        for i, frames in enumerate(written):
            _check_frame_bucket(frames, frame_multiple, model_name, dataset.file,
                                f"directory[{index}].frame_buckets[{i}]")


# ----------------------------------------------------------------------------------------------
# Frame buckets and clips


def frame_bucket_for(frames: int, frame_buckets: Iterable[int]) -> Optional[int]:
    """The largest frame bucket that is <= `frames` (an item's frame count), or None if the
    item is shorter than every bucket."""
    fitting = [b for b in frame_buckets if b <= frames]
    return max(fitting) if fitting else None


def clip_starts(video_frames: int, clip_frames: int, mode: str) -> list[int]:
    """First frame of each clip of `clip_frames` frames cut from a video of `video_frames`.

    single_beginning: one clip from frame 0. single_middle: one clip centred in the video (an odd
    spare frame goes after it). multiple_overlapping: the fewest clips that cover the whole
    video, evenly spaced from the first frame to the last, overlapping as needed.
    """
    if not 1 <= clip_frames <= video_frames:
        raise ValueError(f"a {clip_frames}-frame clip does not fit a {video_frames}-frame video")
    spare = video_frames - clip_frames
    if mode == "single_beginning":
        return [0]
    if mode == "single_middle":
        return [spare // 2]
    if mode == "multiple_overlapping":
        count = -(-video_frames // clip_frames)
        if count == 1:
            return [0]
        # Steps of spare/(count-1) <= clip_frames (as count*clip_frames >= video_frames), rounded
        # down: no gap between clips, and the last one ends on the last frame.
        return [i * spare // (count - 1) for i in range(count)]
    raise ValueError(f"unknown video_clip_mode {mode!r}")


def _too_short_reason(item: Item, frame_buckets: list[int]) -> str:
    shown = sorted(frame_buckets)
    if item.frames == 1 and not item.is_video:
        return f"an image is one frame, and frame_buckets {shown} has no 1 (add 1 to train on images)"
    return (f"video has {item.frames} frame(s), fewer than the smallest frame bucket ({shown[0]}) of "
            f"frame_buckets {shown}; add 1 to train on its first frame, or a shorter bucket")


# ----------------------------------------------------------------------------------------------
# Assigning items to buckets and planning batches


def nearest_bucket(aspect: float, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest `aspect` in log space (first one on a tie)."""
    log_aspect = math.log(aspect)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - log_aspect))


def bucket_for(aspect: float, resolution: Resolution, settings: BucketSettings, size_multiple: int) -> Bucket:
    """The bucket of an item of this aspect ratio at `resolution`: the configured aspect ratio
    nearest it in log space (first one on a tie), as diffusion-pipe picks, then that ratio's
    rounded shape. Picking by the configured ratio, not by the rounded shape's, keeps the choice
    the same at every size multiple."""
    ratios = _aspect_ratios(settings) if settings.enable_ar_bucket else [1.0]
    ratio = min(ratios, key=lambda r: abs(math.log(r) - math.log(aspect)))
    area = resolution_area(resolution)
    return Bucket(_round_to_multiple(math.sqrt(area * ratio), size_multiple),
                  _round_to_multiple(math.sqrt(area / ratio), size_multiple))


def assign_buckets(items: Iterable[Item], dataset: Dataset, size_multiple: int,
                   too_short: Optional[list[tuple[Path, str]]] = None) -> list[Sample]:
    """Samples of every item: per resolution of its directory, in the bucket nearest its aspect
    ratio, one per clip.

    The frame count is the largest of the directory's `frame_buckets` that fits the item; a
    video longer than that gives the clips `video_clip_mode` cuts. A video that only fits the
    1-frame bucket trains on its first frame. An item shorter than every frame bucket gets no
    sample and is appended to `too_short` as (path, reason), so it can be reported.
    Items outside their directory's [min_ar, max_ar] still go to the nearest bucket (and are
    cropped more); their samples have `outside_ar_range` set so they can be counted.
    """
    shapes_per_directory = [bucket_shapes(d.settings, size_multiple) for d in dataset.directories]
    samples = []
    for item in items:
        settings = dataset.directories[item.directory_index].settings
        frame_buckets = settings.frame_buckets or [1]
        frames = frame_bucket_for(item.frames, frame_buckets)
        if frames is None:
            if too_short is not None:
                too_short.append((item.path, _too_short_reason(item, frame_buckets)))
            continue
        # A single frame is a still: more of them would repeat the video as near-duplicate images.
        starts = [0] if frames == 1 else clip_starts(item.frames, frames,
                                                      settings.video_clip_mode or "single_beginning")
        aspect = item.width / item.height
        # Without AR buckets every shape is fixed, so there is no range to be outside of.
        outside = bool(settings.enable_ar_bucket) and not (settings.min_ar <= aspect <= settings.max_ar)
        for resolution, buckets in shapes_per_directory[item.directory_index].items():
            bucket = replace(bucket_for(aspect, resolution, settings, size_multiple), frames=frames)
            for start in starts:
                samples.append(Sample(item, bucket, settings.num_repeats, resolution, outside, start,
                                      settings.caption_dropout or 0.0, settings.caption_shuffle_variants or 0,
                                      settings.keep_tokens or 0))
    return samples


def plan_batches(samples: Iterable[Sample], micro_batch_size: int) -> dict[Bucket, BucketPlan]:
    """Per bucket (sorted): items, items times repeats, batches and padding slots per epoch."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    items: dict[Bucket, int] = defaultdict(int)
    repeated: dict[Bucket, int] = defaultdict(int)
    for sample in samples:
        items[sample.bucket] += 1
        repeated[sample.bucket] += sample.repeats
    plans = {}
    for bucket in sorted(items):
        batches = math.ceil(repeated[bucket] / micro_batch_size)
        plans[bucket] = BucketPlan(bucket, items[bucket], repeated[bucket], batches,
                                   batches * micro_batch_size - repeated[bucket])
    return plans


# ----------------------------------------------------------------------------------------------
# Report


def _describe_range(values: Iterable[int]) -> str:
    values = sorted(set(values))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    # Text columns read left-aligned, numbers right-aligned.
    def line(row):
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]


def _names(paths: Sequence[Path], limit: int = 3) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _too_short_note(too_short: Sequence[tuple[Path, str]]) -> list[str]:
    if not too_short:
        return []
    return [f"note: {len(too_short)} file(s) are shorter than every frame bucket of their directory "
            f"and are skipped ({_names([p for p, _ in too_short])}): see the skipped files for why"]


def format_bucket_table(samples: list[Sample], micro_batch_size: int,
                        too_short: Sequence[tuple[Path, str]] = ()) -> str:
    """A table of buckets (configured resolution, shape, aspect, frames, items, [clips,] repeats,
    samples, batches, padding) with totals and notes on everything that was adjusted.

    `too_short` is what `assign_buckets` left out for being shorter than every frame bucket.
    A 'clips' column appears when a bucket holds several clips of one video
    (multiple_overlapping): 'items' then counts files and 'clips' counts samples.
    """
    if not samples:
        return "\n".join(["no samples: the dataset has no usable items"] + _too_short_note(too_short))
    plans = plan_batches(samples, micro_batch_size)
    by_bucket: dict[Bucket, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_bucket[sample.bucket].append(sample)
    clips: dict[tuple[Path, Optional[Resolution]], int] = defaultdict(int)
    for sample in samples:
        clips[(sample.item.path, sample.resolution)] += 1
    item_resolutions = len(clips)
    # Some item gives more than one sample per resolution: it was cut into several clips.
    several_clips = item_resolutions < len(samples)

    # Rows grouped by configured resolution (smallest first), then by aspect ratio.
    def row_order(bucket: Bucket):
        return (min(resolution_area(s.resolution) for s in by_bucket[bucket]), bucket.aspect, bucket)

    header = ["resolution", "bucket", "aspect", "frames", "items", "repeats", "samples", "batches", "padded"]
    if several_clips:
        header.insert(5, "clips")
    rows = []
    for bucket in sorted(plans, key=row_order):
        plan, members = plans[bucket], by_bucket[bucket]
        resolutions = sorted({s.resolution for s in members}, key=lambda r: (resolution_area(r), str(r)))
        resolutions = [format_resolution(r) for r in resolutions]
        counts = [str(len({s.item.path for s in members})), str(plan.items)] if several_clips else [str(plan.items)]
        rows.append([", ".join(resolutions), f"{bucket.width}x{bucket.height}", f"{bucket.aspect:.2f}",
                     str(bucket.frames), *counts, _describe_range(s.repeats for s in members),
                     str(plan.repeated_items), str(plan.batches), str(plan.padding)])
    lines = _table(header, rows)

    total_samples = sum(p.repeated_items for p in plans.values())
    total_batches = sum(p.batches for p in plans.values())
    distinct_items = len({s.item.path for s in samples})
    videos = {s.item.path for s in samples if s.item.is_video}
    items_text = f"{distinct_items} items" + (f" ({len(videos)} videos)" if videos else "")
    pairs_text = (f"{len(samples)} clips of {item_resolutions} item-resolution pairs" if several_clips
                  else f"{len(samples)} item-resolution pairs")
    lines.append("")
    lines.append(f"total: {items_text}, {pairs_text} in {len(plans)} buckets, {total_samples} samples "
                 f"per epoch in {total_batches} batches of {micro_batch_size}")

    outside = {s.item.path for s in samples if s.outside_ar_range}
    if outside:
        lines.append(f"note: {len(outside)} item(s) have an aspect ratio outside their directory's "
                     f"[min_ar, max_ar]; they go to the nearest bucket and more of them is cropped")
    if several_clips:
        cut = {path for (path, _), count in clips.items() if count > 1}
        lines.append(f"note: video_clip_mode = multiple_overlapping cut {len(cut)} video(s) into several "
                     f"clips each; every clip is a sample of its own, cached and trained separately")
    first_frame = sorted({s.item.path for s in samples if s.item.frames > 1 and s.bucket.frames == 1})
    if first_frame:
        lines.append(f"note: {len(first_frame)} video(s) are shorter than every frame bucket above 1 of "
                     f"their directory (or it has none) and train on their first frame only "
                     f"({_names(first_frame)})")
    lines += _too_short_note(too_short)
    padded = [p for p in plans.values() if p.padding]
    if padded:
        slots = sum(p.padding for p in padded)
        lines.append(f"note: {slots} batch slot(s) in {len(padded)} bucket(s) are filled by repeating "
                     f"items of the same bucket, so no item is dropped (see 'padded')")
    return "\n".join(lines)
