"""The dataset config (dataset TOML) as typed objects, each directory's settings resolved, and
what both config files share: reading TOML, reporting unknown keys.

Every key is documented in `examples/dataset.toml`. Loading checks keys, types, ranges and paths
and raises `ConfigError` naming the file and key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from config.diffusion_pipe import replacement_for_key, translate_dataset
from config.schema import (build, check, described, key, near_name_hint, path_is, required, resolve_path, table_rule,
                           unknown_keys)
from utils.errors import ConfigError


# A square side (512: 512x512) or [width, height].
Resolution = Union[int, tuple[int, int]]


VideoClipMode = Literal["single_beginning", "single_middle", "multiple_overlapping"]


MissingCaption = Literal["error", "empty", "skip"]


def read_toml(path: Path) -> dict:
    """Parse a TOML file, turning syntax errors and missing files into ConfigError."""
    if path_is(path, "dir"):
        raise ConfigError(f"{path}: is a folder; expected a TOML file")
    if not path_is(path, "file"):
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {_explain_toml_error(str(e), path)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 text: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None


_TOML_KEY = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*"""


def _explain_toml_error(message: str, path: Path) -> str:
    """tomllib's message, with the key or table named where it does not name it (a key set twice
    in one table: the key is read from the line the message points at)."""
    declared = re.fullmatch(r"Cannot declare \((.*)\) twice (\(at line \d+, column \d+\))", message)
    if declared:
        table = ".".join(part.strip(" '\"") for part in declared.group(1).split(",") if part.strip())
        return f"the table [{table}] is declared twice {declared.group(2)}; put all its keys under one [{table}] header"
    found = re.fullmatch(r"Cannot overwrite a value (\(at (?:line (\d+), column \d+|end of document)\))", message)
    if not found:
        return message
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        lines = lines[:int(found.group(2))] if found.group(2) else lines
    except (OSError, ValueError):
        return message
    written = re.match(rf"\s*({_TOML_KEY})\s*=", lines[-1]) if lines else None
    if not written:
        return message
    table = next((m.group(1) for line in reversed(lines[:-1])
                  if (m := re.match(rf"\s*\[\[?\s*({_TOML_KEY})\s*\]\]?\s*(#.*)?$", line))), None)
    name = ".".join(part.strip("'\"") for part in re.split(r"\s*\.\s*", written.group(1)))
    return f"'{f'{table}.{name}' if table else name}' is set twice {found.group(1)}; a key may be set only once"


