"""From a dataset config to cached tensors: scan, bucket, report, encode what is missing."""

from __future__ import annotations

from pathlib import Path

from config.dataset_config import Dataset
from data.buckets import Sample, assign_buckets, format_bucket_table
from data.cache import CacheReader, DatasetCache, cache_dir, default_caching_workers, remove_caches
from data.scan import format_problems, scan_dataset
from utils.dist import Distributed
from utils.errors import DataError

# An item whose sides are less than this fraction of its bucket's is upscaled enough to blur.
_UPSCALE_NOTE_BELOW = 0.5


def prepare_dataset(dataset: Dataset, model, *, title: str, micro_batch_size: int, caching_batch_size: int,
                    regenerate: bool, place: Distributed, log=print,
                    prompts: list[str] = (), caching_workers: int | None = 0) -> CacheReader:
    """Scan `dataset`, print its bucket table, and return a reader over its cached tensors.

    Items that cannot be used (no caption, unreadable file, video shorter than every frame
    bucket, a file that fails to encode) are listed by path in one summary after caching, never
    silently dropped; the rest train. `prompts` (sample prompts) are embedded into the text cache
    too (`CacheReader.prompt_text`). `caching_workers` processes per rank read the media files
    ahead of the VAE (None: `default_caching_workers()`; 0: none). Raises DataError, the same on
    every rank, when nothing is left to train on, when a directory has missing_caption = "error"
    and a caption is missing, or when the dataset is `strict` and any file cannot be used.
    """
    scan = scan_dataset(dataset)
    too_short: list = []
    samples = assign_buckets(scan.items, dataset, model.size_multiple, too_short)
    skipped = scan.problems + too_short
    if scan.caption_errors:
        raise DataError(_summary(f"{dataset.file}: missing_caption = \"error\" and {len(scan.caption_errors)} "
                                 f"file(s) have no caption file", scan.caption_errors + skipped,
                                 "write their captions (photo.png -> photo.txt, UTF-8), or set missing_caption "
                                 "to \"skip\" (leave them out) or \"empty\" (train them uncaptioned)"))
    if dataset.strict and skipped:
        raise DataError(_summary(f"{dataset.file}: strict = true and {len(skipped)} file(s) cannot be used",
                                 skipped, "fix or remove them, or set strict = false to train on the rest"))
    if not samples:
        raise DataError(_summary(f"{dataset.file}: no usable items: nothing is left to train on", skipped,
                                 "check the [[directory]] paths, and the files listed"))
    if place.is_main:
        log(f"\n{title}: {dataset.file}")
        log(format_bucket_table(samples, micro_batch_size, too_short))
        for note in _notes(scan.empty_captions, samples):
            log(note)
        if skipped:
            log(f"note: {len(skipped)} file(s) cannot be used; they are listed once the cache is filled")
    cache = DatasetCache(model, samples, prompts)
    if regenerate:
        regenerate_caches([dataset], model, place, log=lambda *_: None)
    workers = default_caching_workers() if caching_workers is None else caching_workers
    reader = cache.build(place, caching_batch_size, log=log, workers=workers)
    # Every rank has the same problems (rank 0 broadcasts the encoding ones), so all stop together.
    problems = skipped + reader.problems
    if dataset.strict and problems:
        raise DataError(_summary(f"{dataset.file}: strict = true and {len(problems)} file(s) cannot be used",
                                 problems, "fix or remove them, or set strict = false to train on the rest"))
    if len(reader) == 0:
        raise DataError(_summary(f"{dataset.file}: no usable items: nothing is left to train on", problems,
                                 "fix the files listed"))
    if place.is_main:
        if problems:
            log(_summary(f"{title}: {len(problems)} file(s) cannot be used and are left out; "
                         f"the other {len({c.sample.item.path for c in reader.samples})} train", problems,
                         "fix them and run again to include them (strict = true stops on any of these)"))
        log(f"cache: {reader.encoded} new entries encoded, {len(reader)} samples ready")
    return reader


def regenerate_caches(datasets: list[Dataset], model, place: Distributed, log=print) -> None:
    """--regenerate_cache: delete `model`'s cache in every folder of `datasets`, each once (an
    eval dataset that reads a training folder must not delete what the training dataset just
    encoded), before any of them is prepared."""
    folders = list(dict.fromkeys(d.path for ds in datasets for d in ds.directories))
    if place.is_main:
        remove_caches(folders, model.name)
        log(f"--regenerate_cache: deleted the {model.name} cache of {len(folders)} folder(s): "
            + ", ".join(str(cache_dir(f, model.name)) for f in folders))
    place.barrier()


def cache_summary(readers: list[CacheReader], model) -> str:
    """The closing line of --cache_only: what was encoded now, and where the cache is."""
    folders = list(dict.fromkeys(c.folder for r in readers for c in r.samples))
    samples = len({(c.folder, c.latent_key, c.text_key) for r in readers for c in r.samples})
    return (f"--cache_only: the cache is complete: {sum(r.encoded for r in readers)} entries encoded now, "
            f"{samples} samples cached in {', '.join(str(cache_dir(f, model.name)) for f in folders)}; "
            f"not training (run without --cache_only to train)")


def _summary(headline: str, problems: list[tuple[Path, str]], advice: str) -> str:
    """The headline, every problem on its own indented line, and what to do."""
    lines = format_problems(problems).splitlines()
    return "\n".join([headline + ":"] + [f"  {line}" for line in lines] + [advice])


def _notes(empty_captions: list[Path], samples: list[Sample]) -> list[str]:
    notes = []
    if empty_captions:
        notes.append(f"note: {len(empty_captions)} item(s) have no caption file and train with an empty caption "
                     f"(missing_caption = \"empty\"): {_names(empty_captions)}")
    small = {}
    for s in samples:
        scale = min(s.item.width / s.bucket.width, s.item.height / s.bucket.height)
        if scale < _UPSCALE_NOTE_BELOW:
            small.setdefault(s.item.path, f"{s.item.path.name} ({s.item.width}x{s.item.height} -> "
                                          f"{s.bucket.width}x{s.bucket.height})")
    if small:
        shown = list(small.values())
        notes.append(f"note: {len(shown)} item(s) are less than half their bucket's size and are upscaled, so "
                     f"they train blurred: {', '.join(shown[:5])}" + (f" and {len(shown) - 5} more" if len(shown) > 5
                                                                       else ""))
    return notes


def _names(paths: list[Path], limit: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
