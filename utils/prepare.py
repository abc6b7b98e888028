"""From a dataset config to cached tensors: scan, bucket, report, encode what is missing."""

from __future__ import annotations

import torch

from utils.buckets import assign_buckets, format_bucket_table
from utils.cache import CacheReader, DatasetCache
from utils.config import Dataset
from utils.dataset import format_problems, scan_dataset


def prepare_dataset(dataset: Dataset, model, *, title: str, micro_batch_size: int, caching_batch_size: int,
                    regenerate: bool, rank: int, world: int, device: torch.device, log=print) -> CacheReader:
    """Scan `dataset`, print its bucket table, and return a reader over its cached tensors.

    Items that cannot be used (no caption, unreadable file, video shorter than every frame
    bucket) are listed by path, never silently dropped; the rest train.
    """
    scan = scan_dataset(dataset)
    too_short: list = []
    samples = assign_buckets(scan.items, dataset, model.size_multiple, too_short)
    if rank == 0:
        log(f"\n{title}: {dataset.file}")
        log(format_bucket_table(samples, micro_batch_size, too_short))
        skipped = scan.problems + too_short
        if skipped:
            log(f"{len(skipped)} file(s) skipped:\n{format_problems(skipped)}")
    cache = DatasetCache(model, samples)
    if regenerate and rank == 0:
        cache.remove()
    if regenerate and world > 1:
        torch.distributed.barrier()
    reader = cache.build(device, caching_batch_size, rank, world)
    if rank == 0:
        if reader.problems:
            log(f"{len(reader.problems)} file(s) could not be encoded and are skipped:\n"
                f"{format_problems(reader.problems)}")
        log(f"cache: {reader.encoded} new entries encoded, {len(reader)} samples ready")
    return reader