@dataclass
class BucketSettings:
    """Settings that decide the shapes items are trained at; per-directory tables may override."""

    resolutions: Optional[described(list[described(Resolution, "a size like 512 or [1280, 720]")],
                                    "a list like [512] or [[1280, 720]]")] = None
    enable_ar_bucket: Optional[bool] = None
    min_ar: Optional[float] = None
    max_ar: Optional[float] = None
    num_ar_buckets: Optional[int] = None
    num_repeats: Optional[int] = None
    # Clip lengths in frames (1 = a still image or one frame of a video), and how clips are cut
    # from a video longer than its bucket.
    frame_buckets: Optional[list[int]] = None
    video_clip_mode: Optional[VideoClipMode] = None
    # What to do with a media file that has no caption file: stop ("error"), train it with an
    # empty caption ("empty"), or leave it out and list it ("skip").
    missing_caption: Optional[MissingCaption] = None
    # The probability of training a sample with the empty caption at a step (per sample and epoch).
    caption_dropout: Optional[float] = None
    # Train on shuffled orders of the comma-separated tags of each caption (data/cache.py).
    caption_shuffle_variants: Optional[int] = None
    keep_tokens: Optional[int] = None

    def validate(self, file, prefix):
        if self.caption_dropout is not None:
            check(0.0 <= self.caption_dropout <= 1.0, file, key(prefix, "caption_dropout"), "must be in [0, 1]")
        if self.caption_shuffle_variants is not None:
            check(self.caption_shuffle_variants >= 0, file, key(prefix, "caption_shuffle_variants"), "must be >= 0")
        if self.keep_tokens is not None:
            check(self.keep_tokens >= 0, file, key(prefix, "keep_tokens"), "must be >= 0")
        if self.resolutions is not None:
            check(len(self.resolutions) > 0, file, key(prefix, "resolutions"), "must list at least one resolution")
            for i, r in enumerate(self.resolutions):
                sizes = (r,) if isinstance(r, int) else r
                check(all(s > 0 for s in sizes), file, f"{key(prefix, 'resolutions')}[{i}]", f"must be positive, got {r!r}")
        if self.min_ar is not None:
            check(self.min_ar > 0, file, key(prefix, "min_ar"), "must be > 0")
        if self.max_ar is not None:
            check(self.max_ar > 0, file, key(prefix, "max_ar"), "must be > 0")
        if self.min_ar is not None and self.max_ar is not None:
            check(self.min_ar <= self.max_ar, file, key(prefix, "min_ar"), f"({self.min_ar}) must not exceed max_ar ({self.max_ar})")
        if self.num_ar_buckets is not None:
            check(self.num_ar_buckets >= 1, file, key(prefix, "num_ar_buckets"), "must be at least 1")
        if self.num_repeats is not None:
            check(self.num_repeats >= 1, file, key(prefix, "num_repeats"), "must be at least 1")
        if self.frame_buckets is not None:
            where = key(prefix, "frame_buckets")
            check(len(self.frame_buckets) > 0, file, where, "must list at least one frame count (1 for images)")
            for i, frames in enumerate(self.frame_buckets):
                check(frames >= 1, file, f"{where}[{i}]", f"must be at least 1, got {frames}")
                check(frames not in self.frame_buckets[:i], file, f"{where}[{i}]", f"repeats {frames}")

    def overridden_by(self, other: "BucketSettings") -> "BucketSettings":
        """These settings with every value that `other` sets replaced."""
        values = {f.name: getattr(other, f.name) if getattr(other, f.name) is not None else getattr(self, f.name)
                  for f in dataclasses.fields(BucketSettings)}
        return BucketSettings(**values)


BUCKET_DEFAULTS = BucketSettings(resolutions=[512], enable_ar_bucket=True, min_ar=0.5, max_ar=2.0,
                                 num_ar_buckets=7, num_repeats=1, frame_buckets=[1],
                                 video_clip_mode="single_beginning", missing_caption="skip",
                                 caption_dropout=0.0, caption_shuffle_variants=0, keep_tokens=0)


# kw_only: a required field cannot follow the defaulted fields inherited from BucketSettings.
@dataclass(kw_only=True)
class DirectoryConfig(BucketSettings):
    path: str = required()
    # A folder with a mask image per media file (same file name stem) weighting its loss.
    mask_path: Optional[str] = None


@dataclass
class DatasetConfig(BucketSettings):
    directory: list[DirectoryConfig] = field(default_factory=list)
    # Stop before training when any file cannot be used, instead of listing it and going on.
    strict: bool = False

    def validate(self, file, prefix):
        super().validate(file, prefix)
        check(len(self.directory) > 0, file, "directory", "needs at least one [[directory]] table with a 'path'")


@dataclass
class ResolvedDirectory:
    """One dataset directory with the dataset-wide defaults applied."""

    path: Path
    settings: BucketSettings
    # The table as written: says which keys the directory set itself, for error messages.
    raw: Optional[DirectoryConfig] = None
    # The folder of loss masks (data/scan.py finds each item's), or None: no masks.
    mask_path: Optional[Path] = None


@dataclass
class Dataset:
    file: Path
    directories: list[ResolvedDirectory]
    # The file as written: dataset-level keys before defaults were applied, for error messages.
    raw: Optional[DatasetConfig] = None
    # Things printed at start: translated diffusion-pipe names, defaults that differ from it.
    notes: list[str] = field(default_factory=list)

    @property
    def strict(self) -> bool:
        """Whether a file that cannot be used stops the run (the dataset's `strict` key)."""
        return bool(self.raw is not None and self.raw.strict)


