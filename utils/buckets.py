"""Aspect-ratio buckets: the shapes items are trained at, which item goes where, and batching.

Each configured resolution gives a set of bucket shapes of about the same area. Every item goes
to the bucket nearest its aspect ratio for every resolution of its directory; no item is ever
dropped. Items outside the aspect-ratio range and batches topped up by repetition are counted,
so `format_bucket_table` can say what was adjusted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Iterable, Optional

from utils.config import BucketSettings, Dataset, DatasetConfig, Resolution
from utils.dataset import Item
from utils.schema import ConfigError


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
    """

    item: Item
    bucket: Bucket
    repeats: int
    resolution: Optional[Resolution] = None
    outside_ar_range: bool = False


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


def _shapes_for(resolution: Resolution, settings: BucketSettings, size_multiple: int) -> list[Bucket]:
    if not isinstance(resolution, int):
        width, height = resolution
        return [Bucket(width, height)]
    if not settings.enable_ar_bucket:
        return [Bucket(resolution, resolution)]
    area = resolution * resolution
    shapes = {Bucket(_round_to_multiple(math.sqrt(area * ar), size_multiple),
                     _round_to_multiple(math.sqrt(area / ar), size_multiple))
              for ar in _aspect_ratios(settings)}
    return sorted(shapes, key=lambda b: (b.aspect, b.width))


def bucket_shapes(settings: BucketSettings, size_multiple: int) -> dict[Resolution, list[Bucket]]:
    """Bucket shapes per configured resolution, each list sorted by aspect ratio.

    An int resolution r gives shapes of area about r*r at `num_ar_buckets` aspect ratios spaced
    evenly in log space over [min_ar, max_ar] (or just r x r without AR buckets), with sides
    rounded to multiples of `size_multiple`; duplicates after rounding are removed. A (w, h)
    resolution gives exactly that shape.
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
    sides = [("", resolution)] if isinstance(resolution, int) else \
        [("width ", resolution[0]), ("height ", resolution[1])]
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
    """Raise ConfigError naming the dataset file and key of the first resolution that is not a
    positive multiple of `size_multiple` (the model's patch/latent granularity)."""
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


# ----------------------------------------------------------------------------------------------
# Assigning items to buckets and planning batches


def nearest_bucket(aspect: float, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest `aspect` in log space (first one on a tie)."""
    log_aspect = math.log(aspect)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - log_aspect))


def assign_buckets(items: Iterable[Item], dataset: Dataset, size_multiple: int) -> list[Sample]:
    """One sample per item per resolution of its directory, in the bucket nearest its aspect ratio.

    Items outside their directory's [min_ar, max_ar] still go to the nearest bucket (and are
    cropped more); their samples have `outside_ar_range` set so they can be counted.
    """
    shapes_per_directory = [bucket_shapes(d.settings, size_multiple) for d in dataset.directories]
    samples = []
    for item in items:
        settings = dataset.directories[item.directory_index].settings
        aspect = item.width / item.height
        # Without AR buckets every shape is fixed, so there is no range to be outside of.
        outside = bool(settings.enable_ar_bucket) and not (settings.min_ar <= aspect <= settings.max_ar)
        for resolution, buckets in shapes_per_directory[item.directory_index].items():
            # Video items keep their frame count; the spatial shape comes from the bucket list.
            bucket = replace(nearest_bucket(aspect, buckets), frames=item.frames)
            samples.append(Sample(item, bucket, settings.num_repeats, resolution, outside))
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


def format_bucket_table(samples: list[Sample], micro_batch_size: int) -> str:
    """A table of buckets (configured resolution, shape, aspect, frames, items, repeats,
    samples, batches, padding) with totals and notes on everything that was adjusted."""
    if not samples:
        return "no samples: the dataset has no usable items"
    plans = plan_batches(samples, micro_batch_size)
    by_bucket: dict[Bucket, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_bucket[sample.bucket].append(sample)

    def resolution_area(resolution: Optional[Resolution]) -> int:
        if resolution is None:
            return 0
        return resolution * resolution if isinstance(resolution, int) else resolution[0] * resolution[1]

    # Rows grouped by configured resolution (smallest first), then by aspect ratio.
    def row_order(bucket: Bucket):
        return (min(resolution_area(s.resolution) for s in by_bucket[bucket]), bucket.aspect, bucket)

    header = ["resolution", "bucket", "aspect", "frames", "items", "repeats", "samples", "batches", "padded"]
    rows = []
    for bucket in sorted(plans, key=row_order):
        plan, members = plans[bucket], by_bucket[bucket]
        resolutions = sorted({s.resolution for s in members}, key=lambda r: (resolution_area(r), str(r)))
        resolutions = [format_resolution(r) for r in resolutions]
        rows.append([", ".join(resolutions), f"{bucket.width}x{bucket.height}", f"{bucket.aspect:.2f}",
                     str(bucket.frames), str(plan.items), _describe_range(s.repeats for s in members),
                     str(plan.repeated_items), str(plan.batches), str(plan.padding)])
    lines = _table(header, rows)

    total_samples = sum(p.repeated_items for p in plans.values())
    total_batches = sum(p.batches for p in plans.values())
    distinct_items = len({s.item.path for s in samples})
    lines.append("")
    lines.append(f"total: {distinct_items} items, {len(samples)} item-resolution pairs in "
                 f"{len(plans)} buckets, {total_samples} samples per epoch in {total_batches} "
                 f"batches of {micro_batch_size}")

    outside = {s.item.path for s in samples if s.outside_ar_range}
    if outside:
        lines.append(f"note: {len(outside)} item(s) have an aspect ratio outside their directory's "
                     f"[min_ar, max_ar]; they go to the nearest bucket and more of them is cropped")
    padded = [p for p in plans.values() if p.padding]
    if padded:
        slots = sum(p.padding for p in padded)
        lines.append(f"note: {slots} batch slot(s) in {len(padded)} bucket(s) are filled by repeating "
                     f"items of the same bucket, so no item is dropped (see 'padded')")
    return "\n".join(lines)