def check_keys(file: Path, problems: list[tuple[str, str]], unknown: list[tuple[str, list[str]]],
               dataset_file: bool = False, top_level: frozenset = frozenset()) -> None:
    """One ConfigError listing every unknown key (with the nearest name, what to write instead of
    a diffusion-pipe key, or TOML's table rule for a top-level key written below a table header)
    and every other problem found before building: all at once."""
    lines = []
    for where, valid in unknown:
        table, _, name = where.rpartition(".")
        instead = replacement_for_key(where, dataset_file)
        if instead:
            hint = f" (diffusion-pipe's; {instead})"
        elif table and name in top_level:
            hint = f": {table_rule(table, name)}"
        else:
            hint = near_name_hint(name, valid)
        lines.append(f"unknown key '{where}'{hint}")
    lines += [f"'{where}' {message}" for where, message in problems]
    if len(lines) == 1:
        raise ConfigError(f"{file}: {lines[0]}")
    if lines:
        raise ConfigError(f"{file}: {len(lines)} keys to change:\n" + "\n".join(f"  {line}" for line in lines))


def _set_by(raw_dataset: DatasetConfig, directory: DirectoryConfig, index: int, name: str) -> str:
    """Which key of the dataset TOML gave a directory its value of `name`."""
    if getattr(directory, name) is not None:
        return f"directory[{index}].{name}"
    return name if getattr(raw_dataset, name) is not None else f"{name}, by default"


def load_dataset_config(path: Path) -> Dataset:
    """Read a dataset TOML and resolve each directory's effective settings and path."""
    path = Path(path)
    raw = read_toml(path)
    notes, problems = translate_dataset(raw)
    check_keys(path, problems, unknown_keys(DatasetConfig, raw), dataset_file=True,
               top_level=frozenset(f.name for f in dataclasses.fields(DatasetConfig)))
    cfg = build(DatasetConfig, raw, path)
    base = BUCKET_DEFAULTS.overridden_by(cfg)
    directories = []
    for i, d in enumerate(cfg.directory):
        dir_path = resolve_path(path.parent, d.path, path, f"directory[{i}].path")
        check(path_is(dir_path, "dir"), path, f"directory[{i}].path", f"is not a folder: {dir_path}")
        settings = base.overridden_by(d)
        # Each table's own pair is checked as it is built; a pair split over two tables only here.
        check(settings.min_ar <= settings.max_ar, path, _set_by(cfg, d, i, "min_ar"),
              f"gives directory[{i}] min_ar = {settings.min_ar}, above its max_ar = {settings.max_ar} "
              f"(from '{_set_by(cfg, d, i, 'max_ar')}'); min_ar must not exceed max_ar")
        mask_path = None
        if d.mask_path is not None:
            mask_path = resolve_path(path.parent, d.mask_path, path, f"directory[{i}].mask_path")
            check(path_is(mask_path, "dir"), path, f"directory[{i}].mask_path", f"is not a folder: {mask_path}")
            # There a mask would share its name with the media file: it would be the file itself.
            check(mask_path != dir_path.resolve(), path, f"directory[{i}].mask_path",
                  "is the directory's own folder; put the masks in a folder of their own (e.g. a sub-folder 'masks')")
        directories.append(ResolvedDirectory(dir_path.resolve(), settings, raw=d, mask_path=mask_path))
    if cfg.enable_ar_bucket is None and any(d.enable_ar_bucket is None for d in cfg.directory):
        notes.append("enable_ar_bucket is not set: aspect-ratio buckets are on (diffusion-pipe's default is off, "
                     "which trains every item square); set enable_ar_bucket to choose")
    return Dataset(path.resolve(), directories, raw=cfg, notes=[f"{path}: {n}" for n in notes])
